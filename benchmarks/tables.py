"""The printed report: one markdown table per model with its goal lines, then the small tables.

Everything printed comes from the JSON document ``bench.py`` builds (``doc``), so the text and
the JSON always agree. As a script, ``python benchmarks/tables.py RESULTS.json [...]`` prints the
"onnxq vs peers" table of one or more ``--json`` documents (their models merged, in order), e.g.
of runs split by ``--models``.
"""

from __future__ import annotations

from typing import Any

from checks import easyquant_ratio_line, memory_time_lines
from configs import (CALIB_SEED, EASYQUANT_OCR_TIMEOUT, EVAL_SEED, METRIC_COLUMNS, ONNXQ_BATCH, ORT_HISTOGRAM_TIMEOUT, PEER_FIDELITY, PEER_TITLES,
                     REC_FILE_BATCH, peer_configs)
from tasks import MINILM_LAT_BATCH, MINILM_LAT_SEQ, Task


def fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def md_table(headers: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in body])


def model_table(name: str, res: dict, threads: list[int]) -> str:
    mcols = METRIC_COLUMNS[name]
    lat_spec = ".3f" if name == "digits" else ".1f"
    headers = ["config"] + [c[0] for c in mcols] + ["size MB"] + [f"lat {t}t ms" for t in threads] + ["int ops", "quant wall s", "peak RSS MB", "wall vs ORT-minmax", "RSS vs ORT-minmax"]
    body = []
    for r in res["rows"]:
        cells = [r["config"]["label"] + (f" (chose {r['auto']['chosen']})" if (r.get("auto") or {}).get("chosen") else "")]
        if r["status"] != "ok":
            q = r.get("quantize")
            cells += [r.get("error", r["status"])] + ["-"] * (len(mcols) - 1) + ["-"] + ["-"] * len(threads) + ["-"]
            cells += [fmt(q["wall_s"], ".1f") if q else "-", fmt(q["peak_rss_mb"], ".0f") if q else "-", "-", "-"]
        else:
            met = r["metrics"]
            cells += [fmt(met.get(k), s) for _, k, s in mcols]
            cells.append(fmt(r["size_bytes"] / 1e6, ".3f" if name == "digits" else ".2f"))
            cells += [fmt(r["latency_ms"].get(f"{t}t"), lat_spec) for t in threads]
            ik = r.get("integer_kernels")
            cells.append(f"{ik['integer']}/{ik['integer'] + ik['float']}" if ik and "integer" in ik else "-")
            q = r.get("quantize")
            cells += [fmt(q["wall_s"], ".1f") if q else "-", fmt(q["peak_rss_mb"], ".0f") if q else "-"]
            v = r.get("vs_ort_minmax")
            cells += [f"{v['wall']:.2f}x" if v else "-", f"{v['rss']:.2f}x" if v else "-"]
        body.append(cells)
    return md_table(headers, body)


def peers_table(doc: dict) -> str:
    """One row per model: its fidelity-to-FP32 metric for the best hand-picked onnxq row, ``-p auto``
    (with what it chose), ORT MinMax and every peer row.

    A cell is the metric, the failure ("error: ...", "timeout (900 s)", "> 18.0 GB ..."), "n/a" where the
    row does not exist for that model (NNCF's transformer type off MiniLM) or "-" where it did not run."""
    columns: list[tuple[str, str]] = [("ort-minmax", "ORT MinMax")]
    for res in doc["models"].values():
        for r in res.get("rows", []):
            c = r["config"]
            if c["tool"] in PEER_TITLES and c["key"] not in [k for k, _ in columns]:
                columns.append((c["key"], c["label"]))
    if len(columns) == 1:
        return ""
    with_auto = any(r["config"]["key"] == "onnxq-auto" for res in doc["models"].values() for r in res.get("rows", []))
    order = [c.key for c in peer_configs("minilm")]  # every peer row, in table order
    columns[1:] = sorted(columns[1:], key=lambda kl: order.index(kl[0]) if kl[0] in order else len(order))
    body = []
    for name, res in doc["models"].items():
        if "rows" not in res:
            continue
        header, key, spec = PEER_FIDELITY[name]
        ok = [r for r in res["rows"] if r["status"] == "ok" and r["config"]["tool"] == "onnxq" and r["metrics"].get(key) is not None
              and r["config"].get("method") != "auto"]
        best = max(ok, key=lambda r: r["metrics"][key], default=None)
        cells = [name, header, f"{fmt(best['metrics'][key], spec)} ({best['config']['label'].replace('onnxq ', '')})" if best else "-"]
        by_key = {r["config"]["key"]: r for r in res["rows"]}
        if with_auto:
            cells.append(auto_cell(by_key.get("onnxq-auto"), key, spec))
        for k, _ in columns:
            r = by_key.get(k)
            if r is None:
                cells.append("-" if k == "ort-minmax" or any(c.key == k for c in peer_configs(name)) else "n/a")
            elif r["status"] == "ok":
                cells.append(fmt(r["metrics"].get(key), spec))
            else:
                cells.append(failed_cell(r))
        body.append(cells)
    return md_table(["model", "fidelity", "onnxq best (recipe)"] + (["onnxq auto (chose)"] if with_auto else []) + [label for _, label in columns], body)


def failed_cell(row: dict) -> str:
    """A peers-table cell for a row that did not finish: its error (or status), cut to 48 characters."""
    err = row.get("error", row["status"])
    return err if len(err) <= 48 else err[:45] + "..."


def auto_cell(row: dict | None, key: str, spec: str) -> str:
    """The ``-p auto`` cell of the peers table: its fidelity and the recipe it chose (with its float layers, if any)."""
    if row is None:
        return "-"
    if row["status"] != "ok":
        return failed_cell(row)
    auto = row.get("auto") or {}
    chose = auto.get("chosen") or "?"
    return f"{fmt(row['metrics'].get(key), spec)} ({chose})"


def peer_versions_line(doc: dict) -> str:
    parts = []
    for name, e in (doc.get("peers") or {}).items():
        v = e.get("versions") or {}
        made = f", environment made in {e['install_seconds']:.0f} s" if e.get("install_seconds") else ""
        deps = ", ".join(f"{d} {v[d]}" for d in ("onnx", "onnxruntime", "torch") if d in v)
        parts.append(f"{PEER_TITLES[name]}: {e['error']}" if e.get("error") else
                     f"{PEER_TITLES[name]} {v.get(e['distribution'], '?')} ({deps}{made})")
    return "peers (each in its own environment, benchmarks/peers/envs.py): " + "; ".join(parts) if parts else ""


def describe_task(task: Task, res: dict) -> str:
    bs = ONNXQ_BATCH[task.name] or "16 (CLI default)"
    if task.name == "minilm":
        return (f"{task.calib_samples} real sentences for calibration (benchmarks/minilm/retrieval.py, disjoint from the evaluation text), "
                f"{task.info.get('pairs')} query/passage retrieval pairs for evaluation (query = first sentence of a docstring paragraph, "
                f"passage = the rest; recall@1 over all passages; cosine over all {task.eval_samples} texts)\n"
                f"model: {task.model} (benchmarks/minilm/export_minilm.py)\n"
                f"onnxq --batch-size {bs}; latency: batch {MINILM_LAT_BATCH} x {MINILM_LAT_SEQ} tokens, ORT_ENABLE_ALL, median of round-robin runs "
                "(all models interleaved), speed-up = FP32 / model at 1 thread; "
                "int ops: compute ops on ORT integer kernels / all compute ops (the 12 attention MatMuls of two activations stay float)")
    if task.name == "digits":
        data = f"examples/digits: {task.calib_samples} calibration samples (train split), {task.eval_samples} labelled eval samples (test split)"
    elif task.name == "ppocr-rec":
        data = (f"{task.calib_samples} rendered lines for calibration (seed {CALIB_SEED}), {task.eval_samples} for evaluation (seed {EVAL_SEED}, "
                f"{task.info.get('eval_chars')} chars), 3x48x320, {REC_FILE_BATCH} lines per .npz")
    else:
        data = (f"{task.calib_samples} rendered pages for calibration (seed {CALIB_SEED}), {task.eval_samples} for evaluation (seed {EVAL_SEED}, "
                f"{task.info.get('eval_boxes')} truth boxes), {task.info.get('size')}x{task.info.get('size')}, 1 page per .npz")
    model = "model as shipped" if task.model == task.shipped else f"normalized model ({task.info.get('normalized')})"
    return f"data: {data}\nmodel: {model}\nonnxq --batch-size {bs}; latency: batch 1, median; int ops: compute ops on ORT integer kernels / all compute ops"


def print_report(doc: dict, tasks: dict[str, Task], threads: list[int]) -> None:
    p = print
    env = doc["environment"]
    g = env.get("git", {})
    p(f"# onnxq benchmark ({'quick' if doc['quick'] else 'full'}) - {env['cpu_count']} CPUs, Python {env['python']}, onnx {env['onnx']}, "
      f"onnxruntime {env['onnxruntime']}, onnxq {env['onnxq']} (git {g.get('head', '?')}, {g.get('onnxq_uncommitted_files', '?')} uncommitted files in onnxq/); "
      f"OCR text: {doc['ocr_text']}")
    m = doc.get("machine", {})
    rss_cap = (f"RSS capped at {doc['mem_cap_gb']} GB (summed RSS of the child's process group, polled every 50 ms, killed above it; "
               f"lowered to MemAvailable - 1.5 GB when less; lowest cap used {m.get('lowest_cap_gb', '-')} GB)") if doc["mem_cap_gb"] else "no RSS cap"
    as_cap = f"address space capped at {doc['as_cap_gb']} GB (RLIMIT_AS)" if doc.get("as_cap_gb") else "no address-space cap"
    p(f"quantization subprocesses: {rss_cap}, {as_cap}, timeout {doc['timeout_s']:.0f} s "
      f"({min(doc['timeout_s'], EASYQUANT_OCR_TIMEOUT):.0f} s for easyquant on PP-OCR, {min(doc['timeout_s'], ORT_HISTOGRAM_TIMEOUT):.0f} s for ORT "
      "Percentile / Entropy); 'quant wall s' and 'peak RSS MB' are those of the whole child process (start-up, model load and save included)")
    if m:
        p(f"machine load (1-min load average, {env['cpu_count']} CPUs): median {m['load_median']:.1f}, max {m['load_max']:.1f}; "
          f"memory available at start {m['mem_available_start_gb']:.1f} GB")
        if m["load_median"] > (env["cpu_count"] or 1) * 1.25:
            p("WARNING: other processes were competing for the CPUs during this run; wall times and latencies are inflated and noisy")
    for name, res in doc["models"].items():
        p("")
        p(f"## {name}")
        if "skipped" in res:
            p(res["skipped"])
            continue
        if "error" in res:
            p(f"error: {res['error']}")
            continue
        p(describe_task(tasks[name], res))
        p("")
        p(model_table(name, res, threads))
        ratio = easyquant_ratio_line(res)
        if ratio:
            p(ratio)
        for line in memory_time_lines(res):
            p(line)
        errs = [r for r in res["rows"] if r["status"] not in ("ok", "skipped")]
        for r in errs:
            q = r.get("quantize") or {}
            last = (q.get("stderr") or "").strip().splitlines()[-1:] if q and q.get("status") != "ok" else []
            p(f"  * {r['config']['label']}: {r['status']}: {last[0] if last else r.get('error')}")
        if res.get("as_shipped"):
            p("")
            p("as shipped (the rapidocr file itself, 4 calibration samples):")
            body = []
            for e in res["as_shipped"]:
                ik = e.get("integer_kernels") or {}
                body.append([e["tool"], e["result"], f"{ik['integer']}/{ik['integer'] + ik['float']}" if "integer" in ik else "-", str(e.get("warnings", "-"))])
            p(md_table(["tool", "result", "int ops", "quantizer warnings"], body))
    peers = peers_table(doc)
    if peers:
        p("")
        p("## onnxq vs peers: fidelity to FP32 (higher is better), same calibration and evaluation data")
        p(peers)
        line = peer_versions_line(doc)
        if line:
            p(line)
    if doc.get("u8_vs_s8"):
        p("")
        p("## ORT U8S8 (--target ort) vs S8S8 (--target ort-s8): onnxq minmax, batch 1, interleaved median latency")
        body = []
        for e in doc["u8_vs_s8"]:
            if "error" in e:
                body.append([e["model"], "-", "-", "-", e["error"]])
                continue
            for t, lat in e["latency_ms"].items():
                (a, ta), (b, tb) = lat.items()
                f = e["faster"][t]
                body.append([e["model"], t, f"{ta:.3f}", f"{tb:.3f}", f"{f['winner']} by {f['by_percent']:.1f}%"])
        p(md_table(["model", "threads", "U8S8 ms", "S8S8 ms", "faster"], body))
    if doc.get("memory_flat"):
        p("")
        p("## Memory flat: peak RSS with N and 4N calibration samples (should be about 1x for a streaming calibrator)")
        body = []
        for e in doc["memory_flat"]:
            a, b = e["n"], e["n4"]
            cell = lambda x: f"{x['peak_rss_mb']:.0f}" if x["status"] == "ok" else (x.get("error") or x["status"])  # noqa: E731
            body.append([e["model"], e["tool"], str(a["samples"]), cell(a), str(b["samples"]), cell(b), f"{e['rss_ratio']:.2f}x" if e["rss_ratio"] else "-",
                         f"{a['wall_s']:.1f} / {b['wall_s']:.1f}"])
        p(md_table(["model", "calibrator", "N", "peak RSS MB (N)", "4N", "peak RSS MB (4N)", "RSS ratio 4N/N", "wall s (N / 4N)"], body))
    if doc.get("batch_size_probe"):
        p("")
        p("## onnxq --batch-size vs calibration wall time and peak RSS (minmax: range pass only, all calibration samples)")
        body = []
        for e in doc["batch_size_probe"]:
            for r in e["runs"]:
                body.append([e["model"], str(e["samples"]), str(r["batch_size"]), f"{r['wall_s']:.1f}",
                             f"{r['peak_rss_mb']:.0f}" if r["status"] == "ok" else (r.get("error") or r["status"])])
        p(md_table(["model", "samples", "--batch-size", "wall s", "peak RSS MB"], body))
    p("")
    p(f"total runtime {doc['runtime_s']:.0f} s")


def merged_peers_report(paths: list[str]) -> str:
    """The "onnxq vs peers" table and the peers' versions of several ``bench.py --json`` documents."""
    import json

    doc: dict[str, Any] = {"models": {}, "peers": {}}
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        doc["models"].update(d.get("models", {}))
        doc["peers"].update(d.get("peers") or {})
    return "\n".join(x for x in (peers_table(doc), peer_versions_line(doc)) if x)


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/tables.py RESULTS.json [RESULTS.json ...]")
    print(merged_peers_report(sys.argv[1:]))
