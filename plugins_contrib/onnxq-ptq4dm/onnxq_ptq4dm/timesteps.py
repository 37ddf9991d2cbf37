"""Which denoising iterations the calibration samples come from, and which timestep they are paired with.

PTQ4DM (Shang et al., arXiv 2211.15736) draws, per calibration sample, an iteration
``i = int(N(μ = 0.4, σ = 0.4) · T)`` (truncated toward zero, clamped to ``[0, T − 1]``), counted from
pure noise, so that most samples come from 40 % of the way to the image: the activations of a
denoiser change with the timestep, and a calibration on one timestep (or on noised real images)
misses the ranges of the others.
"""

from __future__ import annotations

import numpy as np

CHOICES = ("normal", "uniform", "last")
PAIRINGS = ("sampler", "as_released")


def iterations(n: int, steps: int, choice: str = "normal", mean: float = 0.4, std: float = 0.4,
               seed: int | np.random.SeedSequence = 0) -> np.ndarray:
    """``n`` iteration indices in ``[0, steps - 1]`` (0: the first step, from pure noise).

    ``normal``: the paper's ``int(N(mean, std) · T)`` clamped (about 16 % of draws land on 0);
    ``uniform``: every iteration equally; ``last``: the noise end only (the timestep ``T − 1``)."""
    rng = np.random.default_rng(seed)
    if choice == "normal":
        return np.clip((rng.normal(mean, std, n) * steps).astype(np.int64), 0, steps - 1)  # astype truncates toward zero
    if choice == "uniform":
        return rng.integers(0, steps, n)
    if choice == "last":
        return np.zeros(n, np.int64)
    raise ValueError(f"timestep choice must be one of {', '.join(CHOICES)}, got '{choice}'")


def paired_timesteps(its: np.ndarray, steps: int, pairing: str = "sampler") -> np.ndarray:
    """The timestep fed with the ``x`` captured at iteration ``its``.

    ``sampler``: the one the sampler used there, ``T − 1 − i``. ``as_released``: ``i`` itself, as the
    paper's released script does (the ``x`` then travels with a timestep from the other end of the
    chain; kept to reproduce that script's calibration sets)."""
    if pairing == "sampler":
        return steps - 1 - its
    if pairing == "as_released":
        return its.copy()
    raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, got '{pairing}'")
