"""The suite's ``onnxq-auto`` row (benchmarks/bench.py): ``-p auto`` with its defaults next to the hand-picked
onnxq rows and the peers, and what it chose kept in the JSON and shown in the tables."""

from __future__ import annotations

import dataclasses

import pytest


def test_auto_row_comes_once_after_the_hand_picked_onnxq_rows_of_every_model(bench_module):
    bench, configs = bench_module("bench"), bench_module("configs")
    sizes = configs.SIZES["full"]
    for model in configs.MODELS:
        rows = bench.selected_configs(model, sizes, list(configs.PEER_TITLES), None)
        keys = [c.key for c in rows]
        assert keys.count("onnxq-auto") == 1, model
        i = keys.index("onnxq-auto")
        assert all(c.tool in ("fp32", "onnxq") for c in rows[:i]) and all(c.tool != "onnxq" for c in rows[i + 1:]), model
        assert bench.with_auto(rows) == rows  # never twice
    only = bench.selected_configs("minilm", sizes, [], ["onnxq-auto"])
    assert [c.key for c in only] == ["fp32", "onnxq-auto"]


def test_auto_row_keeps_what_auto_chose_and_the_tables_show_it(tmp_path, bench_module):
    """A real ``-p auto`` run on the digits example through the bench's runner (a short time budget to keep
    the test quick), scored by the bench's evaluator: its choice reaches the JSON and both tables."""
    pytest.importorskip("cv2", reason="the bench's task and scoring modules need the bench extra (opencv): pip install -e '.[bench]'")
    bench, runner, scoring, tables, tasks, configs = (bench_module(n) for n in ("bench", "runner", "scoring", "tables", "tasks", "configs"))
    task = tasks.prepare_task("digits", tmp_path, configs.SIZES["quick"], False, False)
    cfg = dataclasses.replace(bench.AUTO_CONFIG, options=(("time_budget", "2"),))
    out = tmp_path / "auto.onnx"
    m = runner.Runner(tmp_path, 4.0, 120.0).onnxq(task, cfg, out)
    assert m.ok, m.stderr[-500:]
    auto = bench.auto_summary(m.stdout)
    names = [c["name"] for c in auto["candidates"]]
    assert all(c["score_worst"] is None or c["score"] is None or c["score_worst"] <= c["score"] + 1e-9 for c in auto["candidates"])
    assert auto["chosen"] and auto["chosen"] in names
    assert auto["heldout"] == "split" and auto["calibration_samples"] > auto["heldout_samples"] > 0
    assert bench.auto_summary("not json") == {} and bench.auto_summary('{"report": {"auto": null}}') == {}

    ev = scoring.Evaluator(task, 1)
    fp32 = ev.evaluate(task.model)
    q = ev.evaluate(out)
    assert q["top1_agreement_fp32"] >= 0.97  # auto's INT8 digits CNN keeps FP32's predictions
    row = {"config": cfg.to_json(), "status": "ok", "metrics": q, "auto": auto}
    minmax = {"config": {"key": "onnxq-minmax", "label": "onnxq minmax", "tool": "onnxq", "method": "minmax"}, "status": "ok",
              "metrics": {"top1_agreement_fp32": 0.5}}
    peer = {"config": {"key": "nncf-default", "label": "NNCF default", "tool": "nncf", "method": "default"}, "status": "ok",
            "metrics": {"top1_agreement_fp32": 0.25}}
    doc = {"models": {"digits": {"rows": [{"config": {"key": "fp32", "label": "FP32", "tool": "fp32"}, "status": "ok", "metrics": fp32},
                                          minmax, row, peer]}}}
    lines = tables.peers_table(doc).splitlines()
    assert "onnxq auto (chose)" in lines[0]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    # the best hand-picked row leaves auto out; auto has its own cell with its choice
    assert cells[2] == "0.5000 (minmax)"
    assert cells[3] == f"{q['top1_agreement_fp32']:.4f} ({auto['chosen']})"
    failed = dict(row, status="timeout", error="timeout (600 s)")
    assert tables.auto_cell(failed, "top1_agreement_fp32", ".4f") == "timeout (600 s)"
