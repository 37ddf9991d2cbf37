"""The byte-budgeted allocation of extra points: greedy by output-error reduction per added byte."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass
class LayerPoints:
    """What the allocation needs of one weight: its channels' error after 1..n points and what a point costs."""

    key: str
    errors: np.ndarray  #: [points + 1, channels]: index k = error with k points (k >= 1 used)
    point_bytes: float  #: bytes of one more point of one channel (integers + its steps)
    signal: float  #: the layer's output energy estimate, to compare error reductions across layers


def allocate(layers: list[LayerPoints], budget_bytes: float, max_points: int) -> dict[str, np.ndarray]:
    """Points per channel (>= 1) for every layer: start at one point everywhere, then repeatedly
    give one more point to the channel whose next point removes the most of its layer's relative
    output error (error / layer signal) per byte, while the extra bytes stay within ``budget_bytes``."""
    counts = {ly.key: np.ones(ly.errors.shape[1], np.int64) for ly in layers}
    heap: list[tuple[float, str, int]] = []
    by_key = {ly.key: ly for ly in layers}

    def push(ly: LayerPoints, c: int) -> None:
        k = counts[ly.key][c]
        if k >= max_points or k + 1 >= ly.errors.shape[0]:
            return
        gain = (ly.errors[k, c] - ly.errors[k + 1, c]) / max(ly.signal, 1e-30)
        if gain > 0:
            heapq.heappush(heap, (-gain / ly.point_bytes, ly.key, c))

    for ly in layers:
        for c in range(ly.errors.shape[1]):
            push(ly, c)
    spent = 0.0
    while heap:
        _, key, c = heapq.heappop(heap)
        ly = by_key[key]
        if spent + ly.point_bytes > budget_bytes:
            continue  # a cheaper point elsewhere may still fit
        spent += ly.point_bytes
        counts[key][c] += 1
        push(ly, c)
    return counts
