"""The report of one run: typed dataclasses whose JSON form ``onnxq schema report`` describes.

Field names are the JSON keys. :meth:`Report.to_dict` gives the JSON-ready mapping (the form
plugins' ``report_sections`` hooks receive); :meth:`Report.to_json` the text.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class WeightOnlyFormat:
    """The format of a 4-bit weight-only run."""

    bits: int
    block_size: int | None
    format: str


@dataclass
class LeftInFloat:
    """A node the placement left in float, and why."""

    node: str
    reason: str


@dataclass
class QuantizedRewrite:
    """A model change a method made after the qparams were chosen (``quantized_rewrite``)."""

    method: str
    nodes_added: list[str]
    nodes_removed: list[str]
    initializers_added: list[str]
    initializers_removed: list[str]
    initializers_changed: list[str]
    #: worst output's max |y − y_float| / max |y_float| of the rewritten (still unquantized) model
    #: against the float model on the first calibration batch; None if it could not be run
    output_error: float | None


@dataclass
class Report:
    """What one :func:`~onnxq.pipeline.optimize` run did."""

    #: input model path, or "<in-memory>"
    model: str
    #: where the quantized model was written (None: not written)
    output: str | None
    #: methods in the order they ran (a default calibrator first, when one was added)
    method: list[str]
    #: each method's options
    options: dict[str, dict[str, Any]]
    target: str
    bits: int
    int7_note: str | None
    weight_only: WeightOnlyFormat | None
    #: how shape inference went (see onnxq.graph.prepare.infer_shapes)
    shape_inference: str
    quantized_activations: int
    quantized_weights: int
    layers: int
    #: the target's own float rewrites: rewrite name -> nodes
    float_rewrites: dict[str, list[str]]
    left_in_float: list[LeftInFloat]
    calibration_seconds: float
    refine_seconds: float
    total_seconds: float
    #: each method's own report section (free-form; "summary" is a list of lines)
    methods: dict[str, dict[str, Any]]
    #: model changes returned by methods' quantized_rewrite, in order
    quantized_rewrites: list[QuantizedRewrite] = field(default_factory=list)
    #: sections added by plugins' report_sections hooks
    extra: dict[str, Any] = field(default_factory=dict)

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
