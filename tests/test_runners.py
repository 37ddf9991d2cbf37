"""The runner protocol, the ONNX Runtime runner and the one comparator (TensorRT's rows with stand-in engines).

The TensorRT comparison is exercised here without TensorRT: its engines are replaced by ONNX
Runtime runners, which checks which rows it makes, their names, notes, extras and error handling;
tests/backends/test_tensorrt.py runs the real engines where a GPU is present.
"""

from __future__ import annotations

import types

import numpy as np
import onnx
import pytest

import onnxq.evaluate.tensorrt as trt_eval
from onnxq.backends.ort import OrtBackend, OrtRunner
from onnxq.backends.tensorrt import TensorRTBackend
from onnxq.calib.readers import Batch
from onnxq.errors import ModelError, OnnxqError
from onnxq.evaluate.compare import Candidate, compare_runners, evaluate
from onnxq.runtime import ort as ort_session
from onnxq.runtime.runner import Backend, Runner


@pytest.fixture(scope="module")
def digits_batches(digits_eval_arrays):
    x, y = digits_eval_arrays
    return lambda: (Batch({"input": x[i : i + 125]}, y[i : i + 125]) for i in range(0, len(x), 125))


@pytest.fixture(scope="module")
def digits_int8(digits_model, digits_calib) -> onnx.ModelProto:
    import onnxq

    return onnxq.optimize(digits_model, method="minmax", target="ort", data=str(digits_calib), cache_dir=None, show_progress=False).model


def test_runner_lifecycle(digits_model, digits_eval_arrays):
    runner = OrtRunner(digits_model, "fp32")
    with pytest.raises(OnnxqError, match="must be activated"):
        runner.infer({"input": digits_eval_arrays[0][:2]})
    with runner:
        assert runner.is_active and runner.output_names == ["logits"]
        with pytest.raises(OnnxqError, match="already active"):
            runner.activate()
        out = runner.infer({"input": digits_eval_arrays[0][:2]})
    assert not runner.is_active and out["logits"].shape == (2, 10)
    runner.deactivate()  # deactivating an inactive runner is a no-op
    assert isinstance(runner, Runner) and issubclass(OrtBackend, Backend) and issubclass(TensorRTBackend, Backend)
    assert OrtBackend.name == "ort" and TensorRTBackend.name == "trt" and TensorRTBackend.targets == ("trt",)


def test_ort_runner_matches_a_plain_session(digits_model, digits_eval_arrays):
    x = digits_eval_arrays[0][:50]
    with OrtRunner(digits_model, "fp32") as runner:
        got = runner.infer({"input": x})["logits"]
    (want,) = ort_session.make_session(str(digits_model), "all").run(None, {"input": x})
    np.testing.assert_array_equal(got, want)


def test_evaluate_rows_metrics_latency_and_kernels(digits_model, digits_int8, digits_batches, digits_eval_arrays):
    feeds = {"input": digits_eval_arrays[0][:1]}
    evals = evaluate(digits_model, {"int8": digits_int8}, digits_batches, latency_feeds=feeds, threads=(1, 2), latency_repeats=3)
    assert [e.name for e in evals] == ["fp32", "int8"]
    fp32, int8 = evals
    assert fp32.outputs["logits"]["accuracy"] == pytest.approx(0.994) and fp32.outputs["logits"]["top1_agreement"] == 1.0
    assert int8.outputs["logits"]["accuracy"] >= 0.98
    assert set(fp32.latency_ms) == set(int8.latency_ms) == {"1t", "2t"}
    assert fp32.integer_kernels is None and int8.integer_kernels["integer_fraction"] > 0
    assert fp32.size_bytes > 0 and int8.size_bytes == digits_int8.ByteSize()
    # the same comparator driven by hand gives the same metrics
    backend = OrtBackend(latency_repeats=3)
    rows = [Candidate("fp32", lambda: backend.runner(digits_model, "fp32", reference=True)), Candidate("int8", lambda: backend.runner(digits_int8, "int8"))]
    again = compare_runners(rows, digits_batches)
    assert [e.outputs for e in again] == [e.outputs for e in evals] and again[1].latency_ms == {}


def test_optional_rows_become_notes(digits_model, digits_batches):
    def refuse():
        raise ModelError("this runtime refuses the model")

    backend = OrtBackend()
    notes: list[str] = []
    rows = [Candidate("fp32", lambda: backend.runner(digits_model, "fp32", reference=True)),
            Candidate("maybe", refuse, optional=True, skip_note="not loaded here")]
    evals = compare_runners(rows, digits_batches, notes=notes)
    assert [e.name for e in evals] == ["fp32"] and notes == ["maybe: not loaded here: this runtime refuses the model"]
    with pytest.raises(ModelError, match="refuses"):
        compare_runners([rows[0], Candidate("must", refuse)], digits_batches)


# ---------------------------------------------------------------------------------------------
# TensorRT's comparison, with ONNX Runtime standing in for the engines
# ---------------------------------------------------------------------------------------------

class _FakeCalibrator:
    skipped = 2
    cache_bytes = b"TRT-1001-EntropyCalibration2\n"

    def first_shapes(self):
        return {"input": (16, 1, 16, 16)}


@pytest.fixture
def fake_trt(monkeypatch):
    """evaluate_trt's TensorRT calls answered by ONNX Runtime: engines are OrtRunners on the (float16-free) model."""
    version = {"v": "11.0.0"}
    built: list[tuple[str, str]] = []

    def build_engine(model, settings, mode="explicit", calibrator=None, shapes=None):
        if isinstance(model, onnx.ModelProto) and model.doc_string == "refuse":
            raise ModelError("TensorRT's ONNX parser rejected the model: test")
        built.append((getattr(model, "name", "") or str(model), mode))
        return model

    class Backend:
        def __init__(self, settings, latency_repeats, cuda):
            self.settings = settings

        def runner(self, model, name, reference=False):
            return OrtRunner(build_engine(model, self.settings, "fp32" if reference else "explicit"), name)

    monkeypatch.setattr(trt_eval, "require_tensorrt", lambda: types.SimpleNamespace(__version__=version["v"]))
    monkeypatch.setattr(trt_eval, "cuda_device", lambda: object())
    monkeypatch.setattr(trt_eval, "TensorRTBackend", Backend)
    monkeypatch.setattr(trt_eval, "build_engine", build_engine)
    monkeypatch.setattr(trt_eval, "TrtRunner", lambda engine, name, cuda, repeats: OrtRunner(engine, name))
    monkeypatch.setattr(trt_eval, "make_calibrator", lambda kind, batches, cuda, cache_in: _FakeCalibrator())
    return types.SimpleNamespace(version=version, built=built)


def test_trt_comparison_on_11_uses_the_stand_in(fake_trt, digits_model, digits_int8, digits_batches, digits_eval_arrays):
    seen = {}

    def stand_in(model, batches):
        seen["inputs"] = [b.feeds["input"].shape for b in batches()]
        return digits_int8

    refused = onnx.ModelProto()
    refused.CopyFrom(digits_int8)
    refused.doc_string = "refuse"
    result = trt_eval.evaluate_trt(digits_model, {"int8": digits_int8, "ort quantize_static": refused}, digits_batches,
                                   {"input": digits_eval_arrays[0][:1]}, calib_batches=digits_batches, optional=("ort quantize_static",),
                                   latency_repeats=2, stand_in=stand_in)
    names = [e.name for e in result.evaluations]
    assert names == ["fp32", "int8", trt_eval.STAND_IN_LABEL]
    assert seen["inputs"] == [(125, 1, 16, 16)] * 4
    assert "calibration_seconds" in result.evaluations[2].extra
    assert result.notes[0].startswith("TensorRT 11.0.0: TensorRT's implicit INT8 calibrators")
    assert result.notes[1] == "ort quantize_static: not built on TensorRT: TensorRT's ONNX parser rejected the model: test"
    assert result.calibration_cache is None
    # the stand-in's model is the int8 candidate, so their metrics agree exactly
    assert result.evaluations[2].outputs == result.evaluations[1].outputs
    with pytest.raises(OnnxqError, match=r"^bad: TensorRT's ONNX parser rejected the model: test$"):
        trt_eval.evaluate_trt(digits_model, {"bad": refused}, digits_batches)


def test_trt_comparison_on_10_uses_trt_own_calibrator(fake_trt, digits_model, digits_int8, digits_batches):
    fake_trt.version["v"] = "10.8.0"
    result = trt_eval.evaluate_trt(digits_model, {"int8": digits_int8}, digits_batches, calib_batches=digits_batches, calibrator="minmax")
    label = "TensorRT IInt8MinMaxCalibrator (implicit)"
    assert [e.name for e in result.evaluations] == ["fp32", "int8", label]
    assert ("implicit" in [mode for _, mode in fake_trt.built]) and result.calibration_cache == _FakeCalibrator.cache_bytes
    assert f"{label}: 2 calibration batch(es) of another shape than the first were skipped" in result.notes
    none = trt_eval.evaluate_trt(digits_model, {"int8": digits_int8}, digits_batches, calib_batches=digits_batches, calibrator="none")
    assert [e.name for e in none.evaluations] == ["fp32", "int8"]
