"""Evaluation shared by ``optimize --eval-data``, ``compare`` and :func:`onnxq.compare`: data set-up, quality gates,
TensorRT 11's stand-in row."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.calib.feeds import model_inputs
from onnxq.calib.readers import Batch, DataReader, InputSpec
from onnxq.evaluate.compare import Evaluation, batch_axes, evaluate, one_sample
from onnxq.evaluate.fidelity import Fidelity, fidelity_of
from onnxq.cli.common import parse_key_values
from onnxq.errors import DataError, OptionError, first_line
from onnxq.graph import model_io
from onnxq.host import get_host
from onnxq.pipeline import batch_source, make_reader, optimize
from onnxq.report import evaluation_table

log = logging.getLogger(__name__)


def quality_gate(evals: list[Evaluation], name: str, max_drop: float | None, min_cosine: float | None) -> str | None:
    """Return why ``name`` misses the gate against the FP32 row, or None if it passes."""
    ref = next(e for e in evals if e.name == "fp32").headline()
    cand = next(e for e in evals if e.name == name).headline()
    if max_drop is not None:
        if "accuracy" in cand:
            drop = (ref["accuracy"] - cand["accuracy"]) * 100
            what = "accuracy drop"
        elif "top1_agreement" in cand:
            drop = (1 - cand["top1_agreement"]) * 100
            what = "top-1 disagreement with FP32"
        else:
            raise OptionError("--max-drop needs a classification output (logits); use --min-cosine for other models")
        if drop > max_drop:
            return f"quality gate failed: {what} {drop:.2f} points > --max-drop {max_drop}"
    if min_cosine is not None and cand.get("cosine", 1.0) < min_cosine:
        return f"quality gate failed: cosine {cand['cosine']:.5f} < --min-cosine {min_cosine}"
    return None


def data_source(data: str, inputs: list[InputSpec], opts: Mapping[str, str], reader: str | None, batch_size: int,
                max_samples: int | None = None, evaluation: bool = False) -> Callable[[], Iterable[Batch]]:
    """A re-iterable batch source over a data spec, read by the host's readers (``evaluation``: see :func:`make_reader`)."""
    return batch_source(make_reader(data, inputs, get_host(), opts, reader, evaluation), inputs, batch_size, max_samples)


def evaluation_data(reference: onnx.ModelProto, data: str, opts: Mapping[str, str], reader: str | None, batch_size: int,
                    max_samples: int | None = None, beside_calibration: bool = False
                    ) -> tuple[list[InputSpec], Callable[[], Iterable[Batch]], dict[str, np.ndarray]]:
    """The reference's inputs, a batch source over ``data`` and one-sample latency feeds (its first sample).

    The latency feeds cut each input to one sample along its own batch axis (from the declared
    shapes); inputs without one (a scalar sample rate, a fixed-size table) are fed as they are.
    Raises :class:`DataError` when ``data`` has no batch. ``beside_calibration``: ``optimize --eval-data``, whose
    ``--data-opt`` are the calibration data's: those its reader does not take are left out (:func:`make_reader`).
    """
    inputs = model_inputs(reference)
    source = data_source(data, inputs, opts, reader, batch_size, max_samples, evaluation=beside_calibration)
    first = next(iter(source()), None)
    if first is None:
        raise DataError(f"the evaluation data '{data}' is empty")
    return inputs, source, one_sample(first.feeds, batch_axes(reference))


def check_evaluation_data(model: Path, data: str, opts: Mapping[str, str], reader: str | None, batch_size: int) -> None:
    """Raise :class:`DataError` (or another user error) unless ``data`` (``optimize --eval-data``, read with the
    calibration data's options as :func:`evaluation_data` reads it) yields a first batch that fits ``model``'s inputs.

    Reads the model's graph only (not its weights) and one batch of the data.
    """
    graph = onnx.load(os.fspath(model), load_external_data=False)
    source = data_source(data, model_inputs(graph), opts, reader, batch_size, None, evaluation=True)
    if next(iter(source()), None) is None:
        raise DataError(f"the evaluation data '{data}' is empty")


def evaluate_run(model: Path, quantized: onnx.ModelProto, eval_data: str, data_opt: tuple[str, ...], reader: str | None, batch_size: int,
                 max_drop: float | None, min_cosine: float | None, baseline: str, calib_data: str, max_samples: int | None,
                 target: str, bits: str, check_methods: Sequence[str] | None = None) -> tuple[list[dict[str, Any]], str, str | None, Fidelity | None]:
    """Evaluate FP32, onnxq's model and optionally ORT's quantizer; returns (JSON rows, table, gate failure, fidelity).

    With ``check_methods`` (the run's methods) onnxq's row is also judged by the fidelity check
    (:func:`~onnxq.evaluate.fidelity.fidelity_of`), so that the models run once on the evaluation data.
    """
    opts = parse_key_values(data_opt, "--data-opt")
    reference = model_io.load_model(model)
    inputs, ev_source, latency_feeds = evaluation_data(reference, eval_data, opts, reader, batch_size, beside_calibration=True)
    candidates: dict[str, Any] = {f"onnxq {target} int{bits}": quantized}
    extra: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="onnxq-eval-") as tmp:
        if baseline == "ort":
            from onnxq.backends.ort_quantizer import quantize_with_ort

            cal_source = data_source(calib_data, inputs, opts, reader, batch_size, max_samples, evaluation=True)  # its options were checked by the run
            t0 = time.perf_counter()
            try:
                path = quantize_with_ort(model, Path(tmp) / "ort.onnx", cal_source)
            except Exception as exc:  # noqa: BLE001 - the baseline is another tool: its failure must not cost onnxq's own check
                log.warning("ONNX Runtime's own quantizer failed on this model (left out of the table): %s: %s", type(exc).__name__,
                            first_line(exc)[:300])
            else:
                candidates["ort quantize_static"] = path
                extra["ort quantize_static"] = {"calibration_seconds": round(time.perf_counter() - t0, 3)}
        notes: list[str] = []
        evals = evaluate(model_io.for_runtime(reference, model), candidates, ev_source, latency_feeds=latency_feeds, threads=(1,), notes=notes,
                         optional={"ort quantize_static": "ONNX Runtime's own quantizer wrote a model that does not run (left out of the table)"})
    for note in notes:
        log.warning("%s", note)
    for e in evals:
        e.extra.update(extra.get(e.name, {}))
    gate = quality_gate(evals, f"onnxq {target} int{bits}", max_drop, min_cosine)
    fidelity = None
    if check_methods is not None:
        row = next(e for e in evals if e.name == f"onnxq {target} int{bits}")
        fidelity = fidelity_of(row.outputs, reference, quantized, ev_source, in_sample=False, methods=check_methods, target=target, bits=int(bits),
                               fp32=next(e for e in evals if e.name == "fp32").outputs)
    return [dataclasses.asdict(e) for e in evals], evaluation_table(evals), gate, fidelity


class _SourceReader(DataReader):
    """A DataReader over a batch source (feeds the pipeline from already validated batches)."""

    name = "batch-source"

    def __init__(self, source: Callable[[], Iterable[Batch]], inputs: object) -> None:
        super().__init__("<calibration data>", None, inputs)
        self._source = source

    def __iter__(self) -> Iterator[Batch]:
        yield from self._source()


def trt_entropy_model(model: onnx.ModelProto, batches: Callable[[], Iterable[Batch]]) -> onnx.ModelProto:
    """onnxq's ``trt-entropy-exact`` Q/DQ model of ``model`` on ``batches``: TensorRT 11's stand-in for its removed calibrator
    (TensorRT's algorithm itself, not the error-guarded ``trt-entropy``)."""
    return optimize(model, method="trt-entropy-exact", target="trt", data=_SourceReader(batches, model_inputs(model)), show_progress=False).model


def compare(reference: str | os.PathLike[str], candidates: dict[str, str | os.PathLike[str]], data: str, **kwargs: Any) -> list[Evaluation]:
    """Python entry point mirroring ``onnxq compare``: evaluate models on a data spec.

    Keywords: ``data_options``, ``batch_size`` (64), ``max_samples``, then those of
    :func:`onnxq.evaluate.compare.evaluate` (``threads``, ``latency_repeats``, ``backend``).
    """
    _, source, latency_feeds = evaluation_data(model_io.load_model(reference), data, kwargs.pop("data_options", None) or {}, None,
                                               kwargs.pop("batch_size", 64), kwargs.pop("max_samples", None))
    return evaluate(Path(reference), dict(candidates), source, latency_feeds=latency_feeds, **kwargs)
