"""Outputs never clobber anything, are checked at the start, are reproducible, and fail as user errors.

Every refusal is a one-line ``onnxq: error:`` with exit 1; "at the start" is proved with a calibration
data generator that leaves a marker file when it is first read: a refused run never reads it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxq.errors import OutputError
from onnxq.graph.model_io import ensure_output_path, load_model, save_model_atomic


def _one_error_line(code: int, stdout: str, stderr: str, must_mention: str) -> str:
    assert code == 1, f"exit {code}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxq: error: "), stderr
    assert "Traceback" not in stderr
    assert must_mention in lines[0], lines[0]
    return lines[0]


def _external_model(model: onnx.ModelProto, folder: Path, name: str = "m.onnx", location: str = "m.onnx.data") -> Path:
    """``model`` with every weight in one external-data file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in load_model(path).graph.initializer}


def _marking_data(work: Path) -> tuple[str, Path]:
    """A ``file.py:function`` data spec for the tiny model that creates a marker file when first read."""
    marker = work / "data-was-read"
    script = work / "marking_data.py"
    script.write_text(
        "from pathlib import Path\nimport numpy as np\n\n"
        "def feeds():\n"
        f"    Path({str(marker)!r}).touch()\n"
        "    rng = np.random.default_rng(0)\n"
        "    for _ in range(2):\n"
        "        yield {'x': rng.uniform(0, 1, (4, 1, 8, 8)).astype(np.float32)}\n"
    )
    return f"{script}:feeds", marker


# ---------------------------------------------------------------------------------------------
# never a file the input reads
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("force", [False, True])
def test_output_on_the_inputs_external_data_is_refused(tiny_factory, run_cli, tmp_path, force):
    model = _external_model(tiny_factory(), tmp_path / "in")
    data_before = (tmp_path / "in" / "m.onnx.data").read_bytes()
    weights_before = _weights(model)
    spec, marker = _marking_data(tmp_path)
    args = ["optimize", model, "--data", spec, "--output", tmp_path / "in" / "m.onnx.data", "--no-cache", "--quiet"]
    line = _one_error_line(*run_cli(args + (["--force"] if force else [])), "external data of the input model")
    assert not marker.exists(), "refused only after calibration: " + line
    assert (tmp_path / "in" / "m.onnx.data").read_bytes() == data_before
    after = _weights(model)
    assert all(np.array_equal(after[k], v) for k, v in weights_before.items())


@pytest.mark.parametrize("link_kind", ["symlink", "hard-link"])
def test_output_through_a_link_to_the_inputs_data_is_refused(tiny_factory, run_cli, tmp_path, link_kind):
    model = _external_model(tiny_factory(), tmp_path / "in")
    link = tmp_path / "in" / "q.onnx"
    if link_kind == "symlink":
        link.symlink_to(tmp_path / "in" / "m.onnx.data")
    else:
        os.link(tmp_path / "in" / "m.onnx.data", link)
    data_before = (tmp_path / "in" / "m.onnx.data").read_bytes()
    _one_error_line(*run_cli(["optimize", model, "--data", "random", "--output", link, "--force", "--no-cache", "--quiet"]), "external data")
    assert (tmp_path / "in" / "m.onnx.data").read_bytes() == data_before


def test_output_whose_data_file_would_be_the_inputs_is_refused(tiny_factory, run_cli, tmp_path):
    # the input keeps its weights in "q.onnx.data": output q.onnx would write its weights there
    model = _external_model(tiny_factory(), tmp_path, "m.onnx", "q.onnx.data")
    _one_error_line(*run_cli(["optimize", model, "--data", "random", "--output", tmp_path / "q.onnx", "--force", "--no-cache", "--quiet"]),
                    "external data of the input model")
    assert not (tmp_path / "q.onnx").exists()
    assert _weights(model)


def test_data_file_of_another_model_is_not_replaced_without_force(tiny_factory, run_cli, tmp_path, monkeypatch, digits_model, digits_calib):
    monkeypatch.setenv("ONNXQ_EXTERNAL_DATA_ABOVE", "1000")  # the digits output gets an external-data file
    other = _external_model(tiny_factory(), tmp_path, "other.onnx", "q.onnx.data")  # another model already owns q.onnx.data
    other_before = _weights(other)
    code, out, err = run_cli(["optimize", digits_model, "--data", digits_calib, "--output", tmp_path / "q.onnx", "--no-cache", "--quiet"])
    _one_error_line(code, out, err, "q.onnx.data' already exists")
    after = _weights(other)
    assert all(np.array_equal(after[k], v) for k, v in other_before.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.onnx", "q.onnx.data"], "temporary files left behind"
    # with --force the user says so: the output replaces it and loads with its own weights
    code, out, err = run_cli(["optimize", digits_model, "--data", digits_calib, "--output", tmp_path / "q.onnx", "--force", "--no-cache", "--quiet"])
    assert code == 0, err
    assert load_model(tmp_path / "q.onnx").graph.node


# ---------------------------------------------------------------------------------------------
# checked at the start, as user errors
# ---------------------------------------------------------------------------------------------

def test_special_files_are_refused_even_with_force(tiny_factory, run_cli, tmp_path):
    fifo = tmp_path / "q.onnx"
    os.mkfifo(fifo)
    spec, marker = _marking_data(tmp_path)
    model = tmp_path / "tiny.onnx"
    onnx.save_model(tiny_factory(), str(model))
    _one_error_line(*run_cli(["optimize", model, "--data", spec, "--output", fifo, "--force", "--no-cache", "--quiet"]), "not a regular file")
    assert stat.S_ISFIFO(fifo.stat().st_mode) and not marker.exists()
    # a character device (as root, --force would have replaced /dev/null with a regular file): checked without writing
    with pytest.raises(OutputError, match="not a regular file"):
        ensure_output_path("/dev/null", [], force=True)


@pytest.mark.parametrize("where", ["grandparent-is-a-file", "proc", "sys", "read-only-folder"])
def test_unusable_output_folder_is_refused_at_the_start(tiny_factory, run_cli, tmp_path, where):
    model = tmp_path / "tiny.onnx"
    onnx.save_model(tiny_factory(), str(model))
    spec, marker = _marking_data(tmp_path)
    if where == "grandparent-is-a-file":
        (tmp_path / "afile").write_text("x")
        out, word = tmp_path / "afile" / "sub" / "q.onnx", "is not a folder"
    elif where == "proc":
        out, word = Path("/proc/onnxq-test-no-such/q.onnx"), "/proc"
    elif where == "sys":
        out, word = Path("/sys/onnxq-test.onnx"), "/sys"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out, word = ro / "q.onnx", "cannot create files"
    _one_error_line(*run_cli(["optimize", model, "--data", spec, "--output", out, "--no-cache", "--quiet"]), word)
    assert not marker.exists(), "the output location was checked only after calibration"


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A mounted tmpfs of 32 KiB (root only): a real full disk, no mocks."""
    if os.geteuid() != 0 or sys.platform != "linux":
        pytest.skip("mounting a tmpfs needs root on Linux")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 1024)
        except OSError:  # ENOSPC: full
            pass


def test_full_disk_is_refused_at_the_start(tiny_factory, run_cli, tiny_tmpfs, tmp_path):
    _fill(tiny_tmpfs)
    model = tmp_path / "tiny.onnx"
    onnx.save_model(tiny_factory(), str(model))
    spec, marker = _marking_data(tmp_path)
    _one_error_line(*run_cli(["optimize", model, "--data", spec, "--output", tiny_tmpfs / "q.onnx", "--no-cache", "--quiet"]), "no space left")
    assert not marker.exists()
    assert [p.name for p in tiny_tmpfs.iterdir()] == ["filler"]


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(run_cli, tiny_tmpfs, digits_model, digits_calib):
    # 32 KiB free passes the start check; the digits output (about 50 KB) does not fit
    code, out, err = run_cli(["optimize", digits_model, "--data", digits_calib, "--output", tiny_tmpfs / "q.onnx", "--no-cache", "--quiet"])
    _one_error_line(code, out, err, "No space left on device")
    assert list(tiny_tmpfs.iterdir()) == [], "temporary files left on the full disk"


def test_two_runs_on_one_output_cannot_both_write(run_cli, tmp_path, onnxq_exe, digits_model, digits_calib):
    out = tmp_path / "q.onnx"
    pause = tmp_path / "paused"
    env = {**os.environ, "_ONNXQ_TEST_PAUSE_BEFORE_RENAME": str(pause)}
    first = subprocess.Popen([onnxq_exe, "optimize", str(digits_model), "--data", str(digits_calib), "--output", str(out),
                              "--no-cache", "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not pause.exists():  # the first run has checked the output and is about to move its file into place
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        code, stdout, stderr = run_cli(["optimize", digits_model, "--data", digits_calib, "-p", "minmax", "--output", out, "--no-cache", "--quiet"])
        assert code == 0 and "wrote" in stdout, stderr
        written = out.read_bytes()
        pause.unlink()
        stdout, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 1, stderr
    assert "wrote" not in stdout and "created by someone else" in stderr and len(stderr.splitlines()) == 1, stderr
    assert out.read_bytes() == written, "the second run's output was replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]


# ---------------------------------------------------------------------------------------------
# the bytes and the files
# ---------------------------------------------------------------------------------------------

def test_identical_runs_give_identical_bytes_with_external_data(tmp_path, onnxq_exe, digits_model, digits_calib):
    outs = []
    for seed in ("1", "2"):  # different hash seeds: no set or dict order may leak into the file
        out = tmp_path / f"run{seed}" / "q.onnx"
        env = {**os.environ, "PYTHONHASHSEED": seed, "ONNXQ_EXTERNAL_DATA_ABOVE": "1000"}
        proc = subprocess.run([onnxq_exe, "optimize", str(digits_model), "--data", str(digits_calib), "-p", "percentile", "--output", str(out),
                               "--no-cache", "--quiet"], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outs.append(out)
    a, b = outs
    assert (a.parent / "q.onnx.data").stat().st_size > 10_000, "the weights did not go to the external-data file"
    assert a.read_bytes() == b.read_bytes()
    assert (a.parent / "q.onnx.data").read_bytes() == (b.parent / "q.onnx.data").read_bytes()
    assert sorted(p.name for p in a.parent.iterdir()) == ["q.onnx", "q.onnx.data"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_model_and_data_file_get_the_same_permissions(tiny_factory, tmp_path, monkeypatch, umask):
    monkeypatch.setenv("ONNXQ_EXTERNAL_DATA_ABOVE", "100")
    model = tiny_factory()
    old = os.umask(umask)
    try:
        out = save_model_atomic(model, tmp_path / "q.onnx")
    finally:
        os.umask(old)
    data = tmp_path / "q.onnx.data"
    assert data.is_file()
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(data.stat().st_mode) == 0o666 & ~umask


def test_stale_temp_files_are_never_reused(tiny_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXQ_EXTERNAL_DATA_ABOVE", "100")
    model = tiny_factory()
    stale = b"STALE-BYTES-FROM-A-KILLED-RUN" * 8
    for name in (".q.onnx.data.tmp", ".q.onnx.tmp"):  # the names earlier versions used
        (tmp_path / name).write_bytes(stale)
    save_model_atomic(model, tmp_path / "q.onnx")
    data = (tmp_path / "q.onnx.data").read_bytes()
    assert b"STALE" not in data
    expected = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    got = _weights(tmp_path / "q.onnx")
    assert all(np.array_equal(got[k], v) for k, v in expected.items())
    # the saved model in memory still holds its weights (they were moved out only for the write)
    assert all(t.HasField("raw_data") and not t.external_data for t in model.graph.initializer if t.name in expected)


# ---------------------------------------------------------------------------------------------
# quality-gate thresholds
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option,value", [("--min-cosine", "nan"), ("--max-drop", "nan"), ("--max-drop", "inf"), ("--min-cosine", "-inf")])
def test_non_finite_gate_thresholds_are_refused(run_cli, tmp_path, option, value, digits_model, digits_calib, digits_eval):
    code, out, err = run_cli(["optimize", digits_model, "--data", digits_calib, "--eval-data", digits_eval, option, value,
                              "--output", tmp_path / "q.onnx", "--no-cache", "--quiet"])
    assert code in (1, 2), f"exit {code}: {err}"
    assert option in err and "Traceback" not in err
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("force", [False, True])
def test_export_cache_never_writes_over_the_models_external_data(run_cli, tmp_path, monkeypatch, digits_model, digits_calib, force):
    monkeypatch.setenv("ONNXQ_EXTERNAL_DATA_ABOVE", "1000")
    qdq = tmp_path / "q.onnx"
    code, _, err = run_cli(["optimize", digits_model, "--data", digits_calib, "--output", qdq, "--no-cache", "--quiet"])
    assert code == 0, err
    before = (tmp_path / "q.onnx.data").read_bytes()
    _one_error_line(*run_cli(["export-cache", qdq, tmp_path / "q.onnx.data"] + (["--force"] if force else [])), "external data of the input model")
    assert (tmp_path / "q.onnx.data").read_bytes() == before
