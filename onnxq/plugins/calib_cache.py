"""``trt-cache``: activation thresholds from a TensorRT calibration cache (implicit -> explicit).

TensorRT 10's implicit INT8 calibrators (``IInt8EntropyCalibrator2``, ``IInt8MinMaxCalibrator``,
``trtexec --int8 --calib=FILE``) leave a calibration cache behind; TensorRT 11 removed those
calibrators and only builds explicit Q/DQ graphs. This method turns such a cache into a Q/DQ model
with exactly TensorRT's activation scales (threshold = cache scale x 127), so a deployment moves
to TensorRT 11 without recalibrating and without changing its numbers::

    onnxq optimize model.onnx -p trt-cache -o path model.cache --target trt --data random

Activations missing from the cache (or with a zero scale in it) fall back to the observed
max-abs over ``--data``, with one warning giving how many; ``-o on_missing error`` refuses
instead. Weights are quantized per channel at max-abs, as TensorRT's implicit mode does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

from onnxq.calib.trt_cache import CalibrationCache, read_cache
from onnxq.calib.statistics import StatRequest
from onnxq.errors import DataError
from onnxq.hookspecs import hookimpl
from onnxq.method import QuantMethod, RunContext, finish_activation_qparams, set_weight_qparams
from onnxq.options import option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheOptions:
    """Options of the calibration-cache importer."""

    path: str = option("", "TensorRT calibration cache file to read (required: -o path FILE)")
    on_missing: Literal["maxabs", "error"] = option("maxabs", "activations absent from the cache: max-abs over --data (with a warning), or an error")

    def validate(self) -> None:
        if not self.path:
            raise ValueError("option 'path' is required: -o path CACHE_FILE")


class TrtCache(QuantMethod):
    """Activation thresholds read from a TensorRT INT8 calibration cache (scale x 127 per tensor)."""

    name = "trt-cache"
    summary = "activation ranges from a TensorRT calibration cache (-o path FILE); moves TRT 10 implicit INT8 to explicit Q/DQ"
    Options = CacheOptions
    calibrates = True

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self._loaded: CalibrationCache | None = None

    def cache(self) -> CalibrationCache:
        if self._loaded is None:
            self._loaded = read_cache(self.options.path)
            if not self._loaded.scales:
                raise DataError(f"calibration cache '{self.options.path}' has a header but no tensor scales")
        return self._loaded

    def declare_statistics(self, ctx: RunContext) -> list[StatRequest]:
        self.cache()  # fail early on a missing or malformed cache, before any calibration pass
        # min/max is one cheap pass; it serves the fallback and asymmetric (ort) targets
        return [StatRequest(t, "minmax") for t in ctx.plan.activations]

    def choose_qparams(self, ctx: RunContext) -> None:
        cache = self.cache()
        plan, profile = ctx.plan, ctx.profile
        missing: list[str] = []
        for name, site in plan.activations.items():
            scale = cache.scales.get(name)
            stats = ctx.stats.get(name)
            if scale is None or not math.isfinite(scale) or scale <= 0:
                missing.append(name)
                if stats is None:
                    raise DataError(f"activation '{name}' is not in the cache and has no statistics")
                t = stats.amax
            else:
                t = scale * 127.0
            if profile.activation_signed or stats is None:
                site.range = (-t, t)
            else:  # asymmetric grid: keep the observed sign range inside the clip
                site.range = (max(stats.min, -t), min(stats.max, t))
        if missing and self.options.on_missing == "error":
            raise DataError(f"{len(missing)} of {len(plan.activations)} quantized activations are not in calibration cache "
                            f"'{self.options.path}' (first: '{missing[0]}')")
        finish_activation_qparams(ctx)
        set_weight_qparams(ctx)
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            log.warning("trt-cache: %d of %d quantized activations are not in '%s' (or have a zero scale there); "
                        "they use max-abs over the calibration data: %s", len(missing), len(plan.activations), self.options.path, shown)
        used = len(plan.activations) - len(missing)
        ctx.report[self.name] = {
            "cache": self.options.path,
            "header": cache.header,
            "tensors_in_cache": len(cache.scales),
            "activations_from_cache": used,
            "activations_max_abs_fallback": missing,
            "cache_tensors_unused": len(set(cache.scales) - set(plan.activations)),
        }


@hookimpl
def register_methods(register) -> None:
    register(TrtCache)
