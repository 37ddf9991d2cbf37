"""A DDPM sampler over an ONNX denoiser ``eps(x_t, t)``, run with ONNX Runtime.

The schedule (steps, linear betas) comes from the model's metadata (``onnxq.ddpm.steps``,
``onnxq.ddpm.beta_start``, ``onnxq.ddpm.beta_end``) or from the caller. Sampling is ancestral
DDPM (Ho et al. 2020): ``x_{t-1} = (x_t - β_t / sqrt(1 - ᾱ_t) · ε) / sqrt(α_t) + sqrt(β_t) · z``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxq.errors import DataError


@dataclass(frozen=True)
class Schedule:
    """A linear-beta DDPM schedule of ``steps`` timesteps."""

    steps: int
    beta_start: float
    beta_end: float

    @property
    def betas(self) -> np.ndarray:
        return np.linspace(self.beta_start, self.beta_end, self.steps, dtype=np.float64)

    @property
    def alpha_bar(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)


def schedule_of(model: onnx.ModelProto | str | Path, steps: int | None = None, beta_start: float | None = None,
                beta_end: float | None = None) -> Schedule:
    """The model's schedule from its metadata, each value overridable; a clear error when one is missing."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    kind = meta.get("onnxq.ddpm.schedule", "linear")
    if kind != "linear":
        raise DataError(f"ptq4dm: the model's noise schedule '{kind}' is not supported (linear betas only)")
    values = {"steps": steps, "beta_start": beta_start, "beta_end": beta_end}
    for k in values:
        if values[k] is None and f"onnxq.ddpm.{k}" in meta:
            values[k] = float(meta[f"onnxq.ddpm.{k}"])
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise DataError(f"ptq4dm: the model's metadata has no onnxq.ddpm.{missing[0]}; pass --data-opt {missing[0]}=VALUE")
    return Schedule(int(values["steps"]), float(values["beta_start"]), float(values["beta_end"]))


Denoise = Callable[[np.ndarray, np.ndarray], np.ndarray]


def sample(denoise: Denoise, schedule: Schedule, noise: np.ndarray, seed: int | np.random.SeedSequence = 0,
           capture: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the reverse process from ``noise`` (``[n, ...]``) and return the samples.

    ``capture`` (``[n]`` iteration indices, 0 = the first denoising step, from pure noise): also
    return, for every sample, the ``x`` the denoiser received at that iteration. The per-step noise
    comes from ``seed``, so two models sampled with the same noise and seed are comparable."""
    rng = np.random.default_rng(seed)
    betas, abar = schedule.betas, schedule.alpha_bar
    x = np.asarray(noise, np.float64)
    kept = np.zeros_like(x) if capture is not None else None
    for i in range(schedule.steps):
        t = schedule.steps - 1 - i
        if capture is not None:
            hit = capture == i
            kept[hit] = x[hit]
        eps = np.asarray(denoise(x.astype(np.float32), np.full(len(x), t, np.int64)), np.float64)
        x = (x - betas[t] / np.sqrt(1.0 - abar[t]) * eps) / np.sqrt(1.0 - betas[t])
        if t > 0:
            x = x + np.sqrt(betas[t]) * rng.standard_normal(x.shape)
    return x, kept


def ort_denoiser(model: str | Path | onnx.ModelProto, x_name: str = "x", t_name: str = "t", threads: int | None = None) -> Denoise:
    """``eps(x, t)`` by an ONNX Runtime session of ``model`` (the timestep cast to the input's type).

    ``threads``: ONNX Runtime's intra-op threads (None: its default)."""
    from onnxq.runtime.ort import make_session

    sess = make_session(model if isinstance(model, onnx.ModelProto) else str(model), "all", threads=threads)
    t_type = next(i.type for i in sess.get_inputs() if i.name == t_name)
    t_dtype = np.float32 if "float" in t_type else np.int64

    def denoise(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        return sess.run(None, {x_name: x, t_name: t.astype(t_dtype)})[0]

    return denoise
