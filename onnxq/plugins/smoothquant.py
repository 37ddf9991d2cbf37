"""``smoothquant``: migrate activation outliers into MatMul weights before calibration.

A float rewrite (``onnxq/graph/smoothing.py``): for every activation that feeds quantized
constant-weight MatMuls and comes out of a LayerNormalization or a constant Mul (the ``* 0.5``
ending an exported GELU), the per-channel scale ``s_k = max|X_k|^α / max|W_k|^(1-α)`` is divided
out of the producer's constants and multiplied into the weight rows. The model computes the same
function (the host checks it to 1e-5); the activation loses its outlier channels, the per-output-
channel weight grids absorb them. One extra ONNX Runtime pass over the calibration data collects
the per-channel ``max|X_k|`` (one vector per tensor and batch leaves the session).

It sets no ranges itself: compose it with a calibrator, which then runs on the smoothed graph,
e.g. ``-p smoothquant -p mse`` (alone, the host's default calibrator is used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx

from onnxq.errors import OptionError
from onnxq.hookspecs import hookimpl
from onnxq.method import QuantMethod, RunContext
from onnxq.options import option


@dataclass(frozen=True)
class SmoothQuantOptions:
    """Options of SmoothQuant-style smoothing."""

    alpha: float = option(0.8, "migration strength: s = max|X|^alpha / max|W|^(1-alpha) (0: none; 1: all onto the weights)")
    fold_into: tuple[str, ...] = option(("LayerNormalization", "Mul"), "producer op types that may absorb 1/s (comma-separated)")
    exclude: tuple[str, ...] = option((), "MatMul node-name globs left unsmoothed (comma-separated)")
    max_batches: int = option(0, "calibration batches used for the per-channel max (0: all)")
    shared: Literal["duplicate", "mul"] = option("duplicate", "an activation that also feeds other ops (a post-LN residual): duplicate its producer with 1/s folded in, or insert Mul(x, 1/s) for the MatMuls")

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        bad = set(self.fold_into) - {"LayerNormalization", "Mul"}
        if bad:
            raise ValueError(f"fold_into accepts LayerNormalization and Mul, not {', '.join(sorted(bad))}")
        if self.max_batches < 0:
            raise ValueError("max_batches must be >= 0")


class SmoothQuant(QuantMethod):
    """Per-input-channel smoothing of constant-weight MatMul inputs, folded into LayerNorm / Mul constants."""

    name = "smoothquant"
    summary = "SmoothQuant: move activation outlier channels into MatMul weight rows (folded into LayerNorm/GELU constants; compose with a calibrator)"
    Options = SmoothQuantOptions

    def float_rewrite(self, ctx: RunContext) -> onnx.ModelProto | None:
        from onnxq.runtime import ort as ort_backend
        from onnxq.graph.prepare import infer_shapes
        from onnxq.graph.smoothing import apply_smoothing, channel_absmax_model, find_smooth_sites, smoothing_scales

        if ctx.profile.weight_only:
            raise OptionError("smoothquant needs quantized activations (--bits 8 or 7), not 4-bit weight-only")
        o = self.options
        quantized = [l.node for l in ctx.plan.layers if l.weight is not None and l.weight in ctx.plan.weights]
        sites, rejected = find_smooth_sites(ctx.model, o.fold_into, o.exclude, quantized)
        report: dict[str, Any] = {"alpha": o.alpha, "sites": [], "not_smoothed": [{"tensor": t, "reason": r} for t, r in rejected]}
        ctx.report[self.name] = report
        if not sites or o.alpha == 0.0:
            report["summary"] = ["no activation to smooth" if not sites else "alpha 0: nothing migrated"]
            return None
        probe, outs = channel_absmax_model(ctx.model, [s.tensor for s in sites])
        sess = ort_backend.make_session(probe, "basic", arena=False)
        act = [np.zeros(s.channels, np.float64) for s in sites]
        for k, batch in enumerate(ctx.calibration()):
            if o.max_batches and k >= o.max_batches:
                break
            for a, v in zip(act, ort_backend.run(sess, batch.feeds, outs)):
                np.maximum(a, np.asarray(v, np.float64).reshape(-1), out=a)
        del sess, probe
        scales = {}
        for site, a in zip(sites, act):
            w = np.max([np.abs(ctx.weight(n)).max(axis=1) for n in site.weights], axis=0)
            s = smoothing_scales(a, w, o.alpha)
            site.scale = s
            scales[site.tensor] = s
            before = float(a.max() / max(np.median(a), 1e-12))
            after = float((a / s).max() / max(np.median(a / s), 1e-12))
            report["sites"].append({"tensor": site.tensor, "producer": site.producer, "kind": site.kind, "matmuls": site.matmuls,
                                    "shared_with_other_consumers": site.shared, "max_over_median_before": round(before, 2),
                                    "max_over_median_after": round(after, 2)})
        model = apply_smoothing(ctx.model, sites, scales, o.shared)
        dup = sum(s.shared for s in sites)
        how = "producer duplicated with 1/s folded in" if o.shared == "duplicate" else "Mul(x, 1/s) inserted"
        report["summary"] = [f"smoothed {len(sites)} MatMul inputs (alpha {o.alpha:g}) feeding {sum(len(s.matmuls) for s in sites)} MatMuls; "
                             f"{dup} of them also feed other ops ({how})"]
        return infer_shapes(model)[0]


@hookimpl
def register_methods(register) -> None:
    register(SmoothQuant)
