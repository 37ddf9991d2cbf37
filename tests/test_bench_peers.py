"""The suite's peer rows (benchmarks/peers/, configs.peer_configs, Runner.peer, tables.peers_table), without the peers installed.

The peers themselves (ModelOpt, NNCF, Quark) need their own environments and minutes to install;
what is tested here is everything around them: the rows each model gets, the row selection, the
feed folder as the peer scripts read it, their calibration readers driving ONNX Runtime's own
calibrator (the protocol ModelOpt and Quark call), a peer run that fails becoming a row that says
how, and the summary table.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
DIGITS = ROOT / "examples" / "digits"

pytest.importorskip("onnxruntime.quantization")



def test_every_model_gets_every_peer_and_nncf_transformer_only_on_minilm(bench_module):
    configs, envs = bench_module("configs"), bench_module("peers.envs")
    assert set(configs.PEER_TITLES) == set(envs.PEERS)
    for peer in envs.PEERS.values():
        assert (BENCH / "peers" / peer.script).is_file()
        assert any(r.startswith(peer.distribution) for r in peer.requirements)
    for model in configs.MODELS:
        rows = configs.configs_for(model, configs.SIZES["full"])
        keys = [c.key for c in rows]
        assert len(keys) == len(set(keys)), f"{model}: duplicate row keys"
        peers = [c for c in rows if c.tool in configs.PEER_TITLES]
        assert {c.tool for c in peers} == set(configs.PEER_TITLES)
        assert rows[-len(peers):] == peers  # the peers come last
        assert ("nncf-transformer" in keys) == (model == "minilm")
        assert {"modelopt-entropy", "modelopt-max", "quark-u8s8", "quark-a8w8", "nncf-default"} <= set(keys)
        assert configs.PEER_FIDELITY[model][1] in {k for _, k, _ in configs.METRIC_COLUMNS[model]}


def test_row_selection_keeps_fp32_and_drops_unselected_peers(bench_module):
    bench, configs = bench_module("bench"), bench_module("configs")
    sizes = configs.SIZES["full"]
    none = bench.selected_configs("digits", sizes, [], None)
    assert none and not [c for c in none if c.tool in configs.PEER_TITLES]
    some = bench.selected_configs("minilm", sizes, ["nncf"], ["onnxq-smoothquant-minmax", "nncf-*"])
    assert [c.key for c in some] == ["fp32", "onnxq-smoothquant-minmax", "nncf-default", "nncf-transformer"]


def _feeds(folder: Path, lengths: list[int], batch: int = 3) -> None:
    folder.mkdir()
    for i, seq in enumerate(lengths):
        np.savez(folder / f"feed_{i}.npz", input_ids=np.arange(batch * seq, dtype=np.int64).reshape(batch, seq) + 1,
                 attention_mask=np.ones((batch, seq), np.int64), label=np.zeros(batch, np.int64))


def test_feed_folder_as_the_peer_scripts_read_it(tmp_path, bench_module):
    nf = bench_module("npz_feeds")
    _feeds(tmp_path / "d", [4, 6, 5])
    names = ["input_ids", "attention_mask"]
    batches = nf.load_batches(tmp_path / "d", names, limit=7)
    assert [b["input_ids"].shape for b in batches] == [(3, 4), (3, 6), (1, 5)]  # cut at 7 samples, labels left out
    assert all(set(b) == set(names) for b in batches)
    one = list(nf.samples(batches))
    assert len(one) == 7 and all(s["input_ids"].shape[0] == 1 for s in one)
    np.testing.assert_array_equal(one[3]["input_ids"], batches[1]["input_ids"][:1])
    padded = nf.load_batches(tmp_path / "d", names, pad_seq=True)
    assert {b["input_ids"].shape for b in padded} == {(3, 6)}
    assert padded[0]["attention_mask"][:, 4:].sum() == 0 and padded[0]["input_ids"][:, 4:].sum() == 0  # masked zero padding
    assert nf.stacked(padded)["input_ids"].shape == (9, 6)
    with pytest.raises(ValueError, match="no array named 'x'"):
        nf.load_batches(tmp_path / "d", ["x"])


@pytest.mark.parametrize("script,reader", [("quark_quantize", "BatchReader"), ("modelopt_quantize", "SampleReader")])
def test_peer_calibration_readers_drive_onnxruntimes_calibrator(tmp_path, script, reader, bench_module):
    """The readers the Quark and ModelOpt scripts hand their peer follow ONNX Runtime's reader
    protocol, which both peers call: ORT's own quantize_static calibrates the digits example
    through them to a model that runs and keeps its accuracy."""
    from onnxruntime import quantization as oq

    from onnxq.runtime.ort import make_session

    nf, mod = bench_module("npz_feeds"), bench_module(script)
    batches = nf.load_batches(DIGITS / "calib", nf.graph_inputs(DIGITS / "model.onnx"), limit=64)
    items = batches if reader == "BatchReader" else list(nf.samples(batches))
    rd = getattr(mod, reader)(items)
    got = list(iter(rd.get_next, None))
    assert sum(f["input"].shape[0] for f in got) == 64
    rd.rewind()
    out = tmp_path / "q.onnx"
    oq.quantize_static(str(DIGITS / "model.onnx"), str(out), rd, quant_format=oq.QuantFormat.QDQ, per_channel=True)
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(out)).graph.node}
    ev = [dict(np.load(f)) for f in sorted((DIGITS / "eval").glob("*.npz"))][:4]
    fp, q = make_session(DIGITS / "model.onnx", "all", threads=1), make_session(out, "all", threads=1)
    agree = np.mean(np.concatenate([fp.run(None, {"input": e["input"]})[0].argmax(1) == q.run(None, {"input": e["input"]})[0].argmax(1) for e in ev]))
    assert agree >= 0.95


def test_failed_peer_runs_become_rows_that_say_how(tmp_path, bench_module):
    """A peer whose environment could not be made, and a peer script that fails in its child process
    (here: NNCF's script run without NNCF), both give an error measurement, not an exception."""
    runner_mod, tasks, configs, envs = bench_module("runner"), bench_module("tasks"), bench_module("configs"), bench_module("peers.envs")
    if importlib.util.find_spec("nncf") is not None:
        pytest.skip("nncf is installed in this environment; the failing run needs it absent")
    runner = runner_mod.Runner(tmp_path, mem_cap_gb=4, timeout=120)
    task = tasks.Task("digits", DIGITS / "model.onnx", DIGITS / "model.onnx", DIGITS / "calib", DIGITS / "eval", 256, 500)
    cfg = next(c for c in configs.peer_configs("digits") if c.key == "nncf-default")

    runner.peer_envs["nncf"] = envs.PeerEnv("nncf", Path(sys.executable))
    m = runner.peer(task, cfg, tmp_path / "nncf.onnx", max_samples=16)
    assert m.status == "error" and not (tmp_path / "nncf.onnx").exists()
    assert "No module named 'nncf'" in runner_mod.short_error(m)

    runner.peer_envs["quark"] = envs.PeerEnv("quark", None, error="install failed: ERROR: No matching distribution found for amd-quark==0.13")
    m = runner.peer(task, next(c for c in configs.peer_configs("digits") if c.tool == "quark"), tmp_path / "quark.onnx")
    assert m.status == "error" and runner_mod.short_error(m).startswith("error: install failed: ERROR: No matching distribution")


def test_environment_marker_decides_whether_to_reinstall(tmp_path, bench_module):
    envs = bench_module("peers.envs")
    peer = envs.PEERS["nncf"]
    (tmp_path / "nncf" / "bin").mkdir(parents=True)
    assert not envs.is_current(tmp_path, peer)  # no interpreter, no marker
    envs.venv_python(tmp_path, "nncf").write_text("")
    (tmp_path / "nncf" / envs.MARKER).write_text(json.dumps(envs.marker_for(peer)))
    assert envs.is_current(tmp_path, peer)
    changed = envs.Peer(peer.name, peer.title, peer.distribution, peer.requirements + ("scipy",), peer.script)
    assert not envs.is_current(tmp_path, changed)


def test_peers_table_puts_the_best_onnxq_row_next_to_each_peer(bench_module):
    tables = bench_module("tables")

    def row(key, tool, value=None, error=None):
        r = {"config": {"key": key, "label": key.replace("-", " "), "tool": tool}, "status": "ok" if error is None else "error"}
        if error is None:
            r["metrics"] = {"char_agreement_fp32": value}
        else:
            r["error"] = error
        return r

    doc = {"models": {"ppocr-rec": {"rows": [
        row("fp32", "fp32", 1.0), row("onnxq-minmax", "onnxq", 0.90), row("onnxq-equalize-mse", "onnxq", 0.98), row("ort-minmax", "ort", 0.86),
        row("modelopt-entropy", "modelopt", error="timeout (900 s)"), row("nncf-default", "nncf", 0.04)]}}}
    lines = tables.peers_table(doc).splitlines()
    assert "ORT MinMax" in lines[0] and "modelopt entropy" in lines[0] and "nncf default" in lines[0]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:3] == ["ppocr-rec", "char agree FP32", "0.9800 (equalize mse)"]
    assert cells[3:] == ["0.8600", "timeout (900 s)", "0.0400"]
    assert tables.peers_table({"models": {"digits": {"rows": [row("onnxq-minmax", "onnxq", 1.0)]}}}) == ""


def test_peers_table_of_runs_split_by_model(tmp_path):
    """``python benchmarks/tables.py A.json B.json`` merges the models of several --json documents into one table."""
    import subprocess

    def doc(model, key, value):
        rows = [{"config": {"key": "onnxq-minmax", "label": "onnxq minmax", "tool": "onnxq"}, "status": "ok", "metrics": {key: value}},
                {"config": {"key": "nncf-default", "label": "NNCF default", "tool": "nncf"}, "status": "ok", "metrics": {key: value / 2}}]
        return {"models": {model: {"rows": rows}}, "peers": {"nncf": {"distribution": "nncf", "versions": {"nncf": "9.9"}}}}

    (tmp_path / "a.json").write_text(json.dumps(doc("digits", "top1_agreement_fp32", 0.9)))
    (tmp_path / "b.json").write_text(json.dumps(doc("minilm", "cosine_mean_fp32", 0.8)))
    r = subprocess.run([sys.executable, str(BENCH / "tables.py"), str(tmp_path / "a.json"), str(tmp_path / "b.json")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split("|")[1].strip() for ln in lines[2:4]] == ["digits", "minilm"]
    assert lines[3].split("|")[-2].strip() == "0.40000" and "NNCF 9.9" in lines[4]


def test_peers_get_a_private_copy_of_the_model_with_its_external_data(tmp_path, bench_module):
    """ModelOpt writes its shape-inferred graph over the model it is given: a peer must never see the
    repository's own file (or a model's external data) by path."""
    from onnx import helper, numpy_helper

    runner = bench_module("runner")
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [w])
    src = tmp_path / "src" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(helper.make_model(g), str(src), save_as_external_data=True, location="m.data", size_threshold=0)
    copy = runner.private_copy(src, tmp_path / "private")
    assert copy.parent == tmp_path / "private" and (copy.parent / "m.data").is_file()
    before = src.read_bytes()
    onnx.save_model(onnx.shape_inference.infer_shapes(onnx.load(str(copy))), str(copy))  # what ModelOpt does to its input
    assert src.read_bytes() == before
    onnx.checker.check_model(str(copy))
