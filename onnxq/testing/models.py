"""Small ONNX models for tests (onnxq's own and plugin packages'): built in code, nothing downloaded."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxq.graph.prepare import infer_shapes


def residual_concat_model() -> onnx.ModelProto:
    """x -> conv1 -> relu -> a;  a -> conv2 -> Add(a) -> r;  r -> [conv3, conv4] -> Concat -> conv5; gemm out."""
    rng = np.random.default_rng(0)
    w = lambda name, shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    inits = [w("w1", (4, 3, 3, 3)), w("w2", (4, 4, 3, 3)), w("w3", (2, 4, 1, 1)), w("w4", (2, 4, 1, 1)), w("w5", (4, 4, 1, 1)), w("fc", (5, 4)), w("fcb", (5,))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["a"], name="relu1"),
        helper.make_node("Conv", ["a", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "a"], ["r"], name="add"),
        helper.make_node("Conv", ["r", "w3"], ["c3"], name="conv3"),
        helper.make_node("Conv", ["r", "w4"], ["c4"], name="conv4"),
        helper.make_node("Concat", ["c3", "c4"], ["cat"], axis=1, name="concat"),
        helper.make_node("Conv", ["cat", "w5"], ["c5"], name="conv5"),
        helper.make_node("GlobalAveragePool", ["c5"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], transB=1, name="fc"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return infer_shapes(m)[0]


def conv_relu_model(seed: int = 1) -> onnx.ModelProto:
    """x [N,2,6,6] -> Conv 3x3 (4 ch) -> Relu -> y."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"), helper.make_node("Relu", ["c"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
