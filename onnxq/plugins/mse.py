"""``mse``: the clip threshold that minimises the expected squared error of the deployed grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq.calib.statistics import TensorStats
from onnxq.calib.thresholds import mse_threshold
from onnxq.hookspecs import hookimpl
from onnxq.method import RangeMethod, RunContext
from onnxq.options import option
from onnxq.qparams import QParams


@dataclass(frozen=True)
class MseOptions:
    """Options of the MSE calibrator."""

    candidates: int = option(128, "number of thresholds tried, evenly spaced up to max-abs")
    lowest: float = option(0.02, "smallest threshold tried, as a fraction of max-abs")

    def validate(self) -> None:
        if self.candidates < 2:
            raise ValueError("candidates must be at least 2")
        if not 0 < self.lowest < 1:
            raise ValueError("lowest must be in (0, 1)")


class Mse(RangeMethod):
    """Scores every candidate threshold with the exact grid the target deploys (INT7 and asymmetric included)."""

    name = "mse"
    summary = "clip threshold minimising the expected squared quantization error"
    Options = MseOptions

    def threshold(self, stats: TensorStats, ctx: RunContext) -> float:
        profile = ctx.profile

        def grids(t: np.ndarray) -> QParams:
            return profile.activation_qparams(np.maximum(stats.min, -t), np.minimum(stats.max, t), axis=0)

        return mse_threshold(stats, grids, self.options.candidates, self.options.lowest)


@hookimpl
def register_methods(register) -> None:
    register(Mse)
