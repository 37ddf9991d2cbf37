"""Channels clustered by their calibration ranges, as RPTQ does (Yuan et al., arXiv 2304.01089).

Each channel ``c`` of an activation is the 2-D point ``(max_c, min_c)`` over every calibration
token; k-means (scikit-learn, ``n_init = 10`` as the paper's code) groups channels whose ranges
are alike, so that one quantization step per cluster fits every channel in it. A few outlier
channels 20-50x wider than the rest end up in clusters of their own instead of setting the step
of all the others.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Clusters:
    """A partition of ``C`` channels into ``k`` clusters.

    Clusters are numbered by increasing width of their centre (``max − min``), and the channels
    of a cluster keep their original order, so the result is deterministic for a given labelling.
    """

    labels: np.ndarray  #: [C] int: the cluster of each channel

    @property
    def count(self) -> int:
        return int(self.labels.max()) + 1 if self.labels.size else 0

    @property
    def order(self) -> np.ndarray:
        """The permutation that makes every cluster contiguous: channel ``order[j]`` goes to position ``j``."""
        return np.argsort(self.labels, kind="stable")

    @property
    def sizes(self) -> list[int]:
        return np.bincount(self.labels, minlength=self.count).tolist()

    def members(self, c: int) -> np.ndarray:
        """The channels of cluster ``c``, in increasing order."""
        return np.flatnonzero(self.labels == c)


def cluster_ranges(ranges: np.ndarray, k: int, seed: int = 0) -> Clusters:
    """k-means of the channels' ``(max, min)`` points (``ranges``: ``[2, C]``, row 0 the maxima).

    ``k`` is capped at the number of distinct points (a cluster is never empty); ``k = 1`` puts
    every channel in one cluster (per-tensor quantization).
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    pts = np.asarray(ranges, np.float64).reshape(2, -1).T  # [C, 2]
    if not np.all(np.isfinite(pts)):
        raise ValueError("channel ranges must be finite")
    k = int(min(k, len(np.unique(pts, axis=0))))
    if k <= 1:
        return Clusters(np.zeros(len(pts), np.int64))
    # one thread: a few hundred 2-D points are solved in microseconds, and OpenMP's thread start-up
    # on a busy machine cost 60 ms per k-means run (measured on the decoder fixture)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")  # convergence warnings on tiny, near-duplicate point sets
        raw = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(pts)
    _, raw = np.unique(raw, return_inverse=True)  # numbered 0..k-1 even if k-means left one empty
    k = int(raw.max()) + 1
    centres = np.stack([pts[raw == c].mean(0) for c in range(k)])
    rank = np.empty(k, np.int64)
    rank[np.argsort(centres[:, 0] - centres[:, 1], kind="stable")] = np.arange(k)
    return Clusters(rank[raw].astype(np.int64))


def _span(hi: float, lo: float) -> float:
    """The width of a grid that holds ``[lo, hi]`` and zero (as onnxq's activation grids do)."""
    return max(hi, 0.0) - min(lo, 0.0)


def range_ratio(ranges: np.ndarray, clusters: Clusters) -> float:
    """How much finer the clustered grids are: the whole tensor's span over the channel-weighted
    mean span of the clusters (1 for one cluster; large when a few wide channels were split off)."""
    hi, lo = np.asarray(ranges, np.float64).reshape(2, -1)
    spans = [_span(float(hi[m].max()), float(lo[m].min())) * len(m) for m in map(clusters.members, range(clusters.count))]
    mean = sum(spans) / max(len(hi), 1)
    return _span(float(hi.max()), float(lo.min())) / mean if mean > 0 else 1.0
