"""Agreement metrics between reference (FP32) and quantized outputs."""

from __future__ import annotations

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-sample cosine similarity (axis 0 is the sample axis)."""
    a = np.asarray(a, np.float64).reshape(len(a), -1) if np.ndim(a) else np.asarray(a, np.float64).reshape(1, 1)
    b = np.asarray(b, np.float64).reshape(a.shape)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-30)
    cos[both_zero] = 1.0
    return float(np.mean(cos))


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf for identical tensors)."""
    ref = np.asarray(reference, np.float64)
    noise = np.sum((ref - np.asarray(test, np.float64)) ** 2)
    signal = np.sum(ref**2)
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return float(10 * np.log10(signal / noise))


def max_abs_error(reference: np.ndarray, test: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(reference, np.float64) - np.asarray(test, np.float64)))) if np.size(reference) else 0.0


def top1(logits: np.ndarray) -> np.ndarray:
    """Arg-max over the last axis of a [N, ..., C] output."""
    return np.asarray(logits).reshape(len(logits), -1, np.shape(logits)[-1]).argmax(-1).reshape(len(logits), -1)[:, 0] if np.ndim(logits) > 2 else np.asarray(logits).argmax(-1)


def looks_like_logits(output: np.ndarray) -> bool:
    """A [N, C] float output with a handful of classes is scored as classification."""
    return np.ndim(output) == 2 and 2 <= np.shape(output)[1] <= 100_000 and np.asarray(output).dtype.kind == "f"


def output_metrics(reference: np.ndarray, test: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """Every metric that applies to one output."""
    m = {"cosine": cosine(reference, test), "sqnr_db": sqnr_db(reference, test), "max_abs_error": max_abs_error(reference, test)}
    if looks_like_logits(reference):
        m["top1_agreement"] = float(np.mean(top1(reference) == top1(test)))
        if labels is not None:
            m["accuracy"] = float(np.mean(top1(test) == labels))
    return m
