"""Evaluation never crashes on inputs without a batch axis and never glues batches of unlike shapes.

Each model here is built with onnx.helper and reproduces a third-party model's shape: a
voice-activity model (a scalar sample rate ``sr``, a recurrent ``state`` with the batch on axis 1)
and a sentence encoder fed batches of different sequence lengths. Before per-batch evaluation,
``optimize --eval-data`` and ``onnxq compare`` exited 4 on the first (``v[:1]`` on a scalar) and
on the second (concatenating outputs of different lengths), or, when the batch sizes matched,
compared rows of different batches glued together as one sample.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.evaluate.compare import batch_axes, evaluate, one_sample

RNG = np.random.default_rng(0)


def _init(name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def vad_model() -> onnx.ModelProto:
    """x [batch, 32], sr (int64 scalar), state [2, batch, 16] -> prob [batch, 1], stateN [2, batch, 16]."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="enc"),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT, name="sr_cast"),
        helper.make_node("Div", ["srf", "sr_ref"], ["sr_scale"], name="sr_div"),
        helper.make_node("Mul", ["h", "sr_scale"], ["hs"], name="sr_mul"),
        helper.make_node("Add", ["state", "hs"], ["s"], name="state_add"),
        helper.make_node("Tanh", ["s"], ["stateN"], name="state_tanh"),
        helper.make_node("ReduceMean", ["stateN", "axes0"], ["pooled"], keepdims=0, name="pool"),
        helper.make_node("MatMul", ["pooled", "w2"], ["logit"], name="head"),
        helper.make_node("Sigmoid", ["logit"], ["prob"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes, "vad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, []),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 16])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", 16])],
        [_init("w1", (32, 16)), _init("w2", (16, 1)), numpy_helper.from_array(np.array(16000.0, np.float32), "sr_ref"),
         numpy_helper.from_array(np.array([0], np.int64), "axes0")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def encoder_model() -> onnx.ModelProto:
    """input_ids [batch, seq] -> tokens [batch, seq, 8] and a mean-pooled embedding [batch, 8]."""
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "w"], ["t0"], name="proj"),
        helper.make_node("Relu", ["t0"], ["tokens"], name="act"),
        helper.make_node("ReduceMean", ["tokens", "axes1"], ["pooled"], keepdims=0, name="pool"),
    ]
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq", 8]),
         helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 8])],
        [_init("emb", (50, 16), 1.0), _init("w", (16, 8)), numpy_helper.from_array(np.array([1], np.int64), "axes1")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _vad_batches(n: int = 3, b: int = 4) -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.standard_normal((b, 32)).astype(np.float32), "sr": np.array(16000, np.int64),
             "state": (RNG.standard_normal((2, b, 16)) * 0.5).astype(np.float32)} for _ in range(n)]


def _encoder_batches() -> list[dict[str, np.ndarray]]:
    # the same batch size (4), different sequence lengths: gluing them side by side "worked" before
    return [{"input_ids": RNG.integers(0, 50, (4, seq)).astype(np.int64)} for seq in (5, 9, 7)]


def _write(folder: Path, batches: list[dict[str, np.ndarray]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(batches):
        np.savez(folder / f"{i:03d}.npz", **b)
    return folder


@pytest.fixture
def vad(tmp_path: Path) -> tuple[Path, Path, Path]:
    model = tmp_path / "vad.onnx"
    onnx.save(vad_model(), model)
    data = _write(tmp_path / "vad-data", _vad_batches())
    quantized = tmp_path / "vad.int8.onnx"
    onnxq.optimize(model, quantized, method="minmax", data=str(data), cache_dir=None, show_progress=False)
    return model, data, quantized


@pytest.fixture
def encoder(tmp_path: Path) -> tuple[Path, Path, Path]:
    model = tmp_path / "enc.onnx"
    onnx.save(encoder_model(), model)
    data = _write(tmp_path / "enc-data", _encoder_batches())
    quantized = tmp_path / "enc.int8.onnx"
    onnxq.optimize(model, quantized, method="minmax", data=str(data), cache_dir=None, show_progress=False)
    return model, data, quantized


def test_batch_axes_come_from_declared_shapes():
    axes = batch_axes(vad_model())
    assert axes == {"x": 0, "sr": None, "state": 1, "prob": 0, "stateN": 1}
    feeds = _vad_batches(1)[0]
    one = one_sample(feeds, axes)
    assert one["x"].shape == (1, 32) and one["state"].shape == (2, 1, 16) and one["sr"].shape == ()


def test_compare_scalar_input_and_state_on_axis_1(vad):
    model, data, quantized = vad
    evals = onnxq.compare(model, {"q": quantized}, str(data), batch_size=4)
    q = {e.name: e for e in evals}["q"]
    assert set(q.outputs) == {"prob", "stateN"}
    # per sample along each output's own batch axis: 3 batches of 4
    assert q.outputs["prob"]["samples"] == 12 and q.outputs["stateN"]["samples"] == 12
    assert q.outputs["stateN"]["cosine"] > 0.99 and q.latency_ms["1t"] > 0
    # the per-sample cosine of the state is taken along axis 1, checked by hand
    import onnxruntime as ort

    ref, qs = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (model, quantized))
    cos = []
    for b in _load(data):
        r, t = ref.run(["stateN"], b)[0], qs.run(["stateN"], b)[0]
        for i in range(r.shape[1]):
            a, c = r[:, i].ravel().astype(np.float64), t[:, i].ravel().astype(np.float64)
            cos.append(a @ c / (np.linalg.norm(a) * np.linalg.norm(c)))
    assert q.outputs["stateN"]["cosine"] == pytest.approx(np.mean(cos), abs=1e-9)
    assert q.outputs["stateN"]["cosine_worst"] == pytest.approx(np.min(cos), abs=1e-9)


def test_optimize_eval_data_on_scalar_input(run_cli, vad, tmp_path):
    model, data, _ = vad
    out = tmp_path / "cli.onnx"
    code, stdout, stderr = run_cli(["optimize", model, "-p", "minmax", "--data", data, "--eval-data", data, "--output", out, "--no-cache", "--quiet"])
    assert code == 0, stderr
    assert out.is_file() and "onnxq ort int8" in stdout and "Traceback" not in stderr


def test_compare_cli_on_scalar_input(run_cli, vad):
    model, data, quantized = vad
    code, stdout, stderr = run_cli(["compare", model, quantized, "--data", data, "--layers"])
    assert code == 0, stderr
    assert "fp32" in stdout and quantized.name in stdout


def test_batches_of_different_lengths_are_compared_sample_by_sample(encoder):
    model, data, quantized = encoder
    evals = onnxq.compare(model, {"q": quantized}, str(data), batch_size=4)
    tokens = {e.name: e for e in evals}["q"].outputs["tokens"]
    assert tokens["samples"] == 12  # 3 batches of 4 samples, not 4 rows of glued batches
    import onnxruntime as ort

    ref, qs = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (model, quantized))
    cos, signal, noise = [], 0.0, 0.0
    for b in _load(data):
        r, t = (s.run(["tokens"], b)[0].astype(np.float64) for s in (ref, qs))
        signal += np.sum(r**2)
        noise += np.sum((r - t) ** 2)
        for a, c in zip(r.reshape(len(r), -1), t.reshape(len(t), -1)):
            cos.append(a @ c / (np.linalg.norm(a) * np.linalg.norm(c)))
    assert tokens["cosine"] == pytest.approx(np.mean(cos), abs=1e-9)
    assert tokens["cosine_worst"] == pytest.approx(np.min(cos), abs=1e-9)
    assert tokens["sqnr_db"] == pytest.approx(10 * np.log10(signal / noise), abs=1e-6)


def test_optimize_eval_data_with_different_lengths(run_cli, encoder, tmp_path):
    model, data, _ = encoder
    out = tmp_path / "cli.onnx"
    code, stdout, stderr = run_cli(["optimize", model, "-p", "minmax", "--data", data, "--eval-data", data, "--output", out,
                                    "--no-cache", "--quiet", "--json"])
    assert code == 0, stderr
    import json

    doc = json.loads(stdout)
    q = {e["name"]: e for e in doc["evaluation"]}["onnxq ort int8"]
    assert q["outputs"]["tokens"]["samples"] == 12 and q["outputs"]["pooled"]["samples"] == 12


def test_evaluation_memory_holds_no_outputs_of_earlier_batches(encoder, monkeypatch):
    """Past the reference store's budget, the reference outputs wait on disk, and the metrics are the same."""
    model, data, quantized = encoder
    from onnxq.evaluate import compare as cmp

    batches = _load(data)
    source = lambda: (onnxq_batch(b) for b in batches)  # noqa: E731
    in_memory = evaluate(model, {"q": quantized}, source)
    monkeypatch.setattr(cmp._ReferenceStore, "__init__", lambda self, budget=0: _store_init(self, 0))
    spilled = evaluate(model, {"q": quantized}, source)
    assert spilled[1].outputs == in_memory[1].outputs


def _store_init(self, budget: int) -> None:
    self.budget, self.held, self.items, self._tmp = budget, 0, [], None


def onnxq_batch(feeds: dict[str, np.ndarray]):
    from onnxq.calib.readers import Batch

    return Batch(feeds, None, "test")


def _load(folder: Path) -> list[dict[str, np.ndarray]]:
    out = []
    for f in sorted(folder.glob("*.npz")):
        with np.load(f) as z:
            out.append({k: z[k] for k in z.files})
    return out


def test_large_batches_run_a_few_samples_at_a_time_with_the_same_metrics(vad, monkeypatch):
    """Evaluation memory: a batch is run in pieces of bounded input size; per-sample metrics do not change."""
    model, data, quantized = vad
    from onnxq.backends.ort import OrtRunner
    from onnxq.evaluate import compare as cmp

    whole = onnxq.compare(model, {"q": quantized}, str(data), batch_size=4)
    seen: list[int] = []
    infer = OrtRunner.infer_impl

    def spy(self, feeds):
        seen.append(feeds["x"].shape[0])
        assert feeds["state"].shape[1] == feeds["x"].shape[0] and feeds["sr"].shape == ()  # cut along each input's own batch axis
        return infer(self, feeds)

    monkeypatch.setattr(OrtRunner, "infer_impl", spy)
    monkeypatch.setattr(cmp, "MAX_INFER_INPUT_BYTES", 300)  # about two samples of x and state
    pieces = onnxq.compare(model, {"q": quantized}, str(data), batch_size=4)
    assert seen and max(seen) <= 2 and sum(seen) == 2 * 12  # two rows, 12 samples each
    for name in ("prob", "stateN"):
        for key in ("cosine", "cosine_worst", "samples"):
            assert pieces[1].outputs[name][key] == pytest.approx(whole[1].outputs[name][key], rel=1e-9)


def test_a_baseline_that_loads_and_does_not_run_is_a_note_not_a_failed_evaluation(tiny_model, tiny_feeds):
    """ONNX Runtime's quantizer wrote a model that loads and fails at its first run (a UNet with GroupNorm: a QLinearMul
    that cannot broadcast): the whole evaluation failed, and `optimize --baseline ort` printed "fidelity check could not
    run" for onnxq's own good model. An optional row that fails is left out with a note; any other row still fails."""
    from onnxq.calib.readers import Batch
    from onnxq.errors import OnnxqError

    broken = onnx.ModelProto()
    broken.CopyFrom(tiny_model)
    out = broken.graph.output[0].name
    broken.graph.node[-1].output[0] = "flat"
    broken.graph.initializer.append(numpy_helper.from_array(np.array([5, -1], np.int64), "odd_shape"))
    broken.graph.node.append(helper.make_node("Reshape", ["flat", "odd_shape"], [out]))  # 8x4 values do not split in 5 rows
    broken.graph.output[0].type.tensor_type.shape.Clear()
    batches = lambda: iter(Batch(f) for f in tiny_feeds)  # noqa: E731
    notes: list[str] = []
    rows = evaluate(tiny_model, {"same": tiny_model, "baseline": broken}, batches, threads=(), notes=notes,
                    optional={"baseline": "the baseline's model does not run"})
    assert [r.name for r in rows] == ["fp32", "same"] and rows[1].headline()["cosine"] == pytest.approx(1.0)
    assert len(notes) == 1 and notes[0].startswith("baseline: the baseline's model does not run: ")
    with pytest.raises(OnnxqError):
        evaluate(tiny_model, {"baseline": broken}, batches, threads=())


def _batch1_model() -> onnx.ModelProto:
    """A model of fixed batch 1, as streaming models are exported: x [1, 16] -> logits [1, 4] and prob [1, 1]."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (16, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.4, (32, 4)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.4, (32, 1)).astype(np.float32), "w3")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["logits"]), helper.make_node("MatMul", ["r", "w3"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["prob"])]
    graph = helper.make_graph(nodes, "batch1", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_fixed_batch_of_one_is_judged_sample_by_sample():
    """A streaming model exported with a fixed batch of 1 had no sample axis: its [1, 1] speech probability was one value
    compared alone (cosine 1.0 at 2 dB SQNR), its [1, C] logits got no top-1 or accuracy, and the in-sample check read
    4 samples. Each batch is one sample: its leading 1 is the sample axis, and the check reads up to 64 samples."""
    from onnxq.calib.readers import Batch
    from onnxq.evaluate.fidelity import THRESHOLDS

    rng = np.random.default_rng(3)
    data = [{"x": rng.normal(0, 1, (1, 16)).astype(np.float32)} for _ in range(80)]
    good = onnxq.optimize(_batch1_model(), method="minmax", data=data, show_progress=False).report.fidelity
    logits, prob = good.outputs
    assert good.samples == 64 and not good.warned, good.warnings
    assert logits.top1_agreement is not None and prob.explained_variance is not None
    bad = onnxq.optimize(_batch1_model(), method="percentile", options={"percentile": 51}, data=data, show_progress=False).report.fidelity
    prob = bad.outputs[1]
    assert prob.cosine == 1.0 and prob.explained_variance < THRESHOLDS.explained_variance, "precondition: only the variance sees it"
    assert bad.warned and any("'prob'" in w and "explained variance" in w for w in bad.warnings), bad.warnings
    labels = [np.array([k % 4]) for k in range(len(data))]
    fp32, = evaluate(_batch1_model(), {}, lambda: (Batch(d, lab) for d, lab in zip(data, labels)), threads=())
    assert "accuracy" in fp32.outputs["logits"] and not fp32.outputs["logits"].get("one_value"), "logits are class scores, not a value"
    assert fp32.outputs["prob"]["one_value"] == 1.0


@pytest.mark.parametrize("labels", [np.array(["cat"] * 8), np.full(8, 12), np.full(8, 0.5)], ids=["strings", "past-classes", "floats"])
def test_labels_that_cannot_be_class_ids_give_no_accuracy(tiny_model, tiny_feeds, labels, caplog):
    """String labels, ids past the output's classes and fractional labels read 0 % accuracy for FP32 and every model
    (and --max-drop measured a 0-point drop): no accuracy is read from them, and the run says why."""
    from onnxq.calib.readers import Batch

    with caplog.at_level("WARNING"):
        fp32, same = evaluate(tiny_model, {"same": tiny_model}, lambda: (Batch(f, labels) for f in tiny_feeds), threads=())
    assert "accuracy" not in fp32.outputs["y"] and "top1_agreement" in fp32.outputs["y"]
    assert sum("not class ids 0-3 of this output" in r.getMessage() for r in caplog.records) == 1


def _ctc_like(batch: int | str, out_dims: list, perm: tuple[int, ...] = (0, 2, 1)) -> onnx.ModelProto:
    """x [batch, 1, 8, W] -> Conv -> Relu -> 1x1 Conv to 6 classes (class 0 ahead, as CTC's blank) -> mean over the
    height -> [N, 6, W] -> Transpose."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]), helper.make_node("ReduceMean", ["c2", "ax"], ["m"], keepdims=0),
             helper.make_node("Transpose", ["m"], ["y"], perm=list(perm))]
    graph = helper.make_graph(nodes, "ctc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)],
                              [numpy_helper.from_array(rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32), "w1"),
                               numpy_helper.from_array(rng.normal(0, 0.5, (6, 8, 1, 1)).astype(np.float32), "w2"),
                               numpy_helper.from_array(np.array([2, 0, 0, 0, 0, 0], np.float32), "b2"),  # class 0 leads, as CTC's blank
                               numpy_helper.from_array(np.array([2], np.int64), "ax")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_fixed_batch_of_one_with_a_free_width_is_not_cut_into_columns():
    """ddddocr's captcha reader takes [1, 1, 64, width]: the width is its first free dimension, and reading it as the
    sample axis made one 171-pixel image 171 samples (-p auto calibrated on "5,472" samples from 32 images and judged
    128 columns of one image). A fixed leading 1 is a fixed batch of one."""
    model = _ctc_like(1, [1, "W", 6])
    assert batch_axes(model)["x"] is None
    rng = np.random.default_rng(1)
    data = [{"x": rng.random((1, 1, 8, 40)).astype(np.float32)} for _ in range(12)]
    fid = onnxq.optimize(model, method="minmax", data=data, eval_data=data[:9], show_progress=False).report.fidelity
    assert fid.samples == 9


def test_an_output_declared_with_a_stale_batch_of_one_is_compared_row_by_row():
    """A model whose input batch was made dynamic by editing the input alone still declares its output [1, C]: the runtime
    gives a row per sample, and the batch was compared as one sample (no top-1, no accuracy, --max-drop refused)."""
    model = _ctc_like("N", [1, "W", 6])
    x = np.random.default_rng(2).random((8, 1, 8, 3)).astype(np.float32)
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 6]))
    data = [{"x": x[i : i + 4]} for i in (0, 4)]
    fid = onnxq.optimize(model, method="minmax", data=data, show_progress=False).report.fidelity
    assert fid.samples == 8, "each row of each batch is a sample"


def test_time_major_sequence_logits_of_a_fixed_batch_of_one_are_judged_per_position():
    """ddddocr's reader gives [T, 1, C] logits (time-major, one sample): compared as one flat sample, only its cosine was
    judged, and 21 % of its captchas read differently unseen. The 1 is the sample; the positions run along axis 0."""
    model = _ctc_like(1, [1, "W"], perm=(2, 0, 1))
    rng = np.random.default_rng(1)
    data = [{"x": rng.random((1, 1, 8, 40)).astype(np.float32)} for _ in range(12)]
    fid = onnxq.optimize(model, method="minmax", data=data, eval_data=data[:9], show_progress=False).report.fidelity
    (out,) = fid.outputs
    assert fid.samples == 9 and out.position_agreement is not None


def test_onnx_runtimes_quantizer_failing_costs_nothing_of_onnxqs_own_check(run_cli, tmp_path):
    """ONNX Runtime's quantize_static raises on a Gemm reading a Gather of a SkipLayerNormalization ("Unable to get valid
    quantization scale ... when quantizing bias", an ORT-optimized BERT's pooler): `optimize --baseline ort` printed
    "fidelity check (0 samples) could not run" and exited 0 (4 with --strict). The baseline is left out with a warning."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 8)).astype(np.float32), "w1"), numpy_helper.from_array(np.array(0, np.int64), "i0"),
             numpy_helper.from_array(np.ones(8, np.float32), "gamma"), numpy_helper.from_array(np.zeros(8, np.float32), "beta"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 4)).astype(np.float32), "w2"), numpy_helper.from_array(rng.normal(0, 0.3, 4).astype(np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("SkipLayerNormalization", ["h", "x", "gamma", "beta"], ["n"], domain="com.microsoft", name="skip_ln"),
             helper.make_node("Gather", ["n", "i0"], ["cls"], axis=1, name="cls_token"), helper.make_node("Gemm", ["cls", "w2", "b2"], ["y"], name="pooler")]
    graph = helper.make_graph(nodes, "pooler", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]), path)
    np.savez(tmp_path / "calib.npz", x=rng.normal(0, 1, (32, 6, 8)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=rng.normal(0, 1, (48, 6, 8)).astype(np.float32))
    code, out, err = run_cli(["optimize", path, "-p", "minmax", "--data", tmp_path / "calib.npz", "--eval-data", tmp_path / "eval.npz",
                              "--baseline", "ort", "--strict", "--output", tmp_path / "q.onnx", "--no-cache"])
    assert code == 0, err
    assert "quantizer failed" in err and "could not run" not in out + err
    assert "fidelity (48 evaluation samples)" in out and (tmp_path / "q.onnx").exists()


def test_layer_errors_run_as_many_samples_as_their_outputs_allow(monkeypatch):
    """The diagnosis after a warning exposed every layer of both models for a whole batch: on 9-s audio clips 15 GB.
    It measures one sample, then runs as many as keep the layer outputs within LAYER_ERROR_BYTES; the figures do not
    depend on the cut."""
    import onnxq.evaluate.compare as cmp
    from onnxq.calib.readers import Batch
    from onnxq.runtime import ort as ort_backend

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 4096)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.03, (4096, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["wide"], name="fc1"), helper.make_node("MatMul", ["wide", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quantized = onnxq.optimize(model, method="minmax", data=[{"x": rng.normal(0, 1, (16, 8)).astype(np.float32)}], show_progress=False).model
    batches = lambda: iter([Batch({"x": rng_x}) for rng_x in np.split(np.random.default_rng(5).normal(0, 1, (48, 8)).astype(np.float32), 3)])  # noqa: E731
    whole = cmp.layer_errors(model, quantized, ["wide", "y"], batches)
    runs: list[int] = []
    run = ort_backend.run

    def counting(sess, feeds, names=None):
        out = run(sess, feeds, names)
        runs.append(sum(np.asarray(o).nbytes for o in out))
        return out

    monkeypatch.setattr(cmp.ort_backend, "run", counting)
    monkeypatch.setattr(cmp, "LAYER_ERROR_BYTES", 100_000)  # one sample's layer outputs: 2 x 16 KB
    cut = cmp.layer_errors(model, quantized, ["wide", "y"], batches)
    assert cut == whole and whole["wide"]["sqnr_db"] < math.inf
    assert max(runs) * 2 <= 100_000 and len(runs) > 6  # both models, each run within the bound; more runs than batches


def test_a_graph_network_is_evaluated_whole(tmp_path):
    """One graph per run: ``x [num_atoms, F]`` and ``edges [num_edges]`` (indices into x) hold different lengths on
    their free axes, so neither is the samples'. The latency feeds cut x to one atom and the edges to one, which pointed
    past it: "indices element out of data bounds", and the fidelity check could not run (exit 0, no verdict)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["x", "edges"], ["picked"], axis=0, name="gather"),
             helper.make_node("MatMul", ["picked", "w"], ["y"], name="message")]
    graph = helper.make_graph(nodes, "gnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["num_atoms", 8]),
                                             helper.make_tensor_value_info("edges", TensorProto.INT64, ["num_edges"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["num_edges", 4])],
                              [numpy_helper.from_array(rng.normal(0, 0.3, (8, 4)).astype(np.float32), "w")])
    path = tmp_path / "gnn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    graphs = [{"x": rng.normal(0, 1, (30, 8)).astype(np.float32), "edges": rng.integers(0, 30, 80).astype(np.int64)} for _ in range(3)]
    for i, g in enumerate(graphs):
        np.savez(tmp_path / f"{i}.npz", **g)
    res = onnxq.optimize(path, method="minmax", data=graphs, eval_data=str(tmp_path), show_progress=False, cache_dir=None)
    fid = res.report.fidelity
    assert fid.error is None and fid.samples >= 3 and fid.outputs[0].cosine > 0.99, fid
