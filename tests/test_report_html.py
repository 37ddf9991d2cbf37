"""The HTML report (issue 19): the data it charts is right, the page is self-contained, and a real Chromium renders it.

The charts' data (``Report.diagnostics``) is checked against independent computations on the
bundled digits example: the histogram against the tensor's own values, each calibrator's
threshold against its definition (max |x|, the percentile of |x|), the deployed ranges against
the thresholds, the weight ranges against the weights. The browser test needs Chromium,
chromedriver and selenium and skips without them.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("matplotlib", reason="the HTML report needs the report extra (matplotlib)")

from onnxq.errors import OnnxqError  # noqa: E402
from onnxq.pipeline import optimize  # noqa: E402
from onnxq.report_html import Section, render_html, write_html  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CALIBRATORS = ("minmax", "percentile", "mse", "trt-entropy")


@pytest.fixture(scope="module")
def percentile_run(tmp_path_factory):
    """The bundled example quantized with -p percentile, diagnostics collected (what --report does)."""
    out = tmp_path_factory.mktemp("report") / "digits.int8.onnx"
    result = optimize(REPO / "examples/digits/model.onnx", out, method="percentile", data=str(REPO / "examples/digits/calib"),
                      diagnostics=True, show_progress=False)
    return result, out


@pytest.fixture(scope="module")
def percentile_html(percentile_run) -> str:
    return render_html({"report": percentile_run[0].report.to_dict()})


def _calib_values(tensor: str) -> np.ndarray:
    """Every value ``tensor`` takes in the float model over the bundled calibration data."""
    model = onnx.load(REPO / "examples/digits/model.onnx")
    model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = []
    for f in sorted((REPO / "examples/digits/calib").glob("*.npz")):
        with np.load(f) as z:
            feeds = {i.name: z[i.name] for i in sess.get_inputs()}
        values.append(sess.run([tensor], feeds)[0].ravel())
    return np.concatenate(values)


def test_diagnostics_hold_what_the_charts_need(percentile_run):
    rep = percentile_run[0].report
    diag = rep.diagnostics
    assert diag is not None and diag.error is None
    # every layer output, in the float model's graph order, measured against FP32
    order = [n.output[0] for n in onnx.load(REPO / "examples/digits/model.onnx").graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert [row.tensor for row in diag.layers] == order
    assert diag.samples > 0
    for row in diag.layers:
        assert 15 < row.sqnr_db < 80 and 0.99 < row.cosine <= 1.0, row  # an 8-bit digits CNN: no collapse, not identical
    assert 1 <= len(diag.activations) <= 5 and 1 <= len(diag.weights) <= 5
    assert rep.to_json()  # strict JSON (the --json document and `onnxq report` read it)


def test_histogram_and_thresholds_match_the_tensor(percentile_run):
    """The chart's histogram counts the tensor's values; minmax's T is max |x|, percentile's the 99.99th percentile of |x|."""
    acts = percentile_run[0].report.diagnostics.activations
    names = {n for node in onnx.load(REPO / "examples/digits/model.onnx").graph.node for n in node.output}
    checked = 0
    for a in acts:
        assert set(CALIBRATORS) <= set(a.thresholds) and a.calibrator == "percentile"
        assert len(a.counts) <= 128 and a.lo <= a.min and a.hi >= a.max
        for name, t in a.thresholds.items():
            assert 0 < t <= max(abs(a.min), abs(a.max)) * (1 + 1e-5), (name, t)
        # the deployed range is the percentile calibrator's clip [max(min, -T), min(max, T)] (a shared scale may only widen it)
        t = a.thresholds["percentile"]
        assert a.range[0] <= max(a.min, -t) + 1e-6 and a.range[1] >= min(a.max, t) * (1 - 1e-5)
        if a.tensor not in names:
            continue
        x = _calib_values(a.tensor)
        assert sum(a.counts) == x.size
        counts, _ = np.histogram(x, bins=len(a.counts), range=(a.lo, a.hi))
        # bin edges rounded to 6 digits in the report: a value on an edge may land in the next bin
        assert np.abs(counts - np.asarray(a.counts)).sum() <= 0.001 * x.size
        amax = float(np.abs(x).max())
        assert a.thresholds["minmax"] == pytest.approx(amax, rel=1e-5)
        # the percentile calibrator clips at the right edge of the 2048-bin |x| histogram's bin holding the 99.99th percentile value
        v = float(np.quantile(np.abs(x), 0.9999, method="inverted_cdf"))
        assert v - 1e-5 <= a.thresholds["percentile"] <= v + amax / 2048 + 1e-5
        checked += 1
    assert checked >= 1


def test_weight_ranges_match_the_weights(percentile_run):
    rep = percentile_run[0].report
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(REPO / "examples/digits/model.onnx").graph.initializer}
    sqnrs = [w.sqnr_db for w in rep.diagnostics.weights]
    assert sqnrs == sorted(sqnrs) and all(20 < s < 80 for s in sqnrs)  # worst first
    checked = 0
    for w in rep.diagnostics.weights:
        lo, hi = np.asarray(w.channel_min), np.asarray(w.channel_max)
        assert np.all(lo <= hi) and w.grouped == 1
        # per-channel max-abs weights: each channel's grid covers its values (to the 6 digits kept)
        assert np.all(np.asarray(w.clip_max) >= hi - 1e-5 * np.abs(hi).max()) and np.all(np.asarray(w.clip_min) <= lo + 1e-5 * np.abs(lo).max())
        if w.initializer in weights:
            ref = np.moveaxis(weights[w.initializer], w.axis, 0).reshape(len(lo), -1)
            np.testing.assert_allclose(hi, ref.max(axis=1), rtol=1e-5)
            np.testing.assert_allclose(lo, ref.min(axis=1), rtol=1e-5)
            checked += 1
    assert checked >= 1


def test_html_is_one_self_contained_page(percentile_html):
    html = percentile_html
    assert "<script" not in html.lower()
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', html), "the report must not load anything"
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids)), "element ids repeat across charts"
    for section in ("chart-layers", "chart-histograms", "chart-weights"):
        assert f"<section id='{section}'>" in html
    assert "Fidelity" in html and "Per-layer SQNR vs FP32" in html
    for name in CALIBRATORS:
        assert f"series-threshold-{name}" in html
    assert "chart-candidates" not in html and "TensorRT Q/DQ rules" not in html  # not an auto run, not trt


def _small(report) -> dict:
    """The report's document with one histogram and one weight chart (each full chart costs render time)."""
    doc = {"report": report.to_dict()}
    diag = doc["report"]["diagnostics"]
    diag["activations"], diag["weights"] = diag["activations"][:1], diag["weights"][:1]
    return doc


def test_sections_and_auto_candidates_are_drawn(percentile_run):
    doc = {"report": percentile_run[0].report.to_dict()}
    doc["report"]["diagnostics"] = None  # this test is about the other parts
    doc["report"]["auto"] = {"metric": "cosine", "threshold": 0.999, "chosen": "mse", "reason": "meets the target at the least latency",
                             "candidates": [{"name": "minmax", "score": 0.9990, "latency_ms": 0.050},
                                            {"name": "mse", "score": 0.9995, "latency_ms": 0.048},
                                            {"name": "mse float:1", "score": 0.9998, "latency_ms": 0.061, "score_bound": 0.99962},
                                            {"name": "broken", "score": None, "latency_ms": None, "error": "did not build"}]}
    html = render_html(doc, sections=[Section("CI gate: passed", ["cosine 0.9995 >= 0.999"], status="ok")])
    assert "<section id='chart-candidates'>" in html
    assert "chart-candidates-series-candidates" in html and "chart-candidates-series-chosen" in html
    assert html.index("CI gate: passed") < html.index("<h2>Run</h2>")
    # every candidate's figures in a table under the chart: the bound of a set of float layers, the failed one's error
    section = html[html.index("<section id='chart-candidates'>"):]
    section = section[:section.index("</section>")]
    assert "<th>bound</th>" in section and "0.99962" in section and "failed: did not build" in section
    assert "<td>* mse</td>" in section


def test_report_command_renders_a_saved_json(run_cli, percentile_run, tmp_path):
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(_small(percentile_run[0].report)))
    out = tmp_path / "report.html"
    code, stdout, stderr = run_cli(["report", saved, "-o", out])
    assert code == 0, stderr
    assert out.read_text().startswith("<!DOCTYPE html>") and "chart-histograms" in out.read_text()
    code, _, stderr = run_cli(["report", saved, "-o", out])
    assert code == 1 and "already exists" in stderr and len(stderr.strip().splitlines()) == 1
    assert run_cli(["report", saved, "-o", out, "--force"])[0] == 0
    bad = tmp_path / "bad.json"
    malformed = json.dumps({"report": {"model": "m.onnx", "method": ["minmax"], "target": "ort", "diagnostics": {"layers": 5}}})
    for text, words in (("{not json", "is not JSON"), ("[1, 2]", "not an onnxq report document"), ('{"x": 1}', "not an onnxq report document"),
                        (malformed, "not a well-formed onnxq report document")):
        bad.write_text(text)
        code, _, stderr = run_cli(["report", bad, "-o", tmp_path / "bad.html"])
        assert code == 1 and words in stderr and len(stderr.strip().splitlines()) == 1, stderr
    code, _, stderr = run_cli(["report", tmp_path / "missing.json", "-o", tmp_path / "m.html"])
    assert code == 1 and "does not exist" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "report.html", "run.json"]  # nothing half-written


def test_optimize_report_on_trt_lints_and_charts_minmax(run_cli, tmp_path):
    """--target trt --report: lint findings in the report; minmax collects no histograms, the report's own pass does."""
    out, html = tmp_path / "d.trt.onnx", tmp_path / "d.html"
    args = ["optimize", REPO / "examples/digits/model.onnx", "-p", "minmax", "--target", "trt", "--data", REPO / "examples/digits/calib",
            "--output", out, "--report", html, "--json", "--quiet"]
    code, stdout, stderr = run_cli(args)
    assert code == 0, stderr
    diag = json.loads(stdout)["report"]["diagnostics"]
    assert diag["lint"] is not None and not [f for f in diag["lint"] if f["severity"] == "error"]
    assert diag["activations"]
    for a in diag["activations"]:  # minmax deploys the observed range (a shared Concat scale may widen it)
        assert a["thresholds"]["minmax"] == pytest.approx(max(abs(a["min"]), abs(a["max"])), rel=1e-5)
        assert a["range"][0] <= a["min"] + 1e-6 and a["range"][1] >= a["max"] - 1e-6
        assert sum(a["counts"]) > 0
    text = html.read_text()
    assert "TensorRT Q/DQ rules" in text and "chart-histograms" in text
    # outputs are checked before any work: an existing report without --force, the model's own path
    code, _, stderr = run_cli(args[:-2] + ["--quiet"])
    assert code == 1 and "exists" in stderr
    code, _, stderr = run_cli(["optimize", REPO / "examples/digits/model.onnx", "--data", "random", "--output", out, "--force", "--report", out])
    assert code == 1 and "is the output model" in stderr


def test_compare_report_charts_each_candidate(run_cli, percentile_run, tmp_path):
    html = tmp_path / "cmp.html"
    code, stdout, stderr = run_cli(["compare", REPO / "examples/digits/model.onnx", percentile_run[1], "--data", REPO / "examples/digits/eval",
                               "--max-samples", "64", "--report", html])
    assert code == 0, stderr
    assert f"wrote report {html}" in stdout
    text = html.read_text()
    assert "onnxq comparison: model.onnx" in text and "chart-layers-series-sqnr-0" in text and "Evaluation" in text


def test_missing_matplotlib_is_one_line_naming_the_extra(run_cli, percentile_run, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(OnnxqError, match=re.escape("pip install 'onnxq[report]'")):
        render_html({"report": percentile_run[0].report.to_dict()})
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"report": percentile_run[0].report.to_dict()}))
    code, _, stderr = run_cli(["report", saved, "-o", tmp_path / "r.html"])
    assert code == 1 and "onnxq[report]" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


def test_write_html_is_atomic_and_refuses_folders(percentile_run, tmp_path):
    doc = _small(percentile_run[0].report)
    path = write_html(doc, tmp_path / "sub" / "r.html")
    assert path.read_text().endswith("</html>\n")
    with pytest.raises(OnnxqError, match="already exists"):
        write_html(doc, path)
    with pytest.raises(OnnxqError, match="is a directory"):
        write_html(doc, tmp_path, force=True)
    assert [p.name for p in path.parent.iterdir()] == ["r.html"]


# ---------------------------------------------------------------------------------------------
# a real browser
# ---------------------------------------------------------------------------------------------

def test_report_renders_in_headless_chromium(percentile_run, tmp_path):
    """No console errors, no requests, every chart laid out with its series; the screenshot is kept as an artefact."""
    from onnxq.testing.browser import find_chromium, open_report

    exe = find_chromium()
    if exe is None:
        pytest.skip("no headless Chromium: apt-get install chromium chromium-driver (Debian) and pip install selenium")
    doc = {"report": percentile_run[0].report.to_dict()}
    doc["report"]["auto"] = {"metric": "cosine", "chosen": "mse", "candidates": [{"name": "minmax", "score": 0.9990, "latency_ms": 0.050},
                                                                                {"name": "mse", "score": 0.9995, "latency_ms": 0.048}]}
    html = write_html(doc, tmp_path / "report.html")
    page = open_report(html, tmp_path / "report.png", executables=exe)
    assert page.console_errors == [] and page.external_requests == []
    assert page.title.startswith("onnxq report")
    by_section: dict[str, list] = {}
    for chart in page.charts:
        assert chart.width > 300 and chart.height > 100, chart
        by_section.setdefault(chart.section, []).append(chart)
    assert set(by_section) == {"chart-layers", "chart-histograms", "chart-weights", "chart-candidates"}
    layers = by_section["chart-layers"][0]
    assert {"chart-layers-series-sqnr-0", "chart-layers-series-cosine-0"} <= set(layers.series) and "Per-layer SQNR" in layers.text
    for k, hist in enumerate(by_section["chart-histograms"]):
        want = {f"chart-hist-{k}-series-histogram", f"chart-hist-{k}-series-deployed"} | {f"chart-hist-{k}-series-threshold-{c}" for c in CALIBRATORS}
        assert want <= set(hist.series), hist.series
    for k, w in enumerate(by_section["chart-weights"]):
        assert {f"chart-weights-{k}-series-weight-range", f"chart-weights-{k}-series-weight-clip"} <= set(w.series)
    assert "chart-candidates-series-chosen" in by_section["chart-candidates"][0].series
    from PIL import Image

    with Image.open(page.screenshot) as im:
        assert im.width == 1200 and im.height > 2000
        assert np.asarray(im.convert("L")).std() > 10  # not a blank page
    artefacts = REPO / "out" / "test-artefacts"
    artefacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(page.screenshot, artefacts / "report-chromium.png")
    shutil.copy(html, artefacts / "report-chromium.html")


def test_neighbour_agreement_is_shown_where_the_check_measured_it(percentile_html):
    """An embedding output's neighbour agreement reaches the text and HTML reports with the value the
    check recorded; a run without one (the digits classifier) gets no empty column."""
    from onnxq.report import fidelity_lines

    fixture = REPO / "tests/fixtures/attention_embedding/model.onnx"
    with np.load(REPO / "tests/fixtures/zoo/attention_padded/calib.npz") as z:
        feeds = [{k: z[k][:16] for k in ("input_ids", "attention_mask")}]
    rep = optimize(fixture, method="minmax", data=feeds, show_progress=False).report
    (out,) = rep.fidelity.outputs
    assert out.neighbour_agreement is not None and 0.9 < out.neighbour_agreement <= 1.0
    text = "\n".join(fidelity_lines(rep.fidelity))
    assert f"neighbour agreement {out.neighbour_agreement:.3f}" in text
    page = render_html({"report": rep.to_dict()})
    fidelity_table = page[page.index("<h2>Fidelity"):]
    fidelity_table = fidelity_table[:fidelity_table.index("</table>")]
    assert "<th>neighbour agreement</th>" in fidelity_table
    assert f"<td class='num'>{out.neighbour_agreement:.4f}</td></tr>" in fidelity_table
    assert "neighbour agreement" not in percentile_html


def test_compare_document_aligns_each_model_on_one_axis():
    """compare --json: one line per model over the union of layer outputs; a tensor a model lacks is a gap, not a shift."""
    from onnxq.report_html import normalize_document

    doc = {"evaluations": [], "layers": {"a.onnx": {"t1": {"sqnr_db": 30.0, "cosine": 0.99}, "t2": {"sqnr_db": 20.0, "cosine": 0.98}},
                                         "b.onnx": {"t2": {"sqnr_db": 25.0, "cosine": 0.985}, "t3": {"sqnr_db": 10.0, "cosine": 0.9}}}}
    assert normalize_document(doc)["report"] is None
    html = render_html(doc)
    assert "chart-layers-series-sqnr-0" in html and "chart-layers-series-sqnr-1" in html
    assert "<h2>Run</h2>" not in html and "onnxq comparison" in html


def test_a_run_without_report_never_imports_matplotlib():
    """matplotlib is the report's alone: importing the CLI, the pipeline and the report module loads none of it."""
    import subprocess

    code = ("import sys, onnxq.cli.main, onnxq.pipeline, onnxq.report_html, onnxq.pipeline.diagnostics; "
            "sys.exit('matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
