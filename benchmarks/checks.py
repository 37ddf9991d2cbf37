"""The suite's goals, checked on one model's rows: easyquant's wall time against onnxq minmax's
(the project goal: within 10x) and issue 8's memory/time check (onnxq INT8 peak RSS <= 1.5 GB and
<= 1/4 of ORT's histogram calibrators, wall time below ORT Percentile's), with the lines printed
under each table.

Rows are the JSON rows of ``bench.py`` (``config``, ``status``, ``quantize``, ``metrics``).
"""

from __future__ import annotations

from typing import Any

from configs import METRIC_COLUMNS, ORT_HISTOGRAM_KEYS

EASYQUANT_WALL_GOAL = 10.0  # project goal: easyquant within 10x of a plain minmax run on the same model and data


def easyquant_ratios(rows: list[dict]) -> list[dict]:
    """easyquant wall / onnxq minmax (INT8, --target ort) wall for every easyquant row of one table.

    ``wall`` is the whole child process (start-up, load, calibration, search, save);
    ``in_process`` uses onnxq's own ``total_seconds`` report when both runs have it."""
    by_key = {r["config"]["key"]: r for r in rows}
    base = by_key.get("onnxq-minmax")
    if not base or base["status"] != "ok" or not base.get("quantize"):
        return []
    bq = base["quantize"]
    b_total = ((bq.get("extra") or {}).get("onnxq_report") or {}).get("total_seconds")
    out = []
    for r in rows:
        c = r["config"]
        if c["method"] != "easyquant" or not r.get("quantize"):
            continue
        q = r["quantize"]
        if r["status"] != "ok":
            out.append({"key": c["key"], "label": c["label"], "status": r["status"], "error": r.get("error"), "wall_s": q["wall_s"],
                        "minmax_wall_s": bq["wall_s"], "ratio": None, "within_goal": False})
            continue
        total = ((q.get("extra") or {}).get("onnxq_report") or {}).get("total_seconds")
        e = {"key": c["key"], "label": c["label"], "wall_s": q["wall_s"], "minmax_wall_s": bq["wall_s"], "ratio": q["wall_s"] / bq["wall_s"]}
        if total and b_total:
            e["in_process_ratio"] = total / b_total
            e["total_seconds"], e["minmax_total_seconds"] = total, b_total
        e["within_goal"] = e["ratio"] <= EASYQUANT_WALL_GOAL
        out.append(e)
    return out


def easyquant_ratio_line(res: dict) -> str:
    ratios = res.get("easyquant_vs_minmax") or []
    if not ratios:
        return ""
    parts = []
    for e in ratios:
        if e["ratio"] is None:
            parts.append(f"{e['label'].replace('onnxq ', '')} {e['error']} after {e['wall_s']:.0f} s (minmax {e['minmax_wall_s']:.1f} s)")
            continue
        extra = f", onnxq-reported {e['in_process_ratio']:.1f}x" if "in_process_ratio" in e else ""
        parts.append(f"{e['label'].replace('onnxq ', '')} {e['wall_s']:.1f} s / {e['minmax_wall_s']:.1f} s = {e['ratio']:.1f}x{extra}"
                     f" ({'within' if e['within_goal'] else 'OVER'} {EASYQUANT_WALL_GOAL:.0f}x)")
    return "easyquant wall / minmax wall (onnxq minmax INT8 --target ort, same model and data): " + "; ".join(parts)


RSS_GOAL_MB = 1.5 * 1024  # issue 8: onnxq's peak RSS <= 1.5 GB (peak RSS is in MiB, GB here = GiB like --mem-cap-gb)
RSS_RATIO_GOAL = 0.25  # ... and <= 1/4 of the smallest peak RSS of ORT's histogram calibrators (Percentile, Entropy)


def ort_histogram_reference(r: dict) -> dict:
    """One ORT histogram-calibrator row as a reference for the memory/time check.

    Quantized: its peak RSS and wall time, exact. Killed at the RSS cap, out of memory otherwise,
    or timed out: lower bounds (the cap for a run the watchdog killed, else the peak RSS it had
    reached; the wall time it had run), since it had not finished. Any other failure (a crash
    that says nothing about memory) is excluded, with the reason."""
    c, q = r["config"], r.get("quantize") or {}
    e: dict[str, Any] = {"key": c["key"], "label": c["label"], "name": c["label"].split()[-1], "status": q.get("status", r["status"])}
    if not q:
        e.update(excluded=r.get("error") or r["status"])
        return e
    extra = q.get("extra") or {}
    e["wall_s"], e["peak_rss_mb"] = q["wall_s"], q["peak_rss_mb"]
    if q["status"] == "ok":
        e.update(rss_mb=q["peak_rss_mb"], wall_ref_s=q["wall_s"], lower_bound=False)
    elif "rss_cap_exceeded_mb" in extra:
        e.update(rss_mb=q["rss_limit_mb"], wall_ref_s=q["wall_s"], lower_bound=True, why=f"killed at the RSS cap after {q['wall_s']:.0f} s")
    elif q["status"] in ("oom", "timeout"):
        rss = max(q["peak_rss_mb"], extra.get("group_peak_rss_mb") or 0.0)
        e.update(rss_mb=rss, wall_ref_s=q["wall_s"], lower_bound=True,
                 why=f"{'OOM' if q['status'] == 'oom' else 'timeout'} after {q['wall_s']:.0f} s, at {rss:.0f} MB so far")
    else:
        e.update(excluded=f"failed after {q['wall_s']:.0f} s, not for memory: {r.get('error') or q['status']}")
    return e


def _ref_text(e: dict, what: str) -> str:
    """'5500 MB' / '> 18.0 GB' (what='rss') or '140.2 s' / '> 95.0 s' (what='wall') of a reference."""
    if what == "rss":
        if e["lower_bound"]:  # the cap itself (a round number of GB, as in the table's cell), else the RSS reached so far
            return f"> {e['rss_mb'] / 1024:.1f} GB" if e["why"].startswith("killed") else f"> {e['rss_mb']:.0f} MB"
        return f"{e['rss_mb']:.0f} MB"
    return f"> {e['wall_ref_s']:.1f} s" if e["lower_bound"] else f"{e['wall_ref_s']:.1f} s"


def _verdict(ok: bool, proven: bool = True) -> bool | None:
    """PASS / FAIL as True / False; None when a lower-bound reference cannot decide it."""
    return True if ok else (False if proven else None)


def memory_time_check(model: str, rows: list[dict]) -> dict:
    """Issue 8's memory/time criteria for every onnxq INT8 row that quantized and evaluated.

    Per row: peak RSS <= 1.5 GB; peak RSS <= 1/4 of the smallest peak RSS among ORT's histogram
    calibrator rows (a lower bound there proves a PASS but cannot prove a FAIL: None); wall time
    below ORT Percentile's (same rule). ``best``: the most accurate row (first metric column of the
    table) meeting all three, else the one meeting most."""
    refs = [ort_histogram_reference(r) for r in rows if r["config"]["key"] in ORT_HISTOGRAM_KEYS and r["status"] != "skipped"]
    usable = [e for e in refs if "excluded" not in e]
    smallest = min(usable, key=lambda e: e["rss_mb"]) if usable else None
    pct = next((e for e in usable if e["key"] == "ort-percentile"), None)
    metric = METRIC_COLUMNS[model][0]  # (header, key, format) of the table's first metric column: higher is better
    out: dict[str, Any] = {
        "goal": {"rss_max_mb": RSS_GOAL_MB, "rss_ratio_max": RSS_RATIO_GOAL, "wall": "below ORT Percentile's"},
        "ort_histogram": refs, "smallest_ort_histogram": smallest["key"] if smallest else None,
        "skipped_ort_histogram": [r["error"] for r in rows if r["config"]["key"] in ORT_HISTOGRAM_KEYS and r["status"] == "skipped"],
        "rows": [], "best": None, "met": None, "metric": metric[1], "metric_label": metric[0],
    }
    for r in rows:
        c, q = r["config"], r.get("quantize")
        if c["tool"] != "onnxq" or c["bits"] != 8 or r["status"] != "ok" or not q:
            continue
        rss, wall = q["peak_rss_mb"], q["wall_s"]
        e: dict[str, Any] = {"key": c["key"], "label": c["label"], "peak_rss_mb": rss, "wall_s": wall,
                             "metric": r["metrics"].get(metric[1]), "rss_ok": rss <= RSS_GOAL_MB, "ratio": None, "ratio_ok": None, "wall_ok": None}
        if smallest:
            e["ratio"] = rss / smallest["rss_mb"]  # an upper bound of the true ratio when the reference is a lower bound
            e["ratio_ok"] = _verdict(e["ratio"] <= RSS_RATIO_GOAL, not smallest["lower_bound"])
        if pct:
            e["wall_vs_percentile"] = wall / pct["wall_ref_s"]
            e["wall_ok"] = _verdict(wall < pct["wall_ref_s"], not pct["lower_bound"])
        e["passes"] = sum(v is True for v in (e["rss_ok"], e["ratio_ok"], e["wall_ok"]))
        e["all_ok"] = e["passes"] == 3
        out["rows"].append(e)
    if out["rows"]:
        best = max(out["rows"], key=lambda e: (e["all_ok"], e["passes"], e["metric"] if e["metric"] is not None else float("-inf")))
        out["best"] = best["key"]
        # True: some row meets all three; False: every row fails one for sure; None: not decidable
        # (no ORT reference, or a lower-bound reference leaves a criterion open)
        undecided = any(False not in v and None in v for v in ((e["rss_ok"], e["ratio_ok"], e["wall_ok"]) for e in out["rows"]))
        out["met"] = True if best["all_ok"] else (None if undecided else False)
    return out


def memory_time_lines(res: dict) -> list[str]:
    """The 'memory/time check' block under a model's table (see memory_time_check)."""
    chk = res.get("memory_time_check")
    if not chk:
        return []
    word = {True: "PASS", False: "FAIL", None: "?"}
    lines = [f"memory/time check (issue 8: onnxq INT8 peak RSS <= {RSS_GOAL_MB / 1024:.1f} GB and <= 1/{1 / RSS_RATIO_GOAL:.0f} of the smallest "
             "peak RSS of ORT's histogram calibrators, wall < ORT Percentile's; whole child process; '?' = the ORT reference is a lower bound "
             "that cannot decide it):"]
    refs = []
    for e in chk["ort_histogram"]:
        if "excluded" in e:
            refs.append(f"{e['name']} excluded ({e['excluded']})")
        else:
            refs.append(f"{e['name']} {_ref_text(e, 'rss')} ({e['why']})" if e["lower_bound"]
                        else f"{e['name']} {e['rss_mb']:.0f} MB, {e['wall_ref_s']:.1f} s")
    if not refs:
        refs = [f"none ({'; '.join(sorted(set(chk['skipped_ort_histogram']))) or 'not configured'})"]
    lines.append("  ORT histogram calibrators: " + "; ".join(refs))
    by_key = {e["key"]: e for e in chk["ort_histogram"]}
    smallest = by_key.get(chk["smallest_ort_histogram"])
    pct = by_key.get("ort-percentile")
    pct = pct if pct and "excluded" not in pct else None
    for e in chk["rows"]:
        parts = [f"peak RSS {e['peak_rss_mb']:.0f} MB {'<=' if e['rss_ok'] else '>'} {RSS_GOAL_MB / 1024:.1f} GB {word[e['rss_ok']]}"]
        if smallest:
            rel = "<= " if smallest["lower_bound"] else ""
            parts.append(f"{rel}{e['ratio']:.3f}x ORT {smallest['name']}'s {_ref_text(smallest, 'rss')} "
                         f"(goal <= {RSS_RATIO_GOAL:.2f}x) {word[e['ratio_ok']]}")
        else:
            parts.append("RSS ratio n/a (no ORT histogram reference)")
        if pct:
            parts.append(f"wall {e['wall_s']:.1f} s vs ORT Percentile {_ref_text(pct, 'wall')} {word[e['wall_ok']]}")
        else:
            parts.append("wall n/a (no ORT Percentile reference)")
        lines.append(f"  {e['label']}: " + "; ".join(parts))
    best = next((e for e in chk["rows"] if e["key"] == chk["best"]), None)
    if best:
        m = f"{chk['metric_label']} {best['metric']:.4f}" if best["metric"] is not None else chk["metric_label"]
        what = f"{best['label']} ({m}, {best['peak_rss_mb']:.0f} MB, {best['wall_s']:.1f} s)"
        if chk["met"]:
            lines.append(f"  => met: best onnxq configuration {what}, the most accurate of those meeting all three")
        elif chk["met"] is False:
            lines.append(f"  => NOT met by any onnxq INT8 row; closest: {what}, {best['passes']}/3 PASS")
        else:
            lines.append(f"  => undecided (no ORT reference, or a lower bound that cannot decide it); closest: {what}, {best['passes']}/3 PASS")
    else:
        lines.append("  => no onnxq INT8 row quantized")
    return lines
