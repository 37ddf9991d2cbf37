"""Latency measured round-robin: several models timed in turns, so load from other processes falls on all alike.

Single-model latency is onnxq's own (``onnxq.runtime.ort.latency_ms``); what is here is the
interleaved timing the suite uses where models are compared with each other on a shared machine:
the MiniLM table and the U8S8 vs S8S8 table.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.runtime.ort import make_session


def round_robin_ms(models: list[onnx.ModelProto | str | Path], feed: dict[str, np.ndarray], threads: int, rounds: int, per_round: int = 1,
                   warmup: int = 3) -> list[list[float]]:
    """Wall times in ms of every run of each model (ORT_ENABLE_ALL, ``threads`` intra-op threads).

    After ``warmup`` runs of each, ``rounds`` rounds run each model ``per_round`` times in turn."""
    sessions = [make_session(m if isinstance(m, onnx.ModelProto) else str(m), "all", threads=threads) for m in models]
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, sess in enumerate(sessions):
            for _ in range(per_round):
                t0 = time.perf_counter()
                sess.run(None, feed)
                times[i].append((time.perf_counter() - t0) * 1e3)
    return times


def interleaved_latency(rows: list[dict], paths: dict[str, Path], feed: dict, threads: list[int], repeats: int, warmup: int = 3) -> None:
    """Re-time every evaluated model round-robin (one run of each per round) and replace its latency
    cells, so that load from other processes on a shared machine falls on all models alike; adds
    ``speedup_1t`` (FP32 latency / model latency at 1 thread) to the metrics. ``paths``: model file per row key."""
    ok = [r for r in rows if r["status"] == "ok" and "latency_ms" in r]
    if not ok:
        return
    for t in threads:
        times = round_robin_ms([paths[r["config"]["key"]] for r in ok], feed, t, repeats, warmup=warmup)
        for r, v in zip(ok, times):
            r["latency_ms"][f"{t}t"] = round(statistics.median(v), 4)
    fp32 = next((r for r in ok if r["config"]["tool"] == "fp32"), None)
    if fp32 and "1t" in fp32["latency_ms"]:
        for r in ok:
            r["metrics"]["speedup_1t"] = fp32["latency_ms"]["1t"] / r["latency_ms"]["1t"]


def u8_vs_s8(model: str, paths: dict[str, Path], feed: dict, threads: list[int], rounds: int, repeats: int) -> dict[str, Any]:
    """Interleaved median latency of two models, ``paths`` = {"ort (U8S8)": ..., "ort-s8 (S8S8)": ...}, and which is faster."""
    res: dict[str, Any] = {"model": model, "method": "minmax", "latency_ms": {}, "faster": {}}
    per_round = max(3, repeats // rounds)
    for t in threads:
        times = round_robin_ms(list(paths.values()), feed, t, rounds, per_round)
        med = {n: statistics.median(v) for n, v in zip(paths, times)}
        res["latency_ms"][f"{t}t"] = med
        (a, ta), (b, tb) = med.items()
        fast = a if ta <= tb else b
        res["faster"][f"{t}t"] = {"winner": fast, "by_percent": 100.0 * (max(ta, tb) / min(ta, tb) - 1.0)}
    res["samples_per_model"] = rounds * per_round
    return res
