"""trt-entropy holds on spiky, one-sided-plus-offset distributions; trt-entropy-exact stays TensorRT's (issue 15).

Fixtures: tests/calib/normalized (train.py there): digits at 28x28 normalized the MNIST way,
``(x - 0.1307) / 0.3081``, so about half of every input is the background spike at -0.4242 and the
strokes spread up to 2.82. TensorRT's KL clips the input right after the spike.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from onnxq.calib.statistics import TensorStats, bincount
from onnxq.calib.thresholds import entropy_threshold, expected_sq_errors, grid_steps, guarded_entropy_threshold, mse_threshold
from onnxq.pipeline import optimize
from onnxq.qparams import asymmetric, symmetric
from onnxq.runtime.ort import make_session

NORM = "tests/calib/normalized/"


def stats_of(x: np.ndarray, bins: int = 2048) -> TensorStats:
    amax = float(np.abs(x).max())
    return TensorStats(float(x.min()), float(x.max()), x.size, bincount(x, amax, 2 * bins))


def normalized_pixels(rng, n: int = 200_000) -> np.ndarray:
    """Background spike at (0 - 0.1307) / 0.3081 and strokes up to (1 - 0.1307) / 0.3081."""
    x = np.zeros(n)
    strokes = rng.random(n) < 0.35
    x[strokes] = rng.beta(2.0, 1.2, strokes.sum())
    return (x - 0.1307) / 0.3081


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("signed", [True, False])
def test_exact_kl_clips_the_strokes_and_the_guard_keeps_them(rng, signed):
    x = normalized_pixels(rng)
    s = stats_of(x)
    levels = 128  # the input has negative values: 128 levels over |x| on either grid
    steps = grid_steps(s, signed, 127 if signed else 255)
    exact = entropy_threshold(s, levels)
    guarded, changed = guarded_entropy_threshold(s, levels, steps)
    assert exact < 0.6  # TensorRT's choice: right after the spike at 0.4242
    assert changed and guarded > 0.8 * s.max  # the strokes stay on the grid
    # and the guarded choice costs at most the tolerance times the least error, the exact one far more
    err = expected_sq_errors(s, steps)
    w = s.bin_width
    assert err[round(guarded / w)] <= 4.0 * err.min() < err[round(exact / w)] / 100


def padded_tokens(rng, n: int = 10**6) -> np.ndarray:
    """70 % of positions are padding, all holding one value; the real tokens spread around zero."""
    return np.where(rng.random(n) < 0.7, 0.35, rng.normal(0.0, 1.5, n))


def offset_relu6(rng, n: int = 10**6) -> np.ndarray:
    """One-sided plus an offset: half the values sit exactly at 1.0, the rest spread up to 7."""
    return np.where(rng.random(n) < 0.5, 0.0, np.clip(rng.normal(3.0, 1.5, n), 0.0, 6.0)) + 1.0


@pytest.mark.parametrize("make", [normalized_pixels, padded_tokens, offset_relu6])
@pytest.mark.parametrize("signed", [True, False])
def test_spikes_with_a_spread_tail(rng, make, signed):
    # TensorRT's KL stops right after the spike (within 20 % of max |x|); the guard keeps the tail
    s = stats_of(make(rng))
    levels = 256 if (not signed and s.min >= 0) else 128
    steps = grid_steps(s, signed, 127 if signed else 255)
    exact = entropy_threshold(s, levels)
    guarded, changed = guarded_entropy_threshold(s, levels, steps)
    assert exact < 0.2 * s.amax
    assert changed and guarded > 0.6 * s.amax
    err = expected_sq_errors(s, steps)
    assert err[round(guarded / s.bin_width)] <= 4.0 * err.min()


@pytest.mark.parametrize("case", ["gaussian", "relu-halfnormal", "laplace"])
def test_guard_keeps_tensorrts_choice_where_kl_is_sane(rng, case):
    x = {"gaussian": rng.standard_normal, "laplace": rng.laplace}.get(case, lambda size: np.maximum(rng.standard_normal(size), 0))(size=10**6)
    s = stats_of(x)
    t, changed = guarded_entropy_threshold(s, 128, grid_steps(s, True, 127))
    assert not changed and t == entropy_threshold(s, 128)


def test_guard_keeps_more_of_rare_large_outliers(rng):
    # 0.1 % of values at 30x: TensorRT's KL clips them all (its error is ~13x the least); the guard
    # moves the clip point out until the error is within 4x, and still clips the farthest ones
    x = rng.standard_normal(10**6)
    x[rng.choice(x.size, 1000, replace=False)] *= 30
    s = stats_of(x)
    steps = grid_steps(s, True, 127)
    exact = entropy_threshold(s, 128)
    t, changed = guarded_entropy_threshold(s, 128, steps)
    err = expected_sq_errors(s, steps)
    assert changed and exact < t < s.amax
    assert err[round(t / s.bin_width)] <= 4.0 * err.min() < err[round(exact / s.bin_width)]
    # a looser tolerance gives TensorRT's choice back
    assert guarded_entropy_threshold(s, 128, steps, tolerance=16.0) == (exact, False)


@pytest.mark.parametrize("signed", [True, False])
def test_expected_error_model_tracks_the_real_grid(rng, signed):
    # the prefix-sum error model against fake-quantizing the samples on the deployed grid
    x = np.concatenate([rng.standard_normal(100_000), rng.standard_normal(1000) * 8]) + (0.0 if signed else 1.0)
    s = stats_of(x)
    err = expected_sq_errors(s, grid_steps(s, signed, 127 if signed else 255))
    for frac in (0.2, 0.5, 1.0):
        t = frac * s.amax
        q = symmetric(t, 8, False) if signed else asymmetric(max(s.min, -t), min(s.max, t), 8)
        real = float(np.sum((x - q.fake_quantize(x.astype(np.float32))) ** 2))
        model = err[round(t / s.bin_width)]
        assert model == pytest.approx(real, rel=0.15)


def test_least_error_threshold_is_near_mse_calibrators(rng):
    x = rng.laplace(size=200_000)
    s = stats_of(x)
    err = expected_sq_errors(s, grid_steps(s, True, 127))
    t_err = int(np.argmin(err)) * s.bin_width
    t_mse = mse_threshold(s, lambda t: symmetric(t, 8, False, axis=0))
    assert t_err == pytest.approx(t_mse, rel=0.1)


@lru_cache(maxsize=None)
def _eval():
    d = np.load(NORM + "eval.npz")
    return d["input"], d["label"]


def top1(model) -> float:
    x, y = _eval()
    return float((make_session(model).run(None, {"input": x})[0].argmax(1) == y).mean() * 100)


@lru_cache(maxsize=None)
def quantize(fixture: str, method: tuple[str, ...], target: str):
    kw = {"method": list(method)} if method else {}  # no method: the host's default
    return optimize(NORM + fixture + ".onnx", data=NORM + "calib.npz", target=target, show_progress=False, cache_dir=None, **kw)


@pytest.mark.parametrize("target", ["trt", "ort"])
@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "trt-entropy", ""])
def test_calibrators_hold_on_normalized_inputs(method, target):
    # measured (trt / ort, FP32 99.4): minmax 99.4/99.6, percentile 99.4/99.4, mse 99.4/99.6,
    # trt-entropy 99.4/99.4 (trt-entropy-exact: 13.8/13.6)
    fp32 = top1(NORM + "resnet.onnx")
    assert top1(quantize("resnet", (method,) if method else (), target).model) >= fp32 - 1.0


@pytest.mark.parametrize("target", ["trt", "ort"])
def test_cfws_holds_on_a_normalized_repvgg(target):
    # cfws calibrates its activations with trt-entropy; measured (trt / ort, FP32 98.2): 98.4 / 98.2
    # (with TensorRT's exact KL the same net keeps 25.2 / 26.8)
    assert top1(quantize("repvgg", ("cfws",), target).model) >= top1(NORM + "repvgg.onnx") - 0.5


@pytest.mark.parametrize("target", ["trt", "ort"])
def test_easyquant_start_holds_on_a_normalized_repvgg(target):
    # easyquant starts from trt-entropy (act_init); measured (trt / ort, FP32 98.2): 98.2 / 98.2
    assert top1(quantize("repvgg", ("easyquant",), target).model) >= top1(NORM + "repvgg.onnx") - 1.0


@pytest.mark.parametrize("target", ["trt", "ort"])
def test_exact_variant_collapses_and_the_fidelity_check_says_so(target):
    result = quantize("resnet", ("trt-entropy-exact",), target)
    assert top1(result.model) < 50  # measured 13.8 / 13.6
    fid = result.report.fidelity
    assert fid is not None and fid.warned
    assert "TensorRT-exact" in result.report.methods["trt-entropy-exact"]["variant"]


def test_guarded_run_reports_the_overridden_tensors():
    rep = quantize("resnet", ("trt-entropy",), "trt").report
    section = rep.methods["trt-entropy"]
    assert "input" in section["overridden"]
    assert rep.fidelity is None or not rep.fidelity.warned
