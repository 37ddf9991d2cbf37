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

__all__ = ["Fidelity", "LayerFidelity", "LeftInFloat", "OutputFidelity", "QuantizedRewrite", "Report", "WeightOnlyFormat", "jsonable"]


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
