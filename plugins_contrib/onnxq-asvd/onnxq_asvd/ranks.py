"""Per-layer ranks: the sensitivity of each layer to each rank, and the search that meets a target.

As ASVD's binary search over its sensitivity list: every layer takes the smallest rank whose
output error stays within one shared threshold ``τ`` (a layer that cannot meet ``τ`` below the
rank where factors stop saving parameters stays dense); ``τ`` is then either the fidelity target
itself, or the smallest value, found by bisection, whose ranks fit the parameter budget. One shared
threshold on the layer-wise error leaves every layer about equally damaged instead of emptying the
cheapest ones. The sensitivity here is each layer's exact relative output error on the calibration
inputs (:func:`onnxq_asvd.factorize.decompose`), not the paper's model perplexity per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq_asvd.factorize import Decomposition, dense_params, factor_params, max_useful_rank


@dataclass(frozen=True)
class Choice:
    """One layer's rank (None: kept dense), its parameters and its relative output error."""

    rank: int | None
    params: int
    error: float


def choose(dec: Decomposition, threshold: float, align: int = 1) -> Choice:
    """The smallest rank (a multiple of ``align``) whose error is at most ``threshold``, or dense."""
    shape = dec.shape
    top = max_useful_rank(shape)
    ranks = np.arange(align, top + 1, align)
    ok = ranks[dec.errors[np.minimum(ranks, len(dec.errors) - 1)] <= threshold]
    if len(ok) == 0:
        return Choice(None, dense_params(shape), 0.0)
    r = int(ok[0])
    return Choice(r, factor_params(shape, r), float(dec.errors[r]))


def for_threshold(decs: dict[str, Decomposition], threshold: float, align: int = 1) -> dict[str, Choice]:
    return {name: choose(d, threshold, align) for name, d in decs.items()}


def for_ratio(decs: dict[str, Decomposition], ratio: float, align: int = 1, steps: int = 60) -> tuple[dict[str, Choice], float]:
    """The ranks with the smallest shared threshold whose total parameters are at most ``ratio`` of
    the dense weights', and that threshold (bisection on a log scale: the total falls as it grows)."""
    budget = ratio * sum(dense_params(d.shape) for d in decs.values())

    def total(t: float) -> int:
        return sum(c.params for c in for_threshold(decs, t, align).values())

    hi = 1.0 + 1e-9  # rank 0 of any layer has error <= 1: the smallest ranks everywhere
    if total(hi) > budget:
        return for_threshold(decs, hi, align), hi  # the budget is below what factors can reach: the fewest parameters
    lo = 1e-12
    if total(lo) <= budget:
        return for_threshold(decs, lo, align), lo
    for _ in range(steps):
        mid = float(np.sqrt(lo * hi))
        if total(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return for_threshold(decs, hi, align), hi
