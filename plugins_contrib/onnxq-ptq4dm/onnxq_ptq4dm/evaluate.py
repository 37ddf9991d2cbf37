"""Score quantized denoisers by what they generate: the sliced Wasserstein distance of their samples
to the FP32 sampler's, from the same noise and the same per-step noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from onnxq_ptq4dm.metrics import sliced_wasserstein
from onnxq_ptq4dm.sampler import ort_denoiser, sample, schedule_of


def generated(model: str | Path | onnx.ModelProto, schedule_from: str | Path, n: int = 2000, seed: int = 123,
              x_name: str = "x", t_name: str = "t", shape: tuple[int, ...] = (2,)) -> np.ndarray:
    """``n`` samples of ``model``'s sampler (the schedule read from ``schedule_from``'s metadata)."""
    schedule = schedule_of(schedule_from)
    noise = np.random.default_rng(seed).standard_normal((n, *shape))
    out, _ = sample(ort_denoiser(model, x_name, t_name), schedule, noise, seed=seed + 1)
    return out


def swd_to_fp32(quantized: str | Path | onnx.ModelProto, fp32: str | Path, n: int = 2000, seed: int = 123, **kw) -> float:
    """Sliced Wasserstein distance between the quantized and the FP32 sampler's samples."""
    return sliced_wasserstein(generated(quantized, fp32, n, seed, **kw), generated(fp32, fp32, n, seed, **kw))


def paired_rms(quantized: str | Path | onnx.ModelProto, fp32: str | Path, n: int = 2000, seed: int = 123, **kw) -> float:
    """RMS distance between each quantized sample and the FP32 sample drawn from the same noise:
    how far quantization moves a trajectory (more sensitive than the SWD, which compares the
    distributions and forgives samples that moved to another mode)."""
    q, f = generated(quantized, fp32, n, seed, **kw), generated(fp32, fp32, n, seed, **kw)
    return float(np.sqrt(np.mean(np.sum((q - f) ** 2, axis=1))))
