"""Multipoint approximation of weight rows: ``w ≈ Σ_i a_i · q_i`` with low-bit integer vectors ``q_i``.

Liu, Ye, Zhou, Liu, "Post-training Quantization with Multiple Points" (arXiv 2002.09049). Each
point is chosen greedily on the residual of the previous ones: for a fixed step ``a`` the best
integers are ``clip(round(r / a))``, so the pair is found by a 1-D grid over ``a``.

The error of a channel's weight error ``e`` is its output error ``E[(e·x)²]`` with the input's
covariance taken as diagonal: ``Σ_j var_j e_j² + (Σ_j μ_j e_j)²``. The mean term matters: inputs
after a ReLU have a large mean, and a step that clips the largest weights shifts every output of
the channel the same way, which the variance term alone does not see (measured: with the variance
term alone the searched step lost 2 dB of output SQNR to plain max-abs rounding on a fixture).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_STEP = 1e-12


@dataclass
class Points:
    """Greedy points of the rows of a ``[rows, length]`` matrix, split into blocks along the length
    (one block: a step per row; several: a step per row and block, as block-wise 4-bit weights)."""

    steps: np.ndarray  #: [points, rows, blocks] float64
    ints: np.ndarray  #: [points, rows, length] int8
    errors: np.ndarray  #: [points + 1, rows]: weighted squared error after 0, 1, ... points

    def approximation(self, rows: np.ndarray | None, points: int, block: int) -> np.ndarray:
        """Σ of the first ``points`` points, for ``rows`` (None: all)."""
        sel = slice(None) if rows is None else rows
        out = np.zeros(self.ints.shape[1:], np.float64)[sel]
        for i in range(points):
            step = np.repeat(self.steps[i][sel], block, axis=1)[:, : out.shape[1]]
            out += step * self.ints[i][sel]
        return out


def output_error(e: np.ndarray, var: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """``Σ var e² + (Σ μ e)²`` per row of ``e``: the output error of weight errors ``e`` under a
    diagonal input covariance ``var`` and input mean ``mu`` (both broadcastable to ``e``)."""
    return np.sum(var * e * e, axis=-1) + np.sum(mu * e, axis=-1) ** 2


def fit_point(r: np.ndarray, var: np.ndarray, mu: np.ndarray, qmin: int, qmax: int, grid: int,
              first_step: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The best ``(a, q)`` per row of residual blocks ``r`` ``[n, length]`` (input moments ``var``,
    ``mu`` broadcastable to it), ``a`` on a grid of ``grid`` values in
    ``[max|r| / (4 qmax), max|r| / qmax]``; ``first_step`` fixes ``a`` (max-abs rounding)."""
    amax = np.abs(r).max(axis=1)
    if first_step is not None:
        cands = first_step[None, :]
    else:
        hi = np.maximum(amax / qmax, MIN_STEP)
        cands = hi[None, :] * np.linspace(0.25, 1.0, grid)[:, None]  # [grid, n]
    best_err = np.full(r.shape[0], np.inf)
    best_a = np.full(r.shape[0], MIN_STEP)
    best_q = np.zeros(r.shape, np.int8)
    for a in cands:
        q = np.clip(np.rint(r / a[:, None]), qmin, qmax)
        err = output_error(r - a[:, None] * q, var, mu)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_a = np.where(better, a, best_a)
        best_q[better] = q[better].astype(np.int8)
    zero = amax == 0
    best_a[zero] = MIN_STEP
    best_q[zero] = 0
    return best_a, best_q


def greedy_points(w: np.ndarray, var: np.ndarray, mu: np.ndarray, bits: int, points: int, block: int | None = None,
                  grid: int = 100, first: str = "grid", signed_range: tuple[int, int] | None = None) -> Points:
    """Up to ``points`` greedy points per row of ``w`` ``[rows, length]``; ``var``/``mu``: the variance
    and mean of the input each element multiplies (``[length]`` or ``[rows, length]``); ``block``:
    a step per block of that many elements (None: per row). Within a block the mean term is
    counted per block (the blocks' output errors add up as if independent).

    ``first="max"`` makes the first point plain max-abs rounding (the usual per-channel grid), so
    that one point reproduces ordinary quantization; later points always use the grid."""
    w = np.asarray(w, np.float64)
    rows, length = w.shape
    blk = length if block is None else int(block)
    nb = -(-length // blk)
    qmin, qmax = signed_range or (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    vv = np.broadcast_to(np.asarray(var, np.float64), w.shape)
    mm = np.broadcast_to(np.asarray(mu, np.float64), w.shape)
    pad = nb * blk - length

    def blocks(x: np.ndarray) -> np.ndarray:  # [rows, length] -> [rows * nb, blk]
        if pad:
            x = np.concatenate([x, np.zeros((rows, pad))], axis=1)
        return x.reshape(rows * nb, blk)

    r = w.copy()
    steps = np.zeros((points, rows, nb))
    ints = np.zeros((points, rows, length), np.int8)
    errors = np.zeros((points + 1, rows))
    errors[0] = output_error(r, vv, mm)
    vb, mb = blocks(vv), blocks(mm)
    for i in range(points):
        rb = blocks(r)
        fixed = np.maximum(np.abs(rb).max(axis=1) / qmax, MIN_STEP) if (i == 0 and first == "max") else None
        a, q = fit_point(rb, vb, mb, qmin, qmax, grid, fixed)
        q = q.reshape(rows, nb * blk)[:, :length]
        steps[i] = a.reshape(rows, nb)
        ints[i] = q
        r = r - np.repeat(steps[i], blk, axis=1)[:, :length] * q
        errors[i + 1] = output_error(r, vv, mm)
    return Points(steps, ints, errors)
