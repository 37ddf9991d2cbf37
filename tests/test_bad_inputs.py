"""Bad models, data and options: one ``onnxq: error:`` line on stderr, exit 1, nothing written.

Every case runs ``onnxq optimize`` in-process with ``--output`` inside an empty folder, then checks
that the folder is still empty (no output, no temporary file) and that stderr holds exactly one
line and no traceback.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

Setup = Callable[[Path, Path, Path], list[str]]


def _npz_dir(root: Path, name: str, **arrays) -> Path:
    folder = root / name
    folder.mkdir()
    np.savez(folder / "data_000.npz", **arrays)
    return folder


def _good_input(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (n, 1, 16, 16)).astype(np.float32)


# Each case builds its inputs under ``work`` and returns the optimize arguments (before --output).
# ``model`` is the bundled digits model, ``calib`` its calibration folder.

def case_not_onnx(work: Path, model: Path, calib: Path) -> list[str]:
    fake = work / "model.onnx"
    fake.write_text("this is a text file, not an ONNX model\n")
    return [fake, "--data", calib]


def case_not_onnx_textproto(work: Path, model: Path, calib: Path) -> list[str]:
    fake = work / "model.onnx"
    fake.write_text('ir_version: 8\ngraph { name: "g" }\n')
    return [fake, "--data", calib]


def case_empty_file(work: Path, model: Path, calib: Path) -> list[str]:
    fake = work / "model.onnx"
    fake.write_bytes(b"")
    return [fake, "--data", calib]


def case_truncated(work: Path, model: Path, calib: Path) -> list[str]:
    data = model.read_bytes()
    cut = work / "model.onnx"
    cut.write_bytes(data[: len(data) // 2])
    return [cut, "--data", calib]


def case_missing_model(work: Path, model: Path, calib: Path) -> list[str]:
    return [work / "no-such-model.onnx", "--data", calib]


def case_wrong_input_name(work: Path, model: Path, calib: Path) -> list[str]:
    return [model, "--data", _npz_dir(work, "data", wrong=_good_input())]


def case_wrong_shape(work: Path, model: Path, calib: Path) -> list[str]:
    return [model, "--data", _npz_dir(work, "data", input=np.zeros((4, 1, 8, 8), np.float32))]


def case_wrong_rank(work: Path, model: Path, calib: Path) -> list[str]:
    return [model, "--data", _npz_dir(work, "data", input=np.zeros((4, 16, 16), np.float32))]


def case_wrong_dtype(work: Path, model: Path, calib: Path) -> list[str]:
    return [model, "--data", _npz_dir(work, "data", input=_good_input().astype(np.float64))]


def case_nan(work: Path, model: Path, calib: Path) -> list[str]:
    x = _good_input()
    x[2, 0, 5, 7] = np.nan
    return [model, "--data", _npz_dir(work, "data", input=x)]


def case_inf(work: Path, model: Path, calib: Path) -> list[str]:
    x = _good_input()
    x[0, 0, 0, 0] = -np.inf
    return [model, "--data", _npz_dir(work, "data", input=x)]


def case_nan_in_a_later_file(work: Path, model: Path, calib: Path) -> list[str]:
    """The bad file is met mid-calibration, not on the first batch."""
    folder = work / "data"
    shutil.copytree(calib, folder)
    with np.load(folder / "calib_009.npz") as z:
        x = z["input"].copy()
    x[3, 0, 2, 2] = np.nan
    np.savez(folder / "calib_009.npz", input=x)
    return [model, "--data", folder]


def case_empty_data_folder(work: Path, model: Path, calib: Path) -> list[str]:
    folder = work / "data"
    folder.mkdir()
    return [model, "--data", folder]


def case_missing_data_folder(work: Path, model: Path, calib: Path) -> list[str]:
    return [model, "--data", work / "no-such-data"]


def case_corrupt_npz(work: Path, model: Path, calib: Path) -> list[str]:
    folder = work / "data"
    folder.mkdir()
    (folder / "data_000.npz").write_bytes(b"PK\x03\x04 definitely not a zip archive")
    return [model, "--data", folder]


def case_zero_samples(work: Path, model: Path, calib: Path) -> list[str]:
    return [model, "--data", _npz_dir(work, "data", input=np.zeros((0, 1, 16, 16), np.float32))]


def case_zero_eval_samples(work: Path, model: Path, calib: Path) -> list[str]:
    return [model, "--data", calib, "--eval-data", _npz_dir(work, "eval", input=np.zeros((0, 1, 16, 16), np.float32), label=np.zeros(0, np.int64))]


def case_extra_key(work: Path, model: Path, calib: Path) -> list[str]:
    return [model, "--data", _npz_dir(work, "data", input=_good_input(), mask=np.ones(4, np.float32))]


def case_object_array(work: Path, model: Path, calib: Path) -> list[str]:
    folder = work / "data"
    folder.mkdir()
    np.savez(folder / "data_000.npz", input=np.array([{"a": 1}, None], dtype=object))
    return [model, "--data", folder]


def _data_function(work: Path, model: Path, name: str, source: str) -> list[str]:
    """The arguments of a run whose --data is the function ``feeds`` of a script ``name``.py holding ``source``."""
    script = work / f"{name}.py"
    script.write_text(source)
    return [model, "--data", f"{script}:feeds"]


def case_failing_data_function(work: Path, model: Path, calib: Path) -> list[str]:
    return _data_function(work, model, "mydata", "def feeds():\n    raise RuntimeError('the database is down')\n")


def case_data_function_raising_part_way(work: Path, model: Path, calib: Path) -> list[str]:
    """Issue 16: a generator raising after two good batches was an internal error (exit 4)."""
    return _data_function(work, model, "partway",
                          "import numpy as np\n"
                          "def feeds():\n"
                          "    for i in range(4):\n"
                          "        if i == 2:\n"
                          "            raise ValueError('boom')\n"
                          "        yield {'input': np.zeros((4, 1, 16, 16), np.float32)}\n")


def case_data_function_calling_sys_exit(work: Path, model: Path, calib: Path) -> list[str]:
    """sys.exit(0) in a data function ended the run with exit 0, no model and no message: a CI step passed."""
    return _data_function(work, model, "exits",
                          "import sys\nimport numpy as np\n"
                          "def feeds():\n"
                          "    yield {'input': np.zeros((4, 1, 16, 16), np.float32)}\n"
                          "    sys.exit(0)\n")


def case_data_function_yielding_a_ragged_list(work: Path, model: Path, calib: Path) -> list[str]:
    """A value numpy cannot make an array of (a ragged list; a torch tensor that requires grad) was exit 4."""
    return _data_function(work, model, "ragged", "def feeds():\n    yield {'input': [[1.0, 2.0], [3.0]]}\n")


def case_data_function_with_fresh_random_data(work: Path, model: Path, calib: Path) -> list[str]:
    """Unseeded random data on each call: the check compared FP32 on one draw with the quantized model on another and
    called a good model collapsed."""
    return _data_function(work, model, "unseeded",
                          "import numpy as np\ndef feeds():\n    for _ in range(4):\n"
                          "        yield {'input': np.random.default_rng().normal(0, 1, (4, 1, 16, 16)).astype(np.float32)}\n")


def case_data_function_returning_one_generator(work: Path, model: Path, calib: Path) -> list[str]:
    """The same generator returned on every call is read once: the fidelity check saw no data and said nothing; now the
    pass that finds it spent says so (here the run's first pass after the command's own look at the data: "empty"). A
    module imported by name is imported once; a file.py spec is executed anew for each pass, a new generator each time."""
    import sys
    import uuid

    name = f"oneshot_{uuid.uuid4().hex[:8]}"
    (work / f"{name}.py").write_text("import numpy as np\nG = ({'input': np.full((4, 1, 16, 16), i / 4, np.float32)} for i in range(4))\n"
                                     "def feeds():\n    return G\n")
    sys.path.insert(0, str(work))
    return [model, "--data", f"{name}:feeds"]


def case_external_data_negative_offset(work: Path, model: Path, calib: Path) -> list[str]:
    """Issue 16: an external-data offset of -5 was an internal error (onnx's ValueError)."""
    import onnx

    m = onnx.load(str(model))
    out = work / "ext.onnx"
    onnx.save_model(m, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    m = onnx.load(str(out), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "offset":
                e.value = "-5"
    onnx.save_model(m, str(out))
    return [out, "--data", calib]


def case_labels_mismatch(work: Path, model: Path, calib: Path) -> list[str]:
    return [model, "--data", calib, "--eval-data", _npz_dir(work, "eval", input=_good_input(4), label=np.arange(3))]


def case_bad_eval_data(work: Path, model: Path, calib: Path) -> list[str]:
    """Calibration succeeds; the evaluation data is wrong: still nothing written."""
    return [model, "--data", calib, "--eval-data", _npz_dir(work, "eval", input=np.zeros((4, 1, 8, 8), np.float32))]


def case_unknown_method(work: Path, model: Path, calib: Path) -> list[str]:
    return [model, "--data", calib, "-p", "nosuch"]


def case_unknown_option(work: Path, model: Path, calib: Path) -> list[str]:
    return [model, "--data", calib, "-p", "trt-entropy", "-o", "nosuch", "1"]


def case_bad_option_value(work: Path, model: Path, calib: Path) -> list[str]:
    return [model, "--data", calib, "-p", "trt-entropy", "-o", "zero_bin", "nonsense"]


def case_bad_option_type(work: Path, model: Path, calib: Path) -> list[str]:
    return [model, "--data", calib, "-p", "percentile", "-o", "percentile", "lots"]


def case_option_out_of_range(work: Path, model: Path, calib: Path) -> list[str]:
    return [model, "--data", calib, "-p", "percentile", "-o", "percentile", "120"]


def case_bad_data_opt(work: Path, model: Path, calib: Path) -> list[str]:
    return [model, "--data", calib, "--data-opt", "nonsense"]


def case_output_parent_is_a_file(work: Path, model: Path, calib: Path) -> list[str]:
    (work / "afile").write_text("x")
    return [model, "--data", calib, "--output", work / "afile" / "q.onnx"]


CASES: dict[str, tuple[Setup, str]] = {
    # name: (setup, a word the error line must contain)
    "not-onnx": (case_not_onnx, "not a valid ONNX model"),
    "not-onnx-textproto": (case_not_onnx_textproto, "model.onnx"),
    "empty-file": (case_empty_file, "empty"),
    "truncated": (case_truncated, "not a valid ONNX model"),
    "missing-model": (case_missing_model, "does not exist"),
    "wrong-input-name": (case_wrong_input_name, "input"),
    "wrong-shape": (case_wrong_shape, "shape"),
    "wrong-rank": (case_wrong_rank, "rank"),
    "wrong-dtype": (case_wrong_dtype, "float64"),
    "nan": (case_nan, "NaN"),
    "inf": (case_inf, "Inf"),
    "nan-in-a-later-file": (case_nan_in_a_later_file, "calib_009.npz"),
    "empty-data-folder": (case_empty_data_folder, "data"),
    "missing-data-folder": (case_missing_data_folder, "no-such-data"),
    "corrupt-npz": (case_corrupt_npz, "data_000.npz"),
    "zero-samples": (case_zero_samples, "empty"),
    "zero-eval-samples": (case_zero_eval_samples, "empty"),
    "extra-key": (case_extra_key, "mask"),
    "object-array": (case_object_array, "data_000.npz"),
    "failing-data-function": (case_failing_data_function, "the database is down"),
    "data-function-raising-part-way": (case_data_function_raising_part_way, "partway.py:feeds' failed at batch 2: ValueError: boom"),
    "data-function-calling-sys-exit": (case_data_function_calling_sys_exit, "called sys.exit(0)"),
    "data-function-yielding-a-ragged-list": (case_data_function_yielding_a_ragged_list, "not an array numpy can read"),
    "data-function-with-fresh-random-data": (case_data_function_with_fresh_random_data, "seed its random generator"),
    "data-function-returning-one-generator": (case_data_function_returning_one_generator, "empty"),
    "external-data-negative-offset": (case_external_data_negative_offset, "offset"),
    "labels-mismatch": (case_labels_mismatch, "labels"),
    "bad-eval-data": (case_bad_eval_data, "shape"),
    "unknown-method": (case_unknown_method, "nosuch"),
    "unknown-option": (case_unknown_option, "nosuch"),
    "bad-option-value": (case_bad_option_value, "zero_bin"),
    "bad-option-type": (case_bad_option_type, "percentile"),
    "option-out-of-range": (case_option_out_of_range, "percentile"),
    "bad-data-opt": (case_bad_data_opt, "nonsense"),
    "output-parent-is-a-file": (case_output_parent_is_a_file, "afile"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(case, run_cli, digits_model, digits_calib, tmp_path):
    setup, must_mention = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = setup(work, digits_model, digits_calib)
    if "--output" not in args:
        args += ["--output", out_dir / "q.onnx"]
    work_before = sorted(p.relative_to(work) for p in work.rglob("*"))

    code, stdout, stderr = run_cli(["optimize", *args, "--no-cache"])

    assert code == 1, f"exit {code}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{stderr}"
    assert lines[0].startswith("onnxq: error: "), lines[0]
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert must_mention in lines[0], lines[0]
    assert list(out_dir.iterdir()) == [], "output folder is not empty"
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == work_before, "files appeared beside the inputs"


def test_random_data_warns_once(run_cli, digits_model, tmp_path):
    """--data random is allowed for smoke runs and says so exactly once (the data is read in several passes)."""
    code, _, stderr = run_cli(["optimize", digits_model, "--data", "random", "--output", tmp_path / "q.onnx", "--no-cache"])
    assert code == 0, stderr
    assert stderr.splitlines() == ["onnxq: warning: calibrating on random data: the scales will not suit real inputs (smoke runs only)"]


def test_compare_with_empty_data(run_cli, digits_model, tmp_path):
    data = _npz_dir(tmp_path, "eval", input=np.zeros((0, 1, 16, 16), np.float32))
    code, stdout, stderr = run_cli(["compare", digits_model, digits_model, "--data", data])
    assert code == 1 and stdout == ""
    assert stderr.splitlines() == [f"onnxq: error: the evaluation data '{data}' is empty"]


def test_python_compare_with_empty_data_is_a_data_error(digits_model, tmp_path):
    import onnxq
    from onnxq.errors import DataError

    data = _npz_dir(tmp_path, "eval", input=np.zeros((0, 1, 16, 16), np.float32))
    with pytest.raises(DataError, match="empty"):
        onnxq.compare(digits_model, {"same": digits_model}, str(data))


def test_bits_5_is_a_usage_error(run_cli, digits_model, digits_calib, tmp_path):
    out = tmp_path / "q.onnx"
    code, _, stderr = run_cli(["optimize", digits_model, "--data", digits_calib, "--bits", "5", "--output", out])
    assert code == 2
    assert "--bits" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_bits_5_in_python_api_is_an_option_error(digits_model):
    import onnxq
    from onnxq.errors import OptionError

    with pytest.raises(OptionError, match="--bits 5"):
        onnxq.optimize(digits_model, data="random", bits=5, show_progress=False)


@pytest.mark.parametrize("which", ["model", "output"])
def test_folder_instead_of_file_is_a_usage_error(run_cli, digits_model, digits_calib, tmp_path, which):
    folder = tmp_path / "x.onnx"
    folder.mkdir()
    model, out = (folder, tmp_path / "q.onnx") if which == "model" else (digits_model, folder)
    code, _, stderr = run_cli(["optimize", model, "--data", digits_calib, "--output", out, "--force"])
    assert code == 2 and "is a directory" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"] and not any(folder.iterdir())


def test_unknown_target_is_a_usage_error(run_cli, digits_model, digits_calib, tmp_path):
    code, _, stderr = run_cli(["optimize", digits_model, "--data", digits_calib, "--target", "tpu", "--output", tmp_path / "q.onnx"])
    assert code == 2 and "--target" in stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_model_with_debug_shows_traceback(run_proc, onnxq_exe, digits_calib, tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_text("not a model\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_proc([onnxq_exe, "--debug", "optimize", fake, "--data", digits_calib, "--output", out_dir / "q.onnx"])
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ModelError" in proc.stderr and "not a valid ONNX model" in proc.stderr
    assert list(out_dir.iterdir()) == []


def test_bad_model_without_debug_in_a_real_process(run_proc, onnxq_exe, digits_model, tmp_path):
    """The same one-line contract holds for the installed console script (stderr is not a TTY here)."""
    cut = tmp_path / "model.onnx"
    data = digits_model.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    proc = run_proc([onnxq_exe, "optimize", cut, "--data", "random", "--output", tmp_path / "q.onnx"])
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("onnxq: error: ")
    assert not (tmp_path / "q.onnx").exists()


def test_debug_prints_the_traceback_and_keeps_the_exit_code(digits_calib, tmp_path, capsys, monkeypatch):
    """--debug adds the traceback; the exit code stays what it is without it (a bug's 4 became Python's 1, which a CI
    step reads as a user error)."""
    from onnxq.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["--debug", "optimize", str(tmp_path / "missing.onnx"), "--data", str(digits_calib), "--output", str(tmp_path / "q.onnx")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback (most recent call last)" in err and "ModelError" in err
    assert err.rstrip().splitlines()[-1].startswith("onnxq: error: ")

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli_main, "_invoke", broken)
    for argv, traced in ((["--debug", "optimize"], True), (["optimize"], False)):
        with pytest.raises(SystemExit) as exit_info:
            cli_main.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 4 and ("Traceback" in err) == traced and "internal error: ZeroDivisionError: a bug" in err
