"""SIGINT and SIGTERM: one line on stderr, exit 128 + the signal (130, 143), no temporary file left.

Each test runs the real ``onnxq`` command and sends the signal at a known moment: during calibration
(a data generator that creates a marker file, then reads slowly), during the save (the
``_ONNXQ_TEST_PAUSE_BEFORE_RENAME`` hook: the temporary files are written and the run waits), and
during start-up (as soon as the process has installed its handlers, seen in /proc).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals and /proc")

SIGNALS = [pytest.param(signal.SIGINT, 130, id="SIGINT"), pytest.param(signal.SIGTERM, 143, id="SIGTERM")]


def _slow_data(work: Path) -> tuple[str, Path]:
    """A data spec for the digits model that creates a marker after its first batch, then reads for minutes."""
    marker = work / "calibrating"
    script = work / "slow_data.py"
    script.write_text(
        "import time\nfrom pathlib import Path\nimport numpy as np\n\n"
        "def feeds():\n"
        "    rng = np.random.default_rng(0)\n"
        "    for i in range(100000):\n"
        "        if i == 1:\n"
        f"            Path({str(marker)!r}).touch()\n"
        "        time.sleep(0.01)\n"
        "        yield {'input': rng.uniform(0, 1, (4, 1, 16, 16)).astype(np.float32)}\n"
    )
    return f"{script}:feeds", marker


def _start(exe: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([exe, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _wait_for(proc: subprocess.Popen[str], ready, what: str) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"onnxq ended before {what}: exit {proc.returncode}\n{proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"onnxq never reached {what}")
        time.sleep(0.01)


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def _assert_interrupted(proc: subprocess.Popen[str], stderr: str, sig: int, code: int) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\n{stderr}"
    lines = [line for line in stderr.splitlines() if not line.startswith("onnxq: warning:")]
    assert lines == [f"onnxq: interrupted by {signal.Signals(sig).name}"], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("sig,code", SIGNALS)
def test_signal_during_calibration(onnxq_exe, tmp_path, digits_model, sig, code):
    spec, marker = _slow_data(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _start(onnxq_exe, ["optimize", digits_model, "--data", spec, "--output", out_dir / "q.onnx", "--no-cache", "--quiet"])
    _wait_for(proc, marker.exists, "calibration")
    proc.send_signal(sig)
    _, stderr = _finish(proc)
    _assert_interrupted(proc, stderr, sig, code)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("sig,code", SIGNALS)
def test_signal_during_save_removes_the_temporary_files(onnxq_exe, tmp_path, digits_model, digits_calib, sig, code):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    pause = tmp_path / "saving"
    # weights in an external-data file too: both temporary files must go
    env = {"_ONNXQ_TEST_PAUSE_BEFORE_RENAME": str(pause), "ONNXQ_EXTERNAL_DATA_ABOVE": "1000"}
    proc = _start(onnxq_exe, ["optimize", digits_model, "--data", digits_calib, "--output", out_dir / "q.onnx", "--no-cache", "--quiet"], env)
    _wait_for(proc, pause.exists, "the save")
    temps = sorted(p.name for p in out_dir.iterdir())
    assert len(temps) == 2 and all(n.startswith(".q.onnx.") and n.endswith(".tmp") for n in temps), temps
    proc.send_signal(sig)
    _, stderr = _finish(proc)
    _assert_interrupted(proc, stderr, sig, code)
    assert list(out_dir.iterdir()) == [], "temporary files left in the output folder"


def _catches_sigterm(pid: int) -> bool:
    """Whether ``pid`` has a handler for SIGTERM (Python has none by default: onnxq's code is running)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("delay", [0.0, 0.3], ids=["imports", "plugins"])
def test_ctrl_c_during_start_up_is_one_line(onnxq_exe, tmp_path, digits_model, delay):
    spec, _ = _slow_data(tmp_path)  # the run cannot end before the signal, whatever the machine's speed
    proc = _start(onnxq_exe, ["optimize", digits_model, "--data", spec, "--output", tmp_path / "q.onnx", "--no-cache", "--quiet"])
    _wait_for(proc, lambda: _catches_sigterm(proc.pid), "start-up")
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, stderr = _finish(proc)
    _assert_interrupted(proc, stderr, signal.SIGINT, 130)
    assert not (tmp_path / "q.onnx").exists()
