"""``cfws``: coarse & fine weight splitting for re-parameterized networks (arXiv 2312.10588; docs/methods.md: CFWS).

RepVGG-style networks fold their 1×1 and identity branches onto the centre of one 3×3 kernel at
export, so each output channel's max-abs step is set by a few huge centre taps and the other
eight taps get only a handful of levels. CFWS splits every such conv, as a float rewrite the host
checks, into ``Add(Conv3x3(x̂, W_fine), Conv1x1(x̂, W_coarse, b))`` (``onnxq.graph.splitting``):

* the coarse part (the centre, rounded onto its own per-channel grid) is quantized with exactly
  that grid, so it is represented without error;
* the fine part (off-centre taps plus the coarse rounding residual) gets its own per-channel
  min-max step, typically many times smaller than the merged kernel's.

Both convs read one shared quantized input; their sum is quantized once downstream (``trt``: the
next layer's input; ``ort``: ONNX Runtime needs each conv's output quantized to run QLinearConv,
so there each branch output and the sum get a Q/DQ pair). Activation steps come from
``trt-entropy`` (TensorRT's KL search, guarded by the expected error: docs/methods.md, Baseline
calibrators) by default, or any other calibrator (``-o calibrator mse``). The "improved KL" of
docs/methods.md: CFWS (the masked divergence ``kl=cfws``, provisional until the paper's §3 is read) is
``-o kl cfws``: it is not the default because it measured clearly worse on the RepVGG fixture
(docs/methods.md: CFWS).

Compose with EasyQuant (``-p cfws -p easyquant``): the split happens first, cfws sets the initial
scales, EasyQuant then searches the split graph (both convs of a split are ordinary layers to it).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx

from onnxq.errors import OptionError
from onnxq.graph import edit
from onnxq.graph.model_io import new_initializer, tensor_array
from onnxq.graph.targets import SCALE_PRESERVING_OPS
from onnxq.graph.splitting import SplitConv, find_rep_convs, split_convs
from onnxq.hookspecs import hookimpl
from onnxq.method import QuantMethod, RunContext, set_activation_ranges
from onnxq.options import option, parse_options
from onnxq.qparams import QParams, container_for, int_range, per_channel_absmax


@dataclass(frozen=True)
class CfwsOptions:
    """Options of CFWS (defaults: docs/methods.md: CFWS)."""

    tau: float = option(1.5, "split a 3x3 conv (pads 1, dilation 1) when max|centre| / max|off-centre| >= tau")
    include: tuple[str, ...] = option((), "node-name globs of 3x3 convs to split whatever their ratio (comma-separated)")
    exclude: tuple[str, ...] = option((), "node-name globs of convs never to split (wins over include)")
    per_channel_coarse: bool = option(True, "coarse (centre) grid per output channel; false: one step for the whole centre")
    calibrator: str = option("trt-entropy", "calibrator for the activation steps (any calibrating method)")
    kl: Literal["trt", "cfws", "smoothed"] = option("trt", "divergence when calibrator is trt-entropy (where: kl_scope): trt; cfws = the masked 'improved KL' of methods.md 3.4 (provisional, measured worse: docs/methods.md); smoothed")
    kl_scope: Literal["split", "all"] = option("split", "split: kl only on the tensors carrying split convs' summed outputs (the authors' code KL-calibrates its rep convs), trt KL elsewhere; all: kl on every activation")
    bias_bits: Literal[0, 16] = option(0, "0: biases stay float; 16: simulate the paper's 16-bit per-tensor bias on split convs")

    def validate(self) -> None:
        if not self.tau > 0:
            raise ValueError("tau must be positive")


class Cfws(QuantMethod):
    """Split re-parameterized 3x3 convs into an exact coarse centre part and a fine part; KL activation steps."""

    name = "cfws"
    summary = "CFWS: split re-parameterized (RepVGG) 3x3 convs into an exact coarse centre + a fine part; KL activations (-o kl cfws: improved KL)"
    Options = CfwsOptions
    calibrates = True
    # after another calibrator (-p trt-entropy -p cfws) its ranges stay; refine still puts the coarse weights on their grid
    follows_calibrator = True
    calibrator_option = "calibrator"

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.splits: list[SplitConv] = []
        self._merged: dict[str, np.ndarray] = {}

    # -- float rewrite ---------------------------------------------------------------------
    def float_rewrite(self, ctx: RunContext) -> onnx.ModelProto | None:
        from onnxq.graph.prepare import infer_shapes

        profile = ctx.profile
        if getattr(profile, "weight_only", False):
            raise OptionError("cfws quantizes weights and activations (--bits 8 or 7), not 4-bit weight-only")
        o = self.options
        quantized = [l.node for l in ctx.plan.layers if l.weight is not None and l.weight in ctx.plan.weights]
        decisions = find_rep_convs(ctx.model, o.tau, o.include, o.exclude, quantized)
        for pattern in o.include:
            if not any(fnmatch.fnmatchcase(d.node, pattern) for d in decisions):
                raise OptionError(f"cfws: include pattern '{pattern}' matches no Conv with a constant weight")
        qmax = self._qmax(ctx)
        per_channel = o.per_channel_coarse and profile.weight_per_channel
        model, self.splits = split_convs(ctx.model, decisions, qmax, per_channel)
        inits = {t.name: t for t in ctx.model.graph.initializer}
        self._merged = {d.node: tensor_array(inits[d.weight]) for d in decisions if d.split}
        by_node = {s.node: s for s in self.splits}
        ctx.report[self.name] = {
            "tau": o.tau,
            "activation_calibrator": self._calibrator_label(),
            "bias": "float" if o.bias_bits == 0 else f"{o.bias_bits}-bit per-tensor (simulated)",
            "split": [
                {"node": d.node, "ratio": _finite(d.ratio), "reason": d.reason, "coarse_form": by_node[d.node].coarse_form,
                 "fine_node": by_node[d.node].fine_node, "coarse_node": by_node[d.node].coarse_node}
                for d in decisions if d.split
            ],
            "not_split": [{"node": d.node, "ratio": _finite(d.ratio), "reason": d.reason} for d in decisions if not d.split],
        }
        split = [d for d in decisions if d.split]
        lines = [f"split {len(split)} of {len(decisions)} convs with a constant weight (tau {o.tau:g}); activations: {self._calibrator_label()}"]
        lines += [f"split {d.node} ({d.reason})" for d in split]
        lines += [f"not split {d.node} ({d.reason})" for d in decisions if not d.split]
        ctx.report[self.name]["summary"] = lines
        if not self.splits:
            # said as a warning, not only in the summary: on a net without RepVGG's merged kernels the model is the
            # activation calibrator's alone (five trained CNNs: byte for byte trt-entropy's)
            ctx.report[self.name]["changed_nothing"] = (
                f"no 3x3 conv's centre tap reaches tau ({o.tau:g}) times its off-centre taps, so no conv was split (a RepVGG "
                f"re-parameterized kernel has such a centre); the activations are calibrated with {self._calibrator_label()}")
            return None
        return infer_shapes(model)[0]

    # -- statistics and qparams ------------------------------------------------------------
    def _calibrator(self) -> QuantMethod:
        from onnxq.host import get_host

        name = self.options.calibrator
        cls = get_host().method(name)
        if not cls.calibrates or cls is Cfws or cls.name == self.name:
            raise OptionError(f"cfws: calibrator '{name}' is not a calibrating method")
        if cls.name == "trt-entropy":
            return cls(parse_options(cls.Options, {"kl": self.options.kl}, "method 'trt-entropy'"))
        return cls()

    def _calibrator_label(self) -> str:
        o = self.options
        if o.calibrator == "trt-entropy":
            where = " on split-conv outputs, kl=trt elsewhere" if o.kl_scope == "split" and o.kl != "trt" else ""
            return f"trt-entropy (error-guarded) kl={o.kl}{where}" + (" (improved KL, provisional: docs/methods.md: CFWS)" if o.kl == "cfws" else "")
        return o.calibrator

    def declare_statistics(self, ctx: RunContext):
        return self._calibrator().declare_statistics(ctx)

    def choose_qparams(self, ctx: RunContext) -> None:
        cal = self._calibrator()
        o = self.options
        if o.calibrator == "trt-entropy" and o.kl_scope == "split" and o.kl != "trt":
            # the chosen divergence on the outputs of split convs, TensorRT's own everywhere else
            plain = type(cal)(dataclasses.replace(cal.options, kl="trt"))
            rep = self.split_outputs(ctx)
            names = {id(ctx.stats[t]): t for t in ctx.plan.activations}

            def threshold(stats):
                return (cal if names.get(id(stats)) in rep else plain).threshold(stats, ctx)

            set_activation_ranges(ctx, threshold)
            ctx.report.setdefault(self.name, {})["improved_kl_sites"] = sorted(t for t in ctx.plan.activations if t in rep)
        else:
            cal.choose_qparams(ctx)
        self._set_coarse_qparams(ctx, force=True)

    def split_outputs(self, ctx: RunContext) -> set[str]:
        """Tensors that carry a split conv's summed output: the sum, the sum after a sole Relu/Clip,
        and what sole scale-preserving ops (MaxPool, Reshape, ...) make of it.

        The branch outputs, which only the ``ort`` target quantizes (ONNX Runtime needs a Q after
        each conv), are not in the paper's scheme and keep the plain calibrator.
        """
        from onnxq.graph.index import GraphIndex

        idx = GraphIndex(ctx.model)
        out: set[str] = set()
        for s in self.splits:
            total = idx.nodes.get(s.sum_node)
            if total is None:
                continue
            t = total.output[0]
            out.add(t)
            nxt = idx.sole_consumer(t)
            if nxt is not None and nxt.op_type in ("Relu", "Clip", "LeakyRelu"):
                t = nxt.output[0]
                out.add(t)
                nxt = idx.sole_consumer(t)
            while nxt is not None and nxt.op_type in SCALE_PRESERVING_OPS and nxt.input[0] == t:
                t = nxt.output[0]
                out.add(t)
                nxt = idx.sole_consumer(t)
        return out

    def refine(self, ctx: RunContext) -> None:
        # when another method calibrated first, the coarse weights still get their exact grid
        # (only replacing the default max-abs step, which equals it up to float rounding)
        self._set_coarse_qparams(ctx, force=False)
        report = ctx.report.setdefault(self.name, {})
        report["weight_mse"] = errors = self.weight_errors(ctx)
        if errors:
            red = [v["reduction"] for v in errors.values()]
            report.setdefault("summary", []).append(
                f"weight MSE of split convs vs merged per-channel min-max at {ctx.profile.bits} bits: {min(red):.0f}x to {max(red):.0f}x lower")

    def quantized_rewrite(self, ctx: RunContext) -> onnx.ModelProto | None:
        # a 16-bit bias is a quantization, not an output-preserving rewrite: it comes after the float check
        return self._simulate_bias(ctx) if self.options.bias_bits else None

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _qmax(ctx: RunContext) -> int:
        return int_range(ctx.profile.bits, True, True)[1]

    def coarse_qparams(self, ctx: RunContext, split: SplitConv) -> QParams:
        """The exact grid of a coarse weight: its split step, zero point 0, axis 0."""
        qmin, qmax = int_range(ctx.profile.bits, True, ctx.profile.weight_narrow)
        scale = np.asarray(split.coarse_scale, np.float32)
        return QParams(scale, np.zeros(scale.shape, np.int8), container_for(ctx.profile.bits, True), qmin, qmax, 0)

    def _set_coarse_qparams(self, ctx: RunContext, force: bool) -> None:
        for s in self.splits:
            site = ctx.plan.weights.get(s.coarse_weight)
            if site is None:
                continue
            exact = self.coarse_qparams(ctx, s)
            current = site.qparams
            if force or current is None or (np.shape(current.scale) == exact.scale.shape and np.allclose(current.scale, exact.scale, rtol=1e-5, atol=0)):
                site.qparams = exact

    def _simulate_bias(self, ctx: RunContext) -> onnx.ModelProto | None:
        """A copy of the model with each split conv's bias replaced by its 16-bit per-tensor
        fake-quantized value (docs/methods.md: CFWS); None when no bias changes."""
        model = onnx.ModelProto()
        model.CopyFrom(ctx.model)
        nodes = {n.name: n for n in model.graph.node}
        inits = {t.name: t for t in model.graph.initializer}
        fresh = edit.Namer.of(model)
        levels = 2 ** (self.options.bias_bits - 1)
        changed = False
        for s in self.splits:
            node = nodes.get(s.coarse_node)
            if node is None or len(node.input) < 3 or node.input[2] not in inits:
                continue
            b = tensor_array(inits[node.input[2]]).astype(np.float32)
            amax = float(np.abs(b).max())
            if amax == 0:
                continue
            step = np.float32(amax / levels)
            bq = (np.clip(np.rint(b / step), -levels, levels - 1) * step).astype(np.float32)
            name = fresh(f"{node.input[2]}_cfws_b{self.options.bias_bits}")
            model.graph.initializer.append(new_initializer(model, bq, name))
            node.input[2] = name
            changed = True
        # the float biases go unless something else still reads them; node order stays (the plan's)
        return edit.cleanup(model, sort=False, keep_nodes=True) if changed else None

    def weight_errors(self, ctx: RunContext) -> dict[str, dict[str, float]]:
        """Per split conv: weight MSE of the merged kernel (per-channel max-abs) vs the split, at the run's bits."""
        out = {}
        for s in self.splits:
            w = self._merged.get(s.node)
            fine_site, coarse_site = ctx.plan.weights.get(s.fine_weight), ctx.plan.weights.get(s.coarse_weight)
            if w is None or fine_site is None or coarse_site is None or fine_site.qparams is None or coarse_site.qparams is None:
                continue
            merged_q = ctx.profile.weight_qparams(per_channel_absmax(w, 0), 0).fake_quantize(w)
            fine_q = fine_site.qparams.fake_quantize(ctx.weight(s.fine_weight))
            coarse_q = coarse_site.qparams.fake_quantize(ctx.weight(s.coarse_weight))
            recon = fine_q.astype(np.float64)
            ch, cw = w.shape[2] // 2, w.shape[3] // 2
            if coarse_q.shape[2:] == (1, 1):
                recon[:, :, ch, cw] += coarse_q[:, :, 0, 0]
            else:
                recon += coarse_q
            mse_merged = float(np.mean((w.astype(np.float64) - merged_q) ** 2))
            mse_split = float(np.mean((w.astype(np.float64) - recon) ** 2))
            out[s.node] = {"merged": mse_merged, "split": mse_split, "reduction": mse_merged / mse_split if mse_split > 0 else float("inf")}
        return out


def _finite(x: float) -> float | str | None:
    """A ratio for the JSON report: rounded, "inf" (no off-centre mass) or None (not a 3x3 kernel)."""
    if np.isnan(x):
        return None
    return round(float(x), 3) if np.isfinite(x) else "inf"


@hookimpl
def register_methods(register) -> None:
    register(Cfws)

