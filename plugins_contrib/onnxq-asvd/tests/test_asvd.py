"""ASVD: plain SVD at α = 0, the exact per-rank error, activation awareness on outlier channels, the
rank search, and the factors quantized like any weight MatMul, on the decoder fixture."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

pytest.importorskip("onnxq_asvd", reason="onnxq-asvd is not installed (pip install -e plugins_contrib/onnxq-asvd)")

import onnxq  # noqa: E402
from onnxq.calib.readers import Batch  # noqa: E402
from onnxq.calib.statistics import StatRequest, collect  # noqa: E402
from onnxq.errors import OptionError  # noqa: E402
from onnxq.testing.contract import MethodContract  # noqa: E402
from onnxq_asvd import AsvdOptions, compress, input_moments  # noqa: E402
from onnxq_asvd.factorize import InputMoments, decompose  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures_decoder" / "score.py"
_spec = importlib.util.spec_from_file_location("decoder_score", FIXTURE)
decoder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decoder)


class TestAsvdContract(MethodContract):
    method = "asvd"
    options = {"ratio": 0.9}


@pytest.fixture(scope="module")
def fixture_moments():
    """The decoder fixture, its MatMul weights by node, and mean |x| and XᵀX/T of their inputs."""
    model = decoder.load_model()
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    mms = {n.name: (n.input[0], inits[n.input[1]]) for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    feeds = decoder.calibration()
    reqs = {x: StatRequest(x, InputMoments()) for x, _ in mms.values()}
    stats = collect(model, list(reqs.values()), lambda: iter(Batch(f) for f in feeds), show_progress=False)
    return model, mms, {x: stats[r] for x, r in reqs.items()}


def _outlier_data(rng, k=48, n=40, t=600):
    x = rng.standard_normal((t, k)) @ rng.standard_normal((k, k)) * 0.2
    x[:, [3, 11]] *= 30.0  # planted outlier channels, their weight rows compensated
    w = rng.standard_normal((k, n))
    w[[3, 11]] /= 30.0
    return x, w


def test_alpha_zero_is_plain_svd_exactly():
    rng = np.random.default_rng(0)
    x, w = _outlier_data(rng)
    dec = decompose(w, np.abs(x).mean(0), x.T @ x / len(x), alpha=0.0)
    assert dec.scale is None  # no scaling at all, not a scaling by ones
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    for r in (1, 7, 20):
        a, b = dec.factors(r)
        root = np.sqrt(s[:r])
        assert np.array_equal(a, (u[:, :r] * root).astype(np.float32))
        assert np.array_equal(b, (root[:, None] * vt[:r]).astype(np.float32))
        np.testing.assert_allclose(a.astype(np.float64) @ b, (u[:, :r] * s[:r]) @ vt[:r], atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_error_per_rank_is_the_measured_output_error(alpha):
    rng = np.random.default_rng(1)
    x, w = _outlier_data(rng)
    dec = decompose(w, np.abs(x).mean(0), x.T @ x / len(x), alpha)
    for r in (2, 10, 30):
        a, b = dec.factors(r)
        measured = np.sum((x @ w - x @ (a.astype(np.float64) @ b)) ** 2) / np.sum((x @ w) ** 2)
        assert abs(dec.errors[r] - measured) <= 1e-4 * max(measured, 1e-3)
    assert dec.errors[0] == pytest.approx(1.0) and abs(dec.errors[-1]) < 1e-9
    assert np.all(np.diff(dec.errors) <= 1e-12)  # more rank, never more error


def test_activation_aware_beats_plain_svd_on_uneven_channels():
    """Input channels of very different sizes (log-normal scales, weights not compensating them):
    at the same rank ASVD's output error is well below plain SVD's."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((800, 64)) * np.exp(rng.standard_normal(64))
    w = rng.standard_normal((64, 48))
    mean_abs, gram = np.abs(x).mean(0), x.T @ x / len(x)
    for rank in (8, 16, 24):
        plain = decompose(w, mean_abs, gram, 0.0).errors[rank]
        aware = decompose(w, mean_abs, gram, 0.5).errors[rank]
        assert aware < 0.8 * plain, (rank, aware, plain)


def test_activation_aware_on_the_fixtures_outlier_channels(fixture_moments):
    """The fixture's LayerNorm outputs carry channels 24-48x larger than the rest, read by Q/K/V and
    fc1 rows made as much smaller (the products are unchanged): plain SVD drops those rows first,
    ASVD does not, so its output error at a quarter of the rank is lower on every such layer. The
    gain is small here (three channels of 64 hold ~5% of the output), unlike the test above."""
    _, mms, stats = fixture_moments
    readers_of_ln = [name for name in mms if any(p in name for p in ("/q/", "/k/", "/v/", "/fc1/"))]
    assert len(readers_of_ln) == 8
    for name in readers_of_ln:
        x, w = mms[name]
        mean_abs, gram = stats[x]
        assert mean_abs.max() > 20 * np.median(mean_abs)  # the planted outliers are there
        rank = w.shape[0] // 4
        assert decompose(w, mean_abs, gram, 0.5).errors[rank] < decompose(w, mean_abs, gram, 0.0).errors[rank], name


def test_ratio_and_error_targets_are_met(fixture_moments):
    model, _, _ = fixture_moments
    moments = input_moments(model, decoder.calibration())  # one statistics pass for both targets
    _, summary = compress(model, None, AsvdOptions(ratio=0.85), moments=moments)
    assert 0.8 <= summary["ratio"] <= 0.85
    assert any(v["rank"] is not None for v in summary["layers"].values())
    _, summary = compress(model, None, AsvdOptions(target_error=0.01), moments=moments)
    for v in summary["layers"].values():
        assert v["error"] <= 0.01
    assert summary["ratio"] < 1.0


def test_factors_are_quantized_and_accuracy_kept():
    """-p asvd -p minmax: the host places the factorised graph, so both factor MatMuls read int8 weights
    (integer kernels in ONNX Runtime), the report carries the factorisation's error, the copy task survives."""
    from onnxq.runtime.ort import optimized_op_counts

    model = decoder.load_model()
    res = onnxq.optimize(model, method=["asvd", "minmax"], options={"ratio": 0.95}, data=decoder.calibration(), show_progress=False)
    q = res.model
    producers = {o: n for n in q.graph.node for o in n.output}
    factors = [n for n in q.graph.node if n.op_type == "MatMul" and "_asvd_" in n.name]
    assert len(factors) >= 2
    for n in factors:
        assert producers[n.input[1]].op_type == "DequantizeLinear", n.name
        assert producers[n.input[0]].op_type == "DequantizeLinear", n.name
    rewrites = [r for r in res.report.quantized_rewrites if r.method == "asvd"]
    assert len(rewrites) == 1 and 0 < rewrites[0].output_error < 0.5
    counts = optimized_op_counts(q, "all")
    assert sum(counts[op] for op in ("MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat")) >= len(factors)
    fp = decoder.score(model)
    got = decoder.score(q)
    assert got["top1"] >= fp["top1"] - 0.05 and got["cosine"] > 0.7


def test_bad_ratio_is_one_line():
    with pytest.raises(OptionError) as exc:
        onnxq.optimize(decoder.load_model(), method="asvd", options={"ratio": 1.5}, data=decoder.calibration(), show_progress=False)
    assert "ratio" in str(exc.value) and "\n" not in str(exc.value)
