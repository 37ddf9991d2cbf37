"""FP32 against Q/DQ models on TensorRT, through the one comparator (:func:`onnxq.evaluate.compare.compare_runners`).

Rows: the FP32 engine (the reference), one strongly typed Q/DQ engine per candidate, and on
TensorRT 10.x an engine built by TensorRT's own implicit calibrator. TensorRT 11 removed those
calibrators; there the row is onnxq's ``trt-entropy`` model, made by a ``stand_in`` quantizer the
caller passes (the command line passes the pipeline; this layer sits below it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from onnxq.backends.tensorrt import (
    BuildSettings, TensorRTBackend, TrtGate, TrtRunner, build_engine, cuda_device, derive_profiles, make_calibrator, observed_shapes,
    require_tensorrt, version_gate,
)
from onnxq.calib.feeds import model_inputs
from onnxq.calib.readers import Batch
from onnxq.errors import OnnxqError
from onnxq.evaluate.compare import Candidate, Evaluation, compare_runners
from onnxq.graph import model_io
from onnxq.runtime.runner import ModelLike, Runner

#: makes onnxq's ``trt-entropy-exact`` (TensorRT's algorithm, unguarded) Q/DQ model of an FP32 model from calibration batches
StandIn = Callable[[onnx.ModelProto, Callable[[], Iterable[Batch]]], onnx.ModelProto]

STAND_IN_LABEL = "onnxq trt-entropy-exact (stands in for TensorRT's removed calibrator)"


@dataclass
class TrtComparison:
    """What :func:`evaluate_trt` returns: rows for the table and notes to print under it."""

    evaluations: list[Evaluation]
    notes: list[str]
    gate: TrtGate
    calibration_cache: bytes | None = None


def _named(name: str, make: Callable[[], Runner]) -> Callable[[], Runner]:
    """``make`` with its build errors prefixed by the row's name (which model TensorRT refused)."""

    def wrapped() -> Runner:
        try:
            return make()
        except OnnxqError as exc:
            raise OnnxqError(f"{name}: {exc}") from None

    return wrapped


def evaluate_trt(reference: ModelLike, candidates: Mapping[str, ModelLike], batches: Callable[[], Iterable[Batch]],
                 latency_feeds: Mapping[str, np.ndarray] | None = None, settings: BuildSettings = BuildSettings(),
                 calibrator: Literal["entropy", "minmax", "none"] = "entropy", calib_batches: Callable[[], Iterable[Batch]] | None = None,
                 calib_cache_in: Path | None = None, optional: Iterable[str] = (), latency_repeats: int = 100,
                 stand_in: StandIn | None = None) -> TrtComparison:
    """Build and run an engine for the FP32 ``reference`` and for each Q/DQ candidate; metrics as for ONNX Runtime.

    The FP32 engine is the reference every row is measured against. On TensorRT 10.x a row for
    TensorRT's own implicit calibrator (``calibrator``) on ``calib_batches`` is added; on 11+ a
    row for ``stand_in``'s Q/DQ model on the same data replaces it (no row without a
    ``stand_in``). Build failures of the ``optional`` candidates become notes instead of errors.
    """
    trt = require_tensorrt()
    gate = version_gate(trt.__version__)
    cuda = cuda_device()
    ref_model = reference if isinstance(reference, onnx.ModelProto) else model_io.load_model(reference)
    inputs = model_inputs(ref_model)
    if not settings.profiles:
        settings = replace(settings, profiles=derive_profiles(inputs, observed_shapes(batches(), [latency_feeds] if latency_feeds else [])))
    backend = TensorRTBackend(settings=settings, latency_repeats=latency_repeats, cuda=cuda)
    notes = [gate.note()]
    optional = set(optional)
    rows = [Candidate("fp32", _named("fp32", lambda: backend.runner(ref_model, "fp32", reference=True)))]
    for name, model in candidates.items():
        make = lambda m=model, n=name: backend.runner(m, n)  # noqa: E731
        rows.append(Candidate(name, make if name in optional else _named(name, make), optional=name in optional, skip_note="not built on TensorRT"))
    cache_out: list[bytes | None] = [None]
    if calibrator != "none" and calib_batches is not None:
        if gate.implicit_calibrators:
            label = f"TensorRT {'IInt8EntropyCalibrator2' if calibrator == 'entropy' else 'IInt8MinMaxCalibrator'} (implicit)"

            def implicit() -> Runner:
                cal = make_calibrator(calibrator, calib_batches, cuda, calib_cache_in)  # type: ignore[arg-type]
                shapes = cal.first_shapes()
                built = build_engine(ref_model, settings, "implicit", cal, shapes)
                if cal.skipped:
                    notes.append(f"{label}: {cal.skipped} calibration batch(es) of another shape than the first were skipped")
                cache_out[0] = cal.cache_bytes
                return TrtRunner(built, label, cuda, latency_repeats)

            rows.append(Candidate(label, _named(label, implicit)))
        elif stand_in is not None:
            extra: dict[str, Any] = {}

            def quantized_stand_in() -> Runner:
                t0 = time.perf_counter()
                q = stand_in(ref_model, calib_batches)  # type: ignore[arg-type]
                extra["calibration_seconds"] = round(time.perf_counter() - t0, 3)
                return TrtRunner(build_engine(q, settings, "explicit"), STAND_IN_LABEL, cuda, latency_repeats)

            rows.append(Candidate(STAND_IN_LABEL, _named(STAND_IN_LABEL, quantized_stand_in), extra=extra))
    evaluations = compare_runners(rows, batches, dict(latency_feeds) if latency_feeds is not None else None, notes)
    return TrtComparison(evaluations, notes, gate, cache_out[0])


def compare_on_trt(fp32_model: Path, candidates: Mapping[str, Any], batches: Callable[[], Iterable[Batch]], latency_feeds: Mapping[str, np.ndarray],
                   calib_batches: Callable[[], Iterable[Batch]], calibrator: str = "entropy", fp16: bool = False, workspace_mb: int = 2048,
                   timing_cache: Path | None = None, save_cache: Path | None = None, optional: Iterable[str] = (),
                   stand_in: StandIn | None = None) -> tuple[list[Evaluation], dict[str, Any]]:
    """Run :func:`evaluate_trt` with command-line arguments; returns the rows and a JSON-able summary (notes, version)."""
    settings = BuildSettings(workspace_bytes=int(workspace_mb) << 20, fp16=fp16, timing_cache=timing_cache)
    result = evaluate_trt(fp32_model, candidates, batches, latency_feeds, settings, calibrator, calib_batches,  # type: ignore[arg-type]
                          optional=optional, stand_in=stand_in)
    notes = list(result.notes)
    if save_cache is not None:
        if result.calibration_cache:
            from onnxq.calib.trt_cache import parse_cache

            parsed = parse_cache(result.calibration_cache, "TensorRT's calibration cache")
            tmp = Path(save_cache).with_name(f".{Path(save_cache).name}.tmp")
            tmp.write_bytes(result.calibration_cache)
            os.replace(tmp, save_cache)
            notes.append(f"wrote TensorRT's calibration cache ({len(parsed.scales)} tensors, {parsed.header}) to {save_cache}; "
                         f"`onnxq optimize FP32_MODEL -p trt-cache -o path {save_cache} --target trt` turns it into a Q/DQ model")
        else:
            notes.append("no TensorRT calibration cache to save (TensorRT >= 11, or --trt-calibrator none)")
    doc = {"version": ".".join(map(str, result.gate.version)), "implicit_calibrators": result.gate.implicit_calibrators,
           "notes": notes, "latency": "median GPU time of one inference (batch 1), host copies excluded", "size": "serialized engine bytes"}
    return result.evaluations, doc
