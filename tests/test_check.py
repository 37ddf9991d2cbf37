"""``onnxq check``: a quantized model against its FP32 source and a stored ``optimize --json`` result (exit 3 on a regression)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest


def _cli(argv: list[str]) -> tuple[int, str]:
    """Run ``onnxq ARGV`` in-process (module fixtures cannot use capsys); returns (exit code, stdout)."""
    from onnxq.cli.main import main

    logger = logging.getLogger("onnxq")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            main([str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code or 0), out.getvalue()
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
    raise AssertionError("main() returned instead of exiting")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_model, digits_calib, digits_eval) -> dict[str, Path]:
    """The last release's result (minmax, evaluated: the baseline), and a model whose calibration clips too much."""
    d = tmp_path_factory.mktemp("check")
    code, text = _cli(["optimize", digits_model, "-p", "minmax", "--data", digits_calib, "--eval-data", digits_eval,
                       "--output", d / "good.onnx", "--json", "--no-cache"])
    assert code == 0
    (d / "baseline.json").write_text(text)
    # deliberately degraded: percentile 99 clips the top 1% of every activation (the fidelity check still passes: no collapse)
    code, _ = _cli(["optimize", digits_model, "-p", "percentile", "-o", "percentile", "99", "--data", digits_calib,
                    "--output", d / "clipped.onnx", "--no-check", "--no-cache"])
    assert code == 0
    return {"dir": d, "baseline": d / "baseline.json", "good": d / "good.onnx", "clipped": d / "clipped.onnx"}


def test_model_equal_to_its_baseline_passes(run_cli, runs, digits_eval):
    report = runs["dir"] / "check.html"
    code, out, err = run_cli(["check", runs["good"], "--baseline", runs["baseline"], "--data", digits_eval, "--report", report])
    assert code == 0, err
    assert "check passed" in out
    assert "REGRESSED" not in out
    pytest.importorskip("matplotlib")  # the report extra; without it --report is one line naming the extra (below)
    html = report.read_text()
    assert "Check against the baseline" in html and "passed" in html


def test_degraded_model_fails_with_the_regression_named(run_cli, runs, digits_eval):
    base = json.loads(runs["baseline"].read_text())
    base_cos = next(r for r in base["evaluation"] if r["name"] != "fp32")["outputs"]["logits"]["cosine"]
    code, out, err = run_cli(["check", runs["clipped"], "--baseline", runs["baseline"], "--data", digits_eval, "--metric", "cosine", "--json"])
    assert code == 3, err
    doc = json.loads(out)
    now_cos = next(r for r in doc["evaluation"] if r["name"] != "fp32")["outputs"]["logits"]["cosine"]
    assert now_cos < base_cos - 0.002  # the clipping really cost more than the threshold
    assert not doc["check"]["passed"]
    line = err.strip().splitlines()[-1]
    assert line.startswith("onnxq: error: regression: cosine of output 'logits'")
    assert f"from {base_cos:.4f} (baseline) to {now_cos:.4f}" in line
    # the same model against a looser gate passes: the exit code follows --max-regression
    code, _, err = run_cli(["check", runs["clipped"], "--baseline", runs["baseline"], "--data", digits_eval, "--metric", "cosine",
                            "--max-regression", "0.05"])
    assert code == 0, err


def test_the_suggestion_is_about_the_checked_models_own_recipe(run_cli, runs, digits_model, digits_calib, digits_eval):
    """A collapsed model checked against a baseline of another recipe: the suggestion named the baseline's methods (an
    `mse` model against an auto baseline that chose trt-entropy: "try -p mse instead of -p trt-entropy")."""
    collapsed = runs["dir"] / "percentile60.onnx"
    code, _ = _cli(["optimize", digits_model, "-p", "percentile", "-o", "percentile", "60", "--data", digits_calib,
                    "--output", collapsed, "--no-check", "--no-cache"])
    assert code == 0
    code, out, err = run_cli(["check", collapsed, "--baseline", runs["baseline"], "--data", digits_eval])
    assert code == 3 and "collapsed" in out + err
    assert "-o percentile closer to 100" in out + err  # the baseline is minmax's: "try -p mse, keep the worst layer ..."


def test_its_json_is_the_next_baseline(run_cli, runs, digits_eval):
    code, out, _ = run_cli(["check", runs["good"], "--baseline", runs["baseline"], "--data", digits_eval, "--json"])
    assert code == 0
    nxt = runs["dir"] / "next.json"
    nxt.write_text(out)
    code, _, err = run_cli(["check", runs["clipped"], "--baseline", nxt, "--data", digits_eval])
    assert code == 3 and "regression:" in err


def test_fp32_source_from_the_baseline_or_fp32(run_cli, runs, digits_model, digits_eval, tmp_path):
    moved = json.loads(runs["baseline"].read_text())
    moved["report"]["model"] = "elsewhere/model.onnx"  # a baseline written in another checkout
    path = tmp_path / "moved.json"
    path.write_text(json.dumps(moved))
    code, _, err = run_cli(["check", runs["good"], "--baseline", path, "--data", digits_eval])
    assert code == 1 and "elsewhere/model.onnx" in err and "--fp32" in err
    code, _, err = run_cli(["check", runs["good"], "--baseline", path, "--data", digits_eval, "--fp32", digits_model])
    assert code == 0, err


def test_baseline_that_cannot_be_compared_is_one_line(run_cli, runs, digits_model, digits_calib, digits_eval, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run_cli(["check", runs["good"], "--baseline", bad, "--data", digits_eval])
    assert code == 1 and len(err.strip().splitlines()) == 1 and "not a JSON document" in err
    # a run without --eval-data was judged in-sample on calibration data: not comparable, and the message says what to do
    code, out, _ = run_cli(["optimize", digits_model, "-p", "minmax", "--data", digits_calib, "--output", tmp_path / "m.onnx", "--json"])
    assert code == 0
    (tmp_path / "insample.json").write_text(out)
    code, _, err = run_cli(["check", runs["good"], "--baseline", tmp_path / "insample.json", "--data", digits_eval])
    assert code == 1 and "--eval-data" in err


def test_a_gate_that_compares_nothing_is_refused(run_cli, runs, digits_calib):
    # the calibration data has no labels: accuracy cannot be measured, so --metric accuracy alone would always pass
    code, _, err = run_cli(["check", runs["good"], "--baseline", runs["baseline"], "--data", digits_calib, "--metric", "accuracy"])
    assert code == 1 and "no gated metric (accuracy)" in err
