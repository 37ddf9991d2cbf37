"""PTQ4DM's calibration reader: the timestep draws, the sampler's captures, and what they buy on the 8-Gaussians denoiser."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxq_ptq4dm", reason="onnxq-ptq4dm is not installed (pip install -e plugins_contrib/onnxq-ptq4dm)")

import onnxq  # noqa: E402
from onnxq_ptq4dm.evaluate import generated, paired_score  # noqa: E402
from onnxq_ptq4dm.metrics import sliced_wasserstein  # noqa: E402
from onnxq_ptq4dm.sampler import Schedule, sample, schedule_of  # noqa: E402
from onnxq_ptq4dm.timesteps import iterations, paired_timesteps  # noqa: E402

MODEL = Path(__file__).resolve().parent / "fixture" / "model.onnx"


def test_the_papers_timestep_distribution():
    its = iterations(40000, 100, "normal", seed=1)
    assert its.min() == 0 and its.max() <= 99
    assert 0.14 <= np.mean(its == 0) <= 0.20  # N(0.4, 0.4) < 0 about 16 % of the time, plus the draws truncated to 0
    assert 40 <= np.mean(its[its > 0]) <= 52  # 40 % of the way from noise, skewed up by the clamp at 0
    assert set(np.unique(iterations(5000, 10, "uniform"))) == set(range(10))
    assert np.all(iterations(10, 100, "last") == 0)
    its = np.array([0, 5, 99])
    assert paired_timesteps(its, 100, "sampler").tolist() == [99, 94, 0]
    assert paired_timesteps(its, 100, "as_released").tolist() == [0, 5, 99]


def test_captures_are_what_the_denoiser_saw_at_that_iteration():
    sched = Schedule(12, 1e-3, 0.2)
    seen: dict[int, np.ndarray] = {}

    def denoise(x, t):
        seen[int(t[0])] = x.copy()
        return 0.1 * x

    capture = np.array([0, 3, 11, 7, 0, 5])
    _, kept = sample(denoise, sched, np.random.default_rng(0).standard_normal((6, 2)), capture=capture)
    for k, i in enumerate(capture):
        assert np.allclose(kept[k], seen[sched.steps - 1 - i][k])


def test_schedule_from_metadata_and_sliced_wasserstein():
    s = schedule_of(MODEL)
    assert s.steps == 100 and s.alpha_bar[-1] < 0.01
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 2))
    assert sliced_wasserstein(a, a) == 0.0
    assert sliced_wasserstein(a, a + 1.0) > sliced_wasserstein(a, a + 0.1) > 0


def test_reader_yields_the_requested_pairs():
    from onnxq.calib.readers import InputSpec
    from onnxq_ptq4dm import Ptq4dmOptions, Ptq4dmReader

    inputs = [InputSpec("x", np.dtype(np.float32), ("n", 2)), InputSpec("t", np.dtype(np.int64), ("n",))]
    reader = Ptq4dmReader(f"ptq4dm:{MODEL}", Ptq4dmOptions(samples=96, chunk=40), inputs)
    batches = list(reader)
    assert [len(b.feeds["x"]) for b in batches] == [40, 40, 16]
    t = np.concatenate([b.feeds["t"] for b in batches])
    x = np.concatenate([b.feeds["x"] for b in batches])
    assert t.dtype == np.int64 and 0 <= t.min() and t.max() <= 99 and np.all(np.isfinite(x))
    assert np.mean(t == 99) > 0.1  # the paper's draws put ~16 % on the first (pure-noise) step, timestep T - 1
    again = Ptq4dmReader(f"ptq4dm:{MODEL}", Ptq4dmOptions(samples=96, chunk=40), inputs)
    assert reader.fingerprint() == again.fingerprint()
    assert reader.fingerprint() != Ptq4dmReader(f"ptq4dm:{MODEL}", Ptq4dmOptions(samples=96, timesteps="uniform"), inputs).fingerprint()
    assert np.array_equal(np.concatenate([b.feeds["x"] for b in again]), x)  # seeded: the same calibration set


def test_paired_score_measures_moved_samples():
    a = np.random.default_rng(0).standard_normal((400, 2))
    same = paired_score(a, a)
    assert same.swd == 0.0 and same.drift == 0.0
    moved = paired_score(a + np.array([0.3, 0.4]), a)
    assert moved.drift == pytest.approx(0.5) and 0.2 < moved.swd < 0.5
    swapped = paired_score(a[::-1], a)  # the same cloud, every sample moved: the SWD forgives it, the drift does not
    assert swapped.swd == pytest.approx(0.0, abs=1e-12) and swapped.drift > 1.0


def _drift(choice: str, draws: int = 2) -> float:
    """Mean L2 drift of W8A8 minmax samples from FP32's (paired: the same noise), over ``draws`` calibration sets."""
    fp32 = generated(MODEL, MODEL, n=1024, seed=123)
    out = []
    for seed in range(draws):
        res = onnxq.optimize(MODEL, method="minmax", data=f"ptq4dm:{MODEL}", target="ort",
                             data_options={"timesteps": choice, "samples": 256, "seed": seed}, show_progress=False, check=False)
        out.append(paired_score(generated(res.model, MODEL, n=1024, seed=123), fp32).drift)
    return float(np.mean(out))


def test_normal_timesteps_beat_the_noise_end_and_hold_against_uniform():
    last, uniform, normal = _drift("last"), _drift("uniform"), _drift("normal")
    print(f"W8A8 minmax paired drift from FP32: last {last:.4f}, uniform {uniform:.4f}, normal {normal:.4f}")
    assert normal < 0.5 * last
    assert normal <= 1.5 * uniform  # benchmark.py: equal within about one standard error at W8A8


def test_cli_and_bad_spec(tmp_path):
    out = tmp_path / "q.onnx"
    ok = subprocess.run([sys.executable, "-m", "onnxq", "optimize", str(MODEL), "-p", "minmax", "--data", f"ptq4dm:{MODEL}",
                         "--data-opt", "samples=64", "--output", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert out.is_file()
    bad = subprocess.run([sys.executable, "-m", "onnxq", "optimize", str(MODEL), "-p", "minmax", "--data", "ptq4dm:missing.onnx",
                          "--output", str(tmp_path / "x.onnx")], capture_output=True, text=True)
    assert bad.returncode == 1 and "missing.onnx" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
