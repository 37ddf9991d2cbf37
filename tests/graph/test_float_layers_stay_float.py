"""A layer left float between quantized ones stays float in ONNX Runtime.

ONNX Runtime 1.21+ quantizes, per tensor, the float weight of a Conv/ConvTranspose/Gemm that reads a per-tensor
DequantizeLinear and feeds a QuantizeLinear (optimizer WeightBiasQuantization). A depthwise conv whose channels'
weights differ by orders of magnitude (as after ``equalize``) then loses most of its channels; onnxq gives such a
layer a per-axis input DequantizeLinear that the optimizer does not match (``onnxq.graph.qdq.keep_float_layers_float``).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.graph.edit import cleanup as onnxq_cleanup

DW = "dw"


def _model() -> onnx.ModelProto:
    """Conv 3->8, Relu, depthwise 3x3 whose channels' weights span 1e-3..1e2, Relu, Conv 8->4."""
    rng = np.random.default_rng(0)
    spread = np.logspace(-3, 2, 8).reshape(8, 1, 1, 1)
    inits = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8), "wd": rng.normal(0, 1, (8, 1, 3, 3)) * spread,
             "bd": rng.normal(0, 0.1, 8), "w2": rng.normal(0, 0.3, (4, 8, 1, 1)) / spread.reshape(1, 8, 1, 1), "b2": np.zeros(4)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("Conv", ["r1", "wd", "bd"], ["cd"], name=DW, pads=[1, 1, 1, 1], group=8), helper.make_node("Relu", ["cd"], ["rd"], name="rd"),
             helper.make_node("Conv", ["rd", "w2", "b2"], ["y"], name="c2")]
    graph = helper.make_graph(nodes, "float-dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 12, 12])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, x: np.ndarray, optimize: bool) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_an_excluded_conv_between_quantized_ones_runs_float_in_onnx_runtime():
    model = _model()
    rng = np.random.default_rng(1)
    data = [{"x": rng.normal(0, 1, (8, 3, 12, 12)).astype(np.float32)} for _ in range(4)]
    x = rng.normal(0, 1, (8, 3, 12, 12)).astype(np.float32)
    ref = _run(model, x, False)
    res = onnxq.optimize(model, method="minmax", data=data, exclude=[DW], show_progress=False, check=False)
    q = res.model
    nodes = {n.name: n for n in q.graph.node}
    producers = {o: n for n in q.graph.node for o in n.output}
    inits = {t.name for t in q.graph.initializer}
    assert nodes[DW].input[1] in inits  # written float
    guard = producers[nodes[DW].input[0]]
    assert guard.op_type == "DequantizeLinear" and any(a.name == "axis" for a in guard.attribute)

    # precondition, on this ONNX Runtime: the same model with the conv reading the shared per-tensor DequantizeLinear
    # is changed by the session's optimizer (skipped where the runtime leaves float layers alone)
    bare = onnx.ModelProto()
    bare.CopyFrom(q)
    values = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    bare.graph.initializer.extend([numpy_helper.from_array(values[guard.input[1]][:1], "one_scale"),
                                   numpy_helper.from_array(values[guard.input[2]][:1], "one_zero_point")])
    bare.graph.node.insert(0, helper.make_node("DequantizeLinear", [guard.input[0], "one_scale", "one_zero_point"], ["per_tensor"]))
    next(n for n in bare.graph.node if n.name == DW).input[0] = "per_tensor"
    bare = onnxq_cleanup(bare)
    runtime_quantizes = not np.allclose(_run(bare, x, True), _run(bare, x, False), rtol=1e-3, atol=1e-3 * float(np.abs(ref).max()))

    optimized, plain = _run(q, x, True), _run(q, x, False)
    # what ONNX Runtime runs is what onnxq wrote: the integer layers' kernels round a little differently, no more
    assert np.allclose(optimized, plain, rtol=1e-3, atol=1e-3 * float(np.abs(ref).max()))
    full = onnxq.optimize(model, method="minmax", data=data, show_progress=False, check=False).model
    # leaving the conv float keeps at least the fidelity of quantizing it
    assert _cosine(optimized, ref) >= _cosine(_run(full, x, True), ref) - 1e-4
    if runtime_quantizes:
        assert _cosine(_run(bare, x, True), ref) < _cosine(optimized, ref) - 1e-3
