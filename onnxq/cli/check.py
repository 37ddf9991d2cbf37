"""``onnxq check``: re-evaluate a quantized model against its FP32 source and a stored earlier result; exit 3 on a regression.

The baseline is the JSON document of ``onnxq optimize --eval-data DATA --json`` (or of an earlier
``onnxq check --json``, which has the same ``report`` and ``evaluation`` keys). Its evaluation row
of onnxq's model holds, per model output, the metrics against FP32; this command measures them
again for MODEL on ``--data`` and fails when one of the gated metrics fell by more than
``--max-regression`` (absolute: 0.002 is 0.2 points of accuracy), or when the fidelity check finds
a collapse. The FP32 model is the baseline's ``report.model`` path unless ``--fp32`` names it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from onnxq.cli.common import data_options, emit_json, parse_key_values
from onnxq.errors import OnnxqError, OptionError, QualityGateError

log = logging.getLogger("onnxq")

#: metrics where higher is better and values live in [0, 1], so one absolute threshold fits all
GATED_METRICS = ("accuracy", "top1_agreement", "cosine", "cosine_p1", "cosine_worst")
DEFAULT_METRICS = ("accuracy", "top1_agreement", "cosine")


@dataclass
class MetricChange:
    """One metric of one output: the baseline's value, this check's, and whether it regressed."""

    output: str
    metric: str
    baseline: float
    current: float
    regressed: bool

    @property
    def change(self) -> float:
        return self.current - self.baseline


@dataclass
class CheckResult:
    """The verdict of one check."""

    fp32: str
    model: str
    baseline: str
    max_regression: float
    metrics: list[str]
    changes: list[MetricChange] = field(default_factory=list)
    fidelity_warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[MetricChange]:
        return [c for c in self.changes if c.regressed]

    @property
    def passed(self) -> bool:
        return not self.regressions and not self.fidelity_warnings

    def failure(self) -> str:
        """One line naming the first regression (metric, output and both values), or the collapse."""
        if self.regressions:
            r = self.regressions[0]
            more = f" (and {len(self.regressions) - 1} more)" if len(self.regressions) > 1 else ""
            return (f"regression: {r.metric} of output '{r.output}' fell from {r.baseline:.4f} (baseline) to {r.current:.4f} "
                    f"({r.change:+.4f}, more than --max-regression {self.max_regression:g}){more}")
        return f"fidelity check failed: {self.fidelity_warnings[0]}"

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "fp32": self.fp32, "model": self.model, "baseline": self.baseline,
                "max_regression": self.max_regression, "metrics": self.metrics,
                "changes": [dict(dataclasses.asdict(c), change=c.change) for c in self.changes],
                "regressions": [f"{c.metric} of '{c.output}': {c.baseline:.6g} -> {c.current:.6g}" for c in self.regressions],
                "fidelity_warnings": self.fidelity_warnings, "notes": self.notes}


def read_baseline(path: Path) -> dict[str, Any]:
    """The baseline document; :class:`OnnxqError` (one line) when it is missing, not JSON or has no evaluation to compare with."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OnnxqError(f"baseline '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OnnxqError(f"baseline '{path}' is not a JSON document: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("report"), dict):
        raise OnnxqError(f"baseline '{path}' is not the JSON of `onnxq optimize --json` (no 'report' object)")
    return doc


def baseline_row(doc: Mapping[str, Any], path: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """The name and per-output metrics of onnxq's model in the baseline.

    From its ``evaluation`` rows (``optimize --eval-data``): the row that is neither FP32 nor ONNX
    Runtime's quantizer. Without them, from ``report.fidelity`` when that was measured on
    evaluation data (not in-sample on calibration data, which would not compare like for like).
    """
    rows = doc.get("evaluation")
    if isinstance(rows, list) and rows:
        ours = [r for r in rows if isinstance(r, dict) and r.get("name") != "fp32" and not str(r.get("name", "")).startswith("ort ")]
        if ours and isinstance(ours[0].get("outputs"), dict):
            return str(ours[0]["name"]), ours[0]["outputs"]
    fid = doc["report"].get("fidelity")
    if isinstance(fid, dict) and fid.get("data") == "evaluation" and isinstance(fid.get("outputs"), list) and fid["outputs"]:
        return "quantized", {o["name"]: {**o, "samples": fid.get("samples")} for o in fid["outputs"] if isinstance(o, dict) and "name" in o}
    raise OnnxqError(f"baseline '{path}' holds no evaluation of the quantized model: write it with "
                     "`onnxq optimize MODEL ... --eval-data DATA --json > BASELINE.json`")


def fp32_path(doc: Mapping[str, Any], baseline: Path, override: Path | None) -> Path:
    """``--fp32``, else the baseline's ``report.model`` (relative: to the working folder, then to the baseline's folder)."""
    if override is not None:
        return override
    stored = doc["report"].get("model")
    if not isinstance(stored, str) or not stored or stored == "<in-memory>":
        raise OnnxqError(f"baseline '{baseline}' stores no FP32 model path; name the FP32 model with --fp32")
    p = Path(stored)
    for candidate in ([p] if p.is_absolute() else [p, baseline.parent / p]):
        if candidate.is_file():
            return candidate
    raise OnnxqError(f"the FP32 model '{stored}' stored in baseline '{baseline}' is not there; name it with --fp32")


def compare_metrics(base: Mapping[str, Mapping[str, Any]], now: Mapping[str, Mapping[str, Any]], metrics: Sequence[str],
                    max_regression: float) -> list[MetricChange]:
    """Each gated metric the baseline and this check both have, per output, with its verdict."""
    missing = [o for o in base if o not in now]
    if missing:
        raise OnnxqError(f"the model has no output '{missing[0]}' that the baseline measured: is it the same model?")
    changes = []
    for output, b in base.items():
        for metric in metrics:
            old, new = b.get(metric), now[output].get(metric)
            if not isinstance(old, (int, float)) or not isinstance(new, (int, float)) or not math.isfinite(old):
                continue  # not measured in one of them (no labels, not class scores) or not finite in the baseline
            new = float(new) if math.isfinite(new) else -math.inf  # NaN outputs count as the worst value
            # 1e-9: a fall of exactly the threshold (one sample of 500 at 0.002) is within it despite float rounding
            changes.append(MetricChange(output, metric, float(old), new, float(old) - new > max_regression + 1e-9))
    return changes


def report_writer(path: Path, inputs: Sequence[Path], force: bool) -> Any:
    """The HTML writer for ``--report PATH``, checked before any work (output path, matplotlib); None, with a warning,
    when this onnxq has no HTML report module."""
    from onnxq.graph.model_io import ensure_output_path

    try:
        from onnxq import report_html
    except ImportError:
        log.warning("--report %s not written: this onnxq has no HTML report module (onnxq.report_html)", path)
        return None
    ensure_output_path(path, list(inputs), force)
    report_html.require_matplotlib()  # one line naming the extra, before the evaluation rather than after it
    return report_html


def verdict_section(result: CheckResult, html: Any) -> Any:
    """The check's verdict as the first section of the HTML report: the gate, then each gated metric against the baseline."""
    lines = [f"{'passed' if result.passed else 'FAILED'}: no gated metric ({', '.join(result.metrics)}) may fall by more than "
             f"{result.max_regression:g} against the baseline {result.baseline}"]
    if not result.passed:
        lines.append(result.failure())
    lines += result.fidelity_warnings + result.notes
    rows = [[c.output, c.metric, f"{c.baseline:.5f}", f"{c.current:.5f}", f"{c.change:+.5f}", "REGRESSED" if c.regressed else "ok"]
            for c in result.changes]
    return html.Section("Check against the baseline", lines, ["output", "metric", "baseline", "now", "change", "verdict"], rows,
                        "ok" if result.passed else "fail")


@click.command("check")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--baseline", "baseline", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The stored earlier result: `onnxq optimize ... --eval-data DATA --json` (or `onnxq check --json`) output.")
@click.option("--data", required=True, help="Evaluation data (the same as the baseline's --eval-data; labels give accuracy).")
@data_options
@click.option("--fp32", "fp32", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The FP32 source model (default: the baseline's report.model path).")
@click.option("--max-regression", type=float, default=0.002, show_default=True,
              help="Largest allowed fall of a gated metric against the baseline (absolute; 0.002 = 0.2 points).")
@click.option("--metric", "metrics", multiple=True, type=click.Choice(GATED_METRICS),
              help=f"Gated metric; repeat for several (default: {', '.join(DEFAULT_METRICS)}; each where measured).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the HTML report here (written before the verdict, so a failed gate still has it).")
@click.option("--force", is_flag=True, help="Replace an existing --report file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout (usable as the next --baseline).")
def command(model: Path, baseline: Path, data: str, data_opt: tuple[str, ...], reader: str | None, batch_size: int,
            max_samples: int | None, fp32: Path | None, max_regression: float, metrics: tuple[str, ...], report_path: Path | None,
            force: bool, as_json: bool) -> None:
    """Re-evaluate MODEL against its FP32 source and the --baseline result; exit 3 on a regression."""
    from onnxq.cli.evaluation import evaluation_data
    from onnxq.evaluate.compare import evaluate
    from onnxq.evaluate.fidelity import fidelity_of
    from onnxq.graph import model_io
    from onnxq.report import evaluation_table, fidelity_lines, table

    if not math.isfinite(max_regression) or max_regression < 0:
        raise OptionError(f"--max-regression must be a finite number >= 0, not {max_regression}")
    doc = read_baseline(baseline)
    row_name, base_outputs = baseline_row(doc, baseline)
    reference_path = fp32_path(doc, baseline, fp32)
    html = report_writer(report_path, [model, baseline, reference_path], force) if report_path is not None else None
    reference = model_io.load_model(reference_path)
    quantized = model_io.load_model(model)
    _, source, latency_feeds = evaluation_data(reference, data, parse_key_values(data_opt, "--data-opt"), reader, batch_size, max_samples)
    evals = evaluate(model_io.for_runtime(reference, reference_path), {row_name: model}, source, latency_feeds=latency_feeds, threads=(1,))
    row = next(e for e in evals if e.name == row_name)
    report = doc["report"]
    # the suggestion is about MODEL: the recipe onnxq wrote into its metadata, else the baseline's (an `mse` model checked
    # against an auto baseline that chose trt-entropy was told "try -p mse instead of -p trt-entropy")
    meta = {p.key: p.value for p in quantized.metadata_props}
    methods = meta["onnxq.method"].split("+") if meta.get("onnxq.method") else report.get("method") or ()
    fid = fidelity_of(row.outputs, reference, quantized, source, in_sample=False, methods=methods,
                      target=str(meta.get("onnxq.target") or report.get("target") or "ort"),
                      bits=int(meta.get("onnxq.bits") or report.get("bits") or 8),
                      fp32=next(e for e in evals if e.name == "fp32").outputs)
    gated = list(metrics or DEFAULT_METRICS)
    result = CheckResult(str(reference_path), str(model), str(baseline), max_regression, gated,
                         compare_metrics(base_outputs, row.outputs, gated, max_regression), list(fid.warnings))
    base_n = {int(m["samples"]) for m in base_outputs.values() if isinstance(m.get("samples"), (int, float))}
    now_n = {int(m["samples"]) for m in row.outputs.values()}
    if base_n and base_n != now_n:
        result.notes.append(f"the baseline was measured on {sorted(base_n)[0]} samples and this check on {sorted(now_n)[0]}: "
                            "different data, so the comparison is not like for like")
    if not result.changes:  # a gate that compares nothing would always pass
        raise OnnxqError(f"no gated metric ({', '.join(gated)}) was measured in both the baseline and this check "
                         "(accuracy needs labelled data, top1_agreement class-score outputs): choose others with --metric")
    for note in result.notes:
        log.warning("%s", note)

    # the baseline's run, with this model and this check's fidelity; its diagnostics described the baseline's model, so they go
    run = {k: v for k, v in report.items() if k != "diagnostics"}
    out_doc = {"report": {**run, "model": str(reference_path), "output": str(model), "fidelity": dataclasses.asdict(fid)},
               "evaluation": [dataclasses.asdict(e) for e in evals], "check": result.to_dict()}
    if html is not None and report_path is not None:
        html.write_html(out_doc, report_path, force=force, title=f"onnxq check: {model.name}", sections=[verdict_section(result, html)])
    if as_json:
        emit_json(out_doc)
    else:
        click.echo(evaluation_table(evals))
        rows = [[c.output, c.metric, f"{c.baseline:.5f}", f"{c.current:.5f}", f"{c.change:+.5f}", "REGRESSED" if c.regressed else "ok"]
                for c in result.changes]
        if rows:
            click.echo(f"\nagainst the baseline {baseline} (gate: no gated metric falls by more than {max_regression:g}):")
            click.echo(table(rows, ["output", "metric", "baseline", "now", "change", "verdict"]))
        for line in fidelity_lines(fid):
            click.echo(line)
        click.echo(f"check {'passed' if result.passed else 'FAILED'}: {model} against {baseline}")
    if not result.passed:
        raise QualityGateError(result.failure())
