"""One self-contained HTML file of a run: summary, fidelity, and charts of where the error comes from.

:func:`render_html` takes an ``optimize`` :class:`~onnxq.pipeline.report.Report` (or its JSON form,
or the whole ``onnxq optimize --json`` / ``onnxq compare --json`` document) and returns the HTML;
:func:`write_html` writes it atomically. Charts are drawn by matplotlib and inlined as SVG (no
script, no network: the file opens anywhere, CI artefact viewers included); docs/report.md says
what each chart shows and why matplotlib rather than plotly. Every section is optional: a report
shows what its document holds (the charts of ``report.diagnostics`` need ``--report`` or
``--diagnostics`` on the run).

matplotlib is the ``report`` extra (``pip install 'onnxq[report]'``); without it rendering fails
with one line naming the extra.
"""

from __future__ import annotations

import dataclasses
import html
import io
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxq.errors import OnnxqError, OutputError

__all__ = ["INSTALL_HINT", "Section", "normalize_document", "render_html", "require_matplotlib", "write_html", "write_text_atomic"]

INSTALL_HINT = "the HTML report needs matplotlib: pip install 'onnxq[report]'"

#: how many worst layers the per-layer chart labels, and the most histograms / weight charts drawn
WORST_LABELLED = 5

#: the colour of each calibrator's threshold line (the same in every histogram); others cycle
CALIBRATOR_COLOURS = {"minmax": "#7f7f7f", "percentile": "#2ca02c", "mse": "#d62728", "trt-entropy": "#1f77b4",
                      "trt-entropy-exact": "#9467bd"}


@dataclass
class Section:
    """A section a caller adds at the top of the report (e.g. a CI verdict): a title, text lines and an optional table.

    ``status`` colours the title: ``"ok"`` (green), ``"fail"`` (red) or ``"info"``.
    """

    title: str
    lines: Sequence[str] = ()
    header: Sequence[str] = ()
    rows: Sequence[Sequence[Any]] = ()
    status: str = "info"


@dataclass
class _Doc:
    """What a document holds, whichever command wrote it."""

    report: dict[str, Any] | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    #: compare --layers: candidate name -> {tensor: {sqnr_db, cosine}}
    compare_layers: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    quality_gate: str | None = None
    notes: list[str] = field(default_factory=list)


def normalize_document(doc: Any) -> dict[str, Any]:
    """The parts of ``doc`` the report reads: ``report``, ``evaluations``, ``compare_layers``, ``quality_gate``, ``notes``.

    ``doc`` is a :class:`~onnxq.pipeline.report.Report`, its ``to_dict()``, the ``onnxq optimize
    --json`` document (``{"report": ..., "evaluation": [...]}``) or the ``onnxq compare --json`` one
    (``{"evaluations": [...], "layers": {...}}``). Raises :class:`OnnxqError` for anything else.
    """
    return dataclasses.asdict(_normalize(doc))


def _normalize(doc: Any) -> _Doc:
    if hasattr(doc, "to_dict") and callable(doc.to_dict):
        doc = doc.to_dict()
    if not isinstance(doc, Mapping):
        raise OnnxqError(f"not an onnxq report document: expected a JSON object, got {type(doc).__name__}")
    out = _Doc()
    if "report" in doc and isinstance(doc["report"], Mapping):
        out.report = dict(doc["report"])
        out.evaluations = [_as_dict(e) for e in doc.get("evaluation") or []]
        out.quality_gate = doc.get("quality_gate")
        if doc.get("evaluation_error"):
            out.notes.append(f"the evaluation failed: {doc['evaluation_error']}")
    elif "method" in doc and "target" in doc:
        out.report = dict(doc)
    elif "evaluations" in doc:
        out.evaluations = [_as_dict(e) for e in doc.get("evaluations") or []]
        out.compare_layers = {k: dict(v) for k, v in (doc.get("layers") or {}).items() if v}
        out.notes += [str(n) for n in (doc.get("tensorrt") or {}).get("notes", [])]
    else:
        raise OnnxqError("not an onnxq report document: expected the JSON of `onnxq optimize --json` or `onnxq compare --json` "
                         "(a 'report' or 'evaluations' key)")
    return out


def _as_dict(e: Any) -> dict[str, Any]:
    return dataclasses.asdict(e) if dataclasses.is_dataclass(e) and not isinstance(e, type) else dict(e)


# ---------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#555;margin:0 0 12px}.ok{color:#137333}.fail{color:#b3261e}.warn{color:#9a6700}
table{border-collapse:collapse;font-size:13px;margin:6px 0;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:0;background:#fff;border:1px solid #e3e3e3;padding:6px}figure svg{width:100%;height:auto}
.cols{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:24px}.grid{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:10px}
figcaption{font-size:13px;color:#444;margin:4px 6px}
ul{margin:4px 0 4px 18px;padding:0;font-size:13px}details{font-size:13px;margin:4px 0}li{margin:2px 0}code{font-size:12px}
.kv td:first-child{color:#555;white-space:nowrap}
"""


def render_html(doc: Any, *, title: str | None = None, sections: Sequence[Section] = ()) -> str:
    """The report of ``doc`` as one self-contained HTML page (inline SVG charts, no script, no network).

    ``doc``: a :class:`~onnxq.pipeline.report.Report`, its ``to_dict()``, or the whole document
    ``onnxq optimize --json`` or ``onnxq compare --json`` prints. ``sections`` go first, after the
    title (a CI verdict, a baseline comparison). Raises :class:`OnnxqError` when ``doc`` is not a
    report document or matplotlib (the ``report`` extra) is missing.
    """
    d = _normalize(doc)
    require_matplotlib()
    rep = d.report or {}
    body: list[str] = []
    heading = title or (f"onnxq report: {Path(rep['model']).name}" if rep.get("model") else "onnxq comparison")
    body.append(f"<h1>{_e(heading)}</h1>")
    if rep:
        body.append(f"<p class='sub'>{_e(_subtitle(rep))}</p>")
    for s in sections:
        body.append(_section_html(s))
    if rep:
        # the run and its verdict side by side: the charts start higher on the page
        body.append(f"<div class='cols'><div>{_summary_html(rep, d.quality_gate)}</div><div>{_fidelity_html(rep.get('fidelity'))}</div></div>")
    if d.evaluations:
        body.append(_evaluation_html(d.evaluations))
    for note in d.notes:
        body.append(f"<p class='warn'>{_e(note)}</p>")
    charts = _Charts()
    diag = rep.get("diagnostics") or {}
    if diag.get("error"):
        body.append(f"<p class='warn'>diagnostics could not be collected: {_e(diag['error'])}</p>")
    layer_series = _layer_series(rep, d.compare_layers)
    if layer_series:
        body.append(charts.layers(layer_series, diag))
    elif rep:
        body.append("<h2>Per-layer error</h2><p class='sub'>No per-layer data in this document (<code>onnxq optimize ... --report "
                    "FILE.html</code> or <code>--diagnostics</code> collects it; <code>onnxq compare --report</code> measures it).</p>")
    if diag.get("activations"):
        body.append(charts.histograms(diag["activations"]))
    if diag.get("weights"):
        body.append(charts.weights(diag["weights"]))
    auto = _auto(rep)
    if auto is not None:
        body.append(charts.candidates(auto))
    if diag.get("lint") is not None:
        body.append(_lint_html(diag["lint"]))
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>{_e(heading)}</title><style>{_CSS}</style></head>\n<body><main>\n" + "\n".join(b for b in body if b)
            + "\n</main></body></html>\n")


def write_html(doc: Any, path: str | os.PathLike[str], *, force: bool = False, title: str | None = None,
               sections: Sequence[Section] = ()) -> Path:
    """Render ``doc`` (:func:`render_html`) and write it to ``path`` atomically (temporary file, then rename).

    Without ``force`` an existing file is refused (:class:`OutputError`); a folder always is.
    """
    _check_target(Path(path), force)  # before the rendering: a refused path costs nothing
    text = render_html(doc, title=title, sections=sections)
    return write_text_atomic(path, text, force=force)


def write_text_atomic(path: str | os.PathLike[str], text: str, *, force: bool = False) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, renamed into place when complete."""
    out = Path(path)
    _check_target(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise OutputError(f"cannot write report '{out}': {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write report '{out}': {exc.strerror}") from None
        raise
    return out


def _check_target(out: Path, force: bool) -> None:
    if out.is_dir():
        raise OutputError(f"report '{out}' is a directory")
    if out.exists() and not force:
        raise OutputError(f"report '{out}' already exists (use --force to replace it)")


def require_matplotlib() -> None:
    """Raise :class:`OnnxqError` with :data:`INSTALL_HINT` when matplotlib (the ``report`` extra) is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OnnxqError(INSTALL_HINT) from None


# ---------------------------------------------------------------------------------------------
# tables and text
# ---------------------------------------------------------------------------------------------

def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else format(v, spec)
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1, cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = "".join(f"<td class='num'>{_e(c)}</td>" if i >= numeric_from else f"<td>{_e(c)}</td>" for i, c in enumerate(r))
        body.append(f"<tr>{cells}</tr>")
    return f"<table{f' class={cls!r}' if cls else ''}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _subtitle(rep: Mapping[str, Any]) -> str:
    return (f"{'+'.join(rep.get('method') or [])} · target {rep.get('target')} · {rep.get('bits')}-bit · "
            f"{rep.get('quantized_activations')} activations and {rep.get('quantized_weights')} weights quantized "
            f"({rep.get('layers')} layers)")


def _section_html(s: Section) -> str:
    cls = {"ok": "ok", "fail": "fail"}.get(s.status, "")
    out = [f"<h2 class='{cls}'>{_e(s.title)}</h2>"]
    if s.lines:
        out.append("<ul>" + "".join(f"<li>{_e(line)}</li>" for line in s.lines) + "</ul>")
    if s.rows:
        out.append(_table(s.header, s.rows))
    return "\n".join(out)


def _summary_html(rep: Mapping[str, Any], gate: str | None) -> str:
    rows = [("model", rep.get("model")), ("output", rep.get("output") or "not written"),
            ("methods", ", ".join(rep.get("method") or [])), ("target", rep.get("target")), ("bits", rep.get("bits")),
            ("quantized", f"{rep.get('quantized_activations')} activations, {rep.get('quantized_weights')} weights, {rep.get('layers')} layers"),
            ("shape inference", rep.get("shape_inference")),
            ("time", f"calibration {_fmt(rep.get('calibration_seconds'), '.2f')} s, refine {_fmt(rep.get('refine_seconds'), '.2f')} s, "
                     f"total {_fmt(rep.get('total_seconds'), '.2f')} s")]
    if gate:
        rows.append(("quality gate", gate))
    if rep.get("int7_note"):
        rows.append(("INT7", rep["int7_note"]))
    for name, nodes in (rep.get("float_rewrites") or {}).items():
        rows.append((f"float rewrite {name}", f"{len(nodes)} nodes"))
    out = ["<h2>Run</h2>", "<table class='kv'><tbody>"
           + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows) + "</tbody></table>"]
    lines = []
    for name, section in (rep.get("methods") or {}).items():
        if isinstance(section, Mapping):
            lines += [f"{name}: {line}" for line in section.get("summary") or []]
    for change in rep.get("quantized_rewrites") or []:
        err = change.get("output_error")
        lines.append(f"{change.get('method')} changed the model after quantization: {len(change.get('initializers_changed') or [])} "
                     f"initializers changed; relative output error vs float {_fmt(err, '.3g')}")
    if lines:
        out.append("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in lines) + "</ul>")
    floats = rep.get("left_in_float") or []
    if floats:  # a transformer leaves dozens: folded, so the charts stay near the top
        items = "".join(f"<li>{_e(i.get('node'))} ({_e(i.get('reason'))})</li>" for i in floats)
        out.append(f"<details><summary>{len(floats)} node{'s' if len(floats) != 1 else ''} left in float</summary><ul>{items}</ul></details>")
    return "\n".join(out)


def _fidelity_html(fid: Mapping[str, Any] | None) -> str:
    if not fid:
        return "<h2>Fidelity</h2><p class='sub'>The fidelity check did not run.</p>"
    where = (f"in-sample, {fid.get('samples')} calibration samples" if fid.get("in_sample")
             else f"{fid.get('samples')} evaluation samples")
    out = [f"<h2>Fidelity <span class='sub'>({_e(where)})</span></h2>"]
    if fid.get("error"):
        out.append(f"<p class='fail'>The check could not run: {_e(fid['error'])}</p>")
        return "\n".join(out)
    outputs = fid.get("outputs") or []
    rows = [[o.get("name"), _fmt(o.get("cosine"), ".5f"), _fmt(o.get("cosine_worst"), ".5f"), _fmt(o.get("cosine_p1"), ".5f"),
             _fmt(o.get("sqnr_db"), ".1f"), _fmt(o.get("top1_agreement"), ".4f")] for o in outputs]
    header = ["output", "cosine", "worst sample", "1st pct", "SQNR dB", "top-1 agreement"]
    if any(o.get("neighbour_agreement") is not None for o in outputs):  # embedding-like outputs only: no empty column otherwise
        header.append("neighbour agreement")
        for row, o in zip(rows, outputs):
            row.append(_fmt(o.get("neighbour_agreement"), ".4f"))
    out.append(_table(header, rows))
    verdict = "<p class='fail'>" if fid.get("warned") else "<p class='ok'>"
    if fid.get("warned"):
        items = list(fid.get("warnings") or [])
        if fid.get("worst_layers"):
            items.append("worst layers: " + ", ".join(f"{w.get('node')} ({_fmt(w.get('sqnr_db'), '.1f')} dB)" for w in fid["worst_layers"]))
        if fid.get("suggestion"):
            items.append(str(fid["suggestion"]))
        out.append(verdict + "Collapse against FP32:</p><ul>" + "".join(f"<li class='fail'>{_e(x)}</li>" for x in items) + "</ul>")
    else:
        out.append(verdict + "No output collapsed against FP32.</p>")
    return "\n".join(out)


def _evaluation_html(evals: Sequence[Mapping[str, Any]]) -> str:
    lat_keys = sorted({k for e in evals for k in (e.get("latency_ms") or {})})
    rows = []
    for e in evals:
        h = next(iter((e.get("outputs") or {}).values()), {})
        acc = h.get("accuracy")
        ik = e.get("integer_kernels") or {}
        size = e.get("size_bytes")
        rows.append([e.get("name"), f"{acc * 100:.2f}%" if isinstance(acc, (int, float)) else "–", _fmt(h.get("top1_agreement"), ".4f"),
                     _fmt(h.get("cosine"), ".5f"), _fmt(h.get("cosine_worst"), ".5f"), _fmt(h.get("sqnr_db"), ".1f"),
                     f"{size / 1024:.1f} KB" if isinstance(size, int) else "–"]
                    + [_fmt((e.get("latency_ms") or {}).get(k), ".3f") for k in lat_keys]
                    + [f"{ik['integer_fraction'] * 100:.0f}%" if isinstance(ik.get("integer_fraction"), (int, float)) else "–"])
    header = ["model", "accuracy", "top-1 agree", "cosine", "worst sample", "SQNR dB", "size"] + [f"latency {k} ms" for k in lat_keys] + ["int kernels"]
    return "<h2>Evaluation</h2>" + _table(header, rows)


def _lint_html(findings: Sequence[Mapping[str, Any]]) -> str:
    if not findings:
        return "<h2>TensorRT Q/DQ rules</h2><p class='ok'>No findings: the model passes onnxq's TensorRT Q/DQ rules.</p>"
    rows = [[f.get("severity"), f.get("rule"), f.get("node"), f.get("message")] for f in findings]
    errors = sum(1 for f in findings if f.get("severity") == "error")
    return (f"<h2>TensorRT Q/DQ rules</h2><p class='{'fail' if errors else 'warn'}'>{errors} errors, {len(findings) - errors} warnings</p>"
            + _table(["severity", "rule", "node", "message"], rows, numeric_from=99))


# ---------------------------------------------------------------------------------------------
# chart data
# ---------------------------------------------------------------------------------------------

def _layer_series(rep: Mapping[str, Any], compare_layers: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, list[dict[str, Any]]]:
    """Series name -> rows {tensor, node, sqnr_db, cosine} in graph order."""
    diag = rep.get("diagnostics") or {}
    if diag.get("layers"):
        return {"quantized": list(diag["layers"])}
    # compare: one series per model, on one x axis (a tensor one model lacks is a gap in its line)
    order: dict[str, None] = {}
    for rows in compare_layers.values():
        order.update(dict.fromkeys(rows))
    return {name: [{"tensor": t, "node": t, **(rows.get(t) or {"sqnr_db": None, "cosine": None})} for t in order]
            for name, rows in compare_layers.items() if rows}


def _auto(rep: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``-p auto`` search's section (``report.auto``; a plugin's ``extra.auto`` also counts) when it has candidates."""
    for holder in (rep.get("auto"), (rep.get("extra") or {}).get("auto")):
        if isinstance(holder, Mapping) and isinstance(holder.get("candidates"), list) and holder["candidates"]:
            return dict(holder, candidates=[c for c in holder["candidates"] if isinstance(c, Mapping)])
    return None


#: candidate keys read as the fidelity axis (the search's own score first) and as the latency axis
FIDELITY_KEYS = ("score", "cosine", "accuracy", "top1_agreement", "sqnr_db")
LATENCY_KEYS = ("latency_ms", "latency", "ms")


def _number(c: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, float] | None:
    for k in keys:
        v = c.get(k)
        if isinstance(v, Mapping):  # e.g. latency_ms: {"1t": 0.05}
            v = next((x for x in v.values() if isinstance(x, (int, float))), None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return k, float(v)
    for k, v in c.items():  # a nested metrics mapping
        if isinstance(v, Mapping) and (found := _number(v, keys)) is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------
# charts (matplotlib -> inline SVG)
# ---------------------------------------------------------------------------------------------

_ID = re.compile(r'\bid="([^"]+)"')
_REF = re.compile(r'(url\(#|xlink:href="#|href="#)([^)"]+)')


class _Charts:
    """Draws each chart as a matplotlib figure and inlines it as SVG with ids unique in the page."""

    def __init__(self) -> None:
        import matplotlib

        self.rc = {"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10, "axes.spines.top": False, "axes.spines.right": False,
                   "svg.hashsalt": "onnxq"}
        self.mpl = matplotlib

    def figure(self, width: float, height: float):
        from matplotlib.figure import Figure

        with self.mpl.rc_context(self.rc):
            return Figure(figsize=(width, height), layout="constrained")

    def svg(self, fig: Any, chart_id: str) -> str:
        buf = io.StringIO()
        with self.mpl.rc_context(self.rc):
            fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": "onnxq (matplotlib)"})
        text = buf.getvalue()
        text = text[text.index("<svg"):]  # drop the XML declaration and DOCTYPE: inline SVG in HTML
        # matplotlib numbers its ids per figure (figure_1, patch_1, ...): prefix them, so every id is unique in the page
        text = _ID.sub(lambda m: f'id="{chart_id}-{m.group(1)}"', text)
        text = _REF.sub(lambda m: f"{m.group(1)}{chart_id}-{m.group(2)}", text)
        return text

    def wrap(self, chart_id: str, heading: str, figs_and_captions: Sequence[tuple[str, str]], intro: str = "", grid: bool = False,
             after: str = "") -> str:
        """A chart section: heading, intro, the figures with their captions, then ``after`` (HTML, e.g. a table)."""
        out = [f"<section id='{chart_id}'><h2>{_e(heading)}</h2>"]
        if intro:
            out.append(f"<p class='sub'>{intro}</p>")
        out.append("<div class='grid'>" if grid else "<div>")
        for svg, caption in figs_and_captions:
            out.append(f"<figure>{svg}<figcaption>{caption}</figcaption></figure>")
        out.append("</div>" + after + "</section>")
        return "\n".join(out)

    # -- per-layer SQNR and cosine, in graph order ------------------------------------------------

    def layers(self, series: Mapping[str, Sequence[Mapping[str, Any]]], diag: Mapping[str, Any]) -> str:
        with self.mpl.rc_context(self.rc):
            first = next(iter(series.values()))
            n = len(first)
            fig = self.figure(10.0, 4.2 if n <= 40 else 3.6)
            ax1, ax2 = fig.subplots(2, 1, sharex=True)
            for k, (name, rows) in enumerate(series.items()):
                x = list(range(len(rows)))
                sq = [_finite_or_nan(r.get("sqnr_db")) for r in rows]
                cos = [_finite_or_nan(r.get("cosine")) for r in rows]
                label = name if len(series) > 1 else "SQNR vs FP32"
                (l1,) = ax1.plot(x, sq, marker="o", ms=3, lw=1.2, label=label)
                l1.set_gid(f"series-sqnr-{k}")
                (l2,) = ax2.plot(x, cos, marker="o", ms=3, lw=1.2, color=l1.get_color(), label=name if len(series) > 1 else "cosine vs FP32")
                l2.set_gid(f"series-cosine-{k}")
            ax1.set_title("Per-layer SQNR vs FP32 (graph order)")
            ax1.set_ylabel("SQNR (dB)")
            ax2.set_title("Per-layer cosine vs FP32")
            ax2.set_ylabel("cosine")
            ax2.set_xlabel("layer (graph order)")
            worst = sorted(range(n), key=lambda i: _key(first[i].get("sqnr_db")))[:WORST_LABELLED]
            pts = [(i, _finite_or_nan(first[i].get("sqnr_db"))) for i in worst]
            pts = [(i, v) for i, v in pts if not math.isnan(v)]
            if pts:
                marks = ax1.scatter([i for i, _ in pts], [v for _, v in pts], s=36, facecolors="none", edgecolors="#b3261e", zorder=3,
                                    label="worst layers")
                marks.set_gid("series-worst")
                if n > 40:  # no names on the axis: number the worst points (the table below names them)
                    for i, v in pts:
                        ax1.annotate(str(i), (i, v), textcoords="offset points", xytext=(0, -12), ha="center", fontsize=7, color="#b3261e")
            if n <= 40:
                ax2.set_xticks(range(n), [_short(r.get("node") or r.get("tensor"), 18) for r in first], rotation=60, ha="right", fontsize=7)
            if len(series) > 1:
                ax1.legend(fontsize=8)
            for ax in (ax1, ax2):
                ax.grid(alpha=0.3)
            svg = self.svg(fig, "chart-layers")
        where = ""
        if diag.get("samples"):
            where = f" Measured on {diag['samples']} {'calibration' if diag.get('data') == 'calibration' else 'evaluation'} samples."
        worst_rows = [[i, first[i].get("node") or first[i].get("tensor"), _fmt(first[i].get("sqnr_db"), ".1f"), _fmt(first[i].get("cosine"), ".5f")]
                      for i in worst]
        caption = (f"Each layer output (Conv, ConvTranspose, Gemm, MatMul) of the quantized model against the same tensor of the FP32 model, "
                   f"left to right in graph order; the error accumulates with depth, so look for the steps down.{where}")
        return self.wrap("chart-layers", "Per-layer error", [(svg, _e(caption))]) + "<p class='sub'>Worst layers:</p>" + _table(
            ["#", "node", "SQNR dB", "cosine"], worst_rows, numeric_from=2)

    # -- activation histograms with each calibrator's threshold ---------------------------------

    def histograms(self, acts: Sequence[Mapping[str, Any]]) -> str:
        import numpy as np

        figs = []
        for k, a in enumerate(acts[:WORST_LABELLED]):
            with self.mpl.rc_context(self.rc):
                counts = np.asarray(a.get("counts") or [], dtype=np.float64)
                lo, hi = float(a.get("lo", 0.0)), float(a.get("hi", 0.0))
                fig = self.figure(6.0, 3.0)
                ax = fig.subplots()
                if len(counts) and hi > lo:
                    from matplotlib.ticker import FuncFormatter, NullFormatter

                    edges = np.linspace(lo, hi, len(counts) + 1)
                    bars = ax.stairs(np.where(counts > 0, counts, np.nan), edges, fill=True, color="#c6dbef", edgecolor="#6baed6", label="values")
                    bars.set_gid("series-histogram")
                    ax.set_yscale("log")
                    # plain labels (1, 10, 100, 1k): the default 10^k labels go through mathtext, most of a chart's drawing time
                    ax.yaxis.set_major_formatter(FuncFormatter(_count_label))
                    ax.yaxis.set_minor_formatter(NullFormatter())
                rng = a.get("range")
                if rng and len(rng) == 2:
                    span = ax.axvspan(float(rng[0]), float(rng[1]), color="#fdae6b", alpha=0.18, lw=0, zorder=0,
                                      label=f"deployed range ({a.get('calibrator') or 'run'})")
                    span.set_gid("series-deployed")
                others = 0
                for name, t in (a.get("thresholds") or {}).items():
                    if t is None or not math.isfinite(t):
                        continue
                    colour = CALIBRATOR_COLOURS.get(name) or f"C{4 + others}"
                    others += name not in CALIBRATOR_COLOURS
                    # the clip range T gives this tensor: [max(min, -T), min(max, T)] (a line on each side that has values)
                    vmin, vmax = float(a.get("min", lo)), float(a.get("max", hi))
                    xs = ([min(vmax, t)] if vmax > 0 else []) + ([max(vmin, -t)] if vmin < 0 else [])
                    for j, x in enumerate(xs):
                        line = ax.axvline(x, color=colour, lw=1.3, ls="--" if name != a.get("calibrator") else "-",
                                          label=f"{name} T={t:.3g}" if j == 0 else None)
                        line.set_gid(f"series-threshold-{_slug(name)}" + ("" if j == 0 else "-neg"))
                ax.set_title(f"{_short(a.get('tensor'), 48)}\ninput of {_short(a.get('layer'), 44)}", fontsize=9)
                ax.set_xlabel("value")
                ax.set_ylabel("count (log)")
                ax.legend(fontsize=7, loc="upper right", framealpha=0.85)
                figs.append((self.svg(fig, f"chart-hist-{k}"),
                             _e(f"{a.get('tensor')}: observed [{_fmt(a.get('min'), '.4g')}, {_fmt(a.get('max'), '.4g')}]; "
                                f"dashed lines: the clip threshold T each calibrator would pick (±T on a signed tensor), solid: the run's own.")))
        intro = ("The calibration histogram of the activations feeding the worst layers, with the clip threshold each calibrator "
                 "(minmax, percentile, mse, trt-entropy) would choose from the same statistics, and the range the run deployed. A "
                 "threshold well inside the tail clips values; one far out wastes levels on outliers.")
        return self.wrap("chart-histograms", "Activation ranges of the worst layers", figs, intro, grid=True)

    # -- weight ranges per channel --------------------------------------------------------------

    def weights(self, weights: Sequence[Mapping[str, Any]]) -> str:
        import numpy as np

        figs = []
        for k, w in enumerate(weights[:WORST_LABELLED]):
            with self.mpl.rc_context(self.rc):
                lo = np.asarray(w.get("channel_min") or [], dtype=np.float64)
                hi = np.asarray(w.get("channel_max") or [], dtype=np.float64)
                fig = self.figure(6.0, 2.8)
                ax = fig.subplots()
                x = np.arange(len(lo))
                band = ax.fill_between(x, lo, hi, step="mid", color="#9ecae1", alpha=0.8, label="weight min..max per channel")
                band.set_gid("series-weight-range")
                if w.get("clip_min") is not None and w.get("clip_max") is not None:
                    cmin = np.asarray(w["clip_min"], dtype=np.float64)
                    cmax = np.asarray(w["clip_max"], dtype=np.float64)
                    (c1,) = ax.step(x, cmax, where="mid", color="#d62728", lw=1, label="representable range (scale × q-range)")
                    ax.step(x, cmin, where="mid", color="#d62728", lw=1)
                    c1.set_gid("series-weight-clip")
                grouped = w.get("grouped", 1) or 1
                ax.set_xlabel("output channel" if grouped == 1 else f"output channel group ({grouped} channels each)")
                ax.set_ylabel("weight value")
                ax.set_title(f"{_short(w.get('initializer'), 48)} ({_short(w.get('node'), 36)})\nweight SQNR {_fmt(w.get('sqnr_db'), '.1f')} dB",
                             fontsize=9)
                ax.legend(fontsize=7, loc="upper right", framealpha=0.85)
                figs.append((self.svg(fig, f"chart-weights-{k}"),
                             _e(f"{w.get('initializer')}: {len(lo)} {'channels' if grouped == 1 else 'channel groups'} along axis {w.get('axis')}.")))
        intro = ("The weights quantized with the most error (lowest SQNR of the quantized weight against the float one): per output channel, "
                 "the range of the float weights and the range its quantization grid can represent. Channels far narrower than the "
                 "grid use few levels; with a per-tensor grid one wide channel costs all the others their resolution.")
        return self.wrap("chart-weights", "Weight ranges per channel", figs, intro, grid=True)

    # -- auto candidates: fidelity vs latency ---------------------------------------------------

    def candidates(self, auto: Mapping[str, Any]) -> str:
        cands = auto["candidates"]
        pts = []
        for c in cands:
            f, lat = _number(c, FIDELITY_KEYS), _number(c, LATENCY_KEYS)
            if f is not None and lat is not None:
                pts.append((c, f, lat))
        if not pts:
            rows = [[c.get("name") or c.get("method") or "?", ", ".join(f"{k}={v}" for k, v in c.items() if k not in ("name",))] for c in cands]
            return "<section id='chart-candidates'><h2>auto candidates</h2>" + _table(["candidate", "figures"], rows, numeric_from=99) + "</section>"
        with self.mpl.rc_context(self.rc):
            fig = self.figure(10.0, 3.8)
            ax = fig.subplots()
            fkey = pts[0][1][0]
            flabel = f"score ({auto['metric']})" if fkey == "score" and auto.get("metric") else fkey
            chosen = [p for p in pts if p[0].get("name") == auto.get("chosen") or p[0].get("chosen") is True]
            others = [p for p in pts if p not in chosen]
            sc = ax.scatter([p[2][1] for p in others], [p[1][1] for p in others], s=28, color="#1f77b4", label="candidates")
            sc.set_gid("series-candidates")
            if chosen:
                sc2 = ax.scatter([p[2][1] for p in chosen], [p[1][1] for p in chosen], s=80, marker="*", color="#d62728", label="chosen")
                sc2.set_gid("series-chosen")
            for c, f, lat in pts:
                ax.annotate(_short(c.get("name") or c.get("method") or "", 24), (lat[1], f[1]), textcoords="offset points", xytext=(4, 3), fontsize=7)
            ax.set_xlabel(f"latency ({pts[0][2][0]})")
            if isinstance(auto.get("threshold"), (int, float)) and fkey == "score":
                tl = ax.axhline(auto["threshold"], color="#999", ls=":", lw=1, label="target")
                tl.set_gid("series-target")
            ax.set_ylabel(flabel)
            ax.set_title(f"auto candidates: {flabel} vs latency")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            svg = self.svg(fig, "chart-candidates")
        why = f" Chosen: {auto.get('chosen')} ({auto.get('reason')})." if auto.get("chosen") else ""
        return self.wrap("chart-candidates", "auto candidates",
                         [(svg, _e(f"Each recipe the auto search built and scored on held-out data; up and to the left is better.{why}"))],
                         after=_candidate_table(auto))


#: the auto candidates table: column heading and ``report.auto.candidates[]`` field
CANDIDATE_COLUMNS = (("stage", "stage"), ("score", "score"), ("worst resample", "score_worst"), ("spread", "spread"),
                     ("spread, 95% over new sets", "spread_bound"), ("bound", "score_bound"), ("worst sample cosine", "cosine_worst"), ("latency ms", "latency_ms"))


def _candidate_table(auto: Mapping[str, Any]) -> str:
    """Every candidate's figures (the chart shows score and latency only): the spread the choice is made on and, for a
    set of float layers, the bound it had to meet."""
    rows = []
    for c in auto.get("candidates") or []:
        mark = "* " if c.get("name") == auto.get("chosen") else ""
        cells = [f"{mark}{c.get('name') or c.get('method') or '?'}"]
        for _, key in CANDIDATE_COLUMNS:
            v = c.get(key)
            cells.append("-" if v is None else f"{v:.5f}" if isinstance(v, float) else str(v))
        if c.get("error"):
            cells[1] = f"failed: {c['error']}"
        rows.append(cells)
    return _table(["candidate", *(h for h, _ in CANDIDATE_COLUMNS)], rows, numeric_from=2) if rows else ""


def _count_label(v: float, _pos: Any = None) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:g}{unit}"
    return f"{v:g}"


def _finite_or_nan(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else math.nan


def _key(v: Any) -> float:
    # identical layers have SQNR inf (written as null): they sort last
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.inf


def _short(name: Any, n: int = 28) -> str:
    s = str(name or "")
    return s if len(s) <= n else "…" + s[-(n - 1):]


def _slug(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]+", "-", name)
