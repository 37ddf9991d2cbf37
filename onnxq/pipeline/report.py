"""The report of one run: typed dataclasses whose JSON form ``onnxq schema report`` describes.

Field names are the JSON keys. :meth:`Report.to_dict` gives the JSON-ready mapping (the form
plugins' ``report_sections`` hooks receive); :meth:`Report.to_json` the text.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.evaluate.fidelity import Fidelity, LayerFidelity, OutputFidelity
from onnxq.options import described
from onnxq.pipeline.diagnostics import Diagnostics

__all__ = ["AutoCandidate", "AutoLayer", "AutoReport", "Fidelity", "LayerFidelity", "LeftInFloat", "OutputFidelity", "QuantizedRewrite", "Report", "WeightOnlyFormat", "jsonable"]


@dataclass
class WeightOnlyFormat:
    """The format of a 4-bit weight-only run."""

    bits: int = described("weight bits (4)")
    block_size: int | None = described("weights per block along the reduction axis")
    format: str = described("int4 symmetric, or uint4 with zero points")


@dataclass
class LeftInFloat:
    """A node the placement left in float, and why."""

    node: str = described("node name")
    reason: str = described("why it stays float")


@dataclass
class QuantizedRewrite:
    """A model change a method made after the qparams were chosen (``quantized_rewrite``, or ``qdq_rewrite`` on the QDQ model)."""

    method: str = described("the method that returned the model")
    nodes_added: list[str] = described("names of nodes it added")
    nodes_removed: list[str] = described("names of nodes it removed")
    initializers_added: list[str] = described("names of initializers it added")
    initializers_removed: list[str] = described("names of initializers it removed")
    initializers_changed: list[str] = described("names of initializers whose value it changed")
    output_error: float | None = described(
        "worst output's max |y - y_float| / max |y_float| of the rewritten model (from quantized_rewrite: not yet "
        "quantized; from qdq_rewrite: the QDQ model) against the float model on the first calibration batch; null if it "
        "could not be run")


@dataclass
class AutoCandidate:
    """One recipe ``-p auto`` tried, scored against FP32 on held-out data (``auto.candidates[]``)."""

    name: str = described("the recipe as -p would spell it, plus the layers kept float (e.g. 'equalize+mse', 'mse float:3')")
    methods: list[str] = described("the methods of the recipe, in order")
    float_layers: list[str] = described("weighted layers left in float (mixed precision; empty: full integer)")
    stage: str = described("portfolio, bias-correction, pad-correction, easyquant, all-integer check or mixed")
    score: float | None = described("the target's metric on the held-out data, calibrated on all calibration samples")
    score_worst: float | None = described("the worst of score and the resampled scores: what the choice is made on")
    spread: float | None = described("max - min of the target's metric over the calibration resamples and the full set (null: not resampled; "
                                     "a chosen set of float layers: its recipe's, measured full integer; the chosen candidate: at least "
                                     "how much lower it scored calibrated again on every sample, when that refit was not kept)")
    spread_bound: float | None = described("how much the target's metric may vary over three new calibration sets of the same kind: "
                                           "spread times the 95th percentile of (range of 3 new draws) / (range of the k measured), "
                                           "for normal draws; at least the refit's drop (null: not resampled)")
    resample_scores: list[float] = described("the target's metric when calibrated on each disjoint calibration subset")
    cosine: float | None = described("mean per-sample cosine with FP32, each sample on its worst scored output (-o score_outputs)")
    cosine_worst: float | None = described("the worst sample's cosine (on its worst scored output)")
    cosine_p1: float | None = described("1st percentile of the per-sample cosine (each on its worst scored output)")
    agreement: float | None = described("first output: arg-max agreement with FP32 over the last axis (top-1 for [N, C], per position for sequences)")
    agreement_worst: float | None = described("first output: the worst sample's arg-max agreement")
    accuracy_drop: float | None = described("accuracy drop in points against FP32 (labelled held-out data with a class-score output only)")
    worst_output: str | None = described("the output with the lowest mean cosine")
    worst_output_cosine: float | None = described("that output's mean cosine")
    worst_class: int | None = described("FP32 class with the lowest top-1 agreement ([N, C] class-score outputs only)")
    worst_class_agreement: float | None = described("that class's top-1 agreement")
    meets_target: bool = described("score_worst meets the target")
    latency_ms: float | None = described("measured latency, ONNX Runtime CPU, one sample, one thread (median)")
    size_bytes: int | None = described("serialized size of the quantized model")
    seconds: float = described("time spent building and scoring this candidate")
    error: str | None = described("why the candidate could not be built or scored (null: it ran)")
    score_bound: float | None = described("mixed precision: score less margin_z standard errors of its mean over the held-out samples, "
                                          "what a set of float layers is judged on (null: not a mixed-precision set)", default=None)


@dataclass
class AutoLayer:
    """One weighted layer's sensitivity and latency (``auto.sensitivity[]``)."""

    node: str = described("the layer's node name (what --exclude takes)")
    op_type: str = described("Conv, ConvTranspose, Gemm or MatMul")
    score_float: float | None = described("the target's metric with only this layer left float (null: not measured)")
    gain: float | None = described("score_float minus the full-integer score")
    float_ms: float | None = described("the layer alone in float, ONNX Runtime CPU, one sample, ms")
    int_ms: float | None = described("the layer alone in its integer Q/DQ form, ms")
    float_cost_ms: float | None = described("float_ms - int_ms: what leaving it float costs")
    kept_float: bool = described("left in float in the chosen model")


@dataclass
class AutoReport:
    """What ``-p auto`` tried and why it chose what it chose."""

    metric: str = described("the target's metric: cosine, agreement or drop (accuracy drop / top-1 disagreement in points; lower is better, scores are its negative)")
    threshold: float | None = described("the target (null: none, the best full-integer recipe is chosen)")
    default_target: bool = described("no target was given: the best full-integer recipe, with up to default_float_layers layers float when its worst-case cosine is below default_min_cosine")
    met: bool = described("the chosen model meets the target (on its worst resample)")
    chosen: str = described("the chosen candidate's name")
    reason: str = described("why it was chosen")
    heldout: str = described('"evaluation" (--eval-data) or "split" (every 4th calibration sample held out)')
    heldout_samples: int = described("samples the candidates are scored on")
    calibration_samples: int = described("samples the candidates are calibrated on")
    resamples: int = described("disjoint calibration subsets each finalist is recalibrated on (its spread)")
    candidates: list[AutoCandidate] = described("every candidate tried, in the order tried")
    sensitivity: list[AutoLayer] = described("per-layer sensitivity and latency (only when mixed precision was searched)")
    float_layers: list[str] = described("layers left in float in the chosen model")
    by_error_alone: AutoCandidate | None = described("the comparison: the layers of largest single-layer gain left float one at a time, latency ignored and "
                                                    "nothing put back, until the target is met (on score_bound, as auto's own sets)")
    latency_cache: str | None = described("the per-machine latency table file (null: not cached)")
    machine: str | None = described("the latency table's machine key")
    time_budget_s: float = described("the search's time budget, seconds")
    budget_exhausted: bool = described("the search stopped early because the budget ran out")
    seconds: float = described("time of the whole search")
    notes: list[str] = described("what was skipped and why", default_factory=list)
    faster_float: list[AutoLayer] = described("layers every candidate leaves float because this machine runs them faster that way "
                                              "(option faster_float; ONNX Runtime targets), with their single-layer times", default_factory=list)
    faster_float_model_ms: list[float] = described("the first recipe's whole model, full integer and with those layers float, ms "
                                                   "(what decided it; empty: not measured)", default_factory=list)


@dataclass
class Report:
    """What one :func:`~onnxq.pipeline.optimize` run did."""

    model: str = described('input model path, or "<in-memory>"')
    output: str | None = described("where the quantized model was written (null: not written)")
    method: list[str] = described("methods in the order they ran (the default calibrator first, when one was added)")
    options: dict[str, dict[str, Any]] = described("each method's options")
    target: str = described("target profile")
    bits: int = described("8, 7 (INT7 in an int8 container) or 4 (weight-only)")
    int7_note: str | None = described("what INT7 means on the target's runtime (bits 7 only)")
    weight_only: WeightOnlyFormat | None = described("the 4-bit weight-only format (bits 4 only)")
    shape_inference: str = described("how shape inference went: full, partial (lenient mode) or none (declared shapes kept)")
    quantized_activations: int = described("activation tensors with a Q/DQ pair")
    quantized_weights: int = described("weights with a Q/DQ pair")
    layers: int = described("quantized layers (a weight and its input)")
    float_rewrites: dict[str, list[str]] = described("the target's own float rewrites: rewrite name -> nodes")
    left_in_float: list[LeftInFloat] = described("nodes the placement left in float")
    calibration_seconds: float = described("time of the statistics pass")
    refine_seconds: float = described("time of the methods' refine and quantized_rewrite steps (without the host's checks)")
    total_seconds: float = described("time of the whole run")
    methods: dict[str, dict[str, Any]] = described("each method's own report section (free-form; summary is a list of lines)")
    quantized_rewrites: list[QuantizedRewrite] = described("model changes returned by methods' quantized_rewrite, in order",
                                                          default_factory=list)
    fidelity: Fidelity | None = described("the fidelity check of the quantized model against FP32 (null: not run)", default=None)
    auto: AutoReport | None = described("what -p auto tried and chose (null: not an auto run)", default=None)
    extra: dict[str, Any] = described("sections added by plugins' report_sections hooks", default_factory=dict)
    diagnostics: Diagnostics | None = described("what the HTML report charts: per-layer error, histograms with calibrator thresholds, "
                                                "weight ranges, TensorRT lint (null: not collected; optimize --report or --diagnostics)", default=None)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values (numpy values as Python ones, non-finite floats as None)."""
        return jsonable(dataclasses.asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        """The report as strict JSON text."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def jsonable(o: Any) -> Any:
    """``o`` with containers as dicts/lists, numpy values as Python ones and NaN/Inf as None."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return jsonable(o.tolist())
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, Path):
        return str(o)
    if o is None or isinstance(o, (str, int)):
        return o
    return str(o)
