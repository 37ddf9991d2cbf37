"""PB-LLM on one MatMul weight: salient mask, per-channel binarization, 8-bit salient grid, GPTQ compensation.

ONNX MatMul ``Y = X·W`` with ``W`` of shape ``[K, N]``: input channels are the rows, output channels
(the paper's per-row quantization of ``[out, in]`` weights) the columns. For a salient fraction ``f``:

1. salience per weight: ``|w|`` (``magnitude``) or ``w² / [H⁻¹]_kk²`` (``hessian``, the error GPTQ
   would pay for removing it); exactly ``round(f·K·N)`` weights with the largest salience are salient;
2. per output channel ``n``, over its binarized (non-salient) weights: ``μ_n = mean w``,
   ``α_n = mean |w − μ_n|``; a binarized weight becomes ``α_n·sign(w − μ_n) + μ_n`` (sign(0) = +1);
3. a salient weight keeps 8 bits on the same channel's offset: ``μ_n + s_n·(q − z_n)``, an asymmetric
   int8 grid over the channel's salient ``w − μ_n`` (0 exactly representable, so the binarized
   positions hold ``q = z_n`` and read 0);
4. GPTQ compensation (Frantar et al.): input rows are quantized one by one in the order of the
   calibration inputs (no reordering) and each row's error, divided by the Cholesky factor of
   ``H⁻¹``, is spread over the rows not yet quantized; ``H = XᵀX`` from the calibration inputs,
   damped by 1% of its mean diagonal (×10 until it factorises).

The mask, ``μ``, ``α`` and the salient grid are fixed from the original weight before the
compensation (the paper re-selects the mask per block of 128 columns; fixing it keeps one scale
and offset per channel, which is what standard ONNX stores, and makes the salient count exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PartialBinary:
    """The result for one weight: the two integer tensors and their per-channel parameters."""

    mask: np.ndarray  # [K, N] bool, True = salient (8-bit)
    q_salient: np.ndarray  # [K, N] int8: salient integers, z at binarized positions
    scale: np.ndarray  # [N] float32, salient grid step
    zero_point: np.ndarray  # [N] int8
    q_binary: np.ndarray  # [K, N] int8 in {-1, +1} at binarized positions, 0 at salient ones
    alpha: np.ndarray  # [N] float32
    mu: np.ndarray  # [N] float32

    def dequantized(self) -> np.ndarray:
        """``μ + s·(q_salient − z) + α·q_binary``, float32 (what the ONNX graph computes)."""
        sal = (self.q_salient.astype(np.float32) - self.zero_point.astype(np.float32)) * self.scale
        return (sal + self.q_binary.astype(np.float32) * self.alpha + self.mu).astype(np.float32)

    @property
    def salient_fraction(self) -> float:
        return float(self.mask.mean())

    def bits_per_weight(self, mask_bits: float = 0.0) -> float:
        """Payload bits per weight: 8 per salient weight, 1 per binarized one (+ ``mask_bits`` for the mask)."""
        f = self.salient_fraction
        return 8 * f + (1 - f) + mask_bits


def inverse_cholesky_upper(h: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper triangular ``U`` with ``UᵀU = (H + λI)⁻¹``, λ = damp·mean(diag H) (×10 until it factorises)."""
    h = np.asarray(h, np.float64)
    mean_diag = float(np.mean(np.diag(h))) or 1.0
    d = damp
    for _ in range(8):
        try:
            hinv = np.linalg.inv(np.linalg.cholesky(h + d * mean_diag * np.eye(len(h))))
            return np.linalg.cholesky(hinv.T @ hinv).T  # (L Lᵀ)⁻¹ = L⁻ᵀ L⁻¹
        except np.linalg.LinAlgError:
            d = d * 10 if d > 0 else 1e-4
    raise np.linalg.LinAlgError("H is not positive definite even with heavy damping")


def salient_mask(w: np.ndarray, fraction: float, salience: str = "magnitude", u: np.ndarray | None = None) -> np.ndarray:
    """Exactly ``round(fraction·w.size)`` True entries at the most salient weights (ties: lower flat index)."""
    count = int(round(fraction * w.size))
    mask = np.zeros(w.size, bool)
    if count == 0:
        return mask.reshape(w.shape)
    if salience == "magnitude" or u is None:
        score = np.abs(w)
    else:  # [H⁻¹]_kk = Σ_j U_jk², the diagonal of UᵀU
        hinv_diag = np.sum(u * u, axis=0)
        score = w.astype(np.float64) ** 2 / hinv_diag[:, None] ** 2
    order = np.argsort(-score.ravel(), kind="stable")
    mask[order[:count]] = True
    return mask.reshape(w.shape)


def _channel_params(w: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """μ, α over each channel's binarized weights; the int8 grid (scale, zero point) of its salient ``w − μ``."""
    binar = ~mask
    count = np.maximum(binar.sum(0), 1)
    mu = np.where(binar, w, 0).sum(0) / count
    alpha = np.where(binar, np.abs(w - mu), 0).sum(0) / count
    alpha = np.where(alpha > 0, alpha, 1e-8)
    v = w - mu
    lo = np.minimum(np.where(mask, v, np.inf).min(0), 0.0)
    hi = np.maximum(np.where(mask, v, -np.inf).max(0), 0.0)
    scale = (hi - lo) / 255.0
    scale = np.where(scale > 0, scale, 1e-8)
    zp = np.clip(np.rint(-lo / scale) - 128, -128, 127)
    return mu, alpha, scale, zp


def partial_binarize(w: np.ndarray, h: np.ndarray | None, fraction: float = 0.1, salience: str = "magnitude",
                     compensate: bool = True, damp: float = 0.01, block: int = 128) -> PartialBinary:
    """PB-LLM of ``w`` ``[K, N]`` with ``h = XᵀX`` ``[K, K]`` (module docstring); ``h=None`` or
    ``compensate=False``: every weight quantized as it is (no compensation)."""
    w = np.asarray(w, np.float64)
    k, n = w.shape
    u = None
    if h is not None and (compensate or salience == "hessian"):
        H = np.array(h, np.float64)
        dead = np.diag(H) <= 0
        H[dead, dead] = 1.0
        u = inverse_cholesky_upper(H, damp)
    mask = salient_mask(w, fraction, salience, u)
    mu, alpha, scale, zp = _channel_params(w, mask)

    def quantize(rows: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qs = np.clip(np.rint((rows - mu) / scale) + zp, -128, 127)
        qs = np.where(m, qs, zp)
        qb = np.where(m, 0, np.where(rows >= mu, 1, -1))
        deq = (qs - zp) * scale + qb * alpha + mu
        return qs, qb, deq

    if u is None or not compensate:
        qs, qb, _ = quantize(w, mask)
    else:
        W = w.copy()
        qs, qb = np.zeros((k, n)), np.zeros((k, n))
        for i1 in range(0, k, block):  # lazy batches: rows inside a block, then one product for the rest
            i2 = min(i1 + block, k)
            W1, U1 = W[i1:i2].copy(), u[i1:i2, i1:i2]
            err = np.zeros_like(W1)
            for r in range(i2 - i1):
                a, b, deq = quantize(W1[r], mask[i1 + r])
                qs[i1 + r], qb[i1 + r] = a, b
                e = (W1[r] - deq) / U1[r, r]
                W1[r + 1:] -= np.outer(U1[r, r + 1:], e)
                err[r] = e
            if i2 < k:
                W[i2:] -= u[i1:i2, i2:].T @ err
    return PartialBinary(mask, qs.astype(np.int8), scale.astype(np.float32), zp.astype(np.int8),
                         qb.astype(np.int8), alpha.astype(np.float32), mu.astype(np.float32))


def rtn(w: np.ndarray, bits: int) -> np.ndarray:
    """Round-to-nearest per output channel on an asymmetric min-max grid of ``bits`` bits (the baseline), dequantized."""
    w = np.asarray(w, np.float64)
    lo, hi = np.minimum(w.min(0), 0), np.maximum(w.max(0), 0)
    levels = 2**bits - 1
    scale = np.where(hi > lo, (hi - lo) / levels, 1e-8)
    zp = np.rint(-lo / scale)
    return ((np.clip(np.rint(w / scale) + zp, 0, levels) - zp) * scale).astype(np.float32)
