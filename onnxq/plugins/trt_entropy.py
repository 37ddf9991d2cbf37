"""``trt-entropy``: TensorRT's entropy (KL) calibrator, re-implemented (docs/methods.md: Baseline calibrators).

2048 bins of |x| over [0, max-abs], candidate clip points from 128 (INT8) bins upward, merged to the
quantized levels, KL divergence, last minimum. Not ONNX Runtime's 128-bin entropy calibrator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from onnxq.calib.statistics import TensorStats
from onnxq.calib.thresholds import entropy_threshold
from onnxq.hookspecs import hookimpl
from onnxq.method import RangeMethod, RunContext
from onnxq.options import option


@dataclass(frozen=True)
class EntropyOptions:
    """Options of the TensorRT entropy calibrator."""

    zero_bin: Literal["copy_next", "keep", "drop"] = option("copy_next", "treatment of the bin holding exact zeros (NVIDIA: copy_next)")
    kl: Literal["trt", "smoothed", "cfws"] = option("trt", "divergence: trt (inf where Q empty), smoothed (MXNet/ORT eps), cfws (masked; provisional)")
    edge: Literal["right", "center"] = option("right", "threshold at the right edge or the centre of the last kept bin")
    merge: Literal["even", "mxnet"] = option("even", "how source bins merge into levels")


class TrtEntropy(RangeMethod):
    """Minimum-KL clip threshold per activation, as TensorRT's IInt8EntropyCalibrator2 documents it."""

    name = "trt-entropy"
    summary = "TensorRT's entropy (KL) calibrator: 2048 bins, minimum-KL clip threshold"
    Options = EntropyOptions

    def threshold(self, stats: TensorStats, ctx: RunContext) -> float:
        o = self.options
        return entropy_threshold(stats, self.levels(stats, ctx.profile), o.zero_bin, o.kl, o.edge, o.merge)


@hookimpl
def register_methods(register) -> None:
    register(TrtEntropy)
