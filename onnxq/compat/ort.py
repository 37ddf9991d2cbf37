"""ONNX Runtime's ``quantize_static`` API, run by onnxq: change the import, keep the script.

``from onnxq.compat.ort import quantize_static, CalibrationDataReader, QuantFormat, QuantType,
CalibrationMethod`` takes the place of the same names from ``onnxruntime.quantization``. The
signature is ONNX Runtime's (1.32); each argument is mapped to onnxq's equivalent, and an argument
onnxq cannot honour is an :class:`~onnxq.errors.OptionError` naming it, before any work:

* ``calibrate_method``: MinMax -> ``minmax``, Entropy -> ``trt-entropy`` (TensorRT's KL search
  guarded by the expected error), Percentile -> ``percentile`` (ONNX Runtime's 99.999 unless
  ``CalibPercentile`` says otherwise); Distribution (float8) is refused.
* ``activation_type``: QUInt8 -> target ``ort`` (uint8 asymmetric); QInt8 with asymmetric
  activations (ONNX Runtime's default) -> also ``ort``: the same 256-level grid over the observed
  range, stored as uint8, which ONNX Runtime runs faster on x86; QInt8 with
  ``ActivationSymmetric=True`` -> ``ort-s8`` (int8, zero point 0).
* ``weight_type`` QInt8 (onnxq's weights are int8 symmetric, narrow range); ``per_channel``
  (False: one scale per weight tensor, as ONNX Runtime).
* ``nodes_to_exclude``, ``nodes_to_quantize``, ``op_types_to_quantize`` become node exclusions
  (by name, as ``--exclude`` takes them).
* ``extra_options``: the keys in :data:`EXTRA_OPTIONS`; any other key is refused by name.

Users' existing ``CalibrationDataReader`` objects are read as they are: ``get_next()`` until it
returns None, and ``rewind()`` between onnxq's passes (a reader without ``rewind`` is read once
and its feeds kept in memory). :func:`reader_feeds` hands such a reader to ``onnxq.optimize``
itself, and :func:`translate` says what a call becomes without running it.
"""

from __future__ import annotations

import abc
import enum
import glob
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.calib.feeds import model_inputs
from onnxq.calib.readers import Batch, DataReader
from onnxq.errors import DataError, OptionError
from onnxq.graph.targets import SCALE_PRESERVING_OPS, WEIGHTED_OPS, TargetProfile
from onnxq.host import get_host
from onnxq.pipeline import Report, optimize

__all__ = ["CalibrationDataReader", "CalibrationMethod", "EXTRA_OPTIONS", "QuantFormat", "QuantType", "Translation", "quantize_static",
           "reader_feeds", "translate"]

log = logging.getLogger("onnxq")


class _Named(enum.Enum):
    """An enum that parses its member names (``QuantType.from_string("QInt8")``), as ONNX Runtime's do."""

    def __str__(self) -> str:
        return self.name

    @classmethod
    def from_string(cls, text: str) -> Any:
        try:
            return cls[text]
        except KeyError:
            raise ValueError(f"{text!r} is not a {cls.__name__} (one of {', '.join(m.name for m in cls)})") from None


class QuantFormat(_Named):
    """How quantization is written: Q/DQ pairs (onnxq's only form) or quantized operators."""

    QOperator = 0
    QDQ = 1


class QuantType(_Named):
    """Element type of quantized activations or weights (ONNX Runtime's names and values)."""

    QInt8 = 0
    QUInt8 = 1
    QFLOAT8E4M3FN = 2
    QInt16 = 3
    QUInt16 = 4
    QInt4 = 5
    QUInt4 = 6


class CalibrationMethod(enum.Enum):
    """How activation ranges are chosen (ONNX Runtime's names and values)."""

    MinMax = 0
    Entropy = 1
    Percentile = 2
    Distribution = 3


class CalibrationDataReader(metaclass=abc.ABCMeta):
    """Calibration feeds one dict at a time, as ONNX Runtime's base class of the same name.

    Subclasses implement ``get_next()`` (a dict of input name -> array, None when done) and
    usually ``rewind()`` (start again). Any object with a ``get_next`` method counts as one, so a
    reader written for ONNX Runtime's class works unchanged.
    """

    @classmethod
    def __subclasshook__(cls, subclass: type) -> bool:
        return callable(getattr(subclass, "get_next", None)) or NotImplemented  # type: ignore[return-value]

    @abc.abstractmethod
    def get_next(self) -> dict | None:
        """The next feed dict, or None after the last one."""

    def __iter__(self) -> CalibrationDataReader:
        return self

    def __next__(self) -> dict:
        feeds = self.get_next()
        if feeds is None:
            raise StopIteration
        return feeds


#: the ``extra_options`` keys onnxq honours, and what each becomes; every other key is refused by name
EXTRA_OPTIONS: Mapping[str, str] = {
    "ActivationSymmetric": "True: int8 symmetric activations (target ort-s8, with QInt8); False: asymmetric (target ort)",
    "WeightSymmetric": "True only: onnxq's weights are symmetric",
    "CalibPercentile": "the percentile of CalibrationMethod.Percentile (-o percentile)",
    "CalibTensorRangeSymmetric": "True only with symmetric activations, where onnxq's ranges are symmetric already",
    "CalibMovingAverage": "False only: onnxq takes the observed min/max",
    "CalibMaxIntermediateOutputs": "accepted: onnxq's statistics pass streams under its own memory budget (same result)",
    "CalibStridedMinMax": "accepted: onnxq's statistics pass streams under its own memory budget (same result)",
    "MatMulConstBOnly": "True only: onnxq keeps activation x activation MatMuls in float on the ort targets",
    "EnableSubgraph": "False only: onnxq does not quantize inside If/Loop/Scan bodies",
    "SmoothQuant": "True: -p smoothquant before the calibrator",
    "SmoothQuantAlpha": "smoothquant's alpha (ONNX Runtime's default 0.5)",
    "SmoothQuantFolding": "True only: onnxq always folds the smoothing scales",
}

#: what each calibration method becomes
_METHODS = {CalibrationMethod.MinMax: "minmax", CalibrationMethod.Entropy: "trt-entropy", CalibrationMethod.Percentile: "percentile"}
#: ONNX Runtime's default percentile for CalibrationMethod.Percentile
ORT_PERCENTILE = 99.999
#: ONNX Runtime's default SmoothQuant alpha
ORT_SMOOTHQUANT_ALPHA = 0.5


def _member(value: Any, cls: type[enum.Enum], param: str) -> Any:
    """``value`` as a member of ``cls``: one of its own, ONNX Runtime's member of the same name, or the name as text."""
    if isinstance(value, cls):
        return value
    name = value.name if isinstance(value, enum.Enum) else value if isinstance(value, str) else None
    if name is not None and name in cls.__members__:
        return cls[name]
    raise OptionError(f"{param}={value!r} is not a {cls.__name__} (one of {', '.join(cls.__members__)})")


@dataclass
class Translation:
    """What onnxq runs for one ``quantize_static`` call (the arguments of :func:`onnxq.optimize`)."""

    method: list[str]
    options: dict[str, Any]
    target: TargetProfile
    exclude: list[str] = field(default_factory=list)


def translate(model: onnx.ModelProto, *, quant_format: Any = QuantFormat.QDQ, op_types_to_quantize: Sequence[str] | None = None,
              per_channel: bool = False, reduce_range: bool = False, activation_type: Any = QuantType.QInt8,
              weight_type: Any = QuantType.QInt8, nodes_to_quantize: Sequence[str] | None = None,
              nodes_to_exclude: Sequence[str] | None = None, calibrate_method: Any = CalibrationMethod.MinMax,
              calibration_providers: Sequence[str] | None = None, extra_options: Mapping[str, Any] | None = None,
              calibration_cache_path: str | os.PathLike[str] | None = None) -> Translation:
    """Map ``quantize_static``'s arguments to onnxq's method, options, target and exclusions.

    Raises :class:`OptionError` naming the first argument (or ``extra_options`` key) onnxq cannot
    honour. ``model`` is the input model (node names and op types are checked against it).
    """
    extra = dict(extra_options or {})
    fmt = _member(quant_format, QuantFormat, "quant_format")
    if fmt is not QuantFormat.QDQ:
        raise OptionError("quant_format=QuantFormat.QOperator is not supported: onnxq writes Q/DQ models (QuantFormat.QDQ), "
                          "which ONNX Runtime fuses into the same integer kernels when it loads them")
    act = _member(activation_type, QuantType, "activation_type")
    wt = _member(weight_type, QuantType, "weight_type")
    calib = _member(calibrate_method, CalibrationMethod, "calibrate_method")
    if wt is not QuantType.QInt8:
        raise OptionError(f"weight_type=QuantType.{wt.name} is not supported: onnxq's weights are int8 symmetric (QuantType.QInt8); "
                          "4-bit weight-only MatMuls are onnxq.optimize(..., bits=4)")
    if act not in (QuantType.QInt8, QuantType.QUInt8):
        raise OptionError(f"activation_type=QuantType.{act.name} is not supported: onnxq quantizes activations to 8 bits "
                          "(QuantType.QUInt8 or QuantType.QInt8)")
    if reduce_range:
        raise OptionError("reduce_range=True (7-bit weights, 8-bit activations) is not supported; onnxq's INT7 "
                          "(onnxq.optimize(..., bits=7)) narrows weights and activations")
    if calib not in _METHODS:
        raise OptionError(f"calibrate_method=CalibrationMethod.{calib.name} (float8 ranges) is not supported: "
                          "use MinMax, Entropy or Percentile")
    providers = list(calibration_providers or [])
    if any(p != "CPUExecutionProvider" for p in providers):
        raise OptionError(f"calibration_providers={providers!r}: onnxq calibrates on ONNX Runtime's CPUExecutionProvider only")
    if calibration_cache_path is not None:
        raise OptionError("calibration_cache_path is not supported: onnxq keeps its own statistics cache "
                          "(onnxq.optimize(..., cache_dir=...), keyed by the model's and the data's bytes)")

    unknown = [k for k in extra if k not in EXTRA_OPTIONS]
    if unknown:
        raise OptionError(f"extra_options key '{unknown[0]}' is not supported by onnxq "
                          f"(supported: {', '.join(EXTRA_OPTIONS)}; docs/migrating-from-ort.md)")

    def flag(key: str, default: bool) -> bool:
        value = extra.get(key, default)
        if not isinstance(value, (bool, np.bool_)):
            raise OptionError(f"extra_options['{key}'] must be True or False, not {value!r}")
        return bool(value)

    def only(key: str, allowed: bool, why: str) -> None:
        if key in extra and flag(key, allowed) != allowed:
            raise OptionError(f"extra_options['{key}']={extra[key]!r} is not supported: {why}")

    symmetric = flag("ActivationSymmetric", False)
    if symmetric and act is QuantType.QUInt8:
        raise OptionError("extra_options['ActivationSymmetric']=True with activation_type=QuantType.QUInt8 is not supported: "
                          "onnxq's uint8 activations are asymmetric; use QuantType.QInt8 for symmetric int8 activations")
    only("WeightSymmetric", True, "onnxq's weights are symmetric")
    only("CalibMovingAverage", False, "onnxq's minmax takes the observed min/max of all calibration data")
    only("MatMulConstBOnly", True, "onnxq keeps activation x activation MatMuls (attention) in float on the ort targets")
    only("EnableSubgraph", False, "onnxq does not quantize inside If/Loop/Scan bodies (it reports weighted ops left there)")
    only("SmoothQuantFolding", True, "onnxq always folds the smoothing scales into the LayerNorm / Mul before the MatMul")
    if "CalibTensorRangeSymmetric" in extra and flag("CalibTensorRangeSymmetric", False) and not symmetric:
        raise OptionError("extra_options['CalibTensorRangeSymmetric']=True is supported only with symmetric activations "
                          "(activation_type=QuantType.QInt8 and ActivationSymmetric=True)")

    host = get_host()
    target = host.target("ort-s8" if symmetric else "ort", 8, None)
    if not per_channel:
        target = replace(target, weight_per_channel=False)

    method = [_METHODS[calib]]
    options: dict[str, Any] = {}
    if "CalibPercentile" in extra and calib is not CalibrationMethod.Percentile:
        raise OptionError(f"extra_options['CalibPercentile'] applies to CalibrationMethod.Percentile only, not {calib.name}")
    if calib is CalibrationMethod.Percentile:
        options["percentile.percentile"] = float(extra.get("CalibPercentile", ORT_PERCENTILE))
    if flag("SmoothQuant", False):
        method.insert(0, "smoothquant")
        options["smoothquant.alpha"] = float(extra.get("SmoothQuantAlpha", ORT_SMOOTHQUANT_ALPHA))
    elif "SmoothQuantAlpha" in extra:
        raise OptionError("extra_options['SmoothQuantAlpha'] applies only with extra_options['SmoothQuant']=True")

    return Translation(method, options, target, _exclusions(model, target, op_types_to_quantize, nodes_to_quantize, nodes_to_exclude))


def _exclusions(model: onnx.ModelProto, target: TargetProfile, op_types: Sequence[str] | None, keep: Sequence[str] | None,
                drop: Sequence[str] | None) -> list[str]:
    """Node-name patterns (escaped: matched literally) of the nodes to keep in float."""
    nodes = list(model.graph.node)
    names = {n.name for n in nodes}
    for param, listed in (("nodes_to_quantize", keep), ("nodes_to_exclude", drop)):
        missing = [n for n in listed or [] if n not in names]
        if missing:
            raise OptionError(f"{param} names {len(missing)} node(s) the model does not have: {', '.join(missing[:5])}")
    quantizable = WEIGHTED_OPS | target.extra_ops
    excluded: set[str] = set(drop or [])
    if op_types:
        # ops onnxq quantizes as part of their neighbours' islands (shared scales, Relu folded into the grid)
        implicit = SCALE_PRESERVING_OPS | {"Relu", "Clip"}
        never = sorted(set(op_types) - quantizable - implicit)
        if never:
            raise OptionError(f"op_types_to_quantize names op types onnxq keeps in float on target {target.name}: {', '.join(never)} "
                              f"(it quantizes {', '.join(sorted(quantizable))})")
        excluded |= {n.name for n in nodes if n.op_type in quantizable and n.op_type not in op_types}
    if keep:
        excluded |= {n.name for n in nodes if n.name not in set(keep)}
    if "" in excluded:
        raise OptionError("op_types_to_quantize / nodes_to_quantize would have to exclude nodes without a name: name the model's nodes first")
    # by name, not by op type: a graph-output Gemm that onnxq rewrites as MatMul keeps its name
    return sorted(glob.escape(n) for n in excluded)


def _feeds_of(reader: Any) -> Iterator[dict[str, np.ndarray]]:
    """``reader.get_next()`` until it returns None, each feed checked to be a mapping and its values made arrays."""
    k = 0
    while True:
        feeds = reader.get_next()
        if feeds is None:
            return
        if not isinstance(feeds, Mapping):
            raise DataError(f"{type(reader).__name__}.get_next() returned {type(feeds).__name__} (item {k}), "
                            "not a dict of input name -> array")
        k += 1
        yield {str(name): np.asarray(value) for name, value in feeds.items()}


class _ReaderAdapter(DataReader):
    """onnxq's reader over an ONNX Runtime ``CalibrationDataReader``: one batch per ``get_next()`` dict.

    onnxq reads its data more than once (the range pass, a histogram pass, the fidelity check). A
    reader with ``rewind()`` is rewound before every pass after the first; one without it is read
    once, and its feeds are kept in memory.
    """

    name = "ort-calibration-data-reader"

    def __init__(self, reader: Any, inputs: list) -> None:
        super().__init__(f"<{type(reader).__name__}>", None, inputs)
        self._reader = reader
        self._kept: list[dict[str, np.ndarray]] | None = None
        self._started = False
        self._rewinds = callable(getattr(reader, "rewind", None))

    def __iter__(self) -> Iterator[Batch]:
        if not self._rewinds:
            if self._kept is None:
                self._kept = list(_feeds_of(self._reader))
            feeds_list: Any = self._kept
        else:
            if self._started:
                self._reader.rewind()
            self._started = True
            feeds_list = _feeds_of(self._reader)
        for k, feeds in enumerate(feeds_list):
            yield Batch(dict(feeds), None, source=f"{self.spec} item {k}")


def reader_feeds(reader: Any) -> list[dict[str, np.ndarray]]:
    """All feed dicts of an ONNX Runtime ``CalibrationDataReader`` (rewound first when it can be), as ``onnxq.optimize(data=...)`` takes them.

    For using an existing reader with onnxq's own API (any method, target or bit width).
    """
    if not callable(getattr(reader, "get_next", None)):
        raise OptionError(f"{type(reader).__name__} has no get_next() method: not a CalibrationDataReader")
    if callable(getattr(reader, "rewind", None)):
        reader.rewind()
    return list(_feeds_of(reader))


def _graph_of(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The model's graph without its external weights (names, op types, inputs); onnxq's own error for a bad file."""
    try:
        return onnx.load(os.fspath(path), load_external_data=False)
    except Exception:
        from onnxq.graph.model_io import load_model

        return load_model(path)  # raises ModelError naming what is wrong


def quantize_static(
    model_input: str | Path | onnx.ModelProto,
    model_output: str | Path,
    calibration_data_reader: CalibrationDataReader | None = None,
    quant_format: Any = QuantFormat.QDQ,
    op_types_to_quantize: Sequence[str] | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
    activation_type: Any = QuantType.QInt8,
    weight_type: Any = QuantType.QInt8,
    nodes_to_quantize: Sequence[str] | None = None,
    nodes_to_exclude: Sequence[str] | None = None,
    use_external_data_format: bool = False,
    calibrate_method: Any = CalibrationMethod.MinMax,
    calibration_providers: Sequence[str] | None = None,
    extra_options: Mapping[str, Any] | None = None,
    calibration_cache_path: str | Path | None = None,
) -> Report:
    """Quantize ``model_input`` to a Q/DQ model at ``model_output`` with onnxq, taking ONNX Runtime's arguments.

    The arguments are those of ``onnxruntime.quantization.quantize_static`` (1.32) with its
    defaults; the module docstring says what each becomes. Enum arguments may be this module's
    members, ONNX Runtime's own, or their names. ``model_output`` is replaced if it exists (as
    ONNX Runtime does), never the input model. ``use_external_data_format`` is accepted: onnxq
    writes weights to ``<model_output>.data`` by itself when the model exceeds 2 GB. Returns
    onnxq's :class:`~onnxq.pipeline.Report` of the run (ONNX Runtime returns None).
    """
    if calibration_data_reader is None:
        raise OptionError("calibration_data_reader is required: onnxq calibrates on data (calibration_cache_path is not supported)")
    if not callable(getattr(calibration_data_reader, "get_next", None)):
        raise OptionError(f"calibration_data_reader must have a get_next() method (a CalibrationDataReader), "
                          f"not {type(calibration_data_reader).__name__}")
    graph = model_input if isinstance(model_input, onnx.ModelProto) else _graph_of(model_input)
    plan = translate(graph, quant_format=quant_format, op_types_to_quantize=op_types_to_quantize, per_channel=per_channel,
                     reduce_range=reduce_range, activation_type=activation_type, weight_type=weight_type,
                     nodes_to_quantize=nodes_to_quantize, nodes_to_exclude=nodes_to_exclude, calibrate_method=calibrate_method,
                     calibration_providers=calibration_providers, extra_options=extra_options,
                     calibration_cache_path=calibration_cache_path)
    if use_external_data_format:
        log.debug("use_external_data_format: onnxq writes external data by itself for models over 2 GB")
    reader = _ReaderAdapter(calibration_data_reader, model_inputs(graph))
    result = optimize(model_input, model_output, method=plan.method, options=plan.options, data=reader, target=plan.target,
                      exclude=plan.exclude, force=True, show_progress=False)
    return result.report
