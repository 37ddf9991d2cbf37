"""Quantization parameters and the numeric quantizers that match ONNX QuantizeLinear.

onnxq always stores a *step* (ONNX ``y_scale``), never a multiplier. Simulation uses exactly the
arithmetic of the deployed graph: round half to even, saturate to the integer range, and the
narrowed ranges of INT7 (docs/architecture.md, INT7).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: smallest step onnxq emits; guards all-zero tensors (a zero scale is invalid ONNX/TensorRT).
MIN_SCALE = 1e-8


@dataclass(frozen=True)
class QParams:
    """How one tensor is quantized.

    ``scale`` and ``zero_point`` are scalars (per-tensor) or 1-D along ``axis`` (per-channel).
    ``qmin``/``qmax`` are the integer range actually used; it may be narrower than the container
    dtype (INT7 in int8, narrow-range weights), in which case the graph enforces it with a Clip
    (activations) or the stored integers already respect it (weights).
    """

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: str  # "int8" | "uint8" | "int4" | "uint4"
    qmin: int
    qmax: int
    axis: int | None = None
    #: block quantization (opset 21): ``scale`` has the input's shape with ``axis`` divided by this
    block_size: int | None = None
    #: weights only: the step that produced the stored integers, when the dequantization ``scale``
    #: was corrected afterwards (magnitude correction of a clipped channel); None = ``scale``
    quant_scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        scale = np.asarray(self.scale, dtype=np.float32)
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ValueError(f"quantization scale must be finite and positive, got {scale.ravel()[:4]}")
        if self.axis is None and self.block_size is None and scale.size != 1:
            # several scales with no axis would be written as a per-tensor Q/DQ that no runtime can read as meant
            raise ValueError(f"a per-tensor scale must be one value, got shape {scale.shape}: give the channel axis")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", np.asarray(self.zero_point, dtype=self.np_dtype))
        if self.quant_scale is not None:
            qs = np.asarray(self.quant_scale, dtype=np.float32)
            if qs.shape != scale.shape or not np.all(np.isfinite(qs)) or np.any(qs <= 0):
                raise ValueError("quant_scale must match scale's shape and be finite and positive")
            object.__setattr__(self, "quant_scale", qs)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype({"int8": np.int8, "uint8": np.uint8, "int4": np.int8, "uint4": np.uint8}[self.dtype])

    @property
    def container_range(self) -> tuple[int, int]:
        return {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}[self.dtype]

    @property
    def narrowed(self) -> bool:
        """True when the used integer range is narrower than what QuantizeLinear saturates to."""
        return (self.qmin, self.qmax) != self.container_range

    @property
    def symmetric(self) -> bool:
        return bool(np.all(self.zero_point == 0)) and self.dtype in ("int8", "int4")

    def real_range(self) -> tuple[np.ndarray, np.ndarray]:
        """The representable real interval ``[scale·(qmin−zp), scale·(qmax−zp)]``."""
        zp = self.zero_point.astype(np.float64)
        return self.scale * (self.qmin - zp), self.scale * (self.qmax - zp)

    def _broadcast(self, x: np.ndarray, quant: bool = False) -> tuple[np.ndarray, np.ndarray]:
        s = (self.quant_scale if quant and self.quant_scale is not None else self.scale).astype(np.float32)
        z = self.zero_point.astype(np.float32)
        if self.block_size:
            n = x.shape[self.axis]  # type: ignore[index]
            s = np.repeat(s, self.block_size, axis=self.axis).take(range(n), axis=self.axis)
            z = np.repeat(z, self.block_size, axis=self.axis).take(range(n), axis=self.axis)
            return s, z
        if self.axis is not None and s.ndim == 1:
            shape = [1] * x.ndim
            shape[self.axis] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        return s, z

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Integers as the deployed graph stores them (round half to even, saturated)."""
        s, z = self._broadcast(x, quant=True)
        q = np.rint(np.asarray(x, np.float32) / s) + z
        return np.clip(q, self.qmin, self.qmax).astype(self.np_dtype)

    def fake_quantize(self, x: np.ndarray) -> np.ndarray:
        """Quantize then dequantize, in float32."""
        s, z = self._broadcast(x)
        sq = self._broadcast(x, quant=True)[0] if self.quant_scale is not None else s
        # float32 throughout, as QuantizeLinear/DequantizeLinear compute it, and in place: this
        # runs on every candidate of a search, where float64 temporaries doubled the cost
        z32 = np.asarray(z, np.float32)
        q = np.asarray(x, np.float32) / np.asarray(sq, np.float32)
        np.rint(q, out=q)
        q += z32
        np.clip(q, self.qmin, self.qmax, out=q)
        q -= z32
        q *= np.asarray(s, np.float32)
        return q


def int_range(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-wide grid: signed narrow [−(2^(b−1)−1), 2^(b−1)−1]."""
    if signed:
        qmax = 2 ** (bits - 1) - 1
        return (-qmax if narrow else -qmax - 1), qmax
    return 0, 2**bits - 1


def container_for(bits: int, signed: bool) -> str:
    """The ONNX storage type for a grid of ``bits`` (INT7 lives in int8)."""
    if bits <= 4:
        return "int4" if signed else "uint4"
    return "int8" if signed else "uint8"


def symmetric(threshold: np.ndarray | float, bits: int, narrow: bool, axis: int | None = None) -> QParams:
    """Symmetric signed qparams with clip threshold ``T``: step = T / qmax, zero point 0."""
    qmin, qmax = int_range(bits, True, narrow)
    t = np.maximum(np.asarray(threshold, dtype=np.float64), MIN_SCALE * qmax)
    scale = (t / qmax).astype(np.float32)
    return QParams(scale, np.zeros_like(scale, dtype=np.int8), container_for(bits, True), qmin, qmax, axis)


def asymmetric(lo: float | np.ndarray, hi: float | np.ndarray, bits: int, axis: int | None = None) -> QParams:
    """Unsigned asymmetric qparams covering ``[lo, hi]`` (the range is widened to include 0).

    ``lo`` and ``hi`` may be 1-D arrays, one range per channel along ``axis`` (a calibrator scoring
    many candidate ranges at once); each channel's step and zero point are what the scalar call gives.
    """
    qmin, qmax = int_range(bits, False, False)
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    scale = np.maximum((hi - lo) / (qmax - qmin), MIN_SCALE)
    zp = np.clip(np.rint(qmin - lo / scale), qmin, qmax).astype(np.uint8)
    return QParams(scale.astype(np.float32), zp, container_for(bits, False), qmin, qmax, axis)


def blockwise(weight: np.ndarray, axis: int, block_size: int, bits: int, signed: bool) -> QParams:
    """Block-wise qparams along ``axis`` (blocks of ``block_size``; the last may be shorter).

    Signed grids are symmetric (zero point 0, [−2^(b−1), 2^(b−1)−1] with step max|w|/(2^(b−1)−1));
    unsigned grids are asymmetric min/max per block with an integer zero point.
    """
    w = np.moveaxis(np.asarray(weight, np.float32), axis, 0)
    n = w.shape[0]
    nblocks = -(-n // block_size)
    pad = nblocks * block_size - n
    if pad:
        w = np.concatenate([w, np.zeros((pad,) + w.shape[1:], np.float32)])
    blocks = w.reshape((nblocks, block_size) + w.shape[1:])
    if signed:
        qmin, qmax = int_range(bits, True, False)
        scale = np.maximum(np.abs(blocks).max(axis=1) / qmax, MIN_SCALE)
        zp = np.zeros(scale.shape, np.int8)
    else:
        qmin, qmax = int_range(bits, False, False)
        lo = np.minimum(blocks.min(axis=1), 0.0)
        hi = np.maximum(blocks.max(axis=1), 0.0)
        scale = np.maximum((hi - lo) / (qmax - qmin), MIN_SCALE)
        zp = np.clip(np.rint(qmin - lo / scale), qmin, qmax).astype(np.uint8)
    scale = np.moveaxis(scale.astype(np.float32), 0, axis)
    zp = np.moveaxis(zp, 0, axis)
    return QParams(scale, zp, container_for(bits, signed), qmin, qmax, axis, block_size)


def per_channel_absmax(weight: np.ndarray, axis: int) -> np.ndarray:
    """max |w| over every axis but ``axis``."""
    w = np.abs(np.asarray(weight, dtype=np.float32))
    w = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return w.max(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
