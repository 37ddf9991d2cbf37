"""Lp-optimal clips (plugins_contrib/onnxq-lapq/README.md) and the grids they map to.

* Activations: ``α_p = argmin_α mean|Q_α(x) − x|^p`` over the calibration histogram (bin centres
  weighted by counts), by bounded Brent (``scipy.optimize.minimize_scalar``) inside the bracket of
  the best point of a coarse grid — Brent alone can stop in a local minimum of this ragged curve.
* Weights: the same per output channel, vectorised over a fine grid of clips in
  ``(0, max|w_c|]`` [D: a grid instead of one Brent run per channel].

``Q_α`` is always the grid the deployed graph computes (the target's symmetric or asymmetric
activations, narrowed to ``act_bits``; int8-stored weights narrowed to ``weight_bits``).
"""

from __future__ import annotations

import numpy as np
from onnxq import qparams as qp
from onnxq.calib.statistics import TensorStats
from onnxq.graph.targets import TargetProfile
from onnxq.qparams import MIN_SCALE, QParams


def act_qparams(profile: TargetProfile, lo: float, hi: float, bits: int) -> QParams:
    """Activation qparams for the clipped range ``[lo, hi]`` on a ``bits`` grid stored in 8 bits.

    At the target's own bits this is exactly the target's choice; narrower grids (A4) keep the
    int8/uint8 container, so the QDQ rewrite inserts a Clip (onnxq/qparams.py, W4A4 emulation).
    """
    if bits == profile.bits:
        return profile.activation_qparams(lo, hi)
    if profile.activation_signed:
        q = qp.symmetric(max(abs(float(lo)), abs(float(hi))), bits, narrow=bits < 8)
        return QParams(q.scale, np.zeros((), np.int8), "int8", q.qmin, q.qmax)
    q = qp.asymmetric(lo, hi, bits)
    return QParams(q.scale, q.zero_point.astype(np.uint8), "uint8", q.qmin, q.qmax)


def clipped_range(stats: TensorStats, alpha: float) -> tuple[float, float]:
    """The grid covers ``[max(min, −α), min(max, α)]`` (as onnxq's RangeMethod does)."""
    a = min(float(alpha), stats.amax) if stats.amax > 0 else 0.0
    return max(stats.min, -a), min(stats.max, a)


def _centres(stats: TensorStats) -> tuple[np.ndarray, np.ndarray]:
    h = np.asarray(stats.hist, np.float64)
    edges = np.linspace(-stats.amax, stats.amax, len(h) + 1)
    centres = 0.5 * (edges[:-1] + edges[1:])
    keep = h > 0
    return centres[keep].astype(np.float32), h[keep] / max(h.sum(), 1.0)


def act_lp_clip(stats: TensorStats, p: float, profile: TargetProfile, bits: int, coarse: int = 48) -> float:
    """``argmin_α Σ h·|Q_α(c) − c|^p`` over the histogram of one activation."""
    from scipy.optimize import minimize_scalar

    if stats.hist is None or stats.amax <= 0:
        return stats.amax
    c, w = _centres(stats)
    c64 = c.astype(np.float64)

    def err(alpha: float) -> float:
        q = act_qparams(profile, *clipped_range(stats, alpha), bits)
        return float(np.sum(w * np.abs(q.fake_quantize(c).astype(np.float64) - c64) ** p))

    grid = np.linspace(stats.amax / coarse, stats.amax, coarse)
    errs = np.array([err(a) for a in grid])
    k = int(np.argmin(errs))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, coarse - 1)]
    if hi <= lo:
        return float(grid[k])
    res = minimize_scalar(err, bounds=(lo, hi), method="bounded", options={"xatol": stats.amax * 1e-4})
    return float(res.x) if res.fun <= errs[k] else float(grid[k])


def channel_rows(w: np.ndarray, axis: int | None) -> np.ndarray:
    w = np.asarray(w, np.float32)
    if axis is None:
        return w.reshape(1, -1)
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def weight_lp_steps(w: np.ndarray, axis: int | None, qmin: int, qmax: int, p: float, points: int = 100) -> np.ndarray:
    """Per-channel step ``α_c/qmax`` minimising ``Σ|Q(w_c) − w_c|^p`` over ``points`` clips in ``(0, max|w_c|]``."""
    rows = channel_rows(w, axis).astype(np.float64)
    amax = np.abs(rows).max(axis=1)
    best = amax.copy()
    best_err = np.full(len(amax), np.inf)
    for f in np.linspace(1.0, 1.0 / points, points):  # max-abs first: it wins ties
        s = np.maximum(amax * f / qmax, MIN_SCALE)[:, None]
        e = (np.abs(np.clip(np.rint(rows / s), qmin, qmax) * s - rows) ** p).sum(axis=1)
        better = e < best_err
        best[better], best_err[better] = (amax * f)[better], e[better]
    return np.maximum(best / qmax, MIN_SCALE)


def weight_qparams(steps: np.ndarray, axis: int | None, qmin: int, qmax: int) -> QParams:
    """Symmetric weights in int8 storage restricted to ``[qmin, qmax]``."""
    steps = np.asarray(steps, np.float32)
    if axis is None:
        return QParams(np.float32(steps.reshape(-1)[0]), np.int8(0), "int8", qmin, qmax, None)
    return QParams(steps, np.zeros(steps.shape, np.int8), "int8", qmin, qmax, axis)
