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
    # the step of conv2's input, times its weight steps, holds every bias within BIAS_LIMIT integer steps
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    q = next(n for n in res.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r1")
    dq_w = next(n for n in res.model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in
                {c.input[1] for c in res.model.graph.node if c.name == "conv2"})
    steps = float(inits[q.input[1]]) * inits[dq_w.input[1]].astype(np.float64)
    assert np.all(np.abs(inits["b2"]) / steps <= BIAS_LIMIT * 1.0001)
