"""Models at the newest opsets, as newer exporters write them.

* ``--target ort-s8`` at opset 21 and later: ONNX Runtime copies a DequantizeLinear forward past Reshape/Transpose/...
  (and a QuantizeLinear backward before them) when it loads a model, then turns int8 activations into uint8; from
  opset 21 the QuantizeLinear it inserted keeps ``output_dtype`` INT8 against a uint8 zero point and the session fails
  to load. A decoder written at opset 23 (projection → Reshape → Transpose → rotary Slice/Mul) stopped with exit 4.
  onnxq writes those pairs itself.
* An opset ONNX Runtime runs in float without Q/DQ kernels for it (28 on 1.32) is refused before calibrating.
* Attention-23 is listed as float compute, as LSTM and Einsum are.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.graph.qdq import propagate_across_moves


def _model(opset: int, backward: bool = True) -> onnx.ModelProto:
    """fc1 → Reshape → Transpose → (Slice, Mul) → Concat/Add (DQ forward); with ``backward``, then Softmax → Transpose →
    Reshape → fc2 (Q backward). (With both, ONNX Runtime 1.32 happens to load the old form.)"""
    rng = np.random.default_rng(0)
    consts = {"w1": rng.normal(0, 0.3, (16, 32)), "w2": rng.normal(0, 0.3, (32, 8)), "shape": np.array([0, 4, 8]),
              "flat": np.array([0, 32]), "st": np.array([0]), "en": np.array([2]), "ax": np.array([2])}
    inits = [numpy_helper.from_array(v.astype(np.int64 if v.dtype.kind == "i" else np.float32), k) for k, v in consts.items()]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Reshape", ["h", "shape"], ["r"], name="split_heads"),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1], name="heads_first"),
             helper.make_node("Slice", ["t", "st", "en", "ax"], ["s"], name="half"),
             helper.make_node("Mul", ["t", "t"], ["m"], name="square"),
             helper.make_node("Concat", ["s", "s"], ["c"], axis=-1, name="cat"),
             helper.make_node("Add", ["m", "c"], ["a"], name="add"),
             helper.make_node("Softmax", ["a"], ["p"], axis=-1, name="softmax"),
             helper.make_node("Transpose", ["p"], ["pt"], perm=[0, 2, 1], name="heads_last"),
             helper.make_node("Reshape", ["pt", "flat"], ["f"], name="merge_heads"),
             helper.make_node("MatMul", ["f", "w2"], ["y"], name="fc2")]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    if not backward:
        nodes, inits = nodes[:7], inits[:1] + inits[2:3] + inits[4:]
        output = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 8, 4])
    graph = helper.make_graph(nodes, "moves", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])], [output], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _data(n: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (8, 16)).astype(np.float32)} for _ in range(n)]


def _run(model: onnx.ModelProto, x: np.ndarray, level: ort.GraphOptimizationLevel) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("opset", [21, 23])
def test_ort_s8_output_loads_in_onnx_runtime_at_opset_21_and_later(opset: int) -> None:
    model = _model(opset, backward=False)
    res = onnxq.optimize(model, method="minmax", data=_data(), target="ort-s8", show_progress=False)
    x = _data(1, 7)[0]["x"]
    ref, got = _run(model, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL), _run(res.model, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert float(np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.999
    assert res.report.quantized_weights == 1


def test_pairs_written_across_moves_change_no_value() -> None:
    """Forward the moved values are on the grid already; backward only Qs of one grid read the move: the same numbers."""
    plain = onnxq.optimize(_model(21), method="minmax", data=_data(), target="ort", show_progress=False).model
    moved, added = propagate_across_moves(plain)
    assert added >= 3  # forward past split_heads, backward before merge_heads and heads_last
    readers = {i: n for n in moved.graph.node for i in n.input}
    assert readers[next(n for n in moved.graph.node if n.name == "split_heads").output[0]].op_type == "QuantizeLinear"
    x = _data(1, 7)[0]["x"]
    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    np.testing.assert_array_equal(_run(moved, x, level), _run(plain, x, level))
    assert propagate_across_moves(_model(20))[1] == 0


def test_an_opset_onnx_runtime_runs_in_float_but_has_no_qdq_kernels_for_is_refused_before_calibrating(tmp_path) -> None:
    """ONNX Runtime 1.32 runs opset-28 float models; its Q/DQ kernels stop below: the run ended in exit 4 after calibrating."""
    from onnxq.errors import ModelError
    from onnxq.runtime.ort import has_qdq_kernels

    model = _model(28, backward=False)
    if has_qdq_kernels(28, model.ir_version):
        pytest.skip("this ONNX Runtime has Q/DQ kernels at opset 28")
    try:
        _run(model, _data(1)[0]["x"], ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    except Exception:  # noqa: BLE001 - an older ONNX Runtime: no float run at opset 28 either
        pytest.skip("this ONNX Runtime does not run opset-28 models")
    calls = []

    def data():
        calls.append(1)
        yield from _data()

    with pytest.raises(ModelError, match=r"no QuantizeLinear/DequantizeLinear kernels at opset 28.*opset \d+ or lower"):
        onnxq.optimize(model, method="minmax", data=data(), show_progress=False)
    assert not calls, "refused before calibrating"


def test_fused_attention_of_opset_23_is_listed_as_float_compute() -> None:
    """Attention-23 hides Q·Kᵀ and softmax·V: they run in float, said as for LSTM and Einsum (it was said nowhere)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 8)).astype(np.float32), w) for w in ("wq", "wk", "wv", "wo")]
    nodes = [helper.make_node("MatMul", ["x", w], [w + "_out"], name=w) for w in ("wq", "wk", "wv")]
    nodes += [helper.make_node("Attention", ["wq_out", "wk_out", "wv_out"], ["att"], q_num_heads=2, kv_num_heads=2, name="attention"),
              helper.make_node("MatMul", ["att", "wo"], ["y"], name="wo")]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    data = [{"x": rng.normal(0, 1, (4, 6, 8)).astype(np.float32)} for _ in range(3)]
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, data[0])
    except Exception:  # noqa: BLE001 - an ONNX Runtime before Attention-23
        pytest.skip("this ONNX Runtime does not run Attention-23")
    res = onnxq.optimize(model, method="minmax", data=data, show_progress=False)
    reasons = {f.node: f.reason for f in res.report.left_in_float}
    assert "float" in reasons.get("attention", "") and res.report.quantized_weights == 4
