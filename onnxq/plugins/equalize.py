"""``equalize``: data-aware cross-layer equalization of conv activations (a float rewrite).

Composes in front of any calibrator or search (``-p equalize -p mse``, ``-p equalize -p
easyquant``): it rescales the channels of conv input tensors whose ranges differ widely and
folds the factors into the producing BatchNormalization/Conv and the reading conv's weights, so
the float model computes the same outputs (the host checks) while a per-tensor activation step
fits every channel. The rule set and the choice of factors: :mod:`onnxq.graph.equalize`. The
per-channel ranges of the first ``samples`` calibration samples come from
:class:`~onnxq.calib.statistics.ChannelAbsMax` requests collected through ``ctx.collect`` (the
statistics pass's machinery run on the float model before the rewrite).
Related work: Nagel et al., "Data-Free Quantization" (2019) equalize weight ranges across
ReLU pairs; onnxq uses measured activation ranges instead, which also covers BatchNormalization
left in the graph, where weights say nothing about the channel ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.calib.statistics import ChannelAbsMax, StatRequest
from onnxq.graph.model_io import tensor_array
from onnxq.graph.equalize import apply_equalization, equalize_scales, find_equalize_sites
from onnxq.hookspecs import hookimpl
from onnxq.method import QuantMethod, RunContext
from onnxq.options import option


@dataclass(frozen=True)
class EqualizeOptions:
    """Options of cross-layer equalization."""

    samples: int = option(64, "calibration samples whose per-channel ranges set the factors")
    alpha: float = option(0.5, "migration strength for ordinary (group=1) conv consumers: k = (w/a)^alpha; depthwise consumers equalize fully")
    max_scale: float = option(1000.0, "largest factor (and smallest, as 1/max_scale) applied to a channel")
    min_spread: float = option(2.0, "equalize a tensor only when its widest channel is this many times its median channel")
    exclude: tuple[str, ...] = option((), "node-name globs of consumer convs to leave alone (comma-separated)")

    def validate(self) -> None:
        if self.samples < 1 or not 0 <= self.alpha <= 1 or self.max_scale < 1 or self.min_spread < 1:
            raise ValueError("need samples >= 1, 0 <= alpha <= 1, max_scale >= 1, min_spread >= 1")


class Equalize(QuantMethod):
    """Cross-layer equalization of conv input channels, folded into the neighbouring weights."""

    name = "equalize"
    summary = "cross-layer equalization: even out conv input channel ranges, folded into BN/Conv and the next conv (exact float rewrite)"
    Options = EqualizeOptions

    def float_rewrite(self, ctx: RunContext) -> onnx.ModelProto | None:
        o = self.options
        sites = find_equalize_sites(ctx.model, o.exclude)
        section: dict = {"candidates": len(sites), "equalized": []}
        ctx.report[self.name] = section
        if not sites:
            section["changed_nothing"] = ("no tensor between two convs to rescale (Conv or BatchNormalization, then a Relu "
                                          "or nothing, then a Conv, whose weights no other layer shares); for MatMul layers "
                                          "try -p smoothquant")
            return None
        # one streaming pass of the statistics machinery on the float model as it is now (sub-batches
        # keep its activations under the memory budget); "disable": the tensors exactly as the graph
        # computes them, before ONNX Runtime fuses a BatchNormalization into the conv before it
        requests = [StatRequest(s.tensor, ChannelAbsMax(1, o.samples)) for s in sites]
        got = ctx.collect(requests, batch_size=o.samples, optimization="disable")
        amax = {r.tensor: got[r] for r in requests}
        inits = {t.name: t for t in ctx.model.graph.initializer}
        nodes = {n.name: n for n in ctx.model.graph.node}
        chosen = []
        for s in sites:
            a = amax[s.tensor]
            live = a[a > 0]
            if live.size == 0 or live.max() < o.min_spread * np.median(live):
                continue
            w = tensor_array(inits[nodes[s.consumer].input[1]])
            s.scale = equalize_scales(s, a, w, o.alpha, o.max_scale)
            chosen.append(s)
            section["equalized"].append({"tensor": s.tensor, "consumer": s.consumer, "producer": s.producer,
                                         "spread_before": float(live.max() / np.median(live)),
                                         "spread_after": float(_spread(a * s.scale)),
                                         "factor_max": float(s.scale.max()), "factor_min": float(s.scale.min())})
        if not chosen:
            section["changed_nothing"] = (f"the channel ranges of all {len(sites)} tensors it could rescale are within "
                                          f"min_spread ({o.min_spread:g}x) of their median")
            return None
        return apply_equalization(ctx.model, chosen)


def _spread(a: np.ndarray) -> float:
    live = a[a > 0]
    return float(live.max() / np.median(live)) if live.size else 1.0


@hookimpl
def register_methods(register) -> None:
    register(Equalize)
