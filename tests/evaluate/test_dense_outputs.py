"""Outputs that are no class scores: regression targets with offsets, maps, heatmaps.

A per-sample cosine reads such an output's offset and level: a three-target regression (a price near 1000, a
temperature near 300 K, an age near 40) kept cosine 1.0000 and "top-1 agreement 1.000" with R² 0.24-0.36, a depth
map cosine 0.94 with 7 % of its pixels within 5 % of the truth, and nothing warned. They are judged by the share of
FP32's variation across samples they keep, element by element. Keypoint heatmaps, near zero away from the keypoints,
were read as class maps whose background pixels had "clear" winners, and good models were failed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.evaluate.fidelity import THRESHOLDS

BROKEN = {"method": "percentile", "options": {"percentile": 60}}


def _regression_model() -> onnx.ModelProto:
    """x [N, 8] -> MatMul -> Relu -> MatMul + offsets [1000, 300, 40] -> y [N, 3]: the targets' spread is small next to
    their offsets, as a price, a temperature and an age are."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (8, 32)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (32, 3)).astype(np.float32)
    offset = np.array([1000.0, 300.0, 40.0], np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc2"), helper.make_node("Add", ["z", "offset"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "regression", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(offset, "offset")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _regression_data(n: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (16, 8)).astype(np.float32)} for _ in range(n)]


def test_regression_targets_with_offsets_are_judged_by_the_variance_they_keep():
    good = onnxq.optimize(_regression_model(), method="minmax", data=_regression_data(), eval_data=_regression_data(4, 1),
                          show_progress=False).report.fidelity
    (out,) = good.outputs
    assert not good.warned, good.warnings
    assert out.explained_variance > 1 - (1 - THRESHOLDS.explained_variance) / 4
    bad = onnxq.optimize(_regression_model(), method=BROKEN["method"], options=BROKEN["options"], data=_regression_data(),
                         eval_data=_regression_data(4, 1), show_progress=False).report.fidelity
    (out,) = bad.outputs
    assert out.cosine > 0.999 and out.cosine_p1 > 0.999, "precondition: the cosine reads the offsets and cannot see it"
    assert out.explained_variance < THRESHOLDS.explained_variance - 0.1
    assert bad.warned and "explained variance" in bad.warnings[0], bad.warnings


def _heatmap_model() -> onnx.ModelProto:
    """x [N, 6, 16, 16] -> a depthwise 3x3 blur -> Relu -> heatmaps [N, 6, 16, 16]: one peak per channel on a background
    of faint noise, as a pose net's keypoint heatmaps."""
    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16
    w = np.tile(kernel, (6, 1, 1, 1))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4, group=6, name="blur"),
             helper.make_node("Relu", ["c"], ["heatmaps"], name="relu")]
    graph = helper.make_graph(nodes, "heatmaps", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 16, 16])],
                              [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, ["N", 6, 16, 16])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _heatmap_data(n: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = (0.03 + rng.normal(0, 0.004, (8, 6, 16, 16))).astype(np.float32)
        for i in range(8):
            for k in range(6):
                r, c = rng.integers(2, 14, 2)
                x[i, k, r - 1 : r + 2, c - 1 : c + 2] += 4.0
        out.append({"x": x})
    return out


def test_keypoint_heatmaps_are_not_failed_for_their_background():
    good = onnxq.optimize(_heatmap_model(), method="minmax", data=_heatmap_data(), eval_data=_heatmap_data(2, 1),
                          show_progress=False).report.fidelity
    (out,) = good.outputs
    assert not good.warned, good.warnings
    # every peak stays where FP32 has it
    model = onnxq.optimize(_heatmap_model(), method="minmax", data=_heatmap_data(), show_progress=False, check=False).model
    import onnxruntime as ort

    x = _heatmap_data(2, 1)[0]["x"]
    ref, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                for m in (_heatmap_model(), model))
    assert np.all(ref.reshape(8, 6, -1).argmax(-1) == got.reshape(8, 6, -1).argmax(-1))
    bad = onnxq.optimize(_heatmap_model(), method=BROKEN["method"], options={"percentile": 51}, data=_heatmap_data(),
                         eval_data=_heatmap_data(2, 1), show_progress=False).report.fidelity
    assert bad.warned, "a heatmap whose peaks are clipped flat is still caught"


def test_one_sample_copied_is_not_read_as_lost_variation():
    """Calibration data of one image copied 32 times: FP32 varies across the copies by float round-off, and the explained
    variance (noise over round-off) read -5.9e11 on a good classifier, exit 3 with --strict. Elements that do not vary
    are not judged by it."""
    from pathlib import Path

    zoo = Path(__file__).resolve().parents[1] / "fixtures" / "zoo" / "mnist_norm_resnet"
    x = np.load(zoo / "calib.npz")
    name = next(k for k in x.files if k != "label")
    copies = [{name: np.repeat(x[name][:1], 32, axis=0)}]
    res = onnxq.optimize(zoo / "model.onnx", method="minmax", data=copies, show_progress=False).report.fidelity
    assert not res.warned, res.warnings
