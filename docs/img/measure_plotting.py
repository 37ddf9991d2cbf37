"""The measurement behind the report's choice of matplotlib (inline SVG) over plotly (docs/report.md, "Why matplotlib").

Renders the charts of the bundled example's report (the ``--json`` document of a ``--report`` run)
both ways: matplotlib through :func:`onnxq.report_html.render_html`, and the same data (per-layer
line chart, histograms with threshold lines, weight-range bands) as plotly figures in one
self-contained page (plotly.js inlined: a report must open without network). Prints file size,
render time (CPU seconds, median of ``--repeat``) and, with Chromium, the time until the page's
load event. Needs ``pip install plotly`` besides the test extra::

    onnxq optimize examples/digits/model.onnx -p easyquant --data examples/digits/calib --output out/d.onnx --force --diagnostics --json > out/run.json
    python docs/img/measure_plotting.py out/run.json
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def plotly_page(doc: dict[str, Any]) -> str:
    """The report's charts drawn by plotly, in one page with plotly.js inlined once."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    diag = doc["report"]["diagnostics"]
    parts = []
    layers = diag["layers"]
    names = [r["node"] for r in layers]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, subplot_titles=("Per-layer SQNR vs FP32", "Per-layer cosine vs FP32"))
    fig.add_trace(go.Scatter(x=names, y=[r["sqnr_db"] for r in layers], mode="lines+markers", name="SQNR"), row=1, col=1)
    fig.add_trace(go.Scatter(x=names, y=[r["cosine"] for r in layers], mode="lines+markers", name="cosine"), row=2, col=1)
    parts.append(fig)
    for a in diag["activations"]:
        n = len(a["counts"])
        width = (a["hi"] - a["lo"]) / n
        fig = go.Figure(go.Bar(x=[a["lo"] + (i + 0.5) * width for i in range(n)], y=a["counts"], width=width, name="values"))
        for name, t in a["thresholds"].items():
            fig.add_vline(x=t, line_dash="dash", annotation_text=name)
        fig.update_yaxes(type="log")
        fig.update_layout(title=a["tensor"], height=300)
        parts.append(fig)
    for w in diag["weights"]:
        x = list(range(len(w["channel_min"])))
        fig = go.Figure([go.Scatter(x=x, y=w["channel_max"], mode="lines", line_shape="hvh", name="max"),
                         go.Scatter(x=x, y=w["channel_min"], mode="lines", line_shape="hvh", fill="tonexty", name="min")])
        if w["clip_max"] is not None:
            fig.add_trace(go.Scatter(x=x, y=w["clip_max"], mode="lines", line_shape="hvh", name="clip"))
            fig.add_trace(go.Scatter(x=x, y=w["clip_min"], mode="lines", line_shape="hvh", name="clip"))
        fig.update_layout(title=w["initializer"], height=280)
        parts.append(fig)
    body = [f.to_html(full_html=False, include_plotlyjs=(k == 0)) for k, f in enumerate(parts)]
    return "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>" + "\n".join(body) + "</body></html>"


def cpu_seconds(fn: Any, repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return statistics.median(times), out


def load_ms(path: Path) -> float | None:
    """Milliseconds from navigation start to the load event in headless Chromium (None without it)."""
    from onnxq.testing.browser import find_chromium

    exe = find_chromium()
    if exe is None:
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = exe[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=exe[1]), options=opts)
    try:
        driver.get(path.resolve().as_uri())
        time.sleep(0.5)  # plotly draws after load; give it the time a reader would wait anyway
        return float(driver.execute_script(
            "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime;"))
    finally:
        driver.quit()


def main(argv: list[str]) -> int:
    import matplotlib
    import plotly

    from onnxq.report_html import render_html

    doc = json.loads(Path(argv[0]).read_text())
    repeat = int(argv[1]) if len(argv) > 1 else 5
    render_html(doc)  # imports and font caches out of the timing
    plotly_page(doc)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in ((f"matplotlib {matplotlib.__version__} (inline SVG)", lambda: render_html(doc)),
                         (f"plotly {plotly.__version__} (plotly.js inlined)", lambda: plotly_page(doc))):
            secs, html = cpu_seconds(fn, repeat)
            path = Path(tmp) / "page.html"
            path.write_text(html, encoding="utf-8")
            rows.append((name, len(html.encode()) / 1024, secs, load_ms(path)))
    print("| renderer | HTML size | render (CPU s, median) | Chromium load (ms) |\n| --- | --- | --- | --- |")
    for name, kb, secs, ms in rows:
        print(f"| {name} | {kb:,.0f} KB | {secs:.2f} | {'-' if ms is None else f'{ms:.0f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
