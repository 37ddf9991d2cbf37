"""Multipoint quantization: the greedy points, the byte budget, and what they buy at W4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("onnxq_multipoint", reason="onnxq-multipoint is not installed (pip install -e plugins_contrib/onnxq-multipoint)")

import onnxq  # noqa: E402
from onnxq.runtime.ort import make_session  # noqa: E402
from onnxq.testing.contract import MethodContract  # noqa: E402
from onnxq_multipoint.allocate import LayerPoints, allocate  # noqa: E402
from onnxq_multipoint.points import greedy_points, output_error  # noqa: E402

ZOO = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "zoo"


class TestMultipointContract(MethodContract):
    method = "multipoint"
    options = {"weight_bits": 4, "budget": 0.25}
    min_cosine_int8 = 0.9


@pytest.mark.parametrize("block", [None, 8])
def test_greedy_error_never_grows_with_more_points(block):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 40)) * rng.uniform(0.1, 3, (16, 1))
    var, mu = rng.uniform(0.5, 2, 40), rng.uniform(0, 1, 40)
    p = greedy_points(w, var, mu, bits=4, points=4, block=block)
    assert np.all(np.diff(p.errors, axis=0) <= 1e-12)  # row by row, every point helps or holds
    assert p.errors[2].sum() < 0.25 * p.errors[1].sum()  # a second point cuts the error a lot
    approx = p.approximation(None, 4, block or 40)
    assert np.allclose(output_error(w - approx, var, mu), p.errors[4])


def test_budget_is_respected_and_spent_where_it_pays_most():
    # layer a: its channels' second point removes much (relative to its signal); layer b: little
    a = LayerPoints("a", np.array([[10.0, 10.0], [4.0, 4.0], [1.0, 1.0], [0.5, 0.5]]), point_bytes=10.0, signal=10.0)
    b = LayerPoints("b", np.array([[10.0] * 4, [4.0] * 4, [3.9] * 4, [3.8] * 4]), point_bytes=10.0, signal=10.0)
    counts = allocate([a, b], budget_bytes=25.0, max_points=3)
    assert counts["a"].tolist() == [2, 2] and counts["b"].tolist() == [1, 1, 1, 1]
    counts = allocate([a, b], budget_bytes=0.0, max_points=3)
    assert all(np.all(c == 1) for c in counts.values())


def _fixture(name):
    d = ZOO / name
    ev = np.load(d / "eval.npz")
    names = [i.name for i in make_session(str(d / "model.onnx"), "all").get_inputs()]
    return d, {n: ev[n] for n in names}, ev["label"]


def test_w4_with_ten_percent_more_bytes_beats_plain_w4():
    d, feeds, labels = _fixture("mnist_norm_resnet")
    ref = make_session(str(d / "model.onnx"), "all").run(None, feeds)[0]

    def run(**opts):
        res = onnxq.optimize(d / "model.onnx", method=["mse", "multipoint"], data=str(d / "calib.npz"), target="ort",
                             options={"weight_bits": 4, **opts}, show_progress=False, check=False)
        out = make_session(res.model, "all").run(None, feeds)[0]
        sqnr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((out - ref).astype(np.float64) ** 2))
        return float(np.mean(out.argmax(-1) == labels)), float(sqnr), res.report.methods["multipoint"]

    plain_acc, plain_sqnr, _ = run(budget=0.0, first="max")
    mp_acc, mp_sqnr, rep = run(budget=0.10)
    print(f"W4 plain {plain_acc:.4f} / {plain_sqnr:.1f} dB; multipoint +10% {mp_acc:.4f} / {mp_sqnr:.1f} dB; {rep}")
    assert 0.05 <= rep["extra_fraction"] <= 0.10 + 1e-9
    assert rep["layers_with_extra_points"] and all(v["output_error_reduction"] > 0 for v in rep["layers_with_extra_points"].values())
    assert mp_acc >= plain_acc and mp_sqnr >= plain_sqnr + 3.0


def _matmul_model(k: int = 64, n: int = 48) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((k, n)) * rng.uniform(0.2, 2.0, (1, n))).astype(np.float32)
    w[:, :3] *= 6  # outlier columns: where extra points pay
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="relu")],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def test_bits4_weight_only_blocks_get_extra_points():
    model = _matmul_model()
    rng = np.random.default_rng(2)
    data = [{"x": rng.standard_normal((32, 64)).astype(np.float32)} for _ in range(4)]
    x = rng.standard_normal((256, 64)).astype(np.float32)
    ref = make_session(model, "all").run(None, {"x": x})[0]

    def err(budget):
        res = onnxq.optimize(model, method="multipoint", bits=4, data=data, options={"budget": budget}, show_progress=False, check=False)
        onnx.checker.check_model(res.model, full_check=True)
        out = make_session(res.model, "all").run(None, {"x": x})[0]
        return float(np.mean((out - ref) ** 2)), res.report.methods["multipoint"]

    base, _ = err(0.0)
    more, rep = err(0.25)
    assert rep["extra_bytes"] > 0 and rep["extra_fraction"] <= 0.25 + 1e-9
    assert more < 0.7 * base
