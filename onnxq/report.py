"""Readable summaries and tables of reports and evaluations, and the JSON Schema of the report."""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from typing import Any

from onnxq.evaluate.compare import Evaluation
from onnxq.pipeline.report import AutoReport, Fidelity, Report


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return format(v, spec)
    return str(v)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain fixed-width text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def evaluation_table(evals: Sequence[Evaluation]) -> str:
    """One row per model: accuracy, top-1 agreement, cosine (per-sample mean, worst, 1st percentile), SQNR, size, latency, int kernels;
    then, for class scores, each quantized model's worst FP32 class by top-1 agreement."""
    lat_keys = sorted({k for e in evals for k in e.latency_ms})
    header = ["model", "accuracy", "top1-agree", "cosine", "cos-worst", "cos-p1", "sqnr-dB", "size"] + [f"latency {k} (ms)" for k in lat_keys] + ["int-kernels"]
    rows = []
    for e in evals:
        h = e.headline()
        acc = h.get("accuracy")
        ik = e.integer_kernels
        rows.append(
            [
                e.name,
                _fmt(acc * 100, ".2f") + "%" if acc is not None else "-",
                _fmt(h.get("top1_agreement"), ".4f"),
                _fmt(h.get("cosine"), ".5f"),
                _fmt(h.get("cosine_worst"), ".5f"),
                _fmt(h.get("cosine_p1"), ".5f"),
                _fmt(h.get("sqnr_db"), ".1f"),
                human_bytes(e.size_bytes),
            ]
            + [_fmt(e.latency_ms.get(k), ".3f") for k in lat_keys]
            + [f"{ik['integer_fraction'] * 100:.0f}%" if ik else "-"]
        )
    lines = [table(rows, header)]
    worst = [(e.name, e.headline()) for e in evals[1:] if "worst_class" in e.headline()]
    if worst:  # the worst-case view of class scores: the FP32 class whose samples the quantized model agrees on least
        lines.append("\nworst class (top-1 agreement among the samples FP32 puts in it): " + "; ".join(
            f"{name}: class {int(h['worst_class'])} {h['worst_class_agreement']:.3f} of {int(h['worst_class_samples'])}" for name, h in worst))
    return "\n".join(lines)


def run_summary(report: Report) -> str:
    """A few lines about one optimize run."""
    lines = [
        f"method {'+'.join(report.method)}, target {report.target}, {report.bits}-bit: "
        f"{report.quantized_activations} activations and {report.quantized_weights} weights quantized "
        f"({report.layers} layers), calibration {report.calibration_seconds:.2f} s, total {report.total_seconds:.2f} s",
    ]
    if report.int7_note:
        lines.append("note: " + report.int7_note)
    for item in report.left_in_float:
        lines.append(f"left in float: {item.node} ({item.reason})")
    for change in report.quantized_rewrites:
        err = "not measured" if change.output_error is None else f"{change.output_error:.3g}"
        lines.append(f"{change.method} changed the model after quantization: {len(change.initializers_changed)} initializers changed, "
                     f"{len(change.initializers_added)} added, {len(change.nodes_added)} nodes added, {len(change.nodes_removed)} removed; "
                     f"relative output error vs float {err}")
    for name, section in report.methods.items():
        lines += [f"{name}: {line}" for line in (section.get("summary") or [] if isinstance(section, dict) else [])]
    if report.auto is not None:
        lines += auto_lines(report.auto)
    if report.fidelity is not None:
        lines += fidelity_lines(report.fidelity)
    if report.output:
        lines.append(f"wrote {report.output}")
    return "\n".join(lines)


def auto_lines(auto: AutoReport) -> list[str]:
    """``-p auto``'s search: every candidate with its mean and worst-case figures, the choice and why, the sensitivity table."""
    metric = "drop-pt" if auto.metric == "drop" else auto.metric
    sign = -1.0 if auto.metric == "drop" else 1.0
    val = lambda v: _fmt(None if v is None else sign * v, ".2f" if auto.metric == "drop" else ".5f")  # noqa: E731
    rows = []
    for c in auto.candidates:
        rows.append([("* " if c.name == auto.chosen else "  ") + c.name, c.stage, val(c.score), val(c.score_worst), _fmt(c.spread, ".5f"), _fmt(c.spread_bound, ".5f"), val(c.score_bound),
                     _fmt(c.cosine_worst, ".5f"), _fmt(c.cosine_p1, ".5f"), _fmt(c.agreement_worst, ".4f"),
                     f"{c.worst_output} {_fmt(c.worst_output_cosine, '.4f')}" if c.worst_output else "-",
                     f"{c.worst_class} {_fmt(c.worst_class_agreement, '.3f')}" if c.worst_class is not None else "-",
                     human_bytes(c.size_bytes), _fmt(c.latency_ms, ".3f"), f"{c.seconds:.1f}", "yes" if c.meets_target else c.error or "no"])
    target = "none (best full-integer recipe)" if auto.threshold is None else f"{metric} {'<=' if auto.metric == 'drop' else '>='} {val(auto.threshold)}"
    lines = [f"auto: target {target}; scored on {auto.heldout_samples} held-out samples ({auto.heldout}), calibrated on "
             f"{auto.calibration_samples}, {auto.resamples} disjoint resamples for the finalists; {auto.seconds:.1f} s of a "
             f"{auto.time_budget_s:.0f} s budget{' (spent)' if auto.budget_exhausted else ''}",
             table(rows, ["candidate", "stage", metric, "worst-resample", "spread", "spread-95", "bound", "cos-worst", "cos-p1", "agree-worst", "worst output",
                          "worst class", "size", "latency ms", "s", "meets"])]
    if auto.faster_float:
        ms = auto.faster_float_model_ms
        whole = f"; the first recipe {ms[1]:.3f} ms against {ms[0]:.3f} ms full integer" if len(ms) == 2 else ""
        kept = any(r.kept_float for r in auto.faster_float)
        lines.append(f"auto: {'left float in every candidate' if kept else 'left float in every candidate but the chosen one (all-integer check)'}"
                     f", faster in float on this machine{whole} (ONNX Runtime CPU, 1 sample, 1 thread): "
                     + ", ".join(f"{r.node} {_fmt(r.float_ms, '.4f')}/{_fmt(r.int_ms, '.4f')} ms" for r in auto.faster_float))
    if auto.sensitivity:
        lines.append("auto: per-layer sensitivity (only this layer float) and measured latency (ONNX Runtime CPU, 1 sample, 1 thread)"
                     + (f", cached in {auto.latency_cache}" if auto.latency_cache else ""))
        lines.append(table([[r.node, r.op_type, val(r.score_float), _fmt(None if r.gain is None else sign * r.gain, ".5f"), _fmt(r.float_ms, ".4f"),
                             _fmt(r.int_ms, ".4f"), _fmt(r.float_cost_ms, ".4f"), "float" if r.kept_float else ""] for r in auto.sensitivity],
                           ["layer", "op", metric, "gain", "float ms", "int ms", "float cost ms", "chosen"]))
    if auto.by_error_alone is not None:
        b = auto.by_error_alone
        lines.append(f"auto: by sensitivity alone (latency ignored): {len(b.float_layers)} float layer(s), {metric} {val(b.score)}, "
                     f"latency {_fmt(b.latency_ms, '.3f')} ms")
    lines += [f"auto: {n}" for n in auto.notes]
    lines.append(f"auto: chose {auto.chosen}: {auto.reason}")
    return lines


def fidelity_lines(fid: Fidelity) -> list[str]:
    """The fidelity check in a few lines: per-output figures, then what collapsed, where, and what to try."""
    where = f"in-sample, {fid.samples} calibration samples" if fid.in_sample else f"{fid.samples} evaluation samples"
    if fid.error is not None:
        return [f"fidelity check ({where}) could not run: {fid.error}"]
    lines = []
    for o in fid.outputs:
        top1 = f", top-1 agreement {o.top1_agreement:.3f}" if o.top1_agreement is not None else ""
        neighbours = f", neighbour agreement {o.neighbour_agreement:.3f}" if o.neighbour_agreement is not None else ""
        positions = ""
        if o.position_agreement is not None:  # an ArgMax map counts every position; class scores only where FP32's winner is clear
            positions = (f", class ids equal per position {o.position_agreement:.3f}" if o.role == "argmax"
                         else f", arg-max agreement per position {o.position_agreement:.3f} (where FP32's winner is clear)")
        if o.decoded_agreement is not None:
            positions += f", decoded agreement {o.decoded_agreement:.3f} ({_fmt(o.decoded_exact, '.3f')} of the samples decoded as FP32's)"
        if o.worst_part_cosine is not None:
            positions += f", worst part ({o.worst_part}) cosine {o.worst_part_cosine:.4f}"
        if o.label_agreement is not None:
            positions += f", label agreement {o.label_agreement:.3f}"
        if o.exact_agreement is not None and o.role != "argmax":
            positions += f", values equal to FP32's {o.exact_agreement:.3f}"
        if o.length_differs:
            positions += f", length differs from FP32 in {100 * o.length_differs:.0f} % of batches"
        lines.append(f"fidelity ({where}) {o.name}: cosine {_fmt(o.cosine, '.4f')} (worst {_fmt(o.cosine_worst, '.4f')}, "
                     f"1st pct {_fmt(o.cosine_p1, '.4f')}), SQNR {_fmt(o.sqnr_db, '.1f')} dB{top1}{positions}{neighbours}")
    if fid.warned:
        lines += [f"WARNING: {w}" for w in fid.warnings]
        if fid.worst_layers:
            lines.append("WARNING: worst layers (SQNR vs FP32): " + ", ".join(f"{w.tensor} {_fmt(w.sqnr_db, '.1f')} dB" for w in fid.worst_layers))
        if fid.suggestion:
            lines.append(f"WARNING: {fid.suggestion}")
    return lines


# ---------------------------------------------------------------------------------------------
# JSON Schema of the report, generated from its dataclasses
# ---------------------------------------------------------------------------------------------

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def report_schema() -> dict[str, Any]:
    """The JSON Schema of :meth:`Report.to_dict` (``onnxq schema report``)."""
    defs: dict[str, Any] = {}
    root = dataclass_schema(Report, defs)
    return {"$schema": SCHEMA_DIALECT, "title": "onnxq optimize report",
            **root, "$defs": defs}


def dataclass_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    """An object schema of dataclass ``cls`` from its type hints; nested dataclasses go into ``defs``."""
    hints = typing.get_type_hints(cls)
    props: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        props[f.name] = type_schema(hints[f.name], defs)
        if "description" in f.metadata:
            props[f.name] = {"description": f.metadata["description"], **props[f.name]}
    doc = (cls.__doc__ or "").strip().splitlines()
    out: dict[str, Any] = {"type": "object", "properties": props, "required": [f.name for f in dataclasses.fields(cls)],
                           "additionalProperties": False}
    if doc:
        out["description"] = doc[0]
    return out


def type_schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of one Python type as :func:`~onnxq.pipeline.report.jsonable` writes it."""
    if tp is Any:
        return {}
    if tp is type(None):
        return {"type": "null"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        # a non-finite float is written as null
        return {"type": ["number", "null"]}
    if tp is str:
        return {"type": "string"}
    if dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # placeholder against recursion
            defs[tp.__name__] = dataclass_schema(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [type_schema(a, defs) for a in args]}
    if origin in (list, tuple, collections.abc.Sequence):
        return {"type": "array", "items": type_schema(args[0], defs) if args else {}}
    if origin in (dict, collections.abc.Mapping):
        return {"type": "object", "additionalProperties": type_schema(args[1], defs) if args else {}}
    raise TypeError(f"no JSON Schema for type {tp!r}")
