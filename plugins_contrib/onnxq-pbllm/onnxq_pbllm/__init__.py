"""onnxq-pbllm: partially binarized weight MatMuls (PB-LLM, Shang et al., arXiv 2310.00034), as an accuracy emulation.

``-p pbllm`` keeps a salient fraction of each MatMul weight at 8 bits and binarizes the rest per
output channel (``α·sign(w − μ) + μ``), with GPTQ-style error compensation from the calibration
inputs (:mod:`onnxq_pbllm.binarize`), and writes the weight as standard ONNX: two int8
DequantizeLinear nodes and a per-channel offset added before the MatMul (:mod:`onnxq_pbllm.rewrite`).
ONNX Runtime runs that in float: the accuracy is real, the speed and size of 1-bit weights need a
custom kernel.

Alone, the method is weight-only (activations stay float, as in the paper), and the weights of
other layers (Conv, Gemm) get onnxq's per-channel int8. After a calibrator (``-p minmax -p pbllm``)
the activations get that calibrator's int8 ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import onnx

from onnxq.calib.statistics import Reducer, StatRequest
from onnxq.errors import OnnxqError
from onnxq.hookspecs import hookimpl
from onnxq.method import QuantMethod, RunContext, set_weight_qparams
from onnxq.options import option
from onnxq_pbllm.binarize import PartialBinary, partial_binarize, rtn
from onnxq_pbllm.rewrite import Target, partially_binarized, targets

__all__ = ["InputGram", "PbLlm", "PbLlmOptions", "PartialBinary", "partial_binarize", "rtn"]


@dataclass(frozen=True)
class InputGram(Reducer):
    """``XᵀX`` of a MatMul input over every token (last axis = channels), summed in float64."""

    kind: ClassVar[str] = "pbllm_input_gram"
    cacheable: ClassVar[bool] = False

    def start(self) -> Any:
        return None

    def update(self, acc, values, stats):
        x = np.asarray(values, np.float64)
        x = x.reshape(-1, x.shape[-1])
        g = x.T @ x
        return g if acc is None else acc + g

    def finish(self, acc) -> np.ndarray:
        if acc is None:
            raise ValueError("no calibration tokens reached this MatMul")
        return acc


@dataclass(frozen=True)
class PbLlmOptions:
    salient: float = option(0.1, "fraction of each weight kept at 8 bits (exactly round(fraction x size) weights); the rest is binarized")
    salience: Literal["magnitude", "hessian"] = option("hessian", "which weights are salient: largest |w|, or largest w^2 / [H^-1]_kk^2")
    compensate: bool = option(True, "GPTQ-style error compensation from the calibration inputs")
    damp: float = option(0.01, "Hessian damping, a fraction of its mean diagonal")

    def validate(self) -> None:
        if not 0 <= self.salient <= 1:
            raise ValueError("salient must be in [0, 1]")
        if not 0 <= self.damp < 10:
            raise ValueError("damp must be in [0, 10)")


class PbLlm(QuantMethod):
    """Partial binarization of weight MatMuls, written as standard ONNX (ONNX Runtime targets)."""

    name = "pbllm"
    summary = "PB-LLM: weight MatMuls partially binarized (salient fraction at 8 bits, GPTQ compensation); accuracy emulation"
    Options = PbLlmOptions
    replaces_default_calibrator = True
    needs_data = True

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._targets: list[Target] = []

    def float_rewrite(self, ctx: RunContext) -> onnx.ModelProto | None:
        # the earliest step: refuse targets whose rules reject a weight computed from two DQs
        if ctx.profile.weight_only or not ctx.profile.name.startswith("ort"):
            raise OnnxqError(f"pbllm writes each weight as two DequantizeLinear nodes and an offset, which target "
                             f"'{ctx.profile.name}' does not run; use --target ort (8-bit)")
        return None

    def declare_statistics(self, ctx: RunContext) -> list[StatRequest]:
        self._targets = targets(ctx.model, ctx.plan)
        grams = {t.input: StatRequest(t.input, InputGram()) for t in self._targets} if self.options.compensate or self.options.salience == "hessian" else {}
        return super().declare_statistics(ctx) + list(grams.values())

    def _drop_sites(self, ctx: RunContext, activations: bool) -> None:
        plan = ctx.plan
        for t in self._targets:
            plan.weights.pop(t.weight, None)
        if activations:  # weight-only: no activation gets Q/DQ at all
            plan.activations.clear()
            plan.share_groups.clear()

    def choose_qparams(self, ctx: RunContext) -> None:
        """Called only when no calibrator is selected: weight-only, activations left float."""
        self._drop_sites(ctx, activations=True)
        set_weight_qparams(ctx)

    def refine(self, ctx: RunContext) -> None:
        self._drop_sites(ctx, activations=False)

    def quantized_rewrite(self, ctx: RunContext) -> onnx.ModelProto | None:
        if not self._targets:
            ctx.report[self.name] = {"layers": {}, "note": "no MatMul with a constant 2-D weight"}
            return None
        o = self.options
        results, layers = {}, {}
        for t in self._targets:
            w = np.asarray(ctx.weight(t.weight), np.float32)
            req = StatRequest(t.input, InputGram())
            h = ctx.stats[req] if req in ctx.stats else None
            pb = partial_binarize(w, h, o.salient, o.salience, o.compensate, o.damp)
            results[t.node] = pb
            deq = pb.dequantized()
            err = float(np.linalg.norm(deq - w) / (np.linalg.norm(w) + 1e-30))
            if h is not None:
                d = deq.astype(np.float64) - w
                err = float(np.sqrt(np.sum(d * (h @ d)) / max(float(np.sum(w * (h @ w))), 1e-30)))
            layers[t.node] = {"shape": list(w.shape), "salient": int(pb.mask.sum()), "relative_output_error": err}
        total = sum(v["shape"][0] * v["shape"][1] for v in layers.values())
        salient = sum(v["salient"] for v in layers.values())
        ctx.report[self.name] = {"salient_fraction": salient / total, "bits_per_weight": 8 * salient / total + (total - salient) / total,
                                 "layers": layers}
        return partially_binarized(ctx.model, results, {t.node: t for t in self._targets})


@hookimpl
def register_methods(register) -> None:
    register(PbLlm)
