"""Run a command in a child process and measure its wall time and peak RSS.

The peak RSS is ``ru_maxrss`` of the rusage that ``os.wait4`` returns for that
child (on Linux: the child's own high-water mark, and that of any of its own
children it waited for), so each measurement covers exactly one run and not the
benchmark process itself.

An optional address-space cap (``RLIMIT_AS``, set in the child before ``exec``)
turns a run that needs too much memory into a quick, recognisable failure
(``status == "oom"``) instead of swapping or taking the benchmark down with it,
and an optional timeout kills the child's whole process group
(``status == "timeout"``).
"""
from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

#: stderr fragments that mean "ran out of (capped) memory"
OOM_PATTERNS = re.compile(
    r"MemoryError|std::bad_alloc|bad_alloc|Failed to allocate memory|Cannot allocate memory|"
    r"Unable to allocate|out of memory|ENOMEM|onnxruntime::OnnxRuntimeException.*alloc",
    re.IGNORECASE,
)


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
    mem_limit_mb: float | None = None
    timeout_s: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

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


def run_measured(
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    mem_limit_bytes: int | None = None,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    poll_s: float = 0.05,
) -> Measurement:
    """Run ``argv`` to completion and return its status, wall time and peak RSS (MiB).

    stdout/stderr go to temporary files (no pipe can fill up) and are returned as text.
    The child gets its own session, so a timeout kills it and everything it started.
    """
    argv = [str(a) for a in argv]
    with tempfile.TemporaryFile("w+b") as out, tempfile.TemporaryFile("w+b") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd,
            env=dict(env) if env is not None else None, preexec_fn=_limit(mem_limit_bytes),
            start_new_session=True,
        )
        timed_out = False
        deadline = t0 + timeout if timeout else None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
        rc = os.waitstatus_to_exitcode(status)
        proc.returncode = rc  # we reaped it ourselves; keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    if timed_out:
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
    )


if __name__ == "__main__":  # tiny self-test: python benchmarks/_measure.py
    import sys

    small = run_measured([sys.executable, "-c", "x = bytearray(50 * 2**20); print(len(x))"])
    big = run_measured([sys.executable, "-c", "x = bytearray(400 * 2**20); print(len(x))"])
    oom = run_measured([sys.executable, "-c", "x = bytearray(4 * 2**30)"], mem_limit_bytes=1 * 2**30)
    slow = run_measured([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1.0)
    for name, m in [("50 MB", small), ("400 MB", big), ("4 GB capped at 1 GB", oom), ("sleep 30 s, timeout 1 s", slow)]:
        print(f"{name:24} status={m.status:8} wall={m.wall_s:6.2f}s peak_rss={m.peak_rss_mb:8.1f} MB  {m.error_line() if not m.ok else ''}")
