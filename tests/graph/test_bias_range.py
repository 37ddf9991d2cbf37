"""An activation step small enough to overflow the int32 bias of the layer reading it is widened.

ONNX Runtime adds a quantized conv's bias in its int32 accumulator, as ``round(b / (s_x · s_w))``; a nearly dead input
(here a conv with weights of 1e-6 before it) gets a step of 7e-8, a bias of order one becomes billions of steps, and
the runtime's layer computes something else: cosine 0.73 to FP32, while the checks' unfused per-layer runs showed
nothing wrong at that layer. TensorRT's target keeps the bias float and was right all along.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.graph.bias_range import BIAS_LIMIT


def dead_input_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(0, 1, (8, 3, 3, 3)) * 1e-6, "w2": rng.normal(0, 0.3, (8, 8, 3, 3)), "b2": rng.normal(0, 1, 8),
             "w3": rng.normal(0, 0.3, (4, 8, 3, 3))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="conv1"), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4, name="conv2"), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["y"], pads=[1] * 4, name="conv3")]
    graph = helper.make_graph(nodes, "dead", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", ["ort", "ort-s8"])
def test_a_nearly_dead_input_keeps_its_layers_bias(target):
    rng = np.random.default_rng(1)
    data = [{"x": rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    res = onnxq.optimize(dead_input_model(), method="minmax", target=target, data=data, show_progress=False)
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (dead_input_model(), res.model)]
    a, b = (np.concatenate([r.run(None, d)[0].ravel() for d in data]) for r in runs)
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999
    # conv2's bias, in steps of its input's step times its weight steps, stays within BIAS_LIMIT
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    producers = {o: n for n in res.model.graph.node for o in n.output}
    conv2 = next(n for n in res.model.graph.node if n.name == "conv2")
    bias = producers[conv2.input[2]]
    assert bias.op_type == "DequantizeLinear" and np.all(np.abs(inits[bias.input[0]].astype(np.int64)) <= BIAS_LIMIT)


def test_ort_targets_write_int32_biases_the_kernels_add():
    """ONNX Runtime before 1.32 fuses a quantized Conv or Gemm only with an int32 bias: with onnxq's float biases 1.18-1.22
    ran them as float kernels between live Q/DQ pairs (a small CNN at 0.11x FP32's speed at batch 64 on 1.22, 0.21x with
    int32 biases; an MLP 0.70x against 1.81x), with the same outputs. Each quantized Conv and Gemm of an ort model reads
    its bias from a DequantizeLinear of int32 with step s_x · s_w, within half a step of the float bias."""
    from onnxq.runtime.ort import optimized_op_counts

    rng = np.random.default_rng(2)
    inits = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.5, 8), "w2": rng.normal(0, 0.3, (5, 8 * 8 * 8)),
             "b2": rng.normal(0, 0.5, 5), "shape": np.array([0, -1], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1] * 4, name="conv"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w2", "b2"], ["z"], transB=1, name="fc"), helper.make_node("Relu", ["z"], ["y"])]
    graph = helper.make_graph(nodes, "convgemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = [{"x": rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    res = onnxq.optimize(model, method="minmax", data=data, show_progress=False)
    q = res.model
    producers = {o: n for n in q.graph.node for o in n.output}
    arrays = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    for name, float_bias in (("conv", inits["b1"]), ("fc", inits["b2"])):
        node = next(n for n in q.graph.node if n.name == name)
        dq_b, dq_x, dq_w = (producers[node.input[i]] for i in (2, 0, 1))
        assert dq_b.op_type == "DequantizeLinear" and arrays[dq_b.input[0]].dtype == np.int32, name
        step = arrays[dq_x.input[1]].astype(np.float32) * arrays[dq_w.input[1]].astype(np.float32)
        assert np.allclose(arrays[dq_b.input[1]], step, rtol=1e-6), name
        assert np.all(np.abs(arrays[dq_b.input[0]] * step - float_bias) <= step / 2 + 1e-7), name
    counts = optimized_op_counts(q)
    assert counts.get("QLinearConv") == 1 and counts.get("Conv", 0) == 0, counts
    # the fused kernels add the bias the unfused graph adds: every optimization level computes the same numbers
    x = np.concatenate([d["x"] for d in data])
    levels = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        levels.append(ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0])
    assert np.abs(levels[0] - levels[1]).max() <= 1e-4 * np.abs(levels[0]).max()
    trt = onnxq.optimize(model, method="minmax", target="trt", data=data, show_progress=False).model
    assert not any(t.data_type == TensorProto.INT32 for t in trt.graph.initializer)  # TensorRT refuses int32 biases


@pytest.mark.parametrize("scale", [0.0, 1e-7])
def test_a_channel_with_zero_weights_widens_its_own_step_not_its_inputs(scale: float):
    """A conv output channel whose weights are all zero (pruned, or zeroed by a folded BatchNorm) has the finest weight step
    there is, and its bias alone set the input's step: PP-OCRv5's text detector had four in one conv, its input's step went
    900x wider and its text mask's IoU with FP32 fell to 0.015. The zero channel's own step is widened instead (its weights
    are zero at any step): the other channels keep their input's grid, and the zero channel still outputs its bias."""
    rng = np.random.default_rng(0)
    w2 = rng.normal(0, 0.5, (8, 8, 3, 3))
    w2[0] *= scale  # zero, or scaled to nothing by a folded BatchNorm (PP-OCRv5's det: weights of order 1e-7)
    b2 = rng.normal(0, 0.1, 8)
    b2[0] = 1.5
    inits = {"w1": rng.normal(0, 0.02, (8, 3, 3, 3)), "w2": w2, "b2": b2}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4, name="conv1"),
             helper.make_node("Conv", ["a", "w2", "b2"], ["y"], pads=[1] * 4, name="conv2")]
    graph = helper.make_graph(nodes, "zero_channel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = [{"x": rng.random((8, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    x = np.concatenate([d["x"] for d in data])
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for target in ("ort", "trt"):
        q = onnxq.optimize(model, method="minmax", target=target, data=data, show_progress=False).model
        got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        a, b = ref[:, 1:].reshape(len(x), -1), got[:, 1:].reshape(len(x), -1)
        assert float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))) > 0.999, target
        assert np.allclose(got[:, 0], 1.5, atol=1e-3), target
