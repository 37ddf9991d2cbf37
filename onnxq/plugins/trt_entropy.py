"""``trt-entropy``: the entropy (KL) calibrator, guarded against collapse; ``trt-entropy-exact``: TensorRT's algorithm.

Both search 2048 bins of |x| over [0, max-abs] for the clip point whose quantized histogram has the
least KL divergence from the clipped one (candidates from 128 bins upward at INT8, merged to the
quantized levels, last minimum; not ONNX Runtime's 128-bin entropy calibrator).

``trt-entropy`` (the one to use) takes that minimum only among clip points whose expected squared
error on the deployed grid is within ``tolerance`` times the least one; KL alone cannot see how far
clipping moves values and, on a spike followed by a spread tail (the background of a mean/std
normalized image), clips the whole tail. ``trt-entropy-exact`` is TensorRT's algorithm as published,
kept to compare with TensorRT's own calibration (docs/methods.md: Baseline calibrators).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from onnxq.calib.statistics import TensorStats
from onnxq.calib.thresholds import DEFAULT_ERROR_TOLERANCE, entropy_threshold, guarded_entropy_threshold
from onnxq.hookspecs import hookimpl
from onnxq.method import RangeMethod, RunContext
from onnxq.options import option


@dataclass(frozen=True)
class ExactEntropyOptions:
    """Options of TensorRT's entropy calibrator as published."""

    zero_bin: Literal["copy_next", "keep", "drop"] = option("copy_next", "treatment of the bin holding exact zeros (NVIDIA: copy_next)")
    kl: Literal["trt", "smoothed", "cfws"] = option("trt", "divergence: trt (inf where Q empty), smoothed (MXNet/ORT eps), cfws (masked; provisional)")
    edge: Literal["right", "center"] = option("right", "threshold at the right edge or the centre of the last kept bin")
    merge: Literal["even", "mxnet"] = option("even", "how source bins merge into levels")


@dataclass(frozen=True)
class EntropyOptions(ExactEntropyOptions):
    """Options of the guarded entropy calibrator (``trt-entropy``)."""

    tolerance: float = option(DEFAULT_ERROR_TOLERANCE, "keep the minimum-KL clip point only among those whose expected squared error is at most this many times the least (inf: TensorRT's choice everywhere)")

    def validate(self) -> None:
        if not self.tolerance >= 1:
            raise ValueError("tolerance must be at least 1")


class TrtEntropy(RangeMethod):
    """Minimum-KL clip threshold per activation, among those whose expected squared error is within a tolerance of the least."""

    name = "trt-entropy"
    summary = "entropy (KL) calibrator, TensorRT's search guarded by the expected error (trt-entropy-exact: TensorRT's own)"
    Options = EntropyOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.overridden: list[str] = []
        self._names: dict[int, str] = {}

    def threshold(self, stats: TensorStats, ctx: RunContext) -> float:
        o = self.options
        levels = self.levels(stats, ctx.profile)
        if math.isinf(o.tolerance):
            return entropy_threshold(stats, levels, o.zero_bin, o.kl, o.edge, o.merge)
        t, guarded = guarded_entropy_threshold(stats, levels, self.grid_steps(stats, ctx.profile), o.tolerance,
                                               o.zero_bin, o.kl, o.edge, o.merge)
        if guarded and id(stats) in self._names:
            self.overridden.append(self._names[id(stats)])
        return t

    def choose_qparams(self, ctx: RunContext) -> None:
        self.overridden = []
        self._names = {id(ctx.stats[t]): t for t in ctx.plan.activations}
        super().choose_qparams(ctx)
        n = len(ctx.plan.activations)
        rep = ctx.report.setdefault(self.name, {})
        rep["variant"] = f"guarded (expected-error tolerance {self.options.tolerance:g})"
        rep["overridden"] = list(self.overridden)
        line = f"TensorRT's KL clip point kept on {n - len(self.overridden)} of {n} activations"
        if self.overridden:
            names = ", ".join(self.overridden[:8]) + (f" and {len(self.overridden) - 8} more" if len(self.overridden) > 8 else "")
            line += (f"; on {len(self.overridden)} it clipped too much (expected error > {self.options.tolerance:g}x the least) "
                     f"and the least-KL point within that bound was used: {names}")
        rep["summary"] = [line]


class TrtEntropyExact(RangeMethod):
    """TensorRT's entropy calibration exactly as published, for comparison with TensorRT (collapses on spiky inputs)."""

    name = "trt-entropy-exact"
    summary = "TensorRT's entropy calibrator exactly (for comparison with TensorRT; can collapse on normalized inputs: use trt-entropy)"
    Options = ExactEntropyOptions

    def threshold(self, stats: TensorStats, ctx: RunContext) -> float:
        o = self.options
        return entropy_threshold(stats, self.levels(stats, ctx.profile), o.zero_bin, o.kl, o.edge, o.merge)

    def choose_qparams(self, ctx: RunContext) -> None:
        super().choose_qparams(ctx)
        rep = ctx.report.setdefault(self.name, {})
        rep["variant"] = "TensorRT-exact (no error guard; for comparison with TensorRT)"
        rep["summary"] = ["TensorRT-exact entropy calibration (no error guard): for comparison with TensorRT, not for deployment"]


@hookimpl
def register_methods(register) -> None:
    register(TrtEntropy)
    register(TrtEntropyExact)
