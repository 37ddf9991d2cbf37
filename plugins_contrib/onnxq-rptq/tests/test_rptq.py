"""RPTQ on the decoder fixture: the reordering is an exact float rewrite, the per-cluster split runs
in ONNX Runtime (on its integer MatMul kernels) with finite positive scales, and at 4-bit
activations it keeps far more of the logits than one per-tensor min-max scale."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxq_rptq", reason="onnxq-rptq is not installed (pip install -e plugins_contrib/onnxq-rptq)")

import onnxq  # noqa: E402
from onnxq.calib.readers import Batch  # noqa: E402
from onnxq.calib.statistics import ChannelRange, StatRequest, collect  # noqa: E402
from onnxq.graph.placement import build_plan  # noqa: E402
from onnxq.graph.targets import get_profile  # noqa: E402
from onnxq.runtime.ort import optimized_op_counts  # noqa: E402
from onnxq.testing.contract import MethodContract, scales_of  # noqa: E402
from onnxq_rptq import RptqOptions, cluster_ranges, find_sites, reorder_and_split  # noqa: E402
from onnxq_rptq.rewrite import permuted  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures_decoder" / "score.py"
_spec = importlib.util.spec_from_file_location("decoder_score", FIXTURE)
decoder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decoder)

#: the fixture's planted outlier channels (fixtures_decoder/train.py)
OUTLIERS = (5, 17, 42)


class TestRptqContract(MethodContract):
    method = "rptq"  # the contract's convolution model has no MatMul to split: the method must stay harmless


@pytest.fixture(scope="module")
def fixture():
    model = decoder.load_model()
    feeds = decoder.calibration()
    return model, feeds, decoder.logits(model)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _ranges(model, sites, feeds):
    reqs = {s.tensor: StatRequest(s.tensor, ChannelRange(-1)) for s in sites}
    got = collect(model, list(reqs.values()), lambda: iter(Batch(f) for f in feeds), show_progress=False)
    return {t: got[r] for t, r in reqs.items()}


def test_kmeans_isolates_the_planted_outlier_channels(fixture):
    model, feeds, _ = fixture
    ln1 = "/blocks.0/ln1/LayerNormalization_output_0"
    ranges = _ranges(model, [s for s in find_sites(model, build_plan(model, get_profile("ort"))) if s.tensor == ln1], feeds)[ln1]
    cl = cluster_ranges(ranges, 4)
    assert cl.count == 4 and sum(cl.sizes) == 64
    widest = cl.members(cl.count - 1).tolist() + cl.members(cl.count - 2).tolist() + cl.members(cl.count - 3).tolist()
    assert sorted(widest) == list(OUTLIERS)  # the three x24-x48 channels left the bulk's cluster
    order = cl.order
    assert sorted(order.tolist()) == list(range(64))
    assert np.all(np.diff(cl.labels[order]) >= 0)  # reordered, each cluster is contiguous


def test_reordering_and_split_are_exact_float_rewrites(fixture):
    model, feeds, ref = fixture
    sites = find_sites(model, build_plan(model, get_profile("ort")))
    assert len(sites) == 9  # Q/K/V input, attention output, fc1 and fc2 inputs per block; the head's input
    folded = [s for s in sites if s.fold is not None]
    assert {s.fold.matmul for s in folded} == {"/blocks.0/fc1/MatMul", "/blocks.1/fc1/MatMul"}  # through the exported GELU
    # the permutation alone: a random one per folded site changes the weights, not the function
    rng = np.random.default_rng(0)
    orders = {s.tensor: rng.permutation(s.channels) for s in folded}
    perm = permuted(model, folded, orders)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in perm.graph.initializer}
    before = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert all(not np.array_equal(inits[s.fold.weight], before[s.fold.weight]) for s in folded)
    assert _relative(decoder.logits(perm), ref) <= 1e-5
    # the k-means reordering and the split into one MatMul per cluster, summed
    ranges = _ranges(model, sites, feeds)
    rewritten, summary = reorder_and_split(model, sites, ranges, RptqOptions(clusters=4))
    onnx.checker.check_model(rewritten, full_check=True)
    assert sum(n.op_type == "Sum" for n in rewritten.graph.node) == 13
    assert sum(n.op_type == "Split" for n in rewritten.graph.node) == 2  # the folded sites: contiguous clusters
    assert {v["reorder"] for v in summary.values()} == {"gather", "folded into /blocks.0/fc1/MatMul", "folded into /blocks.1/fc1/MatMul"}
    assert _relative(decoder.logits(rewritten), ref) <= 1e-5
    # without folding, every site reads its clusters with Gathers: the same function again
    gathered, _ = reorder_and_split(model, sites, ranges, RptqOptions(clusters=4, fold=False))
    assert not any(n.op_type == "Split" for n in gathered.graph.node)
    assert _relative(decoder.logits(gathered), ref) <= 1e-5


@pytest.fixture(scope="module")
def a4(fixture):
    model, feeds, ref = fixture
    rptq = onnxq.optimize(model, method=["rptq", "minmax"], options={"clusters": 4, "act_bits": 4}, data=feeds, show_progress=False)
    plain = onnxq.optimize(model, method=["rptq", "minmax"], options={"clusters": 1, "act_bits": 4}, data=feeds, show_progress=False)
    return rptq, plain


def test_cluster_split_runs_on_integer_kernels_with_positive_scales(a4):
    res, _ = a4
    m = res.model
    onnx.checker.check_model(m, full_check=True)
    scales = scales_of(m)
    assert scales and all(np.all(np.isfinite(s)) and np.all(s > 0) for s in scales.values())
    # every MatMul of a split reads its own per-tensor quantized slice: Q/K/V of a block share theirs
    quant = {n.input[0]: n for n in m.graph.node if n.op_type == "QuantizeLinear"}
    parts = [t for t in quant if "_rptq" in t]
    assert len(parts) == 9 * 4
    for t in parts:
        assert scales[quant[t].input[1]].size == 1
    assert any(n.op_type == "Clip" for n in m.graph.node)  # A4 emulated in uint8
    counts = optimized_op_counts(m, "all")
    assert counts["MatMulIntegerToFloat"] + counts["MatMulInteger"] + counts["QLinearMatMul"] >= 13 * 4
    assert decoder.logits(m).shape == (256, 32, 64)


def test_rptq_beats_per_tensor_minmax_at_4_bit_activations(fixture, a4):
    _, _, ref = fixture
    rptq, plain = a4
    ours, base = decoder.score(rptq.model, ref), decoder.score(plain.model, ref)
    assert ours["cosine"] > base["cosine"] + 0.3
    assert ours["top1"] > base["top1"] + 0.3
    assert ours["cosine"] > 0.9


def test_onnxq_plugins_lists_rptq():
    out = subprocess.run([sys.executable, "-m", "onnxq", "plugins"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    line = next(x for x in out.stdout.splitlines() if x.startswith("rptq"))
    assert "onnxq-rptq" in line and "ok" in line and "method:rptq" in line


def test_tensorrt_target_gets_per_tensor_activation_scales_and_no_rule_violation(fixture):
    """TensorRT takes per-channel scales for weights only: the split form gives every cluster one
    per-tensor activation scale, which onnxq's TensorRT Q/DQ rule check accepts."""
    from onnxq.graph.trt_rules import check_trt_rules

    model, feeds, ref = fixture
    res = onnxq.optimize(model, method=["rptq", "minmax"], options={"clusters": 4}, data=feeds, target="trt", show_progress=False)
    assert check_trt_rules(res.model) == []
    inits = {t.name for t in res.model.graph.initializer}
    scales = scales_of(res.model)
    acts = [n for n in res.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert sum("_rptq" in n.input[0] for n in acts) == 9 * 4
    assert all(scales[n.input[1]].size == 1 for n in acts)
    assert decoder.score(res.model, ref)["cosine"] > 0.9
