"""EasyQuant: the search never lowers its objective, scales stay valid, and INT7 accuracy improves."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.plugins.easyquant import EasyQuant, EasyQuantOptions, cosine_rows
from onnxq.testing.contract import MethodContract, scales_of

DIGITS = "examples/digits/model.onnx"
CALIB = "examples/digits/calib"


class TestEasyQuantContract(MethodContract):
    method = "easyquant"
    options = {"samples": 16}


@pytest.fixture(scope="module")
def digits_int7():
    from onnxq.pipeline import optimize

    return optimize(DIGITS, method="easyquant", data=CALIB, target="trt", bits=7, show_progress=False)


def test_every_layer_objective_is_not_lowered(digits_int7):
    layers = digits_int7.report.methods["easyquant"]["layers"]
    assert len(layers) == 7
    for name, r in layers.items():
        assert r["weight_score_after"] >= r["weight_score_before"] - 1e-9, name
        assert r["activation_score_after"] >= r["activation_score_before"] - 1e-9, name
    # the search does something: at 7 bits most layers move off the initial weight scale
    assert sum(r["weight_multiplier_mean"] != 1.0 for r in layers.values()) >= 4


def test_scales_are_finite_positive_and_int7(digits_int7):
    from onnx import numpy_helper

    scales = scales_of(digits_int7.model)
    assert scales and all(np.all(np.isfinite(s)) and np.all(s > 0) for s in scales.values())
    for t in digits_int7.model.graph.initializer:
        if t.name.endswith("_quantized"):
            v = numpy_helper.to_array(t)
            assert v.min() >= -63 and v.max() <= 63


def _search(evaluate, ncols, **opts):
    return EasyQuant(EasyQuantOptions(**opts))._search(evaluate, ncols, None)


@pytest.mark.parametrize(("search", "resolution"), [("golden", 0.01), ("zoom", 0.025)])
def test_search_finds_each_channels_optimum(search, resolution):
    rng = np.random.default_rng(0)
    target = rng.uniform(0.55, 1.95, 12)
    calls = []

    def evaluate(g):
        calls.append(len(g))
        return -((g - target[None, :]) ** 2)

    chosen, before, after = _search(evaluate, 12, search=search)
    # zoom: the coarse grid and two finer grids of 4, each one batched evaluation
    assert search != "zoom" or calls == [7, 4, 4]
    np.testing.assert_allclose(chosen, target, atol=resolution)
    assert np.all(after >= before)


def test_flat_objective_keeps_the_initial_scale():
    chosen, before, after = _search(lambda g: np.zeros(g.shape), 5)
    np.testing.assert_array_equal(chosen, 1.0)
    np.testing.assert_array_equal(after, before)


def test_grid_search_evaluates_the_paper_grid():
    seen = []

    def evaluate(g):
        seen.append(g.copy())
        return -np.abs(g - 1.37)

    m = EasyQuant(EasyQuantOptions(search="grid"))
    chosen, _, _ = m._search(evaluate, 1, m._act_grid()[:, None])
    assert len(seen) == 1 and len(seen[0]) == 100
    assert abs(chosen[0] - 1.37) <= 1.5 / 99


def test_cosine_guard_for_all_zero_vectors():
    zero = np.zeros((2, 8), np.float32)
    assert np.allclose(cosine_rows(zero, zero), 1.0)
    x = np.ones((2, 8), np.float32)
    assert np.allclose(cosine_rows(x, x), 1.0)
    assert np.allclose(cosine_rows(x, -x), -1.0)
