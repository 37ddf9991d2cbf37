"""--bits 4: block-wise int4 weight-only MatMul/Gemm that ONNX Runtime runs on its 4-bit kernel."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.evaluate.metrics import cosine
from onnxq.runtime.ort import integer_kernel_report, make_session, optimized_op_counts
from onnxq.errors import OptionError
from onnxq.graph.trt_rules import check_trt_rules
from onnxq.pipeline import optimize


def mlp(seed: int = 0) -> onnx.ModelProto:
    """x [N, 64] -> MatMul 64x256 + b -> Relu -> Gemm(transB) 256->128 -> Relu -> MatMul 128x32 -> y.

    (Linear layers with a bias, as exporters write them: ONNX Runtime 1.32 does not fuse a 4-bit
    DQ->MatMul whose output feeds a Relu directly; see docs/methods.md.)
    """
    rng = np.random.default_rng(seed)
    init = lambda n, s, k=1.0: numpy_helper.from_array((rng.standard_normal(s) * k / np.sqrt(s[0])).astype(np.float32), n)  # noqa: E731
    inits = [init("w1", (64, 256)), numpy_helper.from_array(np.full(256, 0.1, np.float32), "b1"), init("w2", (128, 256)), numpy_helper.from_array(np.zeros(128, np.float32), "b2"), init("w3", (128, 32))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h1"], name="add1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], transB=1, name="gemm2"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "w3"], ["y"], name="mm3"),
    ]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)


def test_ort_target_runs_every_matmul_on_the_4bit_kernel(x):
    fp = mlp()
    result = optimize(fp, method="minmax", data=None, target="ort", bits=4, show_progress=False)
    q = result.model
    onnx.checker.check_model(q)
    assert [n.op_type for n in q.graph.node].count("MatMulNBits") == 3
    assert not [n for n in q.graph.node if n.op_type == "QuantizeLinear"], "activations stay float"
    counts = optimized_op_counts(q, "all")
    assert counts.get("MatMulNBits") == 3, counts
    assert integer_kernel_report(q)["float_compute_ops"] == {}
    ref = make_session(fp).run(None, {"x": x})[0]
    got = make_session(q).run(None, {"x": x})[0]
    assert cosine(ref, got) >= 0.98


def test_trt_target_writes_symmetric_blocked_int4_dequantize(x):
    fp = mlp()
    q = optimize(fp, method="minmax", data=None, target="trt", bits=4, show_progress=False).model
    onnx.checker.check_model(q, full_check=True)
    assert max(i.version for i in q.opset_import if i.domain in ("", "ai.onnx")) >= 21
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 3 and all(any(a.name == "block_size" and a.i == 32 for a in n.attribute) for n in dq)
    ints = {t.data_type for t in q.graph.initializer if t.name.endswith("_quantized")}
    assert ints == {TensorProto.INT4}
    assert check_trt_rules(q) == []  # float activations are weight-only's design, not "put a Q/DQ pair on it"
    ref = make_session(fp).run(None, {"x": x})[0]
    assert cosine(ref, make_session(q).run(None, {"x": x})[0]) >= 0.98


def test_int4_model_is_much_smaller(tmp_path):
    fp = mlp()
    result = optimize(fp, tmp_path / "q.onnx", method="minmax", data=None, bits=4, show_progress=False)
    fp_bytes = sum(numpy_helper.to_array(t).nbytes for t in fp.graph.initializer)
    q_bytes = (tmp_path / "q.onnx").stat().st_size
    assert q_bytes < 0.25 * fp_bytes
    assert result.report.weight_only.block_size == 32


def test_block_size_option_and_validation(x):
    q = optimize(mlp(), method="minmax", data=None, bits=4, block_size=64, target="trt", show_progress=False).model
    assert all(a.i == 64 for n in q.graph.node for a in n.attribute if a.name == "block_size")
    q = optimize(mlp(), method="minmax", data=None, bits=4, block_size=64, show_progress=False).model
    assert {a.i for n in q.graph.node for a in n.attribute if a.name == "block_size"} == {64}
    with pytest.raises(OptionError):
        optimize(mlp(), method="minmax", data=None, bits=4, block_size=24, show_progress=False)


def test_easyquant_refuses_4_bits():
    with pytest.raises(OptionError, match="easyquant"):
        optimize(mlp(), method="easyquant", data=None, bits=4, show_progress=False)


def test_weight_only_needs_no_calibrator_and_declares_ir_10():
    result = optimize(mlp(), data=None, bits=4, target="trt", method="minmax", show_progress=False)
    assert result.model.ir_version >= 10
    default = optimize(mlp(), data=None, bits=4, target="trt", method="percentile", show_progress=False)
    assert default.report.method == ["percentile"]


def test_a_calibrator_at_4_bits_says_it_changes_nothing(x, caplog):
    """At --bits 4 only the weights are quantized: -p mse wrote -p minmax's model to the bit, without a word, and the
    fidelity hint sent users to it. It says so, and what does change the weights."""
    with caplog.at_level("WARNING", logger="onnxq"):
        mse = optimize(mlp(), method="mse", bits=4, data=[{"x": x}], show_progress=False)
    plain = optimize(mlp(), method="minmax", bits=4, data=[{"x": x}], show_progress=False)
    assert [t.raw_data for t in mse.model.graph.initializer] == [t.raw_data for t in plain.model.graph.initializer]
    said = [r.getMessage() for r in caplog.records if "quantizes weights only" in r.getMessage()]
    assert len(said) == 1 and "-p mse" in said[0] and "-p gptq" in said[0]
