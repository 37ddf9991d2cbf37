"""Outputs that hold decisions rather than scores, as deployed models often end: the model's own ArgMax map (a
segmentation class map, a greedy CTC decode), a TopK's values and indices, and rows the data picks (a detector's list
behind a TopK or NMS). The graph says which an output is (:func:`onnxq.graph.index.output_roles`), and the fidelity
check and ``-p auto`` read it.

Found on models built the way task models ship: a segmentation net ending in ArgMax kept 82 % of its pixel labels
(mIoU 0.21) and a greedy CTC decoder 78 % of its time steps (5 % of lines as FP32) with no warning, integer maps being
"reported only"; a TopK(5) classifier lost 87 % of its top-1 classes while the check read the sorted values' arg-max
(always column 0: "top-1 agreement 1.000"); and a good NMS detector (F1 0.99 against FP32) was called collapsed for a
1st-percentile cosine that read two swapped rows.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.calib.readers import Batch
from onnxq.evaluate.fidelity import THRESHOLDS, check_fidelity
from onnxq.graph.index import output_roles

BROKEN = {"method": "percentile", "options": {"percentile": 51}}


def _model(nodes: list, inits: dict[str, np.ndarray], x_shape: list, outputs: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "roles", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])], outputs,
                              [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def segmentation_argmax() -> onnx.ModelProto:
    """x [N, 3, 8, 8] -> Conv+Relu -> Conv (5 classes) -> ArgMax over the classes -> [N, 8, 8] int64."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["logits"]),
             helper.make_node("ArgMax", ["logits"], ["classes"], axis=1, keepdims=0)]
    inits = {"w1": rng.normal(0, 0.4, (16, 3, 3, 3)), "b1": rng.normal(0, 0.1, 16), "w2": rng.normal(0, 0.4, (5, 16, 1, 1)),
             "b2": rng.normal(0, 0.1, 5)}
    return _model(nodes, inits, [3, 8, 8], [helper.make_tensor_value_info("classes", TensorProto.INT64, ["N", 8, 8])])


def greedy_decode() -> onnx.ModelProto:
    """x [N, 12, 16] (time steps of features) -> MatMul+Relu -> MatMul (7 symbols) -> ArgMax per step -> [N, 12] int64."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["logits"]), helper.make_node("ArgMax", ["logits"], ["ids"], axis=2, keepdims=0)]
    inits = {"w1": rng.normal(0, 0.3, (16, 32)), "w2": rng.normal(0, 0.3, (32, 7))}
    return _model(nodes, inits, [12, 16], [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 12])])


def topk_classifier() -> onnx.ModelProto:
    """x [N, 16] -> MatMul+Relu -> MatMul (10 classes) -> TopK(3): values [N, 3] float, indices [N, 3] int64."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["logits"]), helper.make_node("TopK", ["logits", "k"], ["values", "indices"], axis=1)]
    inits = {"w1": rng.normal(0, 0.3, (16, 32)), "w2": rng.normal(0, 0.4, (32, 10)), "k": np.array([3], np.int64)}
    return _model(nodes, inits, [16], [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["N", 3]),
                                       helper.make_tensor_value_info("indices", TensorProto.INT64, ["N", 3])])


def _data(shape: list[int], n: int = 4, seed: int = 3) -> list[dict[str, np.ndarray]]:
    """Four batches of 16: all of them are what the in-sample check reads (at most 4 batches, 64 samples)."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (16, *shape)).astype(np.float32)} for _ in range(n)]


def _same_share(a: onnx.ModelProto, b: onnx.ModelProto, data: list[dict[str, np.ndarray]], output: int = 0) -> float:
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (a, b)]
    return float(np.mean(np.concatenate([(runs[0].run(None, d)[output] == runs[1].run(None, d)[output]).ravel() for d in data])))


def test_the_graph_says_which_outputs_hold_decisions():
    assert output_roles(segmentation_argmax()) == {"classes": "argmax"}
    assert output_roles(greedy_decode()) == {"ids": "argmax"}
    assert output_roles(topk_classifier()) == {"values": "topk_values", "indices": "topk_indices"}


@pytest.mark.parametrize("build,shape", [(segmentation_argmax, [3, 8, 8]), (greedy_decode, [12, 16])], ids=["segmentation", "ctc"])
def test_a_class_map_the_model_computes_is_judged_position_by_position(build, shape):
    data = _data(shape)
    good = onnxq.optimize(build(), method="minmax", data=data, show_progress=False)
    (out,) = good.report.fidelity.outputs
    assert out.role == "argmax" and not out.scored and not good.report.fidelity.warned, good.report.fidelity.warnings
    assert out.position_agreement == pytest.approx(_same_share(build(), good.model, data), abs=1e-6)
    bad = onnxq.optimize(build(), method=BROKEN["method"], options=BROKEN["options"], data=data, show_progress=False)
    kept = _same_share(build(), bad.model, data)
    assert kept < THRESHOLDS.position_agreement - 0.05, "precondition: the broken run changes the map"
    fid = bad.report.fidelity
    assert fid.warned and "class id agreement per position" in fid.warnings[0], fid.warnings
    assert fid.outputs[0].position_agreement == pytest.approx(kept, abs=1e-6)


def test_auto_scores_a_class_map_by_the_share_of_positions_it_keeps():
    from onnxq.pipeline.auto import HeldOut

    data = _data([3, 8, 8])
    held = HeldOut(segmentation_argmax(), [Batch(d) for d in data])
    assert held.score(segmentation_argmax()).cosine == 1.0
    bad = onnxq.optimize(segmentation_argmax(), method=BROKEN["method"], options=BROKEN["options"], data=data, show_progress=False)
    assert held.score(bad.model).cosine == pytest.approx(_same_share(segmentation_argmax(), bad.model, data), abs=1e-9)


def test_a_topk_classifier_is_judged_by_its_first_index_and_its_values_are_not_class_scores():
    data = _data([16])
    good = onnxq.optimize(topk_classifier(), method="minmax", data=data, show_progress=False).report.fidelity
    values, indices = good.outputs
    assert values.role == "topk_values" and values.top1_agreement is None  # their arg-max is column 0 whatever happens
    assert indices.role == "topk_indices" and indices.label_agreement > THRESHOLDS.top1_agreement and not good.warned, good.warnings
    bad = onnxq.optimize(topk_classifier(), method=BROKEN["method"], options=BROKEN["options"], data=data, show_progress=False)
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (topk_classifier(), bad.model)]
    first = float(np.mean(np.concatenate([runs[0].run(None, d)[1][:, 0] == runs[1].run(None, d)[1][:, 0] for d in data])))
    assert first < THRESHOLDS.top1_agreement - 0.1, "precondition: the broken run changes the top class"
    fid = bad.report.fidelity
    assert fid.outputs[1].label_agreement == pytest.approx(first, abs=1e-6)
    assert fid.warned and any("'indices'" in w and "label agreement" in w for w in fid.warnings), fid.warnings


def test_a_topk_classifiers_accuracy_is_read_from_its_first_index():
    from onnxq.evaluate.compare import evaluate

    data = _data([16], n=4)
    sess = ort.InferenceSession(topk_classifier().SerializeToString(), providers=["CPUExecutionProvider"])
    truth = [sess.run(None, d)[1][:, 0] for d in data]
    labels = [np.where(np.arange(len(t)) % 4 == 0, (t + 1) % 10, t) for t in truth]  # FP32 right on 3 of 4
    fp32, = evaluate(topk_classifier(), {}, lambda: [Batch(d, lab) for d, lab in zip(data, labels)], threads=())
    assert "accuracy" not in fp32.outputs["values"] and "top1_agreement" not in fp32.outputs["values"]
    assert fp32.outputs["indices"]["accuracy"] == pytest.approx(0.75)


def nms_like_detector() -> onnx.ModelProto:
    """x [N, 16] -> 20 candidate scores and boxes -> TopK(5) of the scores -> the chosen boxes gathered by its indices, with
    their scores: dets [N, 5, 5], a detector's padded list (behind a TopK, as NMS-free YOLO heads write it). Candidates 0
    and 1 score almost alike and rank high, and the fifth and sixth best are often close: quantization swaps such rows on
    some samples, as near-ties do in a detector."""
    rng = np.random.default_rng(4)
    ws = rng.normal(0, 0.5, (16, 20))
    ws[:, 1] = ws[:, 0] + rng.normal(0, 4e-2, 16)
    sb = np.zeros(20)
    sb[:2] = 1.5
    nodes = [helper.make_node("MatMul", ["x", "ws"], ["s_mm"]), helper.make_node("Add", ["s_mm", "sb"], ["s_raw"]),
             helper.make_node("Sigmoid", ["s_raw"], ["scores"]),
             helper.make_node("MatMul", ["x", "wb"], ["b_flat"]), helper.make_node("Relu", ["b_flat"], ["b_pos"]),
             helper.make_node("Reshape", ["b_pos", "shape"], ["boxes"]),
             helper.make_node("TopK", ["scores", "k"], ["top", "idx"], axis=1),
             helper.make_node("Unsqueeze", ["idx", "ax2"], ["idx3"]), helper.make_node("Unsqueeze", ["top", "ax2"], ["top3"]),
             helper.make_node("Expand", ["idx3", "four"], ["idx4"]),
             helper.make_node("GatherElements", ["boxes", "idx4"], ["picked"], axis=1),
             helper.make_node("Concat", ["picked", "top3"], ["dets"], axis=2)]
    inits = {"ws": ws, "sb": sb, "wb": rng.normal(0, 40, (16, 80)), "shape": np.array([-1, 20, 4], np.int64),
             "k": np.array([5], np.int64), "ax2": np.array([2], np.int64), "four": np.array([1, 1, 4], np.int64)}
    return _model(nodes, inits, [16], [helper.make_tensor_value_info("dets", TensorProto.FLOAT, ["N", 5, 5])])


def test_rows_the_data_picks_are_not_judged_by_their_order():
    data = _data([16])
    assert output_roles(nms_like_detector()) == {"dets": "selected"}
    res = onnxq.optimize(nms_like_detector(), method="minmax", data=data, show_progress=False)
    (out,) = res.report.fidelity.outputs
    assert out.role == "selected" and out.cosine_p1 < THRESHOLDS.cosine_p1, "precondition: near-ties swapped rows of some samples"
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (nms_like_detector(), res.model)]
    ref, got = (np.concatenate([r.run(None, d)[0] for d in data]) for r in runs)
    # the same detections, in another order: nearly every FP32 row has a row of the same sample within 5 % of its scale
    kept = np.mean([[np.abs(got[i] - r).max(axis=1).min() < 0.05 * np.abs(ref[i]).max() for r in ref[i]] for i in range(len(ref))])
    assert kept > 0.95, kept
    assert not res.report.fidelity.warned, res.report.fidelity.warnings
    # and a quantized model that destroys the detections is still warned, by the mean cosine
    bad = check_fidelity(nms_like_detector(), _scrambled(res.model), lambda: iter(Batch(d) for d in data), in_sample=False)
    assert bad.warned and "mean cosine" in bad.warnings[0], bad.warnings


def _scrambled(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its box weights negated and rolled: the boxes it lists are other boxes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name.startswith("wb"):
            t.CopyFrom(numpy_helper.from_array(-np.roll(numpy_helper.to_array(t), 7, axis=-1), t.name))
    return out


def normalized_embedding() -> onnx.ModelProto:
    """x [N, 16] -> MatMul+Relu -> MatMul (32) -> F.normalize as torch exports it: Div by Expand(Clip(ReduceL2))."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["e"]), helper.make_node("ReduceL2", ["e"], ["n"], axes=[1], keepdims=1),
             helper.make_node("Clip", ["n", "eps"], ["nc"]), helper.make_node("Shape", ["e"], ["es"]),
             helper.make_node("Expand", ["nc", "es"], ["ne"]), helper.make_node("Div", ["e", "ne"], ["emb"])]
    inits = {"w1": rng.normal(0, 0.3, (16, 32)), "w2": rng.normal(0, 0.3, (32, 32)), "eps": np.array(1e-12, np.float32)}
    return _model(nodes, inits, [16], [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", 32])])


def test_a_normalized_embedding_gets_no_accuracy_from_labels():
    """An L2-normalized embedding with a labelled data set read its arg-max channel as a class: "accuracy 12.70 %" and a
    worst class, a number --max-drop would gate on. Divided by its norm, it is an embedding: judged by its neighbours."""
    from onnxq.evaluate.compare import evaluate

    assert output_roles(normalized_embedding()) == {"emb": "embedding"}
    data = _data([16])
    labels = [np.arange(16) % 10 for _ in data]
    fp32, = evaluate(normalized_embedding(), {}, lambda: [Batch(d, lab) for d, lab in zip(data, labels)], threads=())
    assert not {"accuracy", "top1_agreement", "worst_class"} & set(fp32.outputs["emb"])
    fid = onnxq.optimize(normalized_embedding(), method="minmax", data=data, show_progress=False).report.fidelity
    assert fid.outputs[0].role == "embedding" and fid.outputs[0].top1_agreement is None
    assert fid.outputs[0].neighbour_agreement is not None
