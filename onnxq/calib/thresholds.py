"""Clip thresholds from calibration histograms: TensorRT entropy (exact and guarded), percentile, MSE.

Each function takes a :class:`~onnxq.calib.statistics.TensorStats` with a histogram and returns a
symmetric clip threshold ``T`` (the activation grid then covers ``[max(min, −T), min(max, T)]``).

:func:`entropy_threshold` is TensorRT's algorithm as published. :func:`guarded_entropy_threshold`
is the one ``trt-entropy`` uses by default: the same minimum-KL choice, restricted to thresholds
whose expected squared error on the deployed grid is within a factor of the best threshold's
(docs/methods.md: Baseline calibrators). KL compares the *shapes* of the clipped and the quantized
histograms and never sees how far clipping moves a value, so on a spike followed by a spread tail
(the background of a mean/std-normalized image) it clips the whole tail; the error guard does see it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import numpy as np

from onnxq.calib.statistics import TensorStats
from onnxq.qparams import QParams

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


def _divergences_of(stats: TensorStats, levels: int, zero_bin: ZeroBin, kl: str, merge: str) -> np.ndarray:
    """:func:`entropy_divergences` of ``stats``' |x| histogram, remembered for the same histogram and arguments."""
    h = np.ascontiguousarray(stats.abs_hist(), dtype=np.float64)
    return _remembered_divergences(h.tobytes(), levels, zero_bin, kl, merge)


@functools.lru_cache(maxsize=256)
def _remembered_divergences(hist: bytes, levels: int, zero_bin: ZeroBin, kl: str, merge: str) -> np.ndarray:
    # -p auto builds each calibrator's candidates from the same statistics several times over (with bias correction,
    # pad-correction, easyquant, and again for the refit), and the divergences of 2,048 bins are most of a trt-entropy
    # build (multi_output_det: 3.3 s of a 7.4-s auto run); 256 histograms of 16 KB are 4 MB
    d = entropy_divergences(np.frombuffer(hist, dtype=np.float64), levels, zero_bin, kl, merge)  # type: ignore[arg-type]
    d.flags.writeable = False
    return d


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
    d = _divergences_of(stats, levels, zero_bin, kl, merge)
    finite = np.isfinite(d)
    if not finite.any():
        return stats.amax
    best = np.min(d[finite])
    i_star = int(np.flatnonzero(finite & (d <= best))[-1])  # last minimum
    w = stats.bin_width
    return (i_star + (0.5 if edge == "center" else 0.0)) * w


#: default tolerance of the guarded entropy calibrator: a KL threshold is kept while its expected
#: squared error is at most this many times the least one (docs/methods.md: Baseline calibrators)
DEFAULT_ERROR_TOLERANCE = 4.0


def expected_sq_errors(stats: TensorStats, steps_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Expected squared quantization error of clipping at every bin edge, from the |x| histogram.

    Returns ``E`` of length ``B + 1``: ``E[i]`` is the error (summed over all counted values) of
    the grid whose threshold is ``T = i·w`` and whose step is ``steps_of(T)`` (vectorised over an
    array of thresholds; the deployed grid's step, asymmetric or INT7 included). Each bin counts at
    its centre ``c``: values beyond ``T`` cost ``(c − T)²`` (clipping), values inside cost
    ``min(c², Δ²/12)`` (rounding: uniform noise, except near zero, which every grid represents
    exactly, so a spike of zeros after a ReLU costs nothing). All candidates at once, from prefix
    sums. ``E[0] = inf``.
    """
    h = stats.abs_hist().astype(np.float64)
    nbins = len(h)
    w = stats.bin_width
    c = (np.arange(nbins) + 0.5) * w
    i = np.arange(1, nbins + 1)
    t = i * w
    step = np.asarray(steps_of(t), dtype=np.float64)
    p0 = np.concatenate([[0.0], np.cumsum(h)])
    p1 = np.concatenate([[0.0], np.cumsum(h * c)])
    p2 = np.concatenate([[0.0], np.cumsum(h * c * c)])
    # clipping: sum over j >= i of h_j (c_j - T)^2
    clip = (p2[-1] - p2[i]) - 2 * t * (p1[-1] - p1[i]) + t * t * (p0[-1] - p0[i])
    # rounding: bins with c < step/sqrt(12) cost c^2, the others step^2/12
    k = np.minimum(np.searchsorted(c, step / np.sqrt(12.0), side="left"), i)
    rnd = p2[k] + step * step / 12.0 * (p0[i] - p0[k])
    out = np.full(nbins + 1, np.inf)
    out[1:] = np.maximum(clip, 0.0) + rnd
    return out


def grid_steps(stats: TensorStats, signed: bool, qspan: int) -> Callable[[np.ndarray], np.ndarray]:
    """``steps_of(T)`` for :func:`expected_sq_errors`: the step of the grid a threshold ``T`` deploys.

    Signed (symmetric, zero point 0): ``T / qspan`` with ``qspan`` the largest code (127 at INT8,
    63 at INT7). Unsigned (asymmetric): the clipped observed range ``[max(min, −T), min(max, T)]``
    widened to include 0, over ``qspan`` = 2^bits − 1 steps.
    """
    if signed:
        return lambda t: np.asarray(t, np.float64) / qspan
    lo, hi = stats.min, stats.max
    return lambda t: (np.minimum(hi, t) - np.minimum(np.maximum(lo, -np.asarray(t, np.float64)), 0.0)) / qspan


def guarded_entropy_threshold(stats: TensorStats, levels: int, steps_of: Callable[[np.ndarray], np.ndarray],
                              tolerance: float = DEFAULT_ERROR_TOLERANCE, zero_bin: ZeroBin = "copy_next",
                              kl: Literal["trt", "smoothed", "cfws"] = "trt", edge: Literal["right", "center"] = "right",
                              merge: Literal["even", "mxnet"] = "even") -> tuple[float, bool]:
    """Minimum-KL threshold among those whose expected squared error is within ``tolerance`` × the least.

    Returns ``(T, guarded)``: ``guarded`` is True where TensorRT's own choice (:func:`entropy_threshold`,
    same arguments) was outside the tolerance and a different threshold was taken. Where no
    admissible candidate has a finite divergence, the least-error threshold is used.
    """
    if stats.amax == 0:
        return 0.0, False
    d = _divergences_of(stats, levels, zero_bin, kl, merge)
    err = expected_sq_errors(stats, steps_of)
    w = stats.bin_width
    finite = np.isfinite(d)
    exact = int(np.flatnonzero(finite & (d <= np.min(d[finite])))[-1]) if finite.any() else len(d) - 1
    best_err = float(np.min(err))
    admissible = err <= tolerance * best_err if best_err > 0 else err <= 0
    ok = finite & admissible
    if ok.any():
        i_star = int(np.flatnonzero(ok & (d <= np.min(d[ok])))[-1])
    else:
        i_star = int(np.flatnonzero(err <= best_err)[-1])
    return (i_star + (0.5 if edge == "center" else 0.0)) * w, i_star != exact


def percentile_threshold(stats: TensorStats, percentile: float) -> float:
    """Smallest bin edge below which ``percentile`` % of |x| lies."""
    h = stats.abs_hist().astype(np.float64)
    total = h.sum()
    if total == 0 or stats.amax == 0:
        return 0.0
    cdf = np.cumsum(h) / total
    i = int(np.searchsorted(cdf, percentile / 100.0, side="left"))
    return min(i + 1, len(h)) * stats.bin_width


#: bytes of float64 scratch one block of :func:`mse_threshold`'s candidates may take
_MSE_BLOCK_BYTES = 1 << 24


def mse_threshold(stats: TensorStats, grids_for: Callable[[np.ndarray], QParams], candidates: int = 128,
                  lowest: float = 0.02, subpoints: int = 4) -> float:
    """Threshold minimising the expected squared quantization error over the histogram.

    ``grids_for(T)`` takes the array of candidate thresholds and returns the deployed grids for
    them, one per entry along axis 0 (``TargetProfile.activation_qparams(lo, hi, axis=0)``), so
    asymmetric and INT7 grids are scored exactly as they will run. Among equal errors the largest
    threshold wins. See :func:`mse_errors`.
    """
    if stats.amax == 0:
        return 0.0
    thresholds, errors = mse_errors(stats, grids_for, candidates, lowest, subpoints)
    errors[np.isnan(errors)] = np.inf
    return float(thresholds[int(np.argmin(errors))])


def mse_errors(stats: TensorStats, grids_for: Callable[[np.ndarray], QParams], candidates: int = 128,
               lowest: float = 0.02, subpoints: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The candidate thresholds of :func:`mse_threshold`, largest first, and each one's squared error.

    Each histogram bin is represented by ``subpoints`` evenly spaced values, weighted by its count.
    Candidates are scored a block at a time in one array operation; each candidate's error is the
    same float64 sum, in the same order, as scoring it alone gives (the tests hold it to that), so
    near-ties resolve as they did when the search ran one grid at a time.
    """
    hist = stats.hist.astype(np.float64)  # type: ignore[union-attr]
    w = stats.bin_width
    edges = -stats.amax + w * np.arange(len(hist))
    offsets = (np.arange(subpoints) + 0.5) / subpoints * w
    keep = hist > 0
    x = (edges[keep][:, None] + offsets[None, :]).astype(np.float32).reshape(1, -1)
    weight = np.repeat(hist[keep] / subpoints, subpoints)[None, :]
    thresholds = np.linspace(lowest, 1.0, candidates)[::-1] * stats.amax
    grid = grids_for(thresholds)
    errors = np.empty(candidates)
    block = max(1, _MSE_BLOCK_BYTES // (8 * max(x.size, 1)))
    for start in range(0, candidates, block):
        part = slice(start, start + block)
        g = QParams(grid.scale[part], grid.zero_point[part], grid.dtype, grid.qmin, grid.qmax, axis=0)
        diff = x - g.fake_quantize(x)
        # squared in float32, weighted in float64: the arithmetic of scoring one grid alone
        errors[part] = np.sum(weight * np.square(diff, out=diff), axis=1)
    return thresholds, errors
