"""A graph input that held one value on every calibration sample is left float, with a warning saying what to feed.

The first try at calibrating a streaming model feeds its recurrent state as zeros. The state input then got a grid of
one point (a step of 1e-8 at 0), every state the model produced in use was rounded back to zero, and the model lost
its memory (an LSTM classifier of pulse streams: 0.964 -> 0.443 accuracy in a closed loop) while the checks, run on
the same zero states, passed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxq


def recurrent_cell() -> onnx.ModelProto:
    """x [N, 8], h [N, 16] -> h_out = tanh(x Wx + h Wh): one step of a recurrent layer with its state as an input."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 16)).astype(np.float32), "wx"),
             numpy_helper.from_array(rng.normal(0, 0.3, (16, 16)).astype(np.float32), "wh")]
    nodes = [helper.make_node("MatMul", ["x", "wx"], ["ax"], name="x_proj"), helper.make_node("MatMul", ["h", "wh"], ["ah"], name="h_proj"),
             helper.make_node("Add", ["ax", "ah"], ["a"]), helper.make_node("Tanh", ["a"], ["h_out"])]
    graph = helper.make_graph(nodes, "cell", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                                              helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["N", 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _quantized_inputs(model: onnx.ModelProto) -> set[str]:
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_a_state_calibrated_as_zeros_is_left_float_and_said(caplog):
    rng = np.random.default_rng(1)
    zero_states = [{"x": rng.normal(0, 1, (8, 8)).astype(np.float32), "h": np.zeros((8, 16), np.float32)} for _ in range(4)]
    with caplog.at_level("WARNING", logger="onnxq"):
        res = onnxq.optimize(recurrent_cell(), method="minmax", data=zero_states, show_progress=False)
    assert "h" not in _quantized_inputs(res.model) and "x" in _quantized_inputs(res.model)
    assert any(e.node == "input 'h'" and "held 0 in every calibration sample" in e.reason for e in res.report.left_in_float)
    assert sum("input 'h' held 0" in r.getMessage() for r in caplog.records) == 1
    # a state it never saw in calibration passes through the quantized model as it does through FP32's
    feeds = {"x": rng.normal(0, 1, (8, 8)).astype(np.float32), "h": rng.uniform(-1, 1, (8, 16)).astype(np.float32)}
    from onnxq.runtime.ort import make_session

    ref, got = (make_session(m, "all").run(None, feeds)[0] for m in (recurrent_cell(), res.model))
    assert float(np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.99


def test_states_recorded_in_use_are_quantized():
    rng = np.random.default_rng(2)
    recorded = [{"x": rng.normal(0, 1, (8, 8)).astype(np.float32), "h": rng.uniform(-1, 1, (8, 16)).astype(np.float32)}
                for _ in range(4)]
    res = onnxq.optimize(recurrent_cell(), method="minmax", data=recorded, show_progress=False)
    assert {"x", "h"} <= _quantized_inputs(res.model) and not any(e.node.startswith("input ") for e in res.report.left_in_float)


def test_calibrating_on_a_handful_of_samples_is_said(caplog):
    """One image calibrated a CNN to 95.5 % against FP32's 99.5 %, and nothing was said."""
    rng = np.random.default_rng(3)
    few = [{"x": rng.normal(0, 1, (2, 8)).astype(np.float32), "h": rng.uniform(-1, 1, (2, 16)).astype(np.float32)}]
    with caplog.at_level("WARNING", logger="onnxq"):
        onnxq.optimize(recurrent_cell(), method="minmax", data=few, show_progress=False, cache_dir=None)
    assert any("calibrated on 2 sample(s)" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="onnxq"):
        onnxq.optimize(recurrent_cell(), method="minmax", data=few * 8, show_progress=False, cache_dir=None)
    assert not any("sample(s):" in r.getMessage() for r in caplog.records)
