"""Transformer blocks: default placement per target and SmoothQuant-style outlier smoothing.

The fixture is a post-LN encoder block built with onnx.helper, the way torch exports BERT:
LayerNorm -> Q/K/V MatMuls -> Q·Kᵀ -> Softmax -> ·V -> output MatMul -> residual Add ->
LayerNorm -> FFN up MatMul -> GELU (Div/Erf/Add/Mul/Mul) -> FFN down MatMul -> residual Add ->
LayerNorm, with planted outlier channels: one channel of each LayerNorm's gamma is ~20x the
others (like channel 99 of all-MiniLM-L6-v2) and one FFN-up column drives one GELU output
channel far above the rest.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.runtime.ort import FLOAT_COMPUTE_OPS, make_session, optimized_op_counts
from onnxq.graph.edit import name_nodes
from onnxq.graph.placement import build_plan
from onnxq.graph.smoothing import apply_smoothing, find_smooth_sites
from onnxq.graph.targets import get_profile
from onnxq.testing.contract import MethodContract

C, F, S = 32, 128, 16  # channels, FFN width, sequence length
WEIGHT_MATMULS = ("q", "k", "v", "attn_out", "ffn_up", "ffn_down")


def block_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def w(name: str, k: int, n: int, gain: float = 1.0) -> str:
        return const(name, rng.normal(0, gain / np.sqrt(k), (k, n)))

    g1 = np.ones(C)
    g1[5] = 20.0  # outlier channel of the first LayerNorm (feeds Q/K/V and the residual)
    g2 = np.ones(C)
    g2[7] = 25.0  # outlier channel of the second LayerNorm (feeds FFN up and the residual)
    w_up = rng.normal(0, 1 / np.sqrt(C), (C, F))
    w_up[:, 11] *= 10.0  # one GELU output channel far above the rest (FFN down input)
    nodes = [
        helper.make_node("LayerNormalization", ["x", const("ln1_g", g1), const("ln1_b", rng.normal(0, 0.1, C))], ["h1"], name="ln1", axis=-1),
        helper.make_node("MatMul", ["h1", w("wq", C, C)], ["q"], name="q"),
        helper.make_node("MatMul", ["h1", w("wk", C, C)], ["k"], name="k"),
        helper.make_node("MatMul", ["h1", w("wv", C, C)], ["v"], name="v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"], name="qk"),
        helper.make_node("Mul", ["qk", const("inv_sqrt_d", 1 / np.sqrt(C))], ["qk_s"], name="qk_scale"),
        helper.make_node("Softmax", ["qk_s"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["ctx"], name="pv"),
        helper.make_node("MatMul", ["ctx", w("wo", C, C)], ["o"], name="attn_out"),
        helper.make_node("Add", [const("bo", rng.normal(0, 0.1, C)), "o"], ["o_b"], name="attn_out_bias"),
        helper.make_node("Add", ["o_b", "h1"], ["r1"], name="residual1"),
        helper.make_node("LayerNormalization", ["r1", const("ln2_g", g2), const("ln2_b", rng.normal(0, 0.1, C))], ["h2"], name="ln2", axis=-1),
        helper.make_node("MatMul", ["h2", const("w_up", w_up)], ["u"], name="ffn_up"),
        helper.make_node("Add", [const("b_up", rng.normal(0, 0.1, F)), "u"], ["u_b"], name="ffn_up_bias"),
        helper.make_node("Div", ["u_b", const("sqrt2", np.sqrt(2.0))], ["g_div"], name="gelu_div"),
        helper.make_node("Erf", ["g_div"], ["g_erf"], name="gelu_erf"),
        helper.make_node("Add", ["g_erf", const("one", 1.0)], ["g_add"], name="gelu_add"),
        helper.make_node("Mul", ["u_b", "g_add"], ["g_mul"], name="gelu_mul"),
        helper.make_node("Mul", ["g_mul", const("half", 0.5)], ["gelu"], name="gelu_half"),
        helper.make_node("MatMul", ["gelu", w("w_down", F, C)], ["d"], name="ffn_down"),
        helper.make_node("Add", [const("b_down", rng.normal(0, 0.1, C)), "d"], ["d_b"], name="ffn_down_bias"),
        helper.make_node("Add", ["d_b", "h2"], ["r2"], name="residual2"),
        helper.make_node("LayerNormalization", ["r2", const("ln3_g", np.ones(C)), const("ln3_b", np.zeros(C))], ["y"], name="ln3", axis=-1),
    ]
    graph = helper.make_graph(nodes, "encoder_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", S, C])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", S, C])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def feeds(n_batches: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (4, S, C)).astype(np.float32)} for _ in range(n_batches)]


def relative_error(model: onnx.ModelProto, ref: onnx.ModelProto, data: list[dict[str, np.ndarray]]) -> float:
    a, b = make_session(model, "all"), make_session(ref, "disable")
    num = den = 0.0
    for f in data:
        ya, yb = a.run(None, f)[0].astype(np.float64), b.run(None, f)[0].astype(np.float64)
        num += float(np.sum((ya - yb) ** 2))
        den += float(np.sum(yb**2))
    return num / den


@pytest.fixture(scope="module")
def block() -> onnx.ModelProto:
    return block_model()


@pytest.fixture(scope="module")
def quantized(block):
    calib, ev = feeds(8, 1), feeds(8, 2)
    plain = onnxq.optimize(block, method="minmax", data=calib, target="ort", show_progress=False)
    smooth = onnxq.optimize(block, method=["smoothquant", "minmax"], data=calib, target="ort", show_progress=False)
    return block, plain, smooth, ev


def test_ort_placement_keeps_attention_matmuls_float(block):
    m = onnx.ModelProto()
    m.CopyFrom(block)
    name_nodes(m)
    plan = build_plan(m, get_profile("ort"))
    assert {layer.node for layer in plan.layers} == set(WEIGHT_MATMULS)
    skipped = dict(plan.skipped)
    assert set(skipped) >= {"qk", "pv"} and "activation x activation" in skipped["qk"]
    assert "p" not in plan.activations  # the Softmax output is not quantized either
    trt = build_plan(m, get_profile("trt"))  # TensorRT's int8 MHA wants its BMMs quantized
    assert {"qk", "pv"} <= {layer.node for layer in trt.layers}


def test_smoothing_sites_and_duplication(block):
    sites, _ = find_smooth_sites(block)
    by_tensor = {s.tensor: s for s in sites}
    assert set(by_tensor) == {"h1", "h2", "gelu"}
    assert sorted(by_tensor["h1"].matmuls) == ["k", "q", "v"] and by_tensor["h1"].shared  # h1 also feeds the residual
    assert by_tensor["gelu"].kind == "mul" and not by_tensor["gelu"].shared  # folded into the GELU's * 0.5, no extra op
    rng = np.random.default_rng(3)
    scales = {s.tensor: rng.uniform(0.05, 20, s.channels).astype(np.float32) for s in sites}
    out = apply_smoothing(block, sites, scales)
    onnx.checker.check_model(out)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("LayerNormalization") == 5 and ops.count("Mul") == 3  # two LNs duplicated, GELU Mul rewritten in place
    assert relative_error(out, block, feeds(2, 5)) < 1e-10  # exact in float (to rounding)
    alt = apply_smoothing(block, sites, scales, shared="mul")  # explicit Mul(x, 1/s) instead of a duplicate
    ops = [n.op_type for n in alt.graph.node]
    assert ops.count("LayerNormalization") == 3 and ops.count("Mul") == 5
    assert relative_error(alt, block, feeds(2, 5)) < 1e-10


def test_smoothquant_beats_plain_minmax(quantized):
    block, plain, smooth, ev = quantized
    e_plain, e_smooth = relative_error(plain.model, block, ev), relative_error(smooth.model, block, ev)
    # measured 5x lower on this block (0.0200 -> 0.0040 relative squared error); assert at least 2.5x
    assert e_smooth < e_plain / 2.5, (e_plain, e_smooth)
    rep = smooth.report.methods["smoothquant"]
    assert len(rep["sites"]) == 3
    assert all(s["max_over_median_after"] < s["max_over_median_before"] for s in rep["sites"])


@pytest.mark.parametrize("which", ["plain", "smooth"])
def test_quantized_block_runs_on_integer_kernels(quantized, which):
    block, plain, smooth, ev = quantized
    q = (plain if which == "plain" else smooth).model
    onnx.checker.check_model(q)
    y = make_session(q, "all").run(None, ev[0])[0]
    assert np.isfinite(y).all() and y.shape == (4, S, C)
    counts = optimized_op_counts(q, "all")
    assert counts.get("MatMulIntegerToFloat", 0) + counts.get("QLinearMatMul", 0) == len(WEIGHT_MATMULS), counts
    # only the two attention MatMuls (activation x activation) run in float
    assert sum(counts.get(op, 0) for op in FLOAT_COMPUTE_OPS) == 2, counts


def test_trt_target_block_passes_lint_and_smoothquant_helps(block):
    from onnxq.graph.trt_rules import check_trt_rules

    calib, ev = feeds(8, 1), feeds(8, 2)
    plain = onnxq.optimize(block, method="minmax", data=calib, target="trt", show_progress=False)
    smooth = onnxq.optimize(block, method=["smoothquant", "minmax"], data=calib, target="trt", show_progress=False)
    for q in (plain, smooth):
        errors = [f for f in check_trt_rules(q.model) if f.severity == "error"]
        assert not errors, errors
    assert relative_error(smooth.model, block, ev) < relative_error(plain.model, block, ev) / 2


class TestSmoothQuantContract(MethodContract):
    """On the contract's CNN there is nothing to smooth: the method must be a clean no-op there."""

    method = "smoothquant"
