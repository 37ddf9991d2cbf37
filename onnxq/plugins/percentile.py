"""``percentile``: clip each activation at a percentile of |x| (2048-bin histogram)."""

from __future__ import annotations

from dataclasses import dataclass

from onnxq.calib.statistics import TensorStats
from onnxq.calib.thresholds import percentile_threshold
from onnxq.hookspecs import hookimpl
from onnxq.method import RangeMethod, RunContext
from onnxq.options import option


@dataclass(frozen=True)
class PercentileOptions:
    """Options of the percentile calibrator."""

    percentile: float = option(99.99, "percentile of |x| kept inside the clip range")

    def validate(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError("percentile must be in (50, 100]")


class Percentile(RangeMethod):
    """Clip threshold at the given percentile of |x| over all calibration values."""

    name = "percentile"
    summary = "clip activations at a percentile of |x| (default 99.99)"
    Options = PercentileOptions

    def threshold(self, stats: TensorStats, ctx: RunContext) -> float:
        return percentile_threshold(stats, self.options.percentile)


@hookimpl
def register_methods(register) -> None:
    register(Percentile)
