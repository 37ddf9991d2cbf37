"""Weight grids (numpy only): W-bit per-channel steps with the Lp "mse" init of BRECQ (plugins_contrib/onnxq-brecq/README.md).

The integers are stored in an int8 container restricted to the W-bit range (int8 storage
restricted to [−7, 7] for narrow 4-bit weights, onnxq/qparams.py), so the exported graph is an
ordinary int8 ``DequantizeLinear`` that every runtime runs.
"""

from __future__ import annotations

import numpy as np
from onnxq.graph.targets import TargetProfile
from onnxq.qparams import MIN_SCALE, QParams, int_range


def weight_range(bits: int, profile: TargetProfile) -> tuple[int, int]:
    """Signed integer range of a ``bits``-wide weight grid, narrow when the target wants narrow weights."""
    return int_range(bits, True, profile.weight_narrow)


def _rows(w: np.ndarray, axis: int | None) -> np.ndarray:
    """[C, rest] view with the channel axis first (a single row when per-tensor)."""
    w = np.asarray(w, np.float32)
    if axis is None:
        return w.reshape(1, -1)
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def lp_steps(w: np.ndarray, axis: int | None, qmin: int, qmax: int, p: float = 2.4, shrink: float = 0.01, steps: int = 80) -> np.ndarray:
    """Per-channel step minimising ``Σ|Q(w) − w|^p``, trying max-abs shrunk by ``shrink`` up to ``steps`` times.

    The un-shrunk max-abs step is tried first and wins ties, so the result is never worse (in Lp)
    than max-abs scaling.
    """
    rows = _rows(w, axis).astype(np.float64)
    amax = np.abs(rows).max(axis=1)
    best_t = amax.copy()
    best_err = np.full(len(amax), np.inf)
    for k in range(steps):
        t = amax * (1.0 - shrink * k)
        s = np.maximum(t / qmax, MIN_SCALE)[:, None]
        err = (np.abs(np.clip(np.rint(rows / s), qmin, qmax) * s - rows) ** p).sum(axis=1)
        better = err < best_err
        best_t[better], best_err[better] = t[better], err[better]
    return np.maximum(best_t / qmax, MIN_SCALE)


def maxabs_steps(w: np.ndarray, axis: int | None, qmax: int) -> np.ndarray:
    return np.maximum(np.abs(_rows(w, axis)).max(axis=1) / qmax, MIN_SCALE)


def weight_qparams(steps: np.ndarray, axis: int | None, qmin: int, qmax: int) -> QParams:
    """Symmetric int8-container qparams with the integer range narrowed to ``[qmin, qmax]``."""
    steps = np.asarray(steps, np.float32)
    if axis is None:
        return QParams(np.float32(steps.reshape(-1)[0]), np.int8(0), "int8", qmin, qmax, None)
    return QParams(steps, np.zeros(steps.shape, np.int8), "int8", qmin, qmax, axis)


def broadcast_steps(q: QParams, ndim: int) -> np.ndarray:
    """The step of every weight element's channel, shaped to broadcast against the weight."""
    s = np.asarray(q.scale, np.float32)
    if q.axis is None or s.ndim == 0:
        return s.reshape([1] * ndim)
    shape = [1] * ndim
    shape[q.axis] = -1
    return s.reshape(shape)
