"""The layer-by-layer searches (detptq, bias-correction, gptq) hold a bounded number of samples.

What they hold between layers grows with every sample kept, and an ONNX Runtime run's working
set with every sample in that run; ``memory_mb`` bounds both (onnxq.search.footprint). These
tests check, without timing: the per-sample estimate covers what a runner really holds, the kept
samples stop growing with the data once the budget binds, runs never exceed the fitted size, and
splitting the same samples into smaller runs leaves each method's result unchanged, while a
budget that keeps fewer samples still gives an accurate model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxq import optimize
from onnxq.search.evaluator import GraphRunner
from onnxq.search.footprint import fit_samples, fitted_chunks, footprint, rechunk
from tests.plugins.test_bias_correction import _shift_and_error
from tests.plugins.test_equalize import _data, bn_depthwise_model

SHAPES = Path(__file__).resolve().parents[1] / "fixtures" / "shapes_detector"


def _held_by_runner(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """The most bytes a GraphRunner holds between two nodes, stepping node by node."""
    runner = GraphRunner(model, [feeds])
    peak = 0
    for i in range(len(runner.nodes)):
        runner.run_to(i)
        peak = max(peak, sum(v.nbytes for parts in runner.values.values() for v in parts))
    return peak


def test_footprint_covers_what_a_runner_holds():
    model = bn_depthwise_model()
    x = _data(16, 1)[0]["x"][:1]
    fp = footprint(model, {"x": x})
    held = _held_by_runner(model, {"x": x})
    assert held <= fp.held <= 2 * held, (held, fp)
    assert 0 < fp.largest <= fp.held <= fp.total
    # per sample: the same footprint whatever the batch of the sample given
    assert footprint(model, {"x": _data(16, 1)[0]["x"]}) == fp


def test_kept_samples_stop_growing_with_the_data():
    model = bn_depthwise_model()
    fp = footprint(model, {"x": _data(16, 1)[0]["x"][:1]})
    budget = 40 * fp.held  # room for 20 samples' frontier (half the budget)
    kept = {}
    for n in (16, 64, 512):
        chunks, fit = fitted_chunks(model, _data(n, 3), budget)
        sizes = [c["x"].shape[0] for c in chunks]
        assert sum(sizes) == fit.samples and max(sizes) <= fit.chunk
        kept[n] = fit.samples
    assert kept[16] == 16  # everything fits
    assert kept[64] == kept[512] == 20 and fit.capped
    # the kept samples are the first ones, in order
    np.testing.assert_array_equal(np.concatenate([c["x"] for c in chunks]), np.concatenate([d["x"] for d in _data(512, 3)])[:20])
    # more budget: more samples, never fewer
    assert fit_samples(fp, 512, 2 * budget).samples > fit_samples(fp, 512, budget).samples


def test_rechunk_never_joins_samples_of_different_shapes():
    a = {"ids": np.zeros((3, 5), np.int64)}
    b = {"ids": np.ones((4, 7), np.int64)}
    runs = rechunk([a, b], 2, join=True)
    assert [r["ids"].shape for r in runs] == [(2, 5), (1, 5), (2, 7), (2, 7)]
    assert [r["ids"].shape for r in rechunk([a, a], 4, limit=5, join=True)] == [(4, 5), (1, 5)]


# -- the methods: smaller runs change nothing; fewer samples stay accurate ------------------------
def _budget_for(model: onnx.ModelProto, sample: dict[str, np.ndarray], samples: int, runners: int = 1) -> float:
    """memory_mb that keeps exactly ``samples`` samples (so runs get smaller than all of them)."""
    fp = footprint(model, sample)
    return 2 * samples * fp.held * runners / 2**20


def test_detptq_same_choice_in_smaller_runs_and_accurate_with_fewer_samples():
    from onnxq.runtime.ort import make_session
    from onnxq.tasks.detection import box_f1, decode

    model = onnx.load(str(SHAPES / "model.onnx"))
    with np.load(SHAPES / "calib.npz") as z:
        calib = {"image": z["image"][:8]}
        held_out = z["image"][8:64]
    small = _budget_for(model, {"image": calib["image"][:1]}, 8)
    opts = {"task": "mse", "samples": 8, "weight_bits": 4, "act_bits": 4}
    runs = {mb: optimize(model, method="detptq", options={**opts, "memory_mb": mb}, data=[calib], target="trt", show_progress=False)
            for mb in (1000, small)}
    big, chunked = (runs[mb].report.methods["detptq"] for mb in (1000, small))
    assert big["samples"] == chunked["samples"] == 8
    assert "runs of at most 8" in big["samples_kept"] and "runs of at most 8" not in chunked["samples_kept"]
    assert {u: r["p"] for u, r in big["units"].items()} == {u: r["p"] for u, r in chunked["units"].items()}
    assert chunked["task_loss_final"]["loss"] == pytest.approx(big["task_loss_final"]["loss"], rel=1e-4)

    # a budget for 2 samples keeps 2 of 8 and still gives a detector close to FP32 at INT8
    few = optimize(model, method="detptq", options={"task": "mse", "samples": 8, "memory_mb": small / 4}, data=[calib], target="trt",
                   show_progress=False)
    assert few.report.methods["detptq"]["samples"] == 2

    def detect(m):
        heat, boxes = make_session(m, "all").run(["heatmap", "boxes"], {"image": held_out})
        return decode(heat, boxes, box_format="centernet", score_threshold=0.3, stride=4)

    onnx.checker.check_model(few.model)
    assert box_f1(detect(few.model), detect(model)) >= 0.95


def _biases(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("b") or "bias" in t.name}


def test_bias_correction_same_biases_in_smaller_runs_and_fewer_samples_still_correct():
    model, calib, held_out = bn_depthwise_model(), _data(64, 1), _data(64, 2)
    small = _budget_for(model, {"x": calib[0]["x"][:1]}, 64, runners=2)
    one, runs = (optimize(model, method=["minmax", "bias-correction"], options={"memory_mb": mb}, data=calib, show_progress=False)
                 for mb in (1000, small))
    assert one.report.methods["bias-correction"]["samples"] == runs.report.methods["bias-correction"]["samples"] == 64
    a, b = _biases(one.model), _biases(runs.model)
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)

    plain = optimize(model, method="minmax", data=calib, show_progress=False)
    few = optimize(model, method=["minmax", "bias-correction"], options={"memory_mb": small / 4}, data=calib, show_progress=False)
    assert few.report.methods["bias-correction"]["samples"] == 16
    shift0, err0 = _shift_and_error(plain.model, model, held_out)
    shift1, err1 = _shift_and_error(few.model, model, held_out)
    assert shift1 < shift0 / 2, (shift0, shift1)  # 16 samples still remove most of the shift
    assert err1 < err0


def test_gptq_same_weights_in_smaller_runs():
    from tests.plugins.test_gptq import CALIB, block_model, output_error

    fp = block_model()
    small = _budget_for(fp, {"x": CALIB[0]["x"][:1]}, 64)  # all 64 samples, in runs smaller than the data's 16
    one = optimize(fp, method="gptq", options={"memory_mb": 1000}, data=CALIB, bits=4, show_progress=False)
    runs = optimize(fp, method="gptq", options={"memory_mb": small}, data=CALIB, bits=4, show_progress=False)
    assert one.report.methods["gptq"]["samples"] == runs.report.methods["gptq"]["samples"] == 64
    assert "runs of at most 64" in one.report.methods["gptq"]["samples_kept"]
    assert "runs of at most 64" not in runs.report.methods["gptq"]["samples_kept"]
    a = {t.name: numpy_helper.to_array(t) for t in one.model.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in runs.model.graph.initializer}
    assert a.keys() == b.keys()
    # H is summed run by run (float32 products per run): the last bits of H differ and GPTQ's
    # sequential updates carry that into an occasional different rounding (measured: 1.6%)
    changed = sum(int(np.sum(a[k] != b[k])) for k in a)
    assert changed <= 0.05 * sum(v.size for v in a.values()), changed
    assert output_error(fp, runs.model) == pytest.approx(output_error(fp, one.model), rel=0.02)


def test_detptq_on_sequences_padded_to_different_lengths_per_batch():
    from onnx import TensorProto, helper

    from onnxq.runtime.ort import make_session

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((16, 32)) / 4).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((32, 16)) / 6).astype(np.float32), "w2")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="act"),
                           helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")], "seq",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 16])], [w1, w2])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    calib = [{"x": rng.standard_normal((4, s, 16)).astype(np.float32)} for s in (5, 9, 7)]
    res = optimize(model, method="detptq", options={"task": "mse", "samples": 12}, data=calib, target="trt", show_progress=False)
    assert res.report.methods["detptq"]["samples"] == 12
    onnx.checker.check_model(res.model)
    x = rng.standard_normal((8, 11, 16)).astype(np.float32)
    ref, got = make_session(model).run(None, {"x": x})[0], make_session(res.model).run(None, {"x": x})[0]
    assert float(np.sum((got - ref) ** 2) / np.sum(ref**2)) < 1e-3
