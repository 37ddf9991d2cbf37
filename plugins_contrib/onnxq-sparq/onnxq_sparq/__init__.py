"""``sparq``: SPARQ, sparsity-aware trimming of 8-bit activations (Shomron et al., arXiv 2105.11010;
plugins_contrib/onnxq-sparq/README.md).

The model is quantized to 8 bits as usual (the run's calibrator: ``-p sparq`` alone uses the
default one, ``-p mse -p sparq`` uses mse); then every unsigned, zero-point-0 activation (the
post-ReLU ones) that feeds a Conv, MatMul or Gemm is trimmed for those readers to an ``bits``-bit
window at its leading one (bSPARQ), or, with ``variant=vsparq``, trimmed only where its partner in
the dot product (the neighbouring input channel) is non-zero. This emulates, in standard ONNX ops
on ONNX Runtime, the accuracy of hardware with 4-bit x 8-bit multipliers; it is not faster here.
``placements=1`` is plain ``bits``-bit uniform quantization over the 8-bit range, the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx
from onnxq.calib.statistics import StatRequest
from onnxq.errors import OptionError
from onnxq.hookspecs import hookimpl
from onnxq.method import QuantMethod, RunContext
from onnxq.options import option

from onnxq_sparq.emulate import apply_sparq
from onnxq_sparq.trim import window_shifts

__version__ = "0.1.0"


@dataclass(frozen=True)
class SparqOptions:
    """Options of SPARQ (defaults: the paper's 4-bit windows with 5 placements and rounding)."""

    variant: Literal["bsparq", "vsparq"] = option("bsparq", "bsparq: trim every value; vsparq: keep 8 bits where the value's pair partner is zero")
    bits: int = option(4, "window bits (1-7)")
    placements: int = option(5, "window placements, evenly spaced from the top window to bits 0.. (4-bit: 5, 3 or 2; 1 = plain uniform)")
    rounding: bool = option(True, "round the dropped bits half to even, saturating the window (False: truncate)")

    def validate(self) -> None:
        window_shifts(self.bits, self.placements)


class Sparq(QuantMethod):
    """8-bit quantization, then SPARQ's n-bit window trim of the post-ReLU activations feeding dot products."""

    name = "sparq"
    summary = "SPARQ: trim 8-bit post-ReLU activations to 4-bit windows at their leading one (bSPARQ), or only where the pair partner is non-zero (vSPARQ); emulated"
    Options = SparqOptions

    def declare_statistics(self, ctx: RunContext) -> list[StatRequest]:
        return []  # a pure transform of the 8-bit model: the calibrator's statistics are enough

    def refine(self, ctx: RunContext) -> None:
        # refused here, before the rewrite, with what to do instead
        if getattr(ctx.profile, "weight_only", False):
            raise OptionError("sparq trims 8-bit activations; it does not apply to --bits 4 weight-only models")
        if ctx.profile.activation_signed:
            raise OptionError(f"sparq trims unsigned 8-bit activations (post-ReLU, zero point 0) and --target {ctx.profile.name} "
                              "stores them signed (TensorRT would also reject integer ops between Q and DQ); use --target ort")

    def qdq_rewrite(self, ctx: RunContext, model: onnx.ModelProto) -> onnx.ModelProto | None:
        o = self.options
        out, res = apply_sparq(model, o.variant, o.bits, o.placements, o.rounding)
        if not res.trimmed:
            why = sorted(set(res.skipped.values()))
            raise OptionError("sparq found no unsigned 8-bit activation with zero point 0 feeding a Conv/MatMul/Gemm to trim"
                              + (f" ({'; '.join(why)}; the ort target quantizes post-ReLU activations as uint8 with zero point 0)" if why else ""))
        ctx.report[self.name] = {
            "variant": o.variant,
            "bits": o.bits,
            "placements": list(window_shifts(o.bits, o.placements)),
            "rounding": o.rounding,
            "trimmed_activations": len(res.trimmed),
            "paired_readers": res.paired,
            "unpaired_readers": res.unpaired,
            "left_8bit": res.skipped,
        }
        return out


@hookimpl
def register_methods(register) -> None:
    register(Sparq)
