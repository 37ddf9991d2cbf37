"""``minmax``: activations clipped at the observed range, weights at per-channel max-abs."""

from __future__ import annotations

from onnxq.calib.statistics import TensorStats
from onnxq.hookspecs import hookimpl
from onnxq.method import RangeMethod, RunContext


class MinMax(RangeMethod):
    """Observed min/max of each activation over the calibration data (no clipping)."""

    name = "minmax"
    summary = "observed min/max ranges (no clipping); weights per-channel max-abs"
    needs_histogram = False

    def threshold(self, stats: TensorStats, ctx: RunContext) -> float:
        return stats.amax


@hookimpl
def register_methods(register) -> None:
    register(MinMax)
