"""``ptq4dm``: calibration data for diffusion denoisers, after PTQ4DM (Shang et al., arXiv 2211.15736;
plugins_contrib/onnxq-ptq4dm/README.md).

``--data ptq4dm:DENOISER.onnx`` runs the FP32 sampler from Gaussian noise and yields, for every
calibration sample, the ``(x_t, t)`` the denoiser sees at an iteration drawn from the paper's
normal distribution over the chain (``--data-opt timesteps=uniform|last`` for the alternatives,
``pairing=as_released`` for the released script's timestep pairing). Any onnxq method then
quantizes the denoiser on those inputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from onnxq.calib.readers import Batch, DataReader
from onnxq.errors import DataError
from onnxq.hookspecs import hookimpl
from onnxq.options import option

from onnxq_ptq4dm.sampler import ort_denoiser, sample, schedule_of
from onnxq_ptq4dm.timesteps import iterations, paired_timesteps

__version__ = "0.1.0"


@dataclass(frozen=True)
class Ptq4dmOptions:
    """Options of the PTQ4DM calibration reader (``--data-opt KEY=VALUE``)."""

    samples: int = option(1024, "calibration samples (the paper: 1024)")
    timesteps: Literal["normal", "uniform", "last"] = option("normal", "iterations the samples come from: normal = int(N(mean, std)·T) from the noise end (the paper); uniform; last = pure noise only")
    mean: float = option(0.4, "mean of the normal choice, as a fraction of the chain from noise")
    std: float = option(0.4, "standard deviation of the normal choice")
    pairing: Literal["sampler", "as_released"] = option("sampler", "timestep fed with each x: sampler = the one the sampler used; as_released = the released script's (the iteration index)")
    chunk: int = option(256, "samples run through the sampler together (memory)")
    seed: int = option(0, "seed of the noise and the timestep draws")
    steps: int | None = option(None, "diffusion steps T (default: the model's onnxq.ddpm.steps metadata)")
    beta_start: float | None = option(None, "first beta of the linear schedule (default: model metadata)")
    beta_end: float | None = option(None, "last beta (default: model metadata)")
    x_input: str | None = option(None, "the noisy-sample input (default: the float input that is not 1-D)")
    t_input: str | None = option(None, "the timestep input (default: the 1-D input)")

    def validate(self) -> None:
        if self.samples < 1 or self.chunk < 1:
            raise ValueError("samples and chunk must be >= 1")
        if self.std <= 0:
            raise ValueError("std must be > 0")


class Ptq4dmReader(DataReader):
    """``ptq4dm:DENOISER.onnx``: (x_t, t) pairs from the FP32 DDPM sampler at PTQ4DM's timesteps."""

    name = "ptq4dm"
    summary = "ptq4dm:DENOISER.onnx: (x_t, t) calibration pairs from the FP32 diffusion sampler at normally distributed timesteps (PTQ4DM)"
    Options = Ptq4dmOptions

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return spec.startswith("ptq4dm:")

    @property
    def model_path(self) -> Path:
        path = Path(self.spec.split(":", 1)[1])
        if not path.is_file():
            raise DataError(f"ptq4dm: denoiser model '{path}' does not exist (--data ptq4dm:DENOISER.onnx)")
        return path

    def _names(self) -> tuple[str, str]:
        o = self.options
        t = o.t_input or next((i.name for i in self.inputs if len(i.shape) == 1), None)
        x = o.x_input or next((i.name for i in self.inputs if i.name != t and np.issubdtype(i.dtype, np.floating)), None)
        if t is None or x is None or {x, t} - {i.name for i in self.inputs}:
            raise DataError(f"ptq4dm: cannot tell the sample and timestep inputs among {[i.name for i in self.inputs]}; "
                            "pass --data-opt x_input=NAME t_input=NAME")
        return x, t

    def _x_shape(self, x_name: str) -> tuple[int, ...]:
        spec = next(i for i in self.inputs if i.name == x_name)
        dims = spec.shape[1:]
        if any(not isinstance(d, int) for d in dims):
            raise DataError(f"ptq4dm: input '{x_name}' needs fixed dimensions after the batch, got {spec.shape}")
        return tuple(dims)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch]:
        o = self.options
        x_name, t_name = self._names()
        schedule = schedule_of(self.model_path, o.steps, o.beta_start, o.beta_end)
        denoise = ort_denoiser(self.model_path, x_name, t_name)
        shape = self._x_shape(x_name)
        # independent streams for the draws, the initial noise and each chunk's per-step noise, so that
        # two seeds give disjoint calibration sets (seed k's streams never reappear under seed k + 1)
        draw_seed, noise_seed, step_seed = np.random.SeedSequence(o.seed).spawn(3)
        its = iterations(o.samples, schedule.steps, o.timesteps, o.mean, o.std, draw_seed)
        ts = paired_timesteps(its, schedule.steps, o.pairing)
        t_dtype = next(i.dtype for i in self.inputs if i.name == t_name)
        rng = np.random.default_rng(noise_seed)
        starts = range(0, o.samples, o.chunk)
        for start, chunk_seed in zip(starts, step_seed.spawn(len(starts))):
            n = min(o.chunk, o.samples - start)
            noise = rng.standard_normal((n, *shape))
            _, kept = sample(denoise, schedule, noise, seed=chunk_seed, capture=its[start:start + n])
            yield Batch({x_name: kept.astype(np.float32), t_name: ts[start:start + n].astype(t_dtype)}, None,
                        source=f"ptq4dm samples {start}-{start + n - 1}")

    def fingerprint(self) -> str | None:
        h = hashlib.sha256(f"seeding 2 {self.options!r}".encode())  # "seeding 2": the SeedSequence streams
        with open(self.model_path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()


@hookimpl
def register_data_readers(register) -> None:
    register(Ptq4dmReader)
