"""Activation-aware truncated SVD of one MatMul weight, and its output error at every rank.

For ``Y = X·W`` with ``W`` of shape ``[K, N]`` (ONNX MatMul: input channels are the rows of ``W``),
ASVD (Yuan et al., arXiv 2312.05821) scales the rows by ``S = diag(s^α)``, ``s_j = mean|x_j|`` over
the calibration tokens, takes the SVD ``S·W = U Σ Vᵀ``, keeps rank ``r`` and undoes the scaling on
the left factor, splitting Σ evenly between the two:

    W ≈ A·B,   A = S⁻¹ U_r Σ_r^½  ([K, r]),   B = Σ_r^½ V_rᵀ  ([r, N]).

The scaling makes the truncation keep what the *inputs* make large: a row read by a channel that
is 30x larger than the others counts 30^α times more. α = 0 is plain SVD (no scaling at all).

With ``G = XᵀX / T`` from the same tokens, the relative output error of rank ``r`` is exact and
costs no model run: ``‖X(W − A·B)‖² / ‖X·W‖² = Σ_{i>r} σ_i² u_iᵀ S⁻¹ G S⁻¹ u_i / tr(Wᵀ G W)``
(the right singular vectors are orthonormal), a suffix sum over the singular values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from onnxq.calib.statistics import Reducer


@dataclass(frozen=True)
class InputMoments(Reducer):
    """Per input channel ``mean |x|`` and the Gram matrix ``XᵀX / T`` of a MatMul input (last axis = channels).

    Sums in float64 over every token, so the result does not depend on how the pass batches samples.
    """

    kind: ClassVar[str] = "asvd_input_moments"
    cacheable: ClassVar[bool] = False

    def start(self) -> list[Any]:
        return [None, None, 0]

    def update(self, acc, values, stats):
        x = np.asarray(values, np.float64)
        x = x.reshape(-1, x.shape[-1])
        abs_sum, gram = np.abs(x).sum(0), x.T @ x
        if acc[0] is None:
            return [abs_sum, gram, x.shape[0]]
        return [acc[0] + abs_sum, acc[1] + gram, acc[2] + x.shape[0]]

    def finish(self, acc) -> tuple[np.ndarray, np.ndarray]:
        if acc[0] is None:
            raise ValueError("no calibration tokens reached this MatMul")
        n = max(acc[2], 1)
        return acc[0] / n, acc[1] / n


def input_scale(mean_abs: np.ndarray, alpha: float) -> np.ndarray | None:
    """``s^α`` per input channel (None for α = 0: no scaling, plain SVD); dead channels get a floor."""
    if alpha == 0:
        return None
    s = np.asarray(mean_abs, np.float64)
    s = np.maximum(s, max(float(s.max()), 1e-30) * 1e-6)  # a channel never seen non-zero must not divide by 0
    return s**alpha


@dataclass
class Decomposition:
    """The SVD of the scaled weight, and the relative output error of keeping each rank."""

    u: np.ndarray  # [K, m]
    sigma: np.ndarray  # [m]
    vt: np.ndarray  # [m, N]
    scale: np.ndarray | None  # [K] (None: plain SVD)
    #: errors[r] = relative output error at rank r (r = 0..m; errors[m] = 0 up to rounding)
    errors: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.shape[0], self.vt.shape[1]

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``A`` ([K, r]) and ``B`` ([r, N]) with ``A·B`` the rank-``r`` approximation of ``W``, float32."""
        root = np.sqrt(self.sigma[:rank])
        a = self.u[:, :rank] * root
        if self.scale is not None:
            a = a / self.scale[:, None]
        b = root[:, None] * self.vt[:rank]
        return a.astype(np.float32), b.astype(np.float32)


def decompose(w: np.ndarray, mean_abs: np.ndarray, gram: np.ndarray | None, alpha: float) -> Decomposition:
    """SVD of ``diag(s^α)·W`` and the output error per rank on the calibration inputs' Gram matrix.

    Without ``gram`` the error is the relative Frobenius error of the scaled weight.
    """
    w64 = np.asarray(w, np.float64)
    scale = input_scale(mean_abs, alpha)
    target = w64 if scale is None else scale[:, None] * w64
    u, sigma, vt = np.linalg.svd(target, full_matrices=False)
    if gram is None:
        energy = sigma**2
        total = float(energy.sum())
    else:
        m = np.asarray(gram, np.float64)
        if scale is not None:
            m = m / scale[:, None] / scale[None, :]
        energy = sigma**2 * np.sum(u * (m @ u), axis=0)  # u_iᵀ M u_i for every i, by BLAS
        total = float(np.sum(w64 * (np.asarray(gram, np.float64) @ w64)))
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])  # tail[r] = sum over i >= r
    errors = np.maximum(tail, 0.0) / max(total, 1e-30)
    return Decomposition(u, sigma, vt, scale, errors)


def dense_params(shape: tuple[int, int]) -> int:
    return shape[0] * shape[1]


def factor_params(shape: tuple[int, int], rank: int) -> int:
    return rank * (shape[0] + shape[1])


def max_useful_rank(shape: tuple[int, int]) -> int:
    """The largest rank whose two factors hold fewer parameters than the dense weight."""
    k, n = shape
    return max((k * n - 1) // (k + n), 0)
