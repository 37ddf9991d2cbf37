"""benchmarks/_measure.py's RSS cap, and the suite's memory/time check built on it (benchmarks/checks.py).

The children are tiny Python processes (a few hundred MB for well under a second); nothing
here times anything.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ru_maxrss in KiB (Linux)")


def _load(name: str):
    """benchmarks/NAME.py as a top-level module, the way bench.py imports _measure."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


MB = 2**20
#: writes every page of 300 MB (so it is resident), then lingers long enough to be seen
ALLOC_300MB = "import time; x = b'\\x01' * (300 * 2**20); time.sleep({linger})"


def test_rss_cap_kills_the_group_and_says_so():
    m = _load("_measure")
    r = m.run_measured([sys.executable, "-c", ALLOC_300MB.format(linger=30)], rss_limit_bytes=150 * MB, timeout=60)
    assert r.status == "oom"
    assert r.rss_capped
    assert r.rss_limit_mb == 150
    assert r.extra["rss_cap_exceeded_mb"] > 150
    assert "killed by the RSS watchdog" in r.stderr
    assert r.returncode == -9
    assert r.mem_limit_mb is None  # no address-space cap unless asked for


def test_rss_cap_counts_the_childs_own_children():
    m = _load("_measure")
    inner = ALLOC_300MB.format(linger=30)
    outer = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {inner!r}])"
    r = m.run_measured([sys.executable, "-c", outer], rss_limit_bytes=150 * MB, timeout=60)
    assert r.status == "oom" and r.rss_capped  # the grandchild holds the memory; the group is killed


def test_under_the_rss_cap_the_run_is_ok_with_a_plausible_peak():
    m = _load("_measure")
    r = m.run_measured([sys.executable, "-c", ALLOC_300MB.format(linger=0.5)], rss_limit_bytes=1024 * MB, timeout=60)
    assert r.status == "ok", r.stderr
    assert not r.rss_capped
    assert 300 <= r.peak_rss_mb < 1024  # ru_maxrss, as before
    assert 250 <= r.extra["group_peak_rss_mb"] <= 1024  # the watchdog's sampled sum


def _row(key, label, tool, status="ok", quantize=None, metrics=None, error=None):
    r = {"config": {"key": key, "label": label, "tool": tool, "bits": 8, "method": None}, "status": status}
    for k, v in (("quantize", quantize), ("metrics", metrics), ("error", error)):
        if v is not None:
            r[k] = v
    return r


def _q(status, wall, rss, extra=None, cap=18432):
    return {"status": status, "wall_s": wall, "peak_rss_mb": rss, "extra": extra or {}, "rss_limit_mb": cap}


def test_memory_time_check_uses_killed_runs_as_lower_bounds():
    checks = _load("checks")
    rows = [
        _row("onnxq-minmax", "onnxq minmax", "onnxq", quantize=_q("ok", 5.0, 260), metrics={"char_accuracy": 0.95}),
        _row("onnxq-easyquant", "onnxq easyquant", "onnxq", quantize=_q("ok", 200.0, 1300), metrics={"char_accuracy": 0.99}),
        _row("ort-percentile", "ORT quantize_static Percentile", "ort", "oom", _q("oom", 60.0, 18400, {"rss_cap_exceeded_mb": 18500.0}),
             error="> 18.0 GB (killed after 60 s)"),
        _row("ort-entropy", "ORT quantize_static Entropy", "ort", "error", _q("error", 3.0, 900), error="error: Too many bins for data range"),
    ]
    chk = checks.memory_time_check("ppocr-rec", rows)
    refs = {e["key"]: e for e in chk["ort_histogram"]}
    assert refs["ort-percentile"]["lower_bound"] and refs["ort-percentile"]["rss_mb"] == 18432
    assert "excluded" in refs["ort-entropy"]  # crashed, not for memory: no reference
    rows_ = {e["key"]: e for e in chk["rows"]}
    assert rows_["onnxq-minmax"]["all_ok"]  # 260 MB <= 18 GB / 4 and 5 s < 60 s are proven by the bounds
    eq = rows_["onnxq-easyquant"]
    assert eq["rss_ok"] and eq["ratio_ok"] and eq["wall_ok"] is None  # 200 s vs "> 60 s": undecided
    assert chk["best"] == "onnxq-minmax" and chk["met"] is True
    lines = "\n".join(checks.memory_time_lines({"memory_time_check": chk}))
    assert "Percentile > 18.0 GB (killed at the RSS cap after 60 s)" in lines
    assert "=> met: best onnxq configuration onnxq minmax" in lines
