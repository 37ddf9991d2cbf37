"""DetPTQ: task-loss-guided per-tensor L_p clipping beats fixed-p L2 and TensorRT entropy on a real
(tiny) detector at emulated W4A4; task losses are plugins; the method passes the contract."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxq.errors import OptionError, UnknownNameError
from onnxq.testing.contract import MethodContract
from onnxq.testing.models import residual_concat_model

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "shapes_detector"
MODEL = FIXTURE / "model.onnx"
CALIB = FIXTURE / "calib.npz"
W4A4 = {"weight_bits": 4, "act_bits": 4}
#: box F1 margins (IoU >= 0.5, against the FP32 model's detections on 1000 generated images) that
#: detptq must keep over each baseline at W4A4. Measured: detptq 0.9505, fixed L2 0.9388, TensorRT
#: entropy 0.9357 (a second 1000-image draw: 0.9460 / 0.9378 / 0.9344).
MARGIN_OVER_L2 = 0.005
MARGIN_OVER_ENTROPY = 0.008


class TestDetPtqContract(MethodContract):
    method = "detptq"
    options = {"task": "mse", "samples": 8}


# -- the fixture detector at W4A4 ------------------------------------------------------------------
def _shapes():
    spec = importlib.util.spec_from_file_location("shapes_fixture", FIXTURE / "shapes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


@pytest.fixture(scope="module")
def eval_images() -> np.ndarray:
    # the committed eval.npz (128 images, ~270 boxes) is too small to separate methods a point
    # apart; 1000 images from the same generator (numpy only, fixed seed) are
    images, _, _ = _shapes().make_images(1000, 12345)
    return images


def _predict(model, images: np.ndarray):
    from onnxq.runtime.ort import make_session
    from onnxq.tasks.detection import decode

    heat, boxes = make_session(model, "all").run(["heatmap", "boxes"], {"image": images})
    return decode(heat, boxes, box_format="centernet", score_threshold=0.3, stride=4)


@pytest.fixture(scope="module")
def fp32_detections(eval_images):
    return _predict(onnx.load(str(MODEL)), eval_images)


def _quantize(options: dict, method: str = "detptq"):
    from onnxq.pipeline import optimize

    return optimize(str(MODEL), method=method, options=options, data=str(CALIB), target="trt", show_progress=False)


@pytest.fixture(scope="module")
def w4a4(eval_images, fp32_detections):
    from onnxq.tasks.detection import box_f1

    runs = {
        "detptq": _quantize(dict(W4A4)),
        "l2": _quantize({**W4A4, "p_values": "2"}),
        "entropy": _quantize({**W4A4, "p_values": "kl"}),
    }
    f1 = {k: box_f1(_predict(r.model, eval_images), fp32_detections) for k, r in runs.items()}
    return runs, f1


def test_fixture_is_a_real_detector():
    from onnxq.tasks.detection import box_f1

    with np.load(FIXTURE / "eval.npz") as z:
        images, gt_boxes, gt_labels = z["image"], z["gt_boxes"], z["gt_labels"]
    truth = [(b[l >= 0], l[l >= 0]) for b, l in zip(gt_boxes, gt_labels)]
    assert box_f1(_predict(onnx.load(str(MODEL)), images), truth, iou=0.5) >= 0.85
    assert MODEL.stat().st_size < 500_000


def test_detptq_beats_fixed_l2_and_entropy_at_w4a4(w4a4):
    _, f1 = w4a4
    # plain calibration visibly hurts at W4A4 (at INT8 both keep ~0.99)
    assert f1["l2"] < 0.96 and f1["entropy"] < 0.96, f1
    assert f1["detptq"] >= f1["l2"] + MARGIN_OVER_L2, f1
    assert f1["detptq"] >= f1["entropy"] + MARGIN_OVER_ENTROPY, f1


def test_int8_entropy_is_close_to_fp32(eval_images, fp32_detections):
    from onnxq.tasks.detection import box_f1

    f1 = box_f1(_predict(_quantize({}, method="trt-entropy").model, eval_images[:300]), fp32_detections[:300])
    assert f1 >= 0.98


def test_report_has_p_per_layer_losses_and_emulation_note(w4a4):
    runs, _ = w4a4
    rep = runs["detptq"].report.methods["detptq"]
    assert rep["task"] == "detection" and rep["outputs"] == ["heatmap", "boxes"]
    assert len(rep["layers"]) == 8
    for name, layer in rep["layers"].items():
        assert layer["weight_p"] in rep["p_values"] and layer["act_p"] in rep["p_values"], name
    chosen = {u["p"] for u in rep["units"].values()}
    assert len(chosen) >= 3, "the chosen p should differ across tensors"
    searched = [u for u in rep["units"].values() if not u.get("single_grid")]
    assert len(searched) >= len(rep["units"]) // 2
    for unit in searched:
        assert set(unit["loss"]) == set(rep["p_values"])
        assert unit["loss"][unit["p"]] == min(unit["loss"].values())
    for unit in rep["units"].values():  # every candidate one grid: nothing run, the p closest to 2 kept
        if unit.get("single_grid"):
            assert unit["loss"] == {} and unit["p"] == "2.0"
    assert rep["search_seconds"] > 0
    # first layer and both output convolutions stay at 8 bits; the rest is W4A4
    assert sorted(rep["kept_at_target_bits"]) == ["/box_head/box_head.2/Conv", "/hm_head/hm_head.2/Conv", "/stem/stem.0/Conv"]
    assert rep["layers"]["/conv4/conv4.0/Conv"]["weight_bits"] == 4 and rep["layers"]["/conv4/conv4.0/Conv"]["act_bits"] == 4
    assert "INT8 kernels" in rep["emulation"] and "emulated" in rep["emulation"]
    # the search lowers the task loss it optimises, compared with p = 2 everywhere
    assert rep["task_loss_final"]["loss"] < runs["l2"].report.methods["detptq"]["task_loss_final"]["loss"]


def test_w4a4_graph_is_int8_restricted_to_4_bits(w4a4):
    runs, _ = w4a4
    model = runs["detptq"].model
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w = inits["conv4.0.weight_quantized"]
    assert w.dtype == np.int8 and w.min() >= -7 and w.max() <= 7 and w.max() == 7
    clips = [n for n in model.graph.node if n.op_type == "Clip" and n.name.endswith("/Clip")]
    assert len(clips) >= 4  # 4-bit activations: Clip before the int8 QuantizeLinear
    for n in clips:
        lo, hi = float(inits[n.input[1]]), float(inits[n.input[2]])
        q = next(m for m in model.graph.node if m.op_type == "QuantizeLinear" and m.input[0] == n.output[0])
        scale = float(inits[q.input[1]])
        assert round(hi / scale) == 7 and round(lo / scale) == -7


# -- task-loss plugins -----------------------------------------------------------------------------
def _calib(n: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32)}]


def test_custom_task_loss_registered_through_a_host():
    from onnxq.host import Host
    from onnxq.hookspecs import hookimpl
    from onnxq.pipeline import optimize
    from onnxq.tasks import TaskLoss

    calls: list[float] = []

    class MaxAbs(TaskLoss):
        name = "max-abs"
        summary = "largest absolute output difference"
        roles = ("logits",)

        def loss(self, outputs, targets):
            value = float(np.abs(self.role(outputs, "logits") - targets[self.outputs[0]]).max())
            calls.append(value)
            return value

    plugin = types.SimpleNamespace(__name__="custom_tasks", register_task_losses=hookimpl(lambda register: register(MaxAbs)))
    host = Host(load_entry_points=True)
    record = host.register_module("custom-tasks", plugin)
    assert record.ok and record.provides == ["task:max-abs"]
    result = optimize(residual_concat_model(), method="detptq", options={"task": "max-abs", "p_values": "2,3,inf"}, data=_calib(),
                      target="trt", host=host, show_progress=False)
    rep = result.report.methods["detptq"]
    assert rep["task"] == "max-abs" and rep["outputs"] == ["logits"]
    assert calls and rep["evaluations"] == len(calls) - 1  # + the final loss of the finished plan


def test_broken_task_plugin_is_contained():
    from onnxq.host import Host
    from onnxq.hookspecs import hookimpl

    class NotATask:
        name = "not-a-task"

    host = Host(load_entry_points=True)
    plugin = types.SimpleNamespace(__name__="bad", register_task_losses=hookimpl(lambda register: register(NotATask)))
    record = host.register_module("bad-tasks", plugin)
    assert not record.ok and "TaskLoss" in record.error
    assert "not-a-task" not in host.tasks and "detection" in host.tasks
    with pytest.raises(UnknownNameError, match="bad-tasks"):
        host.task("not-a-task")


def test_wrong_output_name_is_an_option_error_naming_the_outputs():
    with pytest.raises(OptionError, match=r"'boxs' is not an output of the model \(outputs: heatmap, boxes\)"):
        _quantize({"outputs": "heatmap,boxs"})
    with pytest.raises(OptionError, match="reads 2 output"):
        _quantize({"outputs": "heatmap"})
    with pytest.raises(OptionError, match="has no option 'box'"):
        _quantize({"task_options": "box=ltrb"})
    with pytest.raises(UnknownNameError, match="segmentation-map"):
        _quantize({"task": "segmentaton"})


# -- built-in losses -------------------------------------------------------------------------------
def _bound(cls, outputs, **opts):
    from onnxq.options import parse_options

    task = cls(parse_options(cls.Options, opts, cls.name))
    task.bind(list(outputs))
    return task


def test_builtin_losses_are_zero_at_fp32_and_grow_with_error():
    from onnxq.tasks.dense import ClassificationLoss, MseLoss, SegmentationMapLoss
    from onnxq.tasks.detection import DetectionLoss

    rng = np.random.default_rng(0)
    heat = np.zeros((2, 3, 8, 8), np.float32)
    heat[0, 1, 3, 4] = 0.9
    heat[1, 0, 5, 2] = 0.7
    boxes = np.abs(rng.normal(1, 0.3, (2, 4, 8, 8))).astype(np.float32)
    cases = [
        (DetectionLoss, {"heatmap": heat, "boxes": boxes}),
        (SegmentationMapLoss, {"map": rng.uniform(0, 1, (2, 1, 16, 16)).astype(np.float32)}),
        (ClassificationLoss, {"logits": rng.normal(0, 2, (4, 10)).astype(np.float32)}),
        (MseLoss, {"a": rng.normal(0, 1, (4, 3)).astype(np.float32), "b": rng.normal(0, 9, (4, 2)).astype(np.float32)}),
    ]
    for cls, ref in cases:
        task = _bound(cls, ref)
        targets = task.prepare(ref)
        assert task.loss(ref, targets) == pytest.approx(0.0, abs=1e-9), cls.name
        losses = []
        for eps in (0.02, 0.1):
            noisy = {k: (np.clip(v + eps * rng.standard_normal(v.shape), 0, 1) if cls in (DetectionLoss, SegmentationMapLoss) and k != "boxes"
                         else v + eps * rng.standard_normal(v.shape)).astype(np.float32) for k, v in ref.items()}
            losses.append(task.loss(noisy, targets))
        assert 0 < losses[0] < losses[1], (cls.name, losses)


def test_detection_loss_terms_and_decoding():
    from onnxq.tasks.detection import DetectionLoss, box_f1, decode, giou

    heat = np.zeros((1, 2, 6, 6), np.float32)
    heat[0, 1, 2, 3] = 0.8
    heat[0, 1, 2, 4] = 0.5  # a neighbour, suppressed by the 3x3 peak rule
    boxes = np.zeros((1, 4, 6, 6), np.float32)
    boxes[0, :, 2, 3] = (0.5, 0.25, 2.0, 1.0)  # centre (3.5, 2.25) cells, size 2 x 1
    (det,) = decode(heat, boxes, stride=4)
    np.testing.assert_allclose(det.boxes, [[10, 7, 18, 11]])
    assert det.labels.tolist() == [1] and det.scores.tolist() == pytest.approx([0.8])
    assert box_f1([det], [(np.array([[10, 7, 18, 11.5]]), np.array([1]))]) == 1.0
    assert box_f1([det], [(np.array([[10, 7, 18, 11.5]]), np.array([0]))]) == 0.0  # class-aware
    assert giou(np.array([0, 0, 2, 2.0]), np.array([0, 0, 2, 2.0])) == pytest.approx(1.0)
    assert giou(np.array([0, 0, 1, 1.0]), np.array([2, 0, 3, 1.0])) == pytest.approx(-1 / 3)
    task = _bound(DetectionLoss, {"heatmap": heat, "boxes": boxes})
    targets = task.prepare({"heatmap": heat, "boxes": boxes})
    assert targets["detections"] == 1
    moved = boxes.copy()
    moved[0, 0, 2, 3] += 1.0  # shift the detected box by one cell: only the box term changes
    t = task.terms({"heatmap": heat, "boxes": moved}, targets)
    assert t["cls"] == 0 and t["reg"] > 0.5


def test_segmentation_balanced_weighting_counts_text_pixels():
    from onnxq.tasks.dense import SegmentationMapLoss

    y = np.zeros((1, 1, 10, 10), np.float32)
    y[0, 0, :2, :2] = 0.9  # 4 text pixels out of 100
    task = _bound(SegmentationMapLoss, {"map": y})
    targets = task.prepare({"map": y})
    drop_text = y.copy()
    drop_text[0, 0, :2, :2] = 0.1
    add_noise = y.copy()
    add_noise[0, 0, 5:7, 5:7] = 0.8  # the same number of wrong background pixels
    # balanced: losing all the text costs far more than 4 spurious pixels out of 96
    assert task.loss({"map": drop_text}, targets) > 10 * task.loss({"map": add_noise}, targets)
