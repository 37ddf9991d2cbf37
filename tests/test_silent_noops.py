"""Runs that would do nothing, or ignore what the user asked for, say so instead of exiting 0 silently.

* a model with nothing to quantize (no Conv/MatMul/Gemm; ``--bits 4`` without a weight MatMul)
  is written with a warning, and the report's ``left_in_float`` carries the reason;
* an option that does not apply (``--block-size`` with 8 bits) and a second calibrator are refused
  with one line (exit 1);
* the Python API needs calibration data, or ``data="random"`` said explicitly.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.errors import DataError
from onnxq.graph.placement import WHOLE_MODEL


def _no_weighted_ops_model() -> onnx.ModelProto:
    """x -> Relu -> Add(const) -> Sigmoid: nothing onnxq quantizes."""
    c = numpy_helper.from_array(np.full((1, 4), 0.5, np.float32), "c")
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Add", ["r", "c"], ["a"], name="add"),
             helper.make_node("Sigmoid", ["a"], ["y"], name="sig")]
    graph = helper.make_graph(nodes, "plain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], initializer=[c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("onnxq: error: "), (code, err)
    return lines[0]


def test_emb4bit_on_a_model_without_tables_says_so_and_why_nothing_was_quantized(tmp_path, run_cli, digits_model, digits_calib):
    """`-p emb4bit` on a CNN (no Gather table) said "the model has no Conv, ConvTranspose, Gemm or MatMul", which is
    false, and nothing of emb4bit itself."""
    code, _, err = run_cli(["optimize", digits_model, "-p", "emb4bit", "--data", digits_calib,
                            "--output", tmp_path / "q.onnx", "--no-cache"])
    assert code == 0, err
    assert "emb4bit changed nothing: no rank-2 float table read by a Gather" in err
    assert "nothing was quantized: the selected methods quantize none of its layers" in err and "has no Conv" not in err


def test_model_without_weighted_ops_warns_and_reports(tmp_path, run_cli):
    path = tmp_path / "plain.onnx"
    onnx.save_model(_no_weighted_ops_model(), str(path))
    out = tmp_path / "q.onnx"
    code, stdout, err = run_cli(["optimize", path, "-p", "minmax", "--data", "random", "--output", out, "--json", "--no-cache"])
    assert code == 0, err
    assert "onnxq: warning: nothing was quantized: the model has no Conv, ConvTranspose, Gemm or MatMul" in err
    doc = json.loads(stdout)
    report = doc.get("report", doc)
    left = {e["node"]: e["reason"] for e in report["left_in_float"]}
    assert left[WHOLE_MODEL].startswith("nothing was quantized")
    # the written model is still valid and computes what the float one does
    x = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, 1 / (1 + np.exp(-(np.maximum(x, 0) + 0.5))), rtol=1e-5)


def test_bits4_without_a_weight_matmul_warns(tiny_model, caplog):
    """4-bit weight-only quantizes MatMul weights; a conv-only model has none."""
    assert not any(n.op_type == "MatMul" for n in tiny_model.graph.node)
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        res = onnxq.optimize(tiny_model, bits=4, show_progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(w.startswith("nothing was quantized: 4-bit weight-only quantizes MatMul") for w in warnings), warnings
    assert WHOLE_MODEL in {e.node for e in res.report.left_in_float}


def test_a_model_that_is_quantized_gets_no_noop_warning(tiny_model, tiny_feeds, caplog):
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        res = onnxq.optimize(tiny_model, method="minmax", data=tiny_feeds, show_progress=False)
    assert res.report.quantized_weights > 0
    assert not any("nothing was quantized" in r.getMessage() for r in caplog.records)
    assert WHOLE_MODEL not in {e.node for e in res.report.left_in_float}


def test_block_size_with_8_bits_is_refused(tiny_model_path, tiny_data_dir, tmp_path, run_cli):
    code, _, err = run_cli(["optimize", tiny_model_path, "-p", "minmax", "--data", tiny_data_dir, "--bits", "8", "--block-size", "64",
                            "--output", tmp_path / "q.onnx", "--no-cache"])
    line = _one_error_line(code, err)
    assert "--block-size 64" in line and "--bits 4" in line
    assert not (tmp_path / "q.onnx").exists()


def test_block_size_with_4_bits_is_accepted(tiny_model):
    res = onnxq.optimize(tiny_model, bits=4, block_size=32, show_progress=False)
    assert res.report.bits == 4


def test_two_calibrators_are_refused_with_one_line(tiny_model_path, tiny_data_dir, tmp_path, run_cli):
    code, _, err = run_cli(["optimize", tiny_model_path, "-p", "minmax", "-p", "percentile", "--data", tiny_data_dir,
                            "--output", tmp_path / "q.onnx", "--no-cache"])
    line = _one_error_line(code, err)
    assert "'minmax' and 'percentile' both set activation ranges" in line


def test_python_api_requires_data_or_an_explicit_random(tiny_model):
    with pytest.raises(DataError) as info:
        onnxq.optimize(tiny_model, method="minmax", show_progress=False)
    msg = str(info.value)
    assert "calibration data is required" in msg and "data='random'" in msg and "\n" not in msg
    res = onnxq.optimize(tiny_model, method="minmax", data="random", show_progress=False)
    assert res.report.quantized_weights > 0


@pytest.mark.parametrize("rewrite", ["equalize", "smoothquant"])
def test_a_rewrite_with_nothing_to_rewrite_says_so(rewrite, caplog):
    """-p equalize on a model without a conv pair (every transformer), -p smoothquant without a LayerNorm-fed MatMul (a
    CNN): the run went on as the calibrator alone and said nothing."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "one_conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = [{"x": np.random.default_rng(i).standard_normal((4, 3, 8, 8)).astype(np.float32)} for i in range(2)]
    with caplog.at_level(logging.WARNING):
        res = onnxq.optimize(model, method=[rewrite, "minmax"], data=data, show_progress=False)
    assert caplog.text.count(f"{rewrite} changed nothing: ") == 1  # once, not again after the quantized rewrites
    assert res.report.methods[rewrite]["changed_nothing"]


def test_float_compute_onnxq_does_not_quantize_is_listed_and_counted():
    """An Einsum (or LSTM/GRU/RNN) stays float: the report lists it in left_in_float and the integer-kernel share counts
    it (a BiLSTM classifier read '100 % integer kernels' with 1.5 KB of its 3.6 MB quantized)."""
    from onnxq.runtime.ort import integer_kernel_report

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "we"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "wm")]
    nodes = [helper.make_node("Einsum", ["x", "we"], ["e"], equation="nk,kj->nj", name="mix"),
             helper.make_node("MatMul", ["e", "wm"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "einsum", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = [{"x": rng.standard_normal((8, 8)).astype(np.float32)} for _ in range(2)]
    res = onnxq.optimize(model, method="minmax", data=data, show_progress=False)
    left = {e.node: e.reason for e in res.report.left_in_float}
    assert left["mix"].startswith("Einsum: not quantized by onnxq")
    report = integer_kernel_report(res.model)
    assert report["float_compute_ops"].get("Einsum") == 1 and report["integer_fraction"] < 1.0


def test_an_exclude_that_names_no_node_says_so(caplog):
    """--exclude with a typo kept nothing float and said nothing."""
    with caplog.at_level(logging.WARNING):
        onnxq.optimize(_no_weighted_ops_model(), method="minmax", data="random", exclude=["no_such_node", "Relu"],
                       show_progress=False, check=False)
    assert "--exclude 'no_such_node' names no node" in caplog.text and "--exclude 'Relu'" not in caplog.text


def test_a_task_the_model_cannot_have_points_to_the_task_option():
    """DetPTQ's detection task on a one-output classifier said 'name them with -o outputs scores,boxes', outputs the
    model does not have; it now points to -o task."""
    from onnxq.tasks import make_task
    from onnxq.tasks.detection import DetectionLoss

    with pytest.raises(onnxq.errors.OptionError, match="choose its own with -o task"):
        make_task(DetectionLoss, None, ["logits"])
    with pytest.raises(onnxq.errors.OptionError, match="name them with -o outputs scores,boxes"):
        make_task(DetectionLoss, None, ["a", "b", "c"])
