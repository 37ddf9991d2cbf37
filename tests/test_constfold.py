"""Weights computed at run time (Transpose/Cast/... of initializers) are folded into initializers
before placement, so their MatMuls get quantized (issue 15 follow-up), without changing the float
model's outputs, growing tensors, or reading a lazily loaded model's weights."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq import optimize
from onnxq.graph import model_io
from onnxq.graph.constfold import fold_constants
from onnxq.graph.placement import build_plan
from onnxq.graph.prepare import constants_to_initializers, infer_shapes
from onnxq.graph.targets import get_profile

ZOO = Path(__file__).resolve().parent / "fixtures" / "zoo"
sys.path.insert(0, str(ZOO))
import zoo  # noqa: E402

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits" / "model.onnx"


def _prepared(path: Path) -> onnx.ModelProto:
    model = onnx.load(str(path))
    constants_to_initializers(model)
    return infer_shapes(model)[0]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_attention_weights_become_initializers_and_outputs_stay_exact() -> None:
    fx = zoo.FIXTURES["attention_padded"]
    model = _prepared(fx.model)
    folded_model, folded = fold_constants(model)
    transposes = [n.name for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in {t.name for t in model.graph.initializer}]
    assert len(transposes) == 6 and set(transposes) <= set(folded)
    inits = {t.name for t in folded_model.graph.initializer}
    matmul_weights = [n.input[1] for n in folded_model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(matmul_weights) == 6  # q, k, v, o, fc1, fc2 (the two attention MatMuls multiply activations)
    onnx.checker.check_model(folded_model, full_check=True)
    calib = zoo.load_npz(fx.calib)
    feeds = {k: v[:16] for k, v in calib.items()}
    for a, b in zip(_run(model, feeds), _run(folded_model, feeds)):
        np.testing.assert_array_equal(a, b)  # a transpose is exact


def test_attention_fixture_quantizes_its_matmuls_on_ort_and_keeps_top1() -> None:
    fx = zoo.FIXTURES["attention_padded"]
    ev = zoo.Evaluator(fx)
    result = optimize(str(fx.model), method="minmax", data=str(fx.calib), target="ort", max_samples=64, show_progress=False)
    report = result.report
    assert len(report.float_rewrites.get("fold_constants", [])) >= 6
    assert report.quantized_weights == 7  # the six projections and the classifier (was 1: the classifier only)
    g = result.model.graph
    inits = {t.name for t in g.initializer}
    weight_dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    # six projections and the classifier (its Gemm writes a graph output: a MatMul on ort)
    assert sum(n.op_type == "MatMul" and n.input[1] in weight_dq for n in g.node) == 7
    assert ev.score(result.model) >= ev.fp32 - 0.01  # the fixture's margin: 1 point of top-1
    assert not report.fidelity.warned


@pytest.mark.parametrize("name", [n for n in zoo.FIXTURES if n != "attention_padded"] + ["digits"])
def test_other_models_place_the_same_quantization(name: str) -> None:
    """Where no weight is computed at run time, folding leaves every Q/DQ site where it was."""
    model = _prepared(DIGITS if name == "digits" else zoo.FIXTURES[name].model)
    folded_model, _ = fold_constants(model)
    for target in ("ort", "trt"):
        profile = get_profile(target)
        before, after = build_plan(model, profile), build_plan(folded_model, profile)
        assert set(after.activations) == set(before.activations)
        assert set(after.weights) == set(before.weights)
        assert len(after.layers) == len(before.layers)


def _expand_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "w")
    shape = numpy_helper.from_array(np.array([4096, 3, 2], np.int64), "shape")
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0], name="t"),
        helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm"),
        helper.make_node("Expand", ["w", "shape"], ["big"], name="expand"),  # 4096 copies: must stay a node
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0, name="sum"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, [])], [w, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_expand_is_not_folded_and_a_lazy_model_is_left_alone(tmp_path, monkeypatch) -> None:
    model = _expand_model()
    folded_model, folded = fold_constants(model)
    assert folded == ["t"]
    assert "expand" in {n.name for n in folded_model.graph.node}
    assert max(int(np.prod(t.dims)) for t in folded_model.graph.initializer) == 6
    x = {"x": np.ones((1, 2), np.float32)}
    for a, b in zip(_run(model, x), _run(folded_model, x)):
        np.testing.assert_array_equal(a, b)

    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    monkeypatch.setattr(model_io, "LAZY_ABOVE", 0)
    lazy = model_io.load_model(path)
    assert model_io.is_lazy(lazy)
    same, folded = fold_constants(lazy)
    assert folded == [] and same is lazy
