"""Sliced Wasserstein distance between two point clouds (e.g. samples of the FP32 and a quantized sampler)."""

from __future__ import annotations

import numpy as np


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, projections: int = 256, seed: int = 0) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance of the projected samples.

    ``a`` and ``b``: ``[n, d]`` with the same ``n`` (the 1-D distance is then the mean absolute
    difference of the sorted projections)."""
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise ValueError(f"need point clouds of one shape, got {a.shape} and {b.shape}")
    dirs = np.random.default_rng(seed).standard_normal((a.shape[1], projections))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    pa, pb = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
    return float(np.mean(np.abs(pa - pb)))
