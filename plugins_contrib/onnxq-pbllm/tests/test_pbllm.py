"""PB-LLM: the exact salient count, the binarization's definition, the ONNX form computing the
dequantized weight, compensation, and what partial binarization keeps on the decoder fixture."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("onnxq_pbllm", reason="onnxq-pbllm is not installed (pip install -e plugins_contrib/onnxq-pbllm)")

import onnxq  # noqa: E402
from onnxq.graph.plan import QuantPlan, WeightSite  # noqa: E402
from onnxq.runtime.ort import make_session  # noqa: E402
from onnxq.testing.contract import MethodContract  # noqa: E402
from onnxq_pbllm import partial_binarize  # noqa: E402
from onnxq_pbllm.binarize import salient_mask  # noqa: E402
from onnxq_pbllm.rewrite import partially_binarized, targets  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures_decoder" / "score.py"
_spec = importlib.util.spec_from_file_location("decoder_score", FIXTURE)
decoder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decoder)


class TestPbLlmContract(MethodContract):
    method = "pbllm"
    targets = ("ort",)  # a weight computed from two DQs and an Add breaks TensorRT's Q/DQ rules
    # the contract's bar is INT8 fidelity, which a binarized classifier cannot keep: every weight
    # salient still runs the whole path (the DQ pair and offset, compensation) at 8 bits
    options = {"salient": 1.0}


def _data(rng, k=48, n=40, t=500):
    x = rng.standard_normal((t, k)) @ rng.standard_normal((k, k)) * 0.3
    x[:, 5] *= 30  # an outlier channel, its weight row compensated (as the fixture's)
    w = rng.standard_normal((k, n))
    w[5] /= 30
    return x, w


def _output_error(x, w, w_hat):
    return float(np.linalg.norm(x @ (w_hat - w)) / np.linalg.norm(x @ w))


@pytest.mark.parametrize("fraction", [0.0, 0.1, 1 / 7, 0.333, 1.0])
@pytest.mark.parametrize("salience", ["magnitude", "hessian"])
def test_salient_fraction_is_exact(fraction, salience):
    rng = np.random.default_rng(0)
    x, w = _data(rng, 37, 29)
    pb = partial_binarize(w, x.T @ x, fraction, salience)
    assert int(pb.mask.sum()) == int(round(fraction * w.size))
    # the two integer tensors partition the weights: binary values exactly where not salient
    assert np.array_equal(pb.q_binary != 0, ~pb.mask)
    assert set(np.unique(pb.q_binary[~pb.mask])) <= {-1, 1}
    assert np.array_equal(pb.q_salient[~pb.mask], np.broadcast_to(pb.zero_point, w.shape)[~pb.mask])


def test_binarization_follows_its_definition_without_compensation():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((30, 20))
    pb = partial_binarize(w, None, 0.1, "magnitude", compensate=False)
    assert np.array_equal(pb.mask, salient_mask(w, 0.1, "magnitude"))
    assert np.abs(w[pb.mask]).min() >= np.abs(w[~pb.mask]).max()  # magnitude salience: the largest |w|
    deq = pb.dequantized()
    for c in range(w.shape[1]):
        b = ~pb.mask[:, c]
        mu = w[b, c].mean()
        alpha = np.abs(w[b, c] - mu).mean()
        np.testing.assert_allclose(deq[b, c], alpha * np.where(w[b, c] >= mu, 1, -1) + mu, rtol=1e-5, atol=1e-6)
        s = pb.mask[:, c]  # 8-bit salient weights: within half a step
        assert np.all(np.abs(deq[s, c] - w[s, c]) <= pb.scale[c] / 2 + 1e-6)


def test_onnx_form_computes_the_dequantized_weight():
    rng = np.random.default_rng(2)
    k, n = 24, 16
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((50, k)).astype(np.float32)
    pb = partial_binarize(w, x.T.astype(np.float64) @ x, 0.2, "hessian")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    plan = QuantPlan(profile=None)  # type: ignore[arg-type]
    plan.weights["w"] = WeightSite("w", "mm", 1, 1)
    found = targets(model, plan)
    out = partially_binarized(model, {"mm": pb}, {t.node: t for t in found})
    onnx.checker.check_model(out, full_check=True)
    assert "w" not in {t.name for t in out.graph.initializer}
    y = make_session(out, "all").run(None, {"x": np.eye(k, dtype=np.float32)})[0]
    np.testing.assert_allclose(y, pb.dequantized(), rtol=1e-6, atol=1e-6)


def test_partial_beats_all_binary_and_compensation_and_hessian_help():
    rng = np.random.default_rng(3)
    x, w = _data(rng)
    h = x.T @ x
    err = {key: _output_error(x, w, partial_binarize(w, h, f, s, c).dequantized())
           for key, (f, s, c) in {"binary": (0.0, "magnitude", False), "pb_mag_nocomp": (0.1, "magnitude", False),
                                  "pb_mag": (0.1, "magnitude", True), "pb_hess": (0.1, "hessian", True)}.items()}
    assert err["pb_mag_nocomp"] < 0.9 * err["binary"]
    assert err["pb_mag"] < 0.95 * err["pb_mag_nocomp"]
    assert err["pb_hess"] < 0.5 * err["pb_mag"]  # the outlier channel's small rows are salient by Hessian only


def test_method_on_the_decoder_fixture():
    """Weight-only PB-LLM on the fixture's 13 MatMuls: the report's salient count is exact, activations
    stay float, and 10% salient keeps far more of the logits than all-binary."""
    model = decoder.load_model()
    ref = decoder.logits(model)
    feeds = decoder.calibration()
    res = onnxq.optimize(model, method="pbllm", data=feeds, show_progress=False)
    rep = res.report.methods["pbllm"]
    assert len(rep["layers"]) == 13
    for layer in rep["layers"].values():
        assert layer["salient"] == round(0.1 * layer["shape"][0] * layer["shape"][1])
    assert not any(n.op_type == "QuantizeLinear" for n in res.model.graph.node)  # weight-only
    partial = decoder.score(res.model, ref)
    binary = decoder.score(onnxq.optimize(model, method="pbllm", options={"salient": 0.0}, data=feeds, show_progress=False).model, ref)
    assert partial["cosine"] > binary["cosine"] + 0.15
    assert partial["top1"] > binary["top1"]
