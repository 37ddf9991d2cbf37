"""``smoothquant``: migrate activation outliers into MatMul weights before calibration.

A float rewrite (``onnxq/graph/smoothing.py``): for every activation that feeds quantized
constant-weight MatMuls and comes out of a LayerNormalization (or another normalization whose
constants follow it) or a constant Mul (the ``* 0.5`` ending an exported GELU), the per-channel
scale ``s_k = max|X_k|^α / max|W_k|^(1-α)`` is divided out of the producer's constants (after a
fused GELU, which has none, by an inserted ``Mul``) and multiplied into the weight rows. The model computes the same
function (the host checks it to 1e-5); the activation loses its outlier channels, the per-output-
channel weight grids absorb them. The per-channel ``max|X_k|`` comes from one streaming pass over
the calibration data, requested as :class:`~onnxq.calib.statistics.ChannelAbsMax` statistics through
``ctx.collect`` (a float rewrite runs before the host's statistics pass, on the model as it is
then); the reduction happens inside the graph, so one vector per tensor and run leaves ONNX Runtime.

It sets no ranges itself: compose it with a calibrator, which then runs on the smoothed graph,
e.g. ``-p smoothquant -p mse`` (alone, the host's default calibrator is used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx

from onnxq.calib.statistics import ChannelAbsMax, StatRequest
from onnxq.errors import OptionError
from onnxq.hookspecs import hookimpl
from onnxq.method import QuantMethod, RunContext
from onnxq.options import option


@dataclass(frozen=True)
class SmoothQuantOptions:
    """Options of SmoothQuant-style smoothing."""

    alpha: float = option(0.8, "migration strength: s = max|X|^alpha / max|W|^(1-alpha) (0: none; 1: all onto the weights)")
    fold_into: tuple[str, ...] = option(("LayerNormalization", "Mul"), "producer op types that may absorb 1/s (comma-separated; LayerNormalization "
                                        "includes RMSNormalization and ONNX Runtime's SkipLayerNormalization and simplified forms)")
    exclude: tuple[str, ...] = option((), "MatMul node-name globs left unsmoothed (comma-separated)")
    max_batches: int = option(0, "calibration batches used for the per-channel max (0: all)")
    insert: tuple[str, ...] = option(("Gelu", "BiasGelu", "FastGelu", "QuickGelu"), "producer op types that cannot absorb 1/s but get an inserted "
                                     "Mul(x, 1/s): fused GELUs, whose unfused form ends in the Mul that absorbs it (comma-separated; '' for none)")
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
        from onnxq.graph.prepare import infer_shapes
        from onnxq.graph.smoothing import apply_smoothing, find_smooth_sites, smoothing_scales

        if ctx.profile.weight_only:
            raise OptionError("smoothquant needs quantized activations (--bits 8 or 7), not 4-bit weight-only")
        o = self.options
        quantized = [l.node for l in ctx.plan.layers if l.weight is not None and l.weight in ctx.plan.weights]
        sites, rejected = find_smooth_sites(ctx.model, o.fold_into, o.exclude, quantized, insert=o.insert)
        report: dict[str, Any] = {"alpha": o.alpha, "sites": [], "not_smoothed": [{"tensor": t, "reason": r} for t, r in rejected]}
        ctx.report[self.name] = report
        if not sites or o.alpha == 0.0:
            report["summary"] = ["no activation to smooth" if not sites else "alpha 0: nothing migrated"]
            if not sites:
                report["changed_nothing"] = (f"no constant-weight MatMul reads a tensor made by {' or '.join(o.fold_into)} "
                                             f"that could take its scales (fold_into; {len(rejected)} candidates rejected, see the report)")
            return None
        limit = None
        if o.max_batches:  # the first max_batches batches: the data is batched evenly up to its last batch
            first = next(iter(ctx.calibration()), None)
            limit = o.max_batches * next(iter(first.feeds.values())).shape[0] if first is not None else None
        requests = [StatRequest(s.tensor, ChannelAbsMax(-1, limit)) for s in sites]
        got = ctx.collect(requests)
        act = [np.maximum(np.zeros(s.channels, np.float64), np.asarray(got[r], np.float64).reshape(-1)) if got[r] is not None
               else np.zeros(s.channels, np.float64) for s, r in zip(sites, requests)]
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
        dup = sum(s.shared and s.kind != "insert" for s in sites)
        inserted = sum(s.kind == "insert" for s in sites)
        how = "producer duplicated with 1/s folded in" if o.shared == "duplicate" else "Mul(x, 1/s) inserted"
        report["summary"] = [f"smoothed {len(sites)} MatMul inputs (alpha {o.alpha:g}) feeding {sum(len(s.matmuls) for s in sites)} MatMuls; "
                             f"{dup} of them also feed other ops ({how})"
                             + (f"; {inserted} made by a fused op that cannot absorb 1/s (Mul(x, 1/s) inserted)" if inserted else "")]
        return infer_shapes(model)[0]


@hookimpl
def register_methods(register) -> None:
    register(SmoothQuant)
