"""Readable summaries and tables of reports and evaluations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from onnxq.evaluate.compare import Evaluation


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
    """One row per model: accuracy, top-1 agreement, cosine, SQNR, size, latency, int kernels."""
    lat_keys = sorted({k for e in evals for k in e.latency_ms})
    header = ["model", "accuracy", "top1-agree", "cosine", "sqnr-dB", "size"] + [f"latency {k} (ms)" for k in lat_keys] + ["int-kernels"]
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
                _fmt(h.get("sqnr_db"), ".1f"),
                human_bytes(e.size_bytes),
            ]
            + [_fmt(e.latency_ms.get(k), ".3f") for k in lat_keys]
            + [f"{ik['integer_fraction'] * 100:.0f}%" if ik else "-"]
        )
    return table(rows, header)


def run_summary(report: dict[str, Any]) -> str:
    """A few lines about one optimize run."""
    lines = [
        f"method {'+'.join(report['method'])}, target {report['target']}, {report['bits']}-bit: "
        f"{report['quantized_activations']} activations and {report['quantized_weights']} weights quantized "
        f"({report['layers']} layers), calibration {report['calibration_seconds']:.2f} s, total {report['total_seconds']:.2f} s",
    ]
    if report.get("int7_note"):
        lines.append("note: " + report["int7_note"])
    for item in report.get("left_in_float", []):
        lines.append(f"left in float: {item['node']} ({item['reason']})")
    for name, section in (report.get("methods") or {}).items():
        lines += [f"{name}: {line}" for line in (section.get("summary") or [] if isinstance(section, dict) else [])]
    if report.get("output"):
        lines.append(f"wrote {report['output']}")
    return "\n".join(lines)
