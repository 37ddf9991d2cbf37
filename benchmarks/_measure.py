"""Run a command in a child process and measure its wall time and peak RSS.

The peak RSS is ``ru_maxrss`` of the rusage that ``os.wait4`` returns for that
child (on Linux: the child's own high-water mark, and that of any of its own
children it waited for), so each measurement covers exactly one run and not the
benchmark process itself.

The child gets its own session (and process group). A watchdog thread enforces two
optional limits on that group:

* an RSS cap (``rss_limit_bytes``): every ``poll_s`` (50 ms) it sums the resident set
  of every process in the group (``/proc/PID/stat``), keeps the highest sum seen
  (``extra["group_peak_rss_mb"]``) and, when the sum goes over the cap, kills the
  group: ``status == "oom"``, ``extra["rss_cap_exceeded_mb"]`` (the sum that crossed
  it) and a note at the end of ``stderr``. The run then needed *more than the cap*:
  a lower bound, unlike a failure under an address-space cap;
* a timeout, which kills the group too (``status == "timeout"``).

An optional address-space cap (``RLIMIT_AS``, ``mem_limit_bytes``, set in the child
before ``exec``) is still there; it counts reserved virtual memory, so it stops
programs that reserve much more than they touch (ONNX Runtime) far below their real
need, and a run failing under it (``status == "oom"`` from its stderr) says nothing
about its RSS.
"""
from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

#: stderr fragments that mean "ran out of (capped) memory"
OOM_PATTERNS = re.compile(
    r"MemoryError|std::bad_alloc|bad_alloc|Failed to allocate memory|Cannot allocate memory|"
    r"Unable to allocate|out of memory|ENOMEM|onnxruntime::OnnxRuntimeException.*alloc",
    re.IGNORECASE,
)

PAGE = os.sysconf("SC_PAGE_SIZE")
RESCAN_S = 0.5  # how often the watchdog looks through /proc for new members of the group


@dataclass
class Measurement:
    """Outcome of one measured child process."""

    argv: list[str]
    status: str  # "ok" | "error" | "oom" | "timeout"
    returncode: int | None
    wall_s: float
    peak_rss_mb: float
    user_s: float = 0.0
    sys_s: float = 0.0
    stdout: str = ""
    stderr: str = ""
    mem_limit_mb: float | None = None  # address-space cap (RLIMIT_AS)
    timeout_s: float | None = None
    rss_limit_mb: float | None = None  # RSS cap of the process group (watchdog)
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def rss_capped(self) -> bool:
        """Killed by the RSS watchdog: the run needed more than ``rss_limit_mb``."""
        return "rss_cap_exceeded_mb" in self.extra

    def error_line(self, width: int = 80) -> str:
        """One short line describing a failure (for a table cell)."""
        if self.status in ("oom", "timeout"):
            return self.status.upper() if self.status == "oom" else "timeout"
        lines = [ln.strip() for ln in (self.stderr or self.stdout).splitlines() if ln.strip()]
        msg = lines[-1] if lines else f"exit code {self.returncode}"
        return msg if len(msg) <= width else msg[: width - 3] + "..."

    def to_json(self, keep_output: int = 2000) -> dict:
        d = asdict(self)
        d["stdout"] = d["stdout"][-keep_output:]
        d["stderr"] = d["stderr"][-keep_output:]
        return d


def _limit(mem_limit_bytes: int | None):
    def preexec() -> None:  # runs in the child between fork and exec
        if mem_limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (mem_limit_bytes, mem_limit_bytes))

    return preexec


def _stat(pid: int) -> tuple[int, int] | None:
    """(process group, resident bytes) of ``pid`` from /proc/PID/stat; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
        rest = s[s.rindex(b")") + 2:].split()  # the command name may contain spaces and brackets
        return int(rest[2]), int(rest[21]) * PAGE  # fields 5 (pgrp) and 24 (rss, pages)
    except (OSError, ValueError, IndexError):  # gone, or a half-written entry of a process going away
        return None


class _Watchdog(threading.Thread):
    """Polls the summed RSS of process group ``pgid`` and enforces the RSS cap and the timeout."""

    def __init__(self, pgid: int, t0: float, rss_limit: int | None, timeout: float | None, poll_s: float) -> None:
        super().__init__(daemon=True)
        self.pgid, self.t0, self.rss_limit, self.timeout, self.poll_s = pgid, t0, rss_limit, timeout, poll_s
        self.members = {pgid}
        self.last_scan = 0.0
        self.peak = 0  # highest summed RSS seen (bytes)
        self.exceeded: tuple[int, float] | None = None  # (summed RSS, seconds) when the cap was crossed
        self.timed_out = False
        self.done = threading.Event()

    def _group_rss(self) -> int:
        now = time.perf_counter()
        if now - self.last_scan >= RESCAN_S:  # pick up processes the child started
            self.last_scan = now
            self.members |= {int(d) for d in os.listdir("/proc") if d.isdigit()}
        total = 0
        for pid in list(self.members):
            st = _stat(pid)
            if st is None or st[0] != self.pgid:
                self.members.discard(pid)
            else:
                total += st[1]
        self.members.add(self.pgid)
        return total

    def _kill(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def run(self) -> None:
        while not self.done.is_set():
            rss = self._group_rss()
            self.peak = max(self.peak, rss)
            elapsed = time.perf_counter() - self.t0
            if self.rss_limit and rss > self.rss_limit:
                self.exceeded = (rss, elapsed)
                self._kill()
                return
            if self.timeout and elapsed > self.timeout:
                self.timed_out = True
                self._kill()
                return
            self.done.wait(self.poll_s)


def run_measured(
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    mem_limit_bytes: int | None = None,
    rss_limit_bytes: int | None = None,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    poll_s: float = 0.05,
) -> Measurement:
    """Run ``argv`` to completion and return its status, wall time and peak RSS (MiB).

    stdout/stderr go to temporary files (no pipe can fill up) and are returned as text.
    The child gets its own session, so the RSS cap (``rss_limit_bytes``: summed RSS of the
    child's process group, polled every ``poll_s``) and the timeout kill it and everything
    it started. ``mem_limit_bytes`` is the address-space cap (RLIMIT_AS) of the child.
    """
    argv = [str(a) for a in argv]
    with tempfile.TemporaryFile("w+b") as out, tempfile.TemporaryFile("w+b") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd,
            env=dict(env) if env is not None else None, preexec_fn=_limit(mem_limit_bytes),
            start_new_session=True,
        )
        dog = _Watchdog(proc.pid, t0, rss_limit_bytes, timeout, poll_s)
        dog.start()
        # wait for the exit without reaping: the zombie keeps the pid (and process group id)
        # from being reused while the watchdog may still signal the group
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        wall = time.perf_counter() - t0
        dog.done.set()
        dog.join()
        _, status, usage = os.wait4(proc.pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        proc.returncode = rc  # we reaped it ourselves; keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    extra: dict = {"group_peak_rss_mb": round(dog.peak / 2**20, 1)}
    if dog.exceeded:
        rss, at = dog.exceeded
        state = "oom"
        extra["rss_cap_exceeded_mb"] = round(rss / 2**20, 1)
        extra["rss_cap_killed_after_s"] = round(at, 3)
        stderr += (f"\n[_measure] killed by the RSS watchdog after {at:.1f} s: the process group's RSS "
                   f"{rss / 2**20:.0f} MB went over the cap of {rss_limit_bytes / 2**20:.0f} MB\n")
    elif dog.timed_out:
        state = "timeout"
    elif rc == 0:
        state = "ok"
    elif OOM_PATTERNS.search(stderr) or rc == -signal.SIGKILL:
        state = "oom"
    else:
        state = "error"
    return Measurement(
        argv=argv, status=state, returncode=rc, wall_s=round(wall, 3),
        peak_rss_mb=round(usage.ru_maxrss / 1024.0, 1),  # Linux: ru_maxrss is in KiB
        user_s=round(usage.ru_utime, 3), sys_s=round(usage.ru_stime, 3),
        stdout=stdout, stderr=stderr,
        mem_limit_mb=round(mem_limit_bytes / 2**20) if mem_limit_bytes else None, timeout_s=timeout,
        rss_limit_mb=round(rss_limit_bytes / 2**20) if rss_limit_bytes else None, extra=extra,
    )


if __name__ == "__main__":  # tiny self-test: python benchmarks/_measure.py
    import sys

    small = run_measured([sys.executable, "-c", "x = bytearray(50 * 2**20); print(len(x))"])
    big = run_measured([sys.executable, "-c", "x = bytearray(400 * 2**20); print(len(x))"])
    oom = run_measured([sys.executable, "-c", "x = bytearray(4 * 2**30)"], mem_limit_bytes=1 * 2**30)
    rss = run_measured([sys.executable, "-c", "import time; x = bytearray(400 * 2**20); time.sleep(5)"], rss_limit_bytes=200 * 2**20)
    slow = run_measured([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1.0)
    for name, m in [("50 MB", small), ("400 MB", big), ("4 GB, address space 1 GB", oom), ("400 MB, RSS cap 200 MB", rss),
                    ("sleep 30 s, timeout 1 s", slow)]:
        print(f"{name:26} status={m.status:8} wall={m.wall_s:6.2f}s peak_rss={m.peak_rss_mb:8.1f} MB "
              f"group peak={m.extra['group_peak_rss_mb']:8.1f} MB  {m.error_line() if not m.ok else ''}")
