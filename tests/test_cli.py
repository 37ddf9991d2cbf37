"""The ``onnxq`` command line: optimize, quality gates, output safety, methods/plugins/env/compare/lint.

Most tests call ``onnxq.cli.main.main(argv)`` in-process (``run_cli``); a few run the real console
script and ``python -m onnxq`` as subprocesses.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

#: a quantized digits model may lose at most this many accuracy points against FP32
MAX_DROP_POINTS = 0.5


def _table_rows(text: str) -> dict[str, list[str]]:
    """Rows of an evaluation table keyed by model name (columns split on 2+ spaces)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("model ") and "accuracy" in line:
            rows = {}
            for row in lines[i + 2 :]:
                if not row.strip():
                    break
                cells = re.split(r"\s{2,}", row.strip())
                rows[cells[0]] = cells
            return rows
    raise AssertionError(f"no evaluation table in:\n{text}")


def _strict_json(text: str):
    """Parse JSON the way strict parsers (jq, JavaScript) do: no NaN/Infinity literals."""

    def refuse(token: str):
        raise AssertionError(f"non-standard JSON constant {token!r} in --json output")

    return json.loads(text, parse_constant=refuse)


def _percent(cell: str) -> float:
    assert cell.endswith("%"), cell
    return float(cell[:-1])


@pytest.fixture(scope="module")
def trt_model(tmp_path_factory, digits_model, digits_calib) -> Path:
    """A trt-target INT8 model of the digits example, made once for the module."""
    import onnxq

    out = tmp_path_factory.mktemp("cli-models") / "digits.trt-int8.onnx"
    onnxq.optimize(digits_model, out, method="trt-entropy", target="trt", data=str(digits_calib), cache_dir=None, show_progress=False)
    return out


# ---------------------------------------------------------------------------------------------
# optimize
# ---------------------------------------------------------------------------------------------

def test_optimize_with_eval_prints_table_and_writes_output(run_cli, digits_model, digits_calib, digits_eval, tmp_path, accuracy_of, digits_fp32_accuracy):
    out = tmp_path / "q.onnx"
    code, stdout, stderr = run_cli(["optimize", digits_model, "-p", "trt-entropy", "--data", digits_calib, "--eval-data", digits_eval,
                                    "--output", out, "--no-cache"])
    assert code == 0, stderr
    assert out.is_file()
    assert f"wrote {out}" in stdout
    assert "method trt-entropy, target ort, 8-bit" in stdout
    rows = _table_rows(stdout)
    assert set(rows) == {"fp32", "onnxq ort int8"}
    assert _percent(rows["fp32"][1]) == pytest.approx(99.4, abs=1e-6)
    assert _percent(rows["onnxq ort int8"][1]) >= 99.4 - MAX_DROP_POINTS
    assert rows["onnxq ort int8"][-1] == "100%"  # int-kernels column: all compute on integer kernels
    # what was written is what was evaluated: a valid model with the same accuracy
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert accuracy_of(out) * 100 == pytest.approx(_percent(rows["onnxq ort int8"][1]), abs=0.01)
    assert "Traceback" not in stderr


def test_optimize_json_is_one_document(run_cli, digits_model, digits_calib, digits_eval, tmp_path):
    out = tmp_path / "q.onnx"
    code, stdout, stderr = run_cli(["optimize", digits_model, "-p", "percentile", "-o", "percentile", "99.9", "--target", "trt",
                                    "--data", digits_calib, "--eval-data", digits_eval, "--output", out, "--json", "--no-cache"])
    assert code == 0, stderr
    doc = _strict_json(stdout)  # the whole of stdout is one JSON document
    report = doc["report"]
    _validate_report(run_cli, report)
    assert report["method"] == ["percentile"]
    assert report["options"]["percentile"]["percentile"] == pytest.approx(99.9)
    assert report["target"] == "trt" and report["bits"] == 8
    assert report["output"] == str(out) and out.is_file()
    assert report["quantized_weights"] == 7 and report["quantized_activations"] > 0
    assert report["calibration_seconds"] >= 0 and report["total_seconds"] >= report["calibration_seconds"]
    evals = {e["name"]: e for e in doc["evaluation"]}
    assert set(evals) == {"fp32", "onnxq trt int8"}
    head = next(iter(evals["onnxq trt int8"]["outputs"].values()))
    assert head["accuracy"] >= 0.994 - MAX_DROP_POINTS / 100
    assert head["cosine"] > 0.99 and head["sqnr_db"] > 20
    fp32 = next(iter(evals["fp32"]["outputs"].values()))
    assert fp32["sqnr_db"] is None and fp32["cosine"] == 1.0  # infinite SQNR is null in strict JSON
    assert doc["quality_gate"] is None


def test_optimize_default_output_name(run_cli, digits_model, digits_calib, tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(digits_model, model)
    code, _, stderr = run_cli(["optimize", model, "--data", digits_calib, "--target", "trt", "--bits", "7", "--no-cache", "--quiet"])
    assert code == 0, stderr
    assert (tmp_path / "m.trt-int7.onnx").is_file()


def test_output_folder_is_created(run_cli, digits_model, digits_calib, tmp_path):
    out = tmp_path / "new" / "deeper" / "q.onnx"
    code, _, stderr = run_cli(["optimize", digits_model, "--data", digits_calib, "--output", out, "--no-cache", "--quiet"])
    assert code == 0, stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx"]


def test_refuses_to_overwrite_without_force(run_cli, digits_model, digits_calib, tmp_path):
    out = tmp_path / "q.onnx"
    out.write_bytes(b"precious")
    args = ["optimize", digits_model, "--data", digits_calib, "--output", out, "--no-cache", "--quiet"]
    code, stdout, stderr = run_cli(args)
    assert code == 1
    assert stderr.startswith("onnxq: error:") and "--force" in stderr and len(stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"precious"
    code, _, stderr = run_cli(args + ["--force"])
    assert code == 0, stderr
    onnx.checker.check_model(onnx.load(str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink"])
@pytest.mark.parametrize("force", [False, True])
def test_never_overwrites_the_input(run_cli, digits_model, digits_calib, tmp_path, spelling, force):
    model = tmp_path / "sub" / "model.onnx"
    model.parent.mkdir()
    shutil.copy(digits_model, model)
    before = model.read_bytes()
    if spelling == "same":
        out = model
    elif spelling == "dotdot":
        out = tmp_path / "sub" / ".." / "sub" / "model.onnx"
    else:
        out = tmp_path / "link.onnx"
        out.symlink_to(model)
    code, _, stderr = run_cli(["optimize", model, "--data", digits_calib, "--output", out, "--no-cache", "--quiet"] + (["--force"] if force else []))
    assert code == 1
    assert stderr.startswith("onnxq: error:") and len(stderr.strip().splitlines()) == 1
    assert model.read_bytes() == before
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.onnx"]


def test_quality_gate_impossible_drop_exits_3_and_writes_nothing(run_cli, digits_model, digits_calib, digits_eval, tmp_path):
    out = tmp_path / "q.onnx"
    code, stdout, stderr = run_cli(["optimize", digits_model, "--data", digits_calib, "--eval-data", digits_eval, "--max-drop", "-1",
                                    "--output", out, "--no-cache"])
    assert code == 3
    assert not out.exists() and list(tmp_path.iterdir()) == []
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxq: error: quality gate failed")
    assert "fp32" in stdout  # the evaluation is still shown


def test_quality_gate_json_reports_failure(run_cli, digits_model, digits_calib, digits_eval, tmp_path):
    out = tmp_path / "q.onnx"
    code, stdout, _ = run_cli(["optimize", digits_model, "--data", digits_calib, "--eval-data", digits_eval, "--max-drop", "-1",
                               "--output", out, "--no-cache", "--json"])
    assert code == 3 and not out.exists()
    doc = _strict_json(stdout)
    assert doc["quality_gate"] == "failed"
    assert doc["report"].get("output") is None


def test_quality_gate_failure_keeps_an_existing_output(run_cli, digits_model, digits_calib, digits_eval, tmp_path):
    out = tmp_path / "q.onnx"
    out.write_bytes(b"previous model")
    code, _, _ = run_cli(["optimize", digits_model, "--data", digits_calib, "--eval-data", digits_eval, "--max-drop", "-1",
                          "--output", out, "--force", "--no-cache", "--quiet"])
    assert code == 3
    assert out.read_bytes() == b"previous model" and sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]


def test_quality_gate_on_unlabelled_eval_data(run_cli, digits_model, digits_calib, tmp_path):
    """Without labels the gate uses top-1 disagreement with FP32."""
    out = tmp_path / "q.onnx"
    code, stdout, stderr = run_cli(["optimize", digits_model, "--data", digits_calib, "--eval-data", digits_calib, "--max-drop", "2",
                                    "--output", out, "--no-cache", "--json"])
    assert code == 0, stderr
    doc = _strict_json(stdout)
    head = next(iter({e["name"]: e for e in doc["evaluation"]}["onnxq ort int8"]["outputs"].values()))
    assert "accuracy" not in head and head["top1_agreement"] >= 0.98
    assert doc["quality_gate"] == "passed" and out.is_file()


def test_quality_gate_passes(run_cli, digits_model, digits_calib, digits_eval, tmp_path):
    out = tmp_path / "q.onnx"
    code, stdout, stderr = run_cli(["optimize", digits_model, "--data", digits_calib, "--eval-data", digits_eval, "--max-drop", "5",
                                    "--min-cosine", "0.99", "--output", out, "--no-cache"])
    assert code == 0, stderr
    assert out.is_file()


def test_quality_gate_needs_eval_data(run_cli, digits_model, digits_calib, tmp_path):
    code, _, stderr = run_cli(["optimize", digits_model, "--data", digits_calib, "--max-drop", "1", "--output", tmp_path / "q.onnx"])
    assert code == 1 and "--eval-data" in stderr
    assert list(tmp_path.iterdir()) == []


def test_max_drop_on_a_model_without_class_output_is_a_usage_error(run_cli, tmp_path):
    """--max-drop reads a class output; on a segmentation map the run failed as a quality gate (exit 3, "the evaluation
    failed") after writing the model. It is the user's error: one line, exit 1, nothing written."""
    import numpy as np
    import onnx

    from tests.evaluate.test_output_roles import segmentation_argmax

    model = tmp_path / "seg.onnx"
    onnx.save(segmentation_argmax(), str(model))
    rng = np.random.default_rng(0)
    for name in ("calib", "eval"):
        np.savez(tmp_path / f"{name}.npz", x=rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "q.onnx"
    code, _, stderr = run_cli(["optimize", model, "--data", tmp_path / "calib.npz", "--eval-data", tmp_path / "eval.npz",
                               "--max-drop", "2", "--output", out, "--no-cache"])
    lines = [ln for ln in stderr.splitlines() if ln.startswith("onnxq: error")]
    assert code == 1 and len(lines) == 1 and "--max-drop needs a classification output" in lines[0], stderr
    assert not out.exists()


def test_a_recipe_joined_with_plus_is_the_chain_of_its_methods(run_cli, digits_model, digits_calib, tmp_path):
    """`-p percentile+bias-correction`, as -p auto names a candidate in its report, builds what the two -p give."""
    outs = []
    for spelling in (["-p", "percentile+bias-correction"], ["-p", "percentile", "-p", "bias-correction"]):
        out = tmp_path / f"{len(outs)}.onnx"
        code, _, stderr = run_cli(["optimize", digits_model, *spelling, "--data", digits_calib, "--output", out, "--no-cache", "--quiet"])
        assert code == 0, stderr
        outs.append(onnx.load(str(out)))
    assert [n.op_type for n in outs[0].graph.node] == [n.op_type for n in outs[1].graph.node]
    inits = [{i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer} for m in outs]
    assert inits[0].keys() == inits[1].keys() and all(np.array_equal(inits[0][k], inits[1][k]) for k in inits[0])
    one = run_cli(["optimize", digits_model, "-p", "percentile", "--data", digits_calib, "--output", tmp_path / "p.onnx", "--no-cache", "--quiet"])
    assert one[0] == 0
    plain = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "p.onnx")).graph.initializer}
    assert any(k not in plain or not np.array_equal(plain[k], v) for k, v in inits[0].items()), "precondition: bias correction changes a bias"


def test_optimize_needs_data(run_cli, digits_model, tmp_path):
    code, _, stderr = run_cli(["optimize", digits_model, "--output", tmp_path / "q.onnx"])
    assert code == 1 and stderr.startswith("onnxq: error:") and "--data" in stderr


# ---------------------------------------------------------------------------------------------
# methods, plugins, env
# ---------------------------------------------------------------------------------------------

def test_methods_lists_the_builtins(run_cli):
    code, stdout, stderr = run_cli(["methods"])
    assert code == 0, stderr
    listed = {line.split()[0] for line in stdout.splitlines()[2:] if line.strip() and not line.startswith("(")}
    assert {"minmax", "percentile", "mse", "trt-entropy"} <= listed
    code, stdout, _ = run_cli(["methods", "--json"])
    assert code == 0
    names = {m["name"] for m in _strict_json(stdout)}
    assert {"minmax", "percentile", "mse", "trt-entropy"} <= names


def test_methods_shows_options(run_cli):
    code, stdout, stderr = run_cli(["methods", "trt-entropy"])
    assert code == 0, stderr
    option_rows = {line.split()[0] for line in stdout.splitlines() if line and not line.startswith(("option", "-"))}
    assert {"zero_bin", "kl"} <= option_rows
    assert "copy_next" in stdout
    code, stdout, _ = run_cli(["methods", "trt-entropy", "--json"])
    opts = {o["name"]: o for o in _strict_json(stdout)["options"]}
    assert opts["zero_bin"]["default"] == "copy_next" and opts["kl"]["default"] == "trt"
    code, stdout, _ = run_cli(["methods", "minmax"])
    assert code == 0 and "options: none" in stdout


def test_methods_unknown_name(run_cli):
    code, stdout, stderr = run_cli(["methods", "nosuch"])
    assert code == 1
    assert stderr.strip().splitlines() == [stderr.strip()] and stderr.startswith("onnxq: error: unknown method 'nosuch'")
    assert "trt-entropy" in stderr  # names what is available


def test_plugins_json(run_cli):
    code, stdout, stderr = run_cli(["plugins", "--json"])
    assert code == 0, stderr
    plugins = {p["name"]: p for p in _strict_json(stdout)}
    for name in ("minmax", "percentile", "mse", "trt-entropy", "readers"):
        assert plugins[name]["ok"] is True, plugins[name]
        assert plugins[name]["distribution"] == "onnxq"
        assert plugins[name]["error"] == ""
    assert "method:trt-entropy" in plugins["trt-entropy"]["provides"]
    assert {"reader:npz", "reader:random"} <= set(plugins["readers"]["provides"])
    code, stdout, _ = run_cli(["plugins"])
    assert code == 0 and re.search(r"^trt-entropy\s+onnxq \S+\s+ok\b", stdout, re.M)


def test_env(run_cli):
    code, stdout, stderr = run_cli(["env"])
    assert code == 0, stderr
    assert "onnxruntime" in stdout and "CPUExecutionProvider" in stdout
    code, stdout, _ = run_cli(["env", "--json"])
    info = _strict_json(stdout)
    import onnxruntime

    assert code == 0 and info["onnxruntime"] == onnxruntime.__version__
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))


def test_version(run_cli):
    import onnxq

    code, stdout, _ = run_cli(["--version"])
    assert code == 0 and onnxq.__version__ in stdout


def test_unknown_command_is_a_usage_error(run_cli):
    code, _, stderr = run_cli(["nosuchcommand"])
    assert code == 2 and "nosuchcommand" in stderr


# ---------------------------------------------------------------------------------------------
# compare and lint
# ---------------------------------------------------------------------------------------------

def test_compare_prints_both_rows(run_cli, digits_model, digits_eval, trt_model):
    code, stdout, stderr = run_cli(["compare", digits_model, trt_model, "--data", digits_eval])
    assert code == 0, stderr
    rows = _table_rows(stdout)
    assert set(rows) == {"fp32", trt_model.name}
    assert _percent(rows["fp32"][1]) == pytest.approx(99.4, abs=1e-6)
    assert _percent(rows[trt_model.name][1]) >= 99.4 - MAX_DROP_POINTS


def test_compare_json_with_layers(run_cli, digits_model, digits_eval, trt_model):
    code, stdout, stderr = run_cli(["compare", digits_model, trt_model, "--data", digits_eval, "--layers", "--json"])
    assert code == 0, stderr
    doc = _strict_json(stdout)
    names = [e["name"] for e in doc["evaluations"]]
    assert names == ["fp32", trt_model.name]
    layers = doc["layers"][trt_model.name]
    assert len(layers) == 7  # 6 Conv + Gemm outputs
    assert all(v["cosine"] > 0.95 and v["sqnr_db"] > 10 for v in layers.values()), layers


def test_compare_bad_candidate(run_cli, digits_model, digits_eval, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    code, _, stderr = run_cli(["compare", digits_model, bad, "--data", digits_eval])
    assert code == 1 and stderr.startswith("onnxq: error:") and len(stderr.strip().splitlines()) == 1


def test_backend_and_target_choices_come_from_the_registries(run_cli, digits_model, digits_eval, trt_model):
    code, _, stderr = run_cli(["compare", digits_model, trt_model, "--data", digits_eval, "--backend", "nope"])
    assert code == 2 and "'nope' is not one of 'ort', 'trt'." in stderr
    code, _, stderr = run_cli(["optimize", digits_model, "--data", "random", "--target", "nope"])
    assert code == 2 and "'nope' is not one of 'ort', 'trt', 'ort-s8'." in stderr
    code, _, stderr = run_cli(["lint", trt_model, "--target", "ort"])
    assert code == 1 and stderr == "onnxq: error: target 'ort' has no Q/DQ rule set to lint against (rule sets: trt)\n"


def test_lint_passes_on_trt_output(run_cli, trt_model):
    code, stdout, stderr = run_cli(["lint", trt_model])
    assert code == 0, stdout + stderr
    assert "no TensorRT Q/DQ rule findings" in stdout
    code, stdout, _ = run_cli(["lint", trt_model, "--json"])
    assert code == 0 and _strict_json(stdout) == []


def _ort_quantize_static_default(model: Path, calib: Path, out: Path) -> Path:
    import logging

    from onnxruntime import quantization as oq

    feeds = []
    for f in sorted(calib.glob("*.npz")):
        with np.load(f) as z:
            feeds.append({"input": z["input"]})

    class Reader(oq.CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT prints pre-processing advice on the root logger
    try:
        oq.quantize_static(str(model), str(out), Reader())  # every option at ORT's default
    finally:
        root.setLevel(level)
    return out


def test_lint_fails_on_ort_quantize_static_default(run_cli, digits_model, digits_calib, tmp_path):
    ortq = _ort_quantize_static_default(digits_model, digits_calib, tmp_path / "ortq.onnx")
    code, stdout, stderr = run_cli(["lint", ortq])
    assert code == 1
    assert stderr.strip().splitlines() == [stderr.strip()]
    m = re.match(r"onnxq: error: (\d+) TensorRT rule error\(s\)", stderr)
    assert m and int(m.group(1)) > 0
    assert re.search(r"^error zero-point ", stdout, re.M)  # asymmetric activations
    assert re.search(r"^error int32-bias ", stdout, re.M)  # int32 bias DequantizeLinear
    code, stdout, _ = run_cli(["lint", ortq, "--json"])
    findings = _strict_json(stdout)
    assert code == 1 and sum(f["severity"] == "error" for f in findings) == int(m.group(1))


def test_lint_bad_file(run_cli, tmp_path):
    code, _, stderr = run_cli(["lint", tmp_path / "missing.onnx"])
    assert code == 1 and stderr.startswith("onnxq: error:")


# ---------------------------------------------------------------------------------------------
# real processes
# ---------------------------------------------------------------------------------------------

def test_python_dash_m_onnxq_help(run_proc):
    proc = run_proc([sys.executable, "-m", "onnxq", "--help"])
    assert proc.returncode == 0, proc.stderr
    for command in ("optimize", "compare", "methods", "plugins", "env", "lint"):
        assert re.search(rf"^\s+{command}\b", proc.stdout, re.M), command


def test_console_script_end_to_end(run_proc, onnxq_exe, digits_model, digits_calib, digits_eval, tmp_path, accuracy_of, digits_fp32_accuracy):
    out = tmp_path / "out" / "digits.onnx"
    out.parent.mkdir()
    proc = run_proc([onnxq_exe, "optimize", digits_model, "-p", "trt-entropy", "--target", "trt", "--data", digits_calib,
                     "--eval-data", digits_eval, "--max-drop", "1", "--output", out, "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    doc = _strict_json(proc.stdout)
    assert doc["quality_gate"] == "passed" and doc["report"]["output"] == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["digits.onnx"]
    assert accuracy_of(out) >= digits_fp32_accuracy - MAX_DROP_POINTS / 100
    # the default statistics cache went to the test's XDG_CACHE_HOME, not the user's home
    import os

    assert any((Path(os.environ["XDG_CACHE_HOME"]) / "onnxq" / "stats").iterdir())
    lint = run_proc([onnxq_exe, "lint", out])
    assert lint.returncode == 0, lint.stdout + lint.stderr


def _validate_report(run_cli, report: dict) -> None:
    """``report`` validates against the schema ``onnxq schema report`` prints."""
    jsonschema = pytest.importorskip("jsonschema")
    code, stdout, stderr = run_cli(["schema", "report"])
    assert code == 0, stderr
    schema = _strict_json(stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(report)


def test_report_json_validates_against_the_schema(run_cli, digits_model, digits_calib, tmp_path):
    """``optimize --json`` with a quantized rewrite, INT7 and a default calibrator validates against ``onnxq schema report``."""
    out = tmp_path / "bc.onnx"
    code, stdout, stderr = run_cli(["optimize", digits_model, "-p", "bias-correction", "-o", "samples", "8", "--bits", "7",
                                    "--data", digits_calib, "--output", out, "--json", "--no-cache"])
    assert code == 0, stderr
    report = _strict_json(stdout)["report"]
    _validate_report(run_cli, report)
    assert report["method"] == ["trt-entropy", "bias-correction"] and report["int7_note"]
    (change,) = report["quantized_rewrites"]
    assert change["method"] == "bias-correction" and change["initializers_changed"]
    assert 0 < change["output_error"] < 0.1
    # the schema rejects what the report never holds
    import jsonschema

    schema = _strict_json(run_cli(["schema", "report"])[1])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**report, "bits": "8"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**report, "unknown_field": 1}, schema)


def test_two_calibrators_and_shared_options_are_one_line_errors(run_cli, digits_model, digits_calib):
    code, _, stderr = run_cli(["optimize", digits_model, "-p", "minmax", "-p", "percentile", "--data", digits_calib, "--no-cache"])
    assert code == 1
    assert stderr.strip() == "onnxq: error: methods 'minmax' and 'percentile' both set activation ranges and only one can; select one"
    code, _, stderr = run_cli(["optimize", digits_model, "-p", "easyquant", "-p", "bias-correction", "-o", "samples", "8",
                               "--data", digits_calib, "--no-cache"])
    assert code == 1 and len(stderr.strip().splitlines()) == 1
    assert "-o easyquant.samples 8" in stderr


def test_onnxruntime_kernel_warnings_stay_off_the_command_line(run_proc, tmp_path):
    """ONNX Runtime's kernels warn through its process-wide logger, not a session's: a tf2onnx Resize with the deprecated
    'tf_half_pixel_for_nn' printed a coloured line per session (6 in a minmax run, 46 in -p auto)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "", "scales"], ["y"], name="up", mode="nearest",
                              coordinate_transformation_mode="tf_half_pixel_for_nn")]
    graph = helper.make_graph(nodes, "up", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])], [w, scales])
    path = tmp_path / "up.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    proc = run_proc([sys.executable, "-m", "onnxq", "optimize", path, "-p", "minmax", "--data", "random", "--output",
                     tmp_path / "q.onnx", "--quiet"])
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime" not in proc.stderr, proc.stderr


def test_dash_o_with_a_model_file_points_to_output(run_cli, digits_model, tmp_path):
    """`-o out.onnx`, other tools' way to name the output, read as a method option: the error says which flag names it."""
    code, _, stderr = run_cli(["optimize", str(digits_model), "-p", "minmax", "--data", "random", "-o", str(tmp_path / "q.onnx"), "--force"])
    assert code == 1 and "has no option" in stderr and "--output" in stderr, stderr
    assert not (tmp_path / "q.onnx").exists()
