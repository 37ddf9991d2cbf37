"""Peak RSS and wall time of the search methods on every suite model, against a 1.5 GB budget.

Runs ``onnxq optimize`` once per (model, method) in a child process (``_measure.run_measured``:
``ru_maxrss`` of that child, statistics cache off, so the calibration pass is included) and prints
one markdown table: model, method, calibration samples, batch size, peak RSS, wall time, fidelity
against FP32 on the model's evaluation data, and PASS/FAIL against the budget::

    python benchmarks/search_memory.py                         # every row (~40 min on 2 busy cores)
    python benchmarks/search_memory.py --models ppocr-det --methods detptq
    python benchmarks/search_memory.py --json .bench/search_memory.json

Data (rendered / exported by ``tasks.prepare_task``): digits' bundled calibration set (batches of
the committed files); PP-OCR rec 128 rendered lines in files of 8 (``--batch-size 8``); PP-OCR det
**32 rendered 640x640 pages in files of 8 pages, ``--batch-size 8``** (the issue's setting);
MiniLM 256 calibration sentences in files of 16 (``--batch-size 16``). Fidelity: top-1 agreement
(digits), character agreement (rec), box F1 at IoU 0.5 (det), mean embedding cosine (MiniLM), each
against the FP32 model on the evaluation feeds. The easyquant rows run last.

Where a method does not apply it gets a row saying why instead of a measurement.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _measure import run_measured  # noqa: E402

BUDGET_MB = 1536.0
MODELS = ("digits", "ppocr-rec", "ppocr-det", "minilm")
METHODS = ("detptq", "gptq", "bias-correction", "easyquant")
SIZES = {"rec_calib": 128, "rec_eval": 128, "det_calib": 32, "det_eval": 8, "det_size": 640, "minilm_calib": 256, "minilm_pairs": 64}
BATCH = {"digits": 16, "ppocr-rec": 8, "ppocr-det": 8, "minilm": 16}
#: the fidelity column: (metric key of scoring.Evaluator, label)
FIDELITY = {"digits": ("top1_agreement_fp32", "top-1 agree"), "ppocr-rec": ("char_agreement_fp32", "char agree"),
            "ppocr-det": ("box_f1_fp32", "box F1"), "minilm": ("cosine_mean_fp32", "cos mean")}


@dataclass
class Row:
    model: str
    method: str
    label: str
    args: tuple[str, ...] = ()
    na: str = ""  # why the method does not apply (no run)


def rows_for(model: str) -> list[Row]:
    """The rows of one model: every method where it applies, a reason where it does not."""
    out: list[Row] = []
    task = {"digits": "classification", "ppocr-rec": "mse", "ppocr-det": "segmentation-map", "minilm": "mse"}[model]
    # detptq at --target trt (Q/DQ on Conv inputs and residual Adds, the detector papers' placement;
    # docs/methods.md "DetPTQ"); its default memory_mb
    out.append(Row(model, "detptq", f"detptq -o task {task} --target trt", ("-p", "detptq", "-o", "task", task, "--target", "trt")))
    if model == "ppocr-det":
        out.append(Row(model, "gptq", "gptq", na="no MatMul or Gemm (62 Conv): gptq is 4-bit weight-only MatMul/Gemm"))
    else:
        # gptq is --bits 4 only (weight-only MatMul/Gemm; --bits 8 is refused); keep8 is its 8-bit mixed precision
        out.append(Row(model, "gptq", "gptq --bits 4", ("-p", "gptq", "--bits", "4")))
    if model == "minilm":
        out.append(Row(model, "gptq", "gptq --bits 4 -o keep8 2 (two MatMuls at 8-bit blocks)", ("-p", "gptq", "--bits", "4", "-o", "keep8", "2")))
    if model == "minilm":
        out.append(Row(model, "bias-correction", "bias-correction",
                       na="no Conv/ConvTranspose/Gemm layer: the encoder's linear layers are MatMul + Add, which bias-correction does not rewrite"))
    else:
        out.append(Row(model, "bias-correction", "minmax + bias-correction", ("-p", "minmax", "-p", "bias-correction")))
    out.append(Row(model, "easyquant", "easyquant (defaults)", ("-p", "easyquant")))
    return out


def prepare(models: list[str], work: Path) -> dict:
    """Each model's task (FP32 file, calibration and evaluation feeds); PP-OCR det's calibration
    pages are rewritten as files of 8 pages (32 pages, batches of 8)."""
    import ocr_data
    from configs import CALIB_SEED
    from tasks import ModelUnavailable, prepare_task

    tasks = {}
    for name in models:
        try:
            task = prepare_task(name, work, SIZES, cjk=None, as_shipped=False)
        except ModelUnavailable as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
            continue
        if name == "ppocr-det":
            shutil.rmtree(task.calib)
            pages, _ = ocr_data.render_pages(SIZES["det_calib"], seed=CALIB_SEED, size=SIZES["det_size"])
            ocr_data.save_feeds(ocr_data.det_feeds(pages, BATCH[name], ocr_data.input_name(task.model)), task.calib)
        tasks[name] = task
    return tasks


def kept_samples(report: dict, method: str) -> str:
    """What the method's report says about the samples it kept (the searches' ``samples_kept``)."""
    sec = report.get("report", report).get("methods", {}).get(method, {}) if isinstance(report, dict) else {}
    return str(sec.get("samples_kept", "")) if isinstance(sec, dict) else ""


def measure(row: Row, task, scorer, work: Path, timeout: float, rss_cap_mb: float) -> dict:
    out = work / "out" / f"{row.model}-{row.label.split()[0]}-{abs(hash(row.args)) % 10**6}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "onnxq", "optimize", str(task.model), *row.args, "--data", str(task.calib),
            "--batch-size", str(BATCH[row.model]), "--output", str(out), "--force", "--no-cache", "--quiet", "--json"]
    m = run_measured(argv, timeout=timeout, rss_limit_bytes=int(rss_cap_mb * 2**20))
    res = {"model": row.model, "method": row.method, "label": row.label, "argv": argv[3:], "status": m.status,
           "peak_rss_mb": m.peak_rss_mb, "wall_s": m.wall_s, "cpu_s": round(m.user_s + m.sys_s, 1), "calib_samples": task.calib_samples, "batch": BATCH[row.model]}
    if not m.ok:
        res["error"] = m.error_line(100)
        return res
    try:
        report = json.loads(m.stdout)
    except json.JSONDecodeError:
        report = {}
    res["kept"] = kept_samples(report, row.method)
    key, _ = FIDELITY[row.model]
    metrics = scorer.evaluate(out)
    res["fidelity"] = metrics[key]
    res["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return res


def table(results: list[dict]) -> str:
    lines = ["| model | method | calibration samples | batch | peak RSS (MB) | wall (s) | CPU (s) | fidelity vs FP32 | ≤ 1.5 GB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if r.get("na"):
            lines.append(f"| {r['model']} | {r['label']} | — | — | — | — | — | n/a: {r['na']} | n/a |")
            continue
        name = FIDELITY[r["model"]][1]
        fid = f"{name} {r['fidelity']:.4f}" if "fidelity" in r else r.get("error", r["status"])
        if "prob_map_mae_fp32" in r.get("metrics", {}):
            fid += f", map MAE {r['metrics']['prob_map_mae_fp32']:.5f}"
        kept = re.match(r"(\d+)(?: of \d+)? samples in runs of (?:at most )?(\d+)", r.get("kept", ""))
        samples = f"{r['calib_samples']}" + (f" (kept {kept[1]}, runs of {kept[2]})" if kept else "")
        verdict = "PASS" if r["status"] == "ok" and r["peak_rss_mb"] <= BUDGET_MB else "FAIL"
        lines.append(f"| {r['model']} | {r['label']} | {samples} | {r['batch']} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.0f} | {r.get('cpu_s', 0):.0f} | {fid} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--rss-cap-mb", type=float, default=4096.0, help="kill a run whose process group goes over this (protects a shared machine)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of the fidelity evaluation")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print the table of rows saved by earlier --json runs and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table([r for f in args.table for r in json.loads(Path(f).read_text())["rows"]]))
        return 0
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    from scoring import Evaluator

    work = Path(tempfile.mkdtemp(prefix="onnxq-search-memory-"))
    try:
        tasks = prepare(models, work)
        scorers = {}
        for name, task in tasks.items():
            scorers[name] = Evaluator(task, args.threads)
            scorers[name].evaluate(task.model)  # the FP32 reference
        rows = [r for name in tasks for r in rows_for(name) if r.method in methods]
        rows.sort(key=lambda r: methods.index(r.method))  # in the order of --methods
        rows.sort(key=lambda r: r.method == "easyquant")  # easyquant last (stable: model order kept)
        results = []
        for r in rows:
            if r.na:
                results.append({"model": r.model, "method": r.method, "label": r.label, "na": r.na})
                continue
            res = measure(r, tasks[r.model], scorers[r.model], work, args.timeout, args.rss_cap_mb)
            results.append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "argv"}), file=sys.stderr, flush=True)
            if args.json:  # after every row: a partial run keeps what it measured
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps({"rows": results}, indent=1))
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
        print(f"commit {commit}; peak RSS of each `onnxq optimize` child (statistics cache off); budget {BUDGET_MB:.0f} MB\n")
        print(table(results))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"commit": commit, "sizes": SIZES, "rows": results}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
