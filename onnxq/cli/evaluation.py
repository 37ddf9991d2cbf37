"""Evaluation shared by ``optimize --eval-data`` and ``compare``: tables and quality gates."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

from onnxq.evaluate.compare import Evaluation, evaluate
from onnxq.calib.feeds import model_inputs
from onnxq.cli.common import parse_key_values
from onnxq.errors import DataError, OptionError
from onnxq.graph import model_io
from onnxq.host import get_host
from onnxq.pipeline import batch_source, make_reader
from onnxq.report import evaluation_table


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


def evaluate_run(model: Path, quantized: onnx.ModelProto, eval_data: str, data_opt: tuple[str, ...], reader: str | None, batch_size: int,
                 max_drop: float | None, min_cosine: float | None, baseline: str, calib_data: str, max_samples: int | None,
                 target: str, bits: str) -> tuple[list[dict[str, Any]], str, str | None]:
    """Evaluate FP32, onnxq's model and optionally ORT's quantizer; returns (JSON rows, table, gate failure)."""
    host = get_host()
    ref = model_io.load_model(model)
    inputs = model_inputs(ref)
    opts = parse_key_values(data_opt, "--data-opt")
    ev_source = batch_source(make_reader(eval_data, inputs, host, opts, reader), inputs, max(batch_size, 64))
    first = next(iter(ev_source()), None)
    if first is None:
        raise DataError(f"the evaluation data '{eval_data}' is empty")
    latency_feeds = {k: v[:1] for k, v in first.feeds.items()}
    candidates: dict[str, Any] = {f"onnxq {target} int{bits}": quantized}
    extra: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="onnxq-eval-") as tmp:
        if baseline == "ort":
            from onnxq.backends.ort_quantizer import quantize_with_ort

            cal_source = batch_source(make_reader(calib_data, inputs, host, opts, reader), inputs, batch_size, max_samples)
            t0 = time.perf_counter()
            path = quantize_with_ort(model, Path(tmp) / "ort.onnx", cal_source)
            candidates["ort quantize_static"] = path
            extra["ort quantize_static"] = {"calibration_seconds": round(time.perf_counter() - t0, 3)}
        evals = evaluate(model, candidates, ev_source, latency_feeds=latency_feeds, threads=(1,))
    for e in evals:
        e.extra.update(extra.get(e.name, {}))
    gate = quality_gate(evals, f"onnxq {target} int{bits}", max_drop, min_cosine)
    return [dataclasses.asdict(e) for e in evals], evaluation_table(evals), gate
