"""Clip thresholds from calibration histograms: TensorRT entropy, percentile, MSE.

Each function takes a :class:`~onnxq.calib.statistics.TensorStats` with a histogram and returns a
symmetric clip threshold ``T`` (the activation grid then covers ``[max(min, −T), min(max, T)]``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from onnxq.calib.statistics import TensorStats

ZeroBin = Literal["copy_next", "keep", "drop"]


def _prepare_hist(hist: np.ndarray, zero_bin: ZeroBin) -> np.ndarray:
    h = np.asarray(hist, dtype=np.float64).copy()
    if zero_bin == "copy_next" and len(h) > 1:
        h[0] = h[1]
    elif zero_bin == "drop":
        h[0] = 0.0
    return h


def entropy_divergences(hist: np.ndarray, levels: int, zero_bin: ZeroBin = "copy_next", kl: Literal["trt", "smoothed", "cfws"] = "trt",
                        merge: Literal["even", "mxnet"] = "even") -> np.ndarray:
    """KL divergence for every candidate bin count ``i = levels..B`` (docs/methods.md: Baseline calibrators).

    Returns an array ``D`` of length ``B + 1`` with ``D[i]`` the divergence of clipping after bin
    ``i`` (``inf`` where undefined or not a candidate). The ``trt`` and ``cfws`` divergences are
    computed for all candidates at once from prefix sums (the same numbers as the per-candidate
    loop of :func:`entropy_divergences_reference`, to rounding); ``smoothed`` uses the loop.
    """
    if kl == "smoothed":
        return entropy_divergences_reference(hist, levels, zero_bin, kl, merge)
    h = _prepare_hist(hist, zero_bin)
    nbins = len(h)
    out = np.full(nbins + 1, np.inf)
    total = h.sum()
    if nbins < levels or total <= 0:
        return out
    i = np.arange(levels, nbins + 1)[:, None]  # candidates (rows) x levels (columns)
    lv = np.arange(levels)[None, :]
    if merge == "even":  # bins j with floor(j·L/i) = l: j in [ceil(l·i/L), ceil((l+1)·i/L))
        start = -((-lv * i) // levels)
        end = -((-(lv + 1) * i) // levels)
    else:  # runs of floor(i/L) bins, the remainder appended to the last run
        run = i // levels
        start = lv * run
        end = np.where(lv == levels - 1, i, (lv + 1) * run)
    csum = np.concatenate([[0.0], np.cumsum(h)])
    cnz = np.concatenate([[0.0], np.cumsum(h > 0)])
    safe_h = np.where(h > 0, h, 1.0)
    chl = np.concatenate([[0.0], np.cumsum(np.where(h > 0, h * np.log(safe_h), 0.0))])
    tot = csum[end] - csum[start]
    nz = cnz[end] - cnz[start]
    logq = np.where(nz > 0, np.log(np.where(tot > 0, tot, 1.0) / np.where(nz > 0, nz, 1.0)), 0.0)
    i1 = i[:, 0]
    last = i1 - 1
    h_last = h[last]
    p_last = h_last + (total - csum[i1])  # the clipped mass lands on the last kept bin
    lvl_last = (last * levels) // i1 if merge == "even" else np.minimum(last // (i1 // levels), levels - 1)
    logq_last = logq[np.arange(len(i1)), lvl_last]
    sum_plogq = (tot * logq).sum(axis=1) - h_last * logq_last  # over bins j < i-1
    sum_plogp = chl[last]
    sq = csum[i1]  # Q spreads each run's unclipped mass over its non-empty bins: Σ Q = Σ_{j<i} H
    term_last = np.where(p_last > 0, p_last * (np.log(np.where(p_last > 0, p_last, 1.0)) - logq_last), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kl == "trt":
            d = (sum_plogp - sum_plogq + term_last) / total + np.log(sq / total)
            d = np.where((p_last > 0) & (h_last == 0), np.inf, d)
        else:  # cfws: only bins where both P and Q are non-zero
            has_last = h_last > 0
            term_last = np.where(has_last, term_last, 0.0)
            mass = (csum[last] + np.where(has_last, p_last, 0.0)) / total
            d = (sum_plogp - sum_plogq + term_last) / total + mass * np.log(sq / total)
    out[levels:] = np.where(sq > 0, d, np.inf)
    return out


def entropy_divergences_reference(hist: np.ndarray, levels: int, zero_bin: ZeroBin = "copy_next", kl: Literal["trt", "smoothed", "cfws"] = "trt",
                                  merge: Literal["even", "mxnet"] = "even") -> np.ndarray:
    """Per-candidate loop, written as the published algorithm states it (the reference for the fast path)."""
    h = _prepare_hist(hist, zero_bin)
    nbins = len(h)
    out = np.full(nbins + 1, np.inf)
    suffix = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])  # suffix[i] = sum(h[i:])
    nonzero = h > 0
    for i in range(levels, nbins + 1):
        ref = h[:i].copy()
        ref[i - 1] += suffix[i]
        if merge == "even":
            lvl = (np.arange(i) * levels) // i
        else:  # runs of floor(i/L) bins, the remainder appended to the last run
            run = i // levels
            lvl = np.minimum(np.arange(i) // run, levels - 1)
        tot = np.bincount(lvl, weights=h[:i], minlength=levels)
        nz = np.bincount(lvl, weights=nonzero[:i], minlength=levels)
        cand = np.where(nonzero[:i], tot[lvl] / np.maximum(nz[lvl], 1), 0.0)
        out[i] = _divergence(ref, cand, kl)
    return out


def _divergence(p: np.ndarray, q: np.ndarray, kl: str) -> float:
    ps, qs = p.sum(), q.sum()
    if ps <= 0 or qs <= 0:
        return np.inf
    if kl == "smoothed":
        p, q = _smooth(p), _smooth(q)
        if p is None or q is None:
            return np.inf
        ps, qs = p.sum(), q.sum()
    p, q = p / ps, q / qs
    if kl == "cfws":
        m = (p > 0) & (q > 0)
        return float(np.sum(p[m] * np.log(p[m] / q[m])))
    m = p > 0
    if np.any(q[m] == 0):
        return np.inf
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def _smooth(d: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    zero = d == 0
    n_zero, n_nonzero = int(zero.sum()), int((~zero).sum())
    if n_nonzero == 0:
        return None
    d = d.astype(np.float64).copy()
    d[zero] = eps
    d[~zero] -= eps * n_zero / n_nonzero
    return d if (d[~zero] > 0).all() else None


def entropy_threshold(stats: TensorStats, levels: int, zero_bin: ZeroBin = "copy_next", kl: Literal["trt", "smoothed", "cfws"] = "trt",
                      edge: Literal["right", "center"] = "right", merge: Literal["even", "mxnet"] = "even") -> float:
    """TensorRT's entropy calibration threshold (docs/methods.md: Baseline calibrators): argmin KL, ties to the largest i."""
    if stats.amax == 0:
        return 0.0
    d = entropy_divergences(stats.abs_hist(), levels, zero_bin, kl, merge)
    finite = np.isfinite(d)
    if not finite.any():
        return stats.amax
    best = np.min(d[finite])
    i_star = int(np.flatnonzero(finite & (d <= best))[-1])  # last minimum
    w = stats.bin_width
    return (i_star + (0.5 if edge == "center" else 0.0)) * w


def percentile_threshold(stats: TensorStats, percentile: float) -> float:
    """Smallest bin edge below which ``percentile`` % of |x| lies."""
    h = stats.abs_hist().astype(np.float64)
    total = h.sum()
    if total == 0 or stats.amax == 0:
        return 0.0
    cdf = np.cumsum(h) / total
    i = int(np.searchsorted(cdf, percentile / 100.0, side="left"))
    return min(i + 1, len(h)) * stats.bin_width


def mse_threshold(stats: TensorStats, fake_quant_for: Callable[[float], Callable[[np.ndarray], np.ndarray]], candidates: int = 128,
                  lowest: float = 0.02, subpoints: int = 4) -> float:
    """Threshold minimising the expected squared quantization error over the histogram.

    ``fake_quant_for(T)`` returns the deployed grid's fake-quantizer for threshold ``T`` (so
    asymmetric and INT7 grids are scored exactly as they will run). Each histogram bin is
    represented by ``subpoints`` evenly spaced values.
    """
    if stats.amax == 0:
        return 0.0
    hist = stats.hist.astype(np.float64)  # type: ignore[union-attr]
    w = stats.bin_width
    edges = -stats.amax + w * np.arange(len(hist))
    offsets = (np.arange(subpoints) + 0.5) / subpoints * w
    keep = hist > 0
    x = (edges[keep][:, None] + offsets[None, :]).astype(np.float32)
    weight = hist[keep][:, None] / subpoints
    best_t, best_err = stats.amax, np.inf
    for t in np.linspace(lowest, 1.0, candidates)[::-1] * stats.amax:
        err = float(np.sum(weight * (x - fake_quant_for(float(t))(x)) ** 2))
        if err < best_err:
            best_t, best_err = float(t), err
    return best_t
