"""``-o pd_weight``: each block's PD term weighted by w = kl0/(kl0 + λ_r) (``distance``), kl0 the block's
starting prediction difference, or 1 (``fixed``, the paper's and the default). README, "A PD weight that
shrinks as the block's start nears FP32"."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxq_pdquant", reason="onnxq-pdquant is not installed (pip install -e plugins_contrib/onnxq-pdquant)")
pytest.importorskip("torch", reason="pdquant learns with PyTorch (pip install 'onnxq-pdquant[torch]')")

import onnxq  # noqa: E402
from onnxq_pdquant.reconstruct import pd_block_weight  # noqa: E402

W4A4 = {"weight_bits": 4, "act_bits": 4, "iters": 30, "samples": 64}


def _data():
    return [{"x": np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)}]


def test_weight_function_keeps_the_paper_weight_far_from_fp32_and_shrinks_near_it():
    lam = 0.1
    assert all(pd_block_weight(k, lam, "fixed") == 1.0 for k in (0.0, 1e-6, 0.05, 10.0))
    ks = np.geomspace(1e-6, 1e3, 40)
    w = np.array([pd_block_weight(k, lam, "distance") for k in ks])
    assert np.all(np.diff(w) > 0) and np.all((w > 0) & (w < 1))  # grows with the distance, never above the paper's weight
    assert pd_block_weight(lam, lam, "distance") == pytest.approx(0.5)  # PD term as large as the normalised MSE at the start
    assert pd_block_weight(100 * lam, lam, "distance") > 0.99  # far from FP32: the paper's weight
    small = pd_block_weight(0.01 * lam, lam, "distance")
    assert 0.0098 < small < 0.01  # near FP32: about rho = kl0 / lambda_r
    assert pd_block_weight(0.0, lam, "distance") == 0.0
    with pytest.raises(ValueError, match="pd_weight"):
        pd_block_weight(0.1, lam, "annealed")


@pytest.fixture(scope="module")
def runs(small_cnn):
    model = small_cnn(batchnorm=False)
    out = {}
    for name, opts in (("fixed", W4A4), ("distance", {**W4A4, "pd_weight": "distance"}),
                       ("distance_w8a8", {**W4A4, "weight_bits": 8, "act_bits": 8, "pd_weight": "distance"}),
                       ("distance_small_lambda", {**W4A4, "pd_weight": "distance", "lambda_r": 1e-7})):
        out[name] = onnxq.optimize(model, method="pdquant", data=_data(), show_progress=False, options=opts).report.methods["pdquant"]
    return out


def test_default_is_fixed_and_distance_weights_each_block_by_its_start(runs):
    assert runs["fixed"]["pd_weight"] == "fixed" and runs["distance"]["pd_weight"] == "distance"
    assert all(b["pd_weight"] == 1.0 for b in runs["fixed"]["blocks"])
    for b in runs["distance"]["blocks"]:
        assert b["kl_start"] > 0
        assert b["pd_weight"] == pytest.approx(b["kl_start"] / (b["kl_start"] + 0.1), rel=1e-9)
        assert 0 < b["pd_weight"] < 1
    # the weight is on the term that is optimised and scored: the first block starts from the same point
    # in both runs (no prefix yet), so its PD term at the start is the fixed run's times w
    f0, d0 = runs["fixed"]["blocks"][0], runs["distance"]["blocks"][0]
    assert d0["kl_start"] == pytest.approx(f0["kl_start"], rel=1e-6)
    assert d0["pd_start"] == pytest.approx(d0["pd_weight"] * f0["pd_start"], rel=1e-4)
    assert d0["pd_start"] < 0.9 * f0["pd_start"]


def test_a_start_far_from_fp32_in_the_objective_units_keeps_the_paper_weight(runs):
    """With λ_r far below every block's kl0 (the PD term dwarfs the normalised MSE at the start) the
    weight is the paper's 1 within a few percent, and the term is that of ``fixed`` at this λ_r."""
    blocks = runs["distance_small_lambda"]["blocks"]
    assert all(b["kl_start"] > 10 * 1e-7 for b in blocks), [b["kl_start"] for b in blocks]
    assert all(b["pd_weight"] > 0.9 for b in blocks), [b["pd_weight"] for b in blocks]
    b0 = blocks[0]
    assert b0["pd_start"] == pytest.approx(b0["pd_weight"] * b0["kl_start"] / 1e-7, rel=1e-4)


def test_a_start_nearer_fp32_gets_a_smaller_weight(runs):
    """W8A8 starts far nearer FP32 than W4A4 on the same model and data: its first block's prediction
    difference, and so its weight, is smaller by a wide margin."""
    w4, w8 = runs["distance"]["blocks"][0], runs["distance_w8a8"]["blocks"][0]
    assert w8["kl_start"] < 0.2 * w4["kl_start"], (w8["kl_start"], w4["kl_start"])
    assert w8["pd_weight"] < 0.25 * w4["pd_weight"], (w8["pd_weight"], w4["pd_weight"])
    assert runs["distance_w8a8"]["pd_weight"] == "distance"  # an explicit option wins at 8 bits too


def test_the_8bit_default_is_fixed(small_cnn):
    rep = onnxq.optimize(small_cnn(batchnorm=False), method="pdquant", data=_data(), show_progress=False,
                         options={**W4A4, "act_bits": 8, "iters": 10}).report.methods["pdquant"]
    assert rep["pd_weight"] == "fixed" and all(b["pd_weight"] == 1.0 for b in rep["blocks"])
