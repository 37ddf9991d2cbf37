"""Score quantized denoisers by what they generate, with the sampling noise taken out.

Paired sampling: the quantized and the FP32 sampler start from the same Gaussian noise and draw the
same per-step noise, so every difference between their samples is quantization error, not a
different draw. Two scores of the paired endpoints:

* the sliced Wasserstein distance (SWD) between the two point clouds, over fixed projection
  directions (the same directions for every model compared), which compares the distributions;
* the mean L2 drift, the mean over samples of the distance between a quantized endpoint and the
  FP32 endpoint from the same noise, which sees every moved trajectory (the SWD forgives a sample
  that moved to another mode as long as one moved back).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxq_ptq4dm.metrics import sliced_wasserstein
from onnxq_ptq4dm.sampler import ort_denoiser, sample, schedule_of


def generated(model: str | Path | onnx.ModelProto, schedule_from: str | Path, n: int = 2000, seed: int = 123,
              x_name: str = "x", t_name: str = "t", shape: tuple[int, ...] = (2,), threads: int | None = 1) -> np.ndarray:
    """``n`` samples of ``model``'s sampler (the schedule read from ``schedule_from``'s metadata).

    ``seed`` fixes both the initial noise and the per-step noise: two models sampled with one seed
    follow paired trajectories."""
    schedule = schedule_of(schedule_from)
    noise = np.random.default_rng(seed).standard_normal((n, *shape))
    out, _ = sample(ort_denoiser(model, x_name, t_name, threads=threads), schedule, noise, seed=seed + 1)
    return out


@dataclass(frozen=True)
class PairedScore:
    """How far a quantized sampler's samples are from the FP32 sampler's, from the same noise."""

    swd: float
    drift: float


def paired_score(quantized: np.ndarray, fp32: np.ndarray, projections: int = 1024) -> PairedScore:
    """SWD (fixed directions) and mean L2 drift between paired endpoints ``[n, d]``."""
    q, f = np.asarray(quantized, np.float64), np.asarray(fp32, np.float64)
    drift = float(np.mean(np.linalg.norm((q - f).reshape(len(q), -1), axis=1)))
    return PairedScore(sliced_wasserstein(q, f, projections=projections, seed=0), drift)


def eps_error_by_timestep(quantized: str | Path | onnx.ModelProto, fp32: str | Path, n: int = 1024, seed: int = 123,
                          x_name: str = "x", t_name: str = "t", shape: tuple[int, ...] = (2,), threads: int | None = 1) -> np.ndarray:
    """``[T]``: at each timestep ``t``, the RMS difference of the quantized and the FP32 denoiser's
    output on the same inputs, the ``x_t`` of the FP32 sampler's trajectories (teacher forcing): where
    along the chain a calibration leaves its error."""
    schedule = schedule_of(fp32)
    q, f = ort_denoiser(quantized, x_name, t_name, threads=threads), ort_denoiser(fp32, x_name, t_name, threads=threads)
    err = np.zeros(schedule.steps)

    def denoise(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        ref = f(x, t)
        err[int(t[0])] = float(np.sqrt(np.mean((q(x, t) - ref) ** 2)))
        return ref

    sample(denoise, schedule, np.random.default_rng(seed).standard_normal((n, *shape)), seed=seed + 1)
    return err
