"""onnxq-rptq: reorder-based activation quantization (RPTQ, Yuan et al., arXiv 2304.01089).

``-p rptq`` clusters the channels of every quantized MatMul input by their calibration ranges
(per-channel max and min, :class:`onnxq.calib.statistics.ChannelRange`; k-means in
:mod:`onnxq_rptq.cluster`), folds the reordering into the weights where the producer allows it
and splits each consuming MatMul along K into one MatMul per cluster, summed
(:mod:`onnxq_rptq.rewrite`). That is an exact float rewrite (the host checks it to 1e-5); the
placement then gives every cluster's slice its own per-tensor Q/DQ pair, whose scale the
calibrator chooses (``-p rptq -p minmax``: each cluster's min/max, the paper's asymmetric
per-cluster grid). ``act_bits`` narrows every activation grid below ``--bits`` (A4/A6 emulated
in 8-bit storage with a Clip, as onnxq's other contrib methods do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxq import qparams as qp
from onnxq.calib.statistics import ChannelRange, StatRequest
from onnxq.errors import OptionError
from onnxq.graph.targets import TargetProfile
from onnxq.hookspecs import hookimpl
from onnxq.method import QuantMethod, RunContext
from onnxq.options import option
from onnxq.qparams import QParams
from onnxq_rptq.cluster import Clusters, cluster_ranges, range_ratio
from onnxq_rptq.rewrite import Site, find_sites, permuted, split

__all__ = ["Clusters", "Rptq", "RptqOptions", "act_qparams", "cluster_ranges", "find_sites", "reorder_and_split"]


@dataclass(frozen=True)
class RptqOptions:
    clusters: int = option(4, "clusters per activation (1: no split, one per-tensor scale as usual)")
    act_bits: int = option(0, "activation grid bits, 2-8 (0: the target's --bits); below it a Clip emulates the grid in 8-bit storage")
    fold: bool = option(True, "fold the reordering into the producing MatMul and consuming weights where the graph allows (else read clusters with Gather)")
    samples: int = option(0, "calibration samples for the per-channel ranges (0: all)")
    seed: int = option(0, "k-means seed")

    def validate(self) -> None:
        if self.clusters < 1:
            raise ValueError("clusters must be >= 1")
        if self.act_bits and not 2 <= self.act_bits <= 8:
            raise ValueError("act_bits must be between 2 and 8 (or 0: the target's bits)")
        if self.samples < 0:
            raise ValueError("samples must be >= 0")


def act_qparams(profile: TargetProfile, lo: float, hi: float, bits: int) -> QParams:
    """The target's activation grid for ``[lo, hi]`` narrowed to ``bits`` (kept in its 8-bit container)."""
    if bits >= profile.bits:
        return profile.activation_qparams(lo, hi)
    if profile.activation_signed:
        q = qp.symmetric(max(abs(float(lo)), abs(float(hi))), bits, narrow=True)
        return QParams(q.scale, np.zeros((), np.int8), "int8", q.qmin, q.qmax)
    q = qp.asymmetric(lo, hi, bits)
    return QParams(q.scale, q.zero_point.astype(np.uint8), "uint8", q.qmin, q.qmax)


def reorder_and_split(model: onnx.ModelProto, sites: list[Site], ranges: dict[str, np.ndarray], options: RptqOptions
                      ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Cluster each site's channels from its ``[2, C]`` ranges, fold the reorderings, split the MatMuls.

    Returns the rewritten float model (the same function) and a summary per site."""
    clusters = {s.tensor: cluster_ranges(ranges[s.tensor], options.clusters, options.seed) for s in sites}
    folded = [s for s in sites if options.fold and s.fold is not None and clusters[s.tensor].count > 1]
    orders = {s.tensor: clusters[s.tensor].order for s in folded}
    model = permuted(model, folded, orders)
    members = {}
    for s in sites:
        cl = clusters[s.tensor]
        if s in folded:  # reordered: cluster c is the next run of positions
            bounds = np.cumsum([0, *cl.sizes])
            members[s.tensor] = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            members[s.tensor] = [cl.members(c) for c in range(cl.count)]
    model = split(model, sites, members)
    summary = {s.tensor: {"channels": s.channels, "cluster_sizes": clusters[s.tensor].sizes, "matmuls": [t.node for t in s.matmuls],
                          "reorder": ("folded into " + s.fold.matmul) if s in folded else "gather",
                          "range_ratio": round(range_ratio(ranges[s.tensor], clusters[s.tensor]), 3)} for s in sites}
    return model, summary


class Rptq(QuantMethod):
    """Channels of MatMul inputs clustered by range, reordered into the weights, one scale per cluster."""

    name = "rptq"
    summary = "RPTQ: MatMul input channels clustered by range (k-means), reordered into the weights, one activation scale per cluster (MatMul split along K)"
    Options = RptqOptions
    needs_data = True

    def float_rewrite(self, ctx: RunContext) -> onnx.ModelProto | None:
        if ctx.profile.weight_only:
            raise OptionError("rptq quantizes activations: use --bits 8 or 7, not 4-bit weight-only")
        o = self.options
        sites = find_sites(ctx.model, ctx.plan)
        report: dict[str, Any] = {"clusters": o.clusters, "act_bits": o.act_bits or ctx.profile.bits, "sites": {}}
        ctx.report[self.name] = report
        if not sites or o.clusters == 1:
            report["note"] = "no MatMul input to cluster" if not sites else "one cluster: nothing to split"
            return None
        requests = {s.tensor: StatRequest(s.tensor, ChannelRange(-1, o.samples or None)) for s in sites}
        got = ctx.collect(list(requests.values()))
        ranges = {t: np.asarray(got[r], np.float64) for t, r in requests.items()}
        model, report["sites"] = reorder_and_split(ctx.model, sites, ranges, o)
        return model

    def refine(self, ctx: RunContext) -> None:
        """Narrow every activation grid to ``act_bits`` (each cluster's slice keeps its own range)."""
        bits = self.options.act_bits
        if not bits or bits >= ctx.profile.bits:
            return
        for site in ctx.plan.activations.values():
            if site.range is not None:
                site.qparams = act_qparams(ctx.profile, *site.range, bits)


@hookimpl
def register_methods(register) -> None:
    register(Rptq)
