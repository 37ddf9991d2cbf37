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


def _cached_step() -> onnx.ModelProto:
    """x [N, T, 8], past [N, P, 8] -> y = Concat(past Wp, x Wx) over the steps [N, P + T, 8]: a decoder's cache step."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 8)).astype(np.float32), "wx"),
             numpy_helper.from_array(rng.normal(0, 0.4, (8, 8)).astype(np.float32), "wp")]
    nodes = [helper.make_node("MatMul", ["x", "wx"], ["new"], name="x_proj"), helper.make_node("MatMul", ["past", "wp"], ["old"], name="past_proj"),
             helper.make_node("Concat", ["old", "new"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "step", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 8]),
                                              helper.make_tensor_value_info("past", TensorProto.FLOAT, ["N", "P", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "PT", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_cache_empty_on_every_calibration_step_is_left_float_and_said(caplog):
    """Calibrating a decoder on its first (prefill) steps alone feeds an empty cache: the run failed with "takes non-finite
    values (NaN/Inf) ... the model or the data is broken" (the range of no element). The cache is now left float as a
    constant input is, and the model reads real caches as FP32 does."""
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    prefill = [{"x": rng.normal(0, 1, (8, 6, 8)).astype(np.float32), "past": np.zeros((8, 0, 8), np.float32)} for _ in range(4)]
    with caplog.at_level("WARNING", logger="onnxq"):
        res = onnxq.optimize(_cached_step(), method="minmax", data=prefill, show_progress=False)
    assert "past" not in _quantized_inputs(res.model) and "x" in _quantized_inputs(res.model)
    assert any("'past'" in r.getMessage() and "no element" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    decode = {"x": rng.normal(0, 1, (8, 1, 8)).astype(np.float32), "past": rng.normal(0, 2, (8, 20, 8)).astype(np.float32)}
    ref, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, decode)[0]
                for m in (_cached_step(), res.model))
    # the cache's part, read in float (with int8 weights): a one-point grid would have rounded it all to 0
    assert np.sqrt(np.mean((got[:, :20] - ref[:, :20]) ** 2) / np.mean(ref[:, :20] ** 2)) < 0.05
