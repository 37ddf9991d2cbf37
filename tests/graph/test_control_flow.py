"""Control flow: what sits inside If/Loop/Scan subgraphs is reported as left float, never silently.

onnxq places Q/DQ in the main graph only (calibration cannot observe a tensor inside a branch or
loop body); a model whose weighted ops sit in an If's branches used to come back unchanged, exit 0,
without a word. Now every such node is named in a warning and in the report's ``left_in_float``
with the weighted ops it holds, and a run that quantizes nothing says so.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.graph.placement import WHOLE_MODEL, build_plan, control_flow_summary
from onnxq.graph.targets import get_profile

RNG = np.random.default_rng(0)


def _conv_branch(name: str, x: str, scale: float) -> onnx.GraphProto:
    """A branch body: Conv(x, W) -> Relu, reading ``x`` from the enclosing graph (an outer-scope name)."""
    w = numpy_helper.from_array((RNG.standard_normal((4, 3, 3, 3)) * scale).astype(np.float32), f"{name}_w")
    nodes = [
        helper.make_node("Conv", [x, f"{name}_w"], [f"{name}_c"], name=f"{name}_conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", [f"{name}_c"], [f"{name}_y"], name=f"{name}_relu"),
    ]
    out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [2, 4, 8, 8])
    return helper.make_graph(nodes, name, [], [out], initializer=[w])


def _if_model(main_conv: bool) -> onnx.ModelProto:
    """x -> [Conv ->] If(flag) {then: Conv+Relu, else: Conv+Relu} -> y."""
    nodes, inits = [], []
    branch_in = "x"
    if main_conv:
        inits.append(numpy_helper.from_array(RNG.standard_normal((3, 3, 3, 3)).astype(np.float32) * 0.3, "w0"))
        nodes.append(helper.make_node("Conv", ["x", "w0"], ["h"], name="main_conv", pads=[1, 1, 1, 1]))
        branch_in = "h"
    nodes.append(helper.make_node("If", ["flag"], ["y"], name="vad_if",
                                  then_branch=_conv_branch("then", branch_in, 0.3), else_branch=_conv_branch("else", branch_in, 0.5)))
    graph = helper.make_graph(
        nodes, "cf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _feeds(n: int = 4) -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32), "flag": np.array(i % 2 == 0)} for i in range(n)]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def test_summary_counts_weighted_ops_in_branches_and_nested_bodies():
    model = _if_model(main_conv=False)
    inner = model.graph.node[0]
    # an If whose then-branch holds the If above plus a MatMul: nested bodies are counted too
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "mm_w")
    then = helper.make_graph([inner, helper.make_node("MatMul", ["y", "mm_w"], ["z"], name="mm")], "outer_then", [],
                             [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4, 8, 8])], initializer=[w])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["x2"], name="idn")], "outer_else", [],
                              [helper.make_tensor_value_info("x2", TensorProto.FLOAT, [2, 3, 8, 8])])
    nested = onnx.ModelProto()
    nested.CopyFrom(model)
    del nested.graph.node[:]
    nested.graph.node.append(helper.make_node("If", ["flag"], ["y"], name="outer_if", then_branch=then, else_branch=other))
    assert control_flow_summary(nested) == [("outer_if", "If", {"Conv": 2, "MatMul": 1})]
    assert control_flow_summary(model) == [("vad_if", "If", {"Conv": 2})]
    plan = build_plan(model, get_profile("ort"))
    reasons = dict(plan.skipped)
    assert "vad_if" in reasons and "2 Conv" in reasons["vad_if"] and "not quantized" in reasons["vad_if"]


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_weighted_ops_only_inside_if_are_reported_not_silently_skipped(target, caplog):
    model = _if_model(main_conv=False)
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        res = onnxq.optimize(model, method="minmax", data=_feeds(), target=target, show_progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("If 'vad_if' holds 2 Conv" in w for w in warnings), warnings
    assert any(w.startswith("nothing was quantized") and "control flow" in w for w in warnings), warnings
    left = {e.node: e.reason for e in res.report.left_in_float}
    assert "2 Conv" in left["vad_if"] and WHOLE_MODEL in left
    assert res.report.quantized_weights == 0
    # the output is the float model, valid and runnable, both branches
    for feeds in _feeds(2):
        np.testing.assert_allclose(_run(res.model, feeds), _run(model, feeds), rtol=1e-5, atol=1e-5)


def test_main_graph_is_quantized_and_the_if_is_named(caplog):
    model = _if_model(main_conv=True)
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        res = onnxq.optimize(model, method="minmax", data=_feeds(8), show_progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("If 'vad_if' holds 2 Conv" in w for w in warnings), warnings
    assert not any(w.startswith("nothing was quantized") for w in warnings), warnings
    assert res.report.quantized_weights == 1 and {e.node for e in res.report.left_in_float} == {"vad_if"}
    assert any("w0" in n.input[0] for n in res.model.graph.node if n.op_type == "DequantizeLinear")
    # quantized outputs stay close to float through both branches (int8 on one 3x3 conv)
    for feeds in _feeds(2):
        y_f, y_q = _run(model, feeds), _run(res.model, feeds)
        assert np.linalg.norm(y_q - y_f) / np.linalg.norm(y_f) < 0.05


@pytest.mark.parametrize("methods", [["easyquant"], ["minmax", "bias-correction"]], ids=["easyquant", "bias-correction"])
def test_layer_wise_methods_run_the_control_flow_node_as_one(methods):
    """easyquant and bias-correction (and gptq) run the model layer by layer; a node with a body stopped them ("has a
    subgraph; layer-wise search does not support control flow": every Keras LSTM/GRU with a mask exports as a Loop). The
    node now runs alone with what its bodies read from around it as inputs, its body float as in the quantized model."""
    model = _if_model(main_conv=True)
    res = onnxq.optimize(model, method=methods, data=_feeds(8), show_progress=False)
    assert res.report.quantized_weights == 1
    for feeds in _feeds(2):
        y_f, y_q = _run(model, feeds), _run(res.model, feeds)
        assert np.linalg.norm(y_q - y_f) / np.linalg.norm(y_f) < 0.05


def test_auto_names_the_if_once_not_once_a_build(caplog):
    """``-p auto`` builds the model some twenty times: the control-flow line is said once a run."""
    model = _if_model(main_conv=True)
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        res = onnxq.optimize(model, method="auto", data=_feeds(64), show_progress=False, check=False,
                             options={"resamples": 2, "easyquant": False, "time_budget": 600})
    said = [r.getMessage() for r in caplog.records if "If 'vad_if' holds 2 Conv" in r.getMessage()]
    assert len(res.report.auto.candidates) > 2 and len(said) == 1, said


def test_cli_run_on_control_flow_model_warns_on_stderr(tmp_path, run_cli):
    path = tmp_path / "cf.onnx"
    onnx.save_model(_if_model(main_conv=False), str(path))
    data = tmp_path / "data"
    data.mkdir()
    for i, f in enumerate(_feeds()):
        np.savez(data / f"{i}.npz", **f)
    code, out, err = run_cli(["optimize", path, "-p", "minmax", "--data", data, "--output", tmp_path / "q.onnx", "--no-cache", "--quiet"])
    assert code == 0, err
    assert "onnxq: warning: If 'vad_if' holds 2 Conv in its subgraphs" in err
    assert "onnxq: warning: nothing was quantized" in err


def _loop_model() -> onnx.ModelProto:
    """h = x; repeat 3 times: h = Relu(h @ W) with W an outer-scope initializer read by the Loop body."""
    w = numpy_helper.from_array((RNG.standard_normal((6, 6)) * 0.4).astype(np.float32), "loop_w")
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("MatMul", ["h_in", "loop_w"], ["mm"], name="body_mm"),
         helper.make_node("Relu", ["mm"], ["h_out"], name="body_relu")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [2, 6])])
    trip = numpy_helper.from_array(np.array(3, np.int64), "trip")
    cond = numpy_helper.from_array(np.array(True), "cond")
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="rnn_loop", body=body)], "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
        initializer=[w, trip, cond])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_loop_body_is_reported_with_its_outer_scope_weight(caplog):
    model = _loop_model()
    assert control_flow_summary(model) == [("rnn_loop", "Loop", {"MatMul": 1})]
    feeds = [{"x": RNG.standard_normal((2, 6)).astype(np.float32)} for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        res = onnxq.optimize(model, method="minmax", data=feeds, target="trt", show_progress=False)
    assert any("Loop 'rnn_loop' holds 1 MatMul" in r.getMessage() for r in caplog.records), caplog.text
    assert "1 MatMul inside its body" in {e.node: e.reason for e in res.report.left_in_float}["rnn_loop"]
    # the body still reads its outer-scope weight: the output runs and equals the float model's
    np.testing.assert_allclose(_run(res.model, feeds[0]), _run(model, feeds[0]), rtol=1e-5, atol=1e-6)
