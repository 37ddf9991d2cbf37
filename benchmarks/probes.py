"""The small tables after the model tables: as shipped, memory flat in the sample count, --batch-size, U8S8 vs S8S8."""

from __future__ import annotations

from typing import Any

from configs import ONNXQ_BATCH, PROBE_BATCH_SIZES, Config
from runner import Runner, log, short_error
from scoring import integer_kernels
from tasks import Task, latency_feed, load_feed_files
from timing import u8_vs_s8


def as_shipped_probe(task: Task, runner: Runner) -> list[dict]:
    """Quantize the model exactly as distributed (a few samples) with onnxq and with ORT."""
    out = []
    mdir = runner.work / "models" / task.name
    n = 4
    for tool, fn in (("onnxq minmax", lambda p: runner.onnxq(task, Config("p", "p", "onnxq", "minmax", "ort", 8), p, max_samples=n, batch_size=n, model=task.shipped)),
                     ("ORT quantize_static MinMax", lambda p: runner.ort(task, "minmax", p, max_samples=n, model=task.shipped))):
        path = mdir / f"shipped-{tool.split()[0].lower()}.onnx"
        log(f"{task.name}: as-shipped probe: {tool} ...")
        m = fn(path)
        log(f"{task.name}: as-shipped probe: {tool}: {m.status}")
        entry = {"tool": tool, "samples": n, "status": m.status, "result": "ok" if m.ok else short_error(m), "quantize": m.to_json()}
        if m.ok:
            entry["integer_kernels"] = integer_kernels(path)
            warn = [ln for ln in m.stderr.splitlines() if "WARNING" in ln and "pre-process" not in ln]
            entry["warnings"] = len(warn)
            entry["warning_sample"] = warn[:3]
        out.append(entry)
    return out


def memory_flat(task: Task, runner: Runner, n: int, result_rows: list[dict]) -> list[dict]:
    """onnxq trt-entropy and ORT MinMax (digits: also ORT Percentile) with N and 4N calibration samples: peak RSS of each."""
    mdir = runner.work / "models" / task.name
    out = []
    main = {r["config"]["key"]: r for r in result_rows}
    total = task.calib_samples
    tools = ["onnxq trt-entropy", "ORT MinMax"] + (["ORT Percentile"] if task.name == "digits" else [])
    for tool in tools:
        entry: dict[str, Any] = {"model": task.name, "tool": tool, "n": n, "n4": 4 * n}
        for label, k in (("n", n), ("n4", 4 * n)):
            reuse_key = {"onnxq trt-entropy": "onnxq-trt-entropy", "ORT MinMax": "ort-minmax", "ORT Percentile": "ort-percentile"}[tool]
            if k >= total and reuse_key in main and main[reuse_key].get("quantize"):
                m_json = main[reuse_key]["quantize"]  # the main run already used all samples
                entry[label] = {"samples": total, "status": m_json["status"], "peak_rss_mb": m_json["peak_rss_mb"], "wall_s": m_json["wall_s"], "reused": reuse_key}
                continue
            path = mdir / f"flat-{tool.replace(' ', '-').lower()}-{k}.onnx"
            log(f"memory-flat: {task.name} {tool} with {k} samples ...")
            if tool.startswith("onnxq"):
                m = runner.onnxq(task, Config("f", "f", "onnxq", "trt-entropy", "ort", 8), path, max_samples=k)
            else:
                m = runner.ort(task, tool.split()[1].lower(), path, max_samples=k)
            entry[label] = {"samples": min(k, total), "status": m.status, "peak_rss_mb": m.peak_rss_mb, "wall_s": m.wall_s,
                            "error": None if m.ok else short_error(m)}
        a, b = entry["n"], entry["n4"]
        entry["rss_ratio"] = (b["peak_rss_mb"] / a["peak_rss_mb"]) if a["status"] == b["status"] == "ok" else None
        out.append(entry)
    return out


def batch_size_probe(task: Task, runner: Runner, result_rows: list[dict]) -> dict:
    """onnxq minmax (range pass only) wall time and peak RSS at several --batch-size values."""
    main = next((r for r in result_rows if r["config"]["key"] == "onnxq-minmax"), None)
    entry: dict[str, Any] = {"model": task.name, "samples": task.calib_samples, "runs": []}
    if main and main.get("quantize"):
        q = main["quantize"]
        entry["runs"].append({"batch_size": ONNXQ_BATCH[task.name] or "default (16)", "status": q["status"], "wall_s": q["wall_s"], "peak_rss_mb": q["peak_rss_mb"], "reused": "onnxq-minmax"})
    for bs in PROBE_BATCH_SIZES:
        if bs == ONNXQ_BATCH[task.name]:
            continue
        path = runner.work / "models" / task.name / f"bs{bs}-minmax.onnx"
        log(f"{task.name}: onnxq minmax with --batch-size {bs} ...")
        m = runner.onnxq(task, Config("b", "b", "onnxq", "minmax", "ort", 8), path, batch_size=bs)
        entry["runs"].append({"batch_size": bs, "status": m.status, "wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb, "error": None if m.ok else short_error(m)})
    return entry


def u8_vs_s8_probe(task: Task, rows: list[dict], runner: Runner, threads: list[int], rounds: int, repeats: int) -> dict:
    """Interleaved latency of onnxq minmax --target ort (U8S8) vs --target ort-s8 (S8S8), from the main table's models."""
    paths = {}
    for key, name in (("onnxq-minmax", "ort (U8S8)"), ("onnxq-minmax-s8", "ort-s8 (S8S8)")):
        r = next((r for r in rows if r["config"]["key"] == key), None)
        if r is None or r["status"] != "ok":
            return {"model": task.name, "error": f"{key} did not quantize"}
        paths[name] = runner.work / "models" / task.name / f"{key}.onnx"
    return u8_vs_s8(task.name, paths, latency_feed(task, load_feed_files(task.eval)), threads, rounds, repeats)
