"""SmoothQuant on transformers already run through ONNX Runtime's transformer optimizer.

The optimizer fuses Add + LayerNormalization into ``com.microsoft.SkipLayerNormalization`` and the FFN's bias Add + GELU
into ``BiasGelu``; smoothquant folded its scales only into ``LayerNormalization`` and the GELU's closing ``Mul``, so on
such a model it changed nothing (all-MiniLM-L6-v2 optimized: sentence-embedding cosine 0.9942 with or without it,
against 0.9982 on the unfused export). The skip normalization's scale and shift now take ``1/s`` like a
LayerNormalization's, and a fused GELU, which has no constant to take it, gets a ``Mul(x, 1/s)`` after it (0.9984).
The model here is a small FFN block of the same contrib ops with the outlier channels transformers have: a few
LayerNorm scale channels and FFN bias channels many times the rest.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxq

HIDDEN, FFN, SEQ = 32, 64, 8
MS = "com.microsoft"


def fused_ffn_block() -> onnx.ModelProto:
    """x -> MatMul -> SkipLayerNorm(+x) -> MatMul -> BiasGelu -> MatMul -> SkipLayerNorm(+the first) -> MatMul (the head);
    the first skip normalization's residual-sum output is declared, as the optimizer writes it."""
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int, scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

    gamma = np.ones(HIDDEN, np.float32)
    gamma[[3, 17]] = 25.0  # MiniLM-like outlier channels of every LayerNorm output
    ffn_bias = rng.normal(0, 0.1, FFN).astype(np.float32)
    ffn_bias[[5, 40]] = 12.0  # and of the GELU output that feeds the FFN's second MatMul
    inits = [w("w0", HIDDEN, HIDDEN, scale=0.2), numpy_helper.from_array(gamma, "gamma"),
             numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "beta"), w("b0", HIDDEN, scale=0.05),
             w("w1", HIDDEN, FFN, scale=0.2), numpy_helper.from_array(ffn_bias, "b1"), w("w2", FFN, HIDDEN, scale=0.5),
             numpy_helper.from_array(np.ones(HIDDEN, np.float32), "gamma2"), w("beta2", HIDDEN, scale=0.05),
             w("b2", HIDDEN, scale=0.05), w("head", HIDDEN, 8, scale=0.3)]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="attn_out/MatMul"),
        helper.make_node("SkipLayerNormalization", ["h", "x", "gamma", "beta", "b0"], ["n1", "", "", "sum1"], name="SkipLayerNorm_0",
                         domain=MS, epsilon=1e-5),
        helper.make_node("MatMul", ["n1", "w1"], ["f1"], name="intermediate/MatMul"),
        helper.make_node("BiasGelu", ["f1", "b1"], ["g"], name="BiasGelu_0", domain=MS),
        helper.make_node("MatMul", ["g", "w2"], ["f2"], name="output/MatMul"),
        helper.make_node("SkipLayerNormalization", ["f2", "n1", "gamma2", "beta2", "b2"], ["n2"], name="SkipLayerNorm_1",
                         domain=MS, epsilon=1e-5),
        helper.make_node("MatMul", ["n2", "head"], ["y"], name="head/MatMul"),
    ]
    graph = helper.make_graph(nodes, "fused_ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQ, HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SEQ, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])


def _data(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (8, SEQ, HIDDEN)).astype(np.float32)} for _ in range(n)]


def _error_to_fp32(reference: onnx.ModelProto, model: onnx.ModelProto) -> float:
    """1 − cosine to FP32 of the outputs on held-out data."""
    feeds = _data(4, seed=9)
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (reference, model)]
    a, b = (np.concatenate([r.run(None, f)[0].astype(np.float64).ravel() for f in feeds]) for r in runs)
    return 1.0 - float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_smoothquant_folds_into_skip_layernorm_and_inserts_a_mul_after_a_fused_gelu():
    model, data = fused_ffn_block(), _data(8, seed=1)
    plain = onnxq.optimize(model, method="minmax", data=data, show_progress=False)
    smooth = onnxq.optimize(model, method=["smoothquant", "minmax"], data=data, show_progress=False)
    sites = {s["producer"]: s for s in smooth.report.methods["smoothquant"]["sites"]}
    assert sites["SkipLayerNorm_0"]["kind"] == "layernorm" and sites["BiasGelu_0"]["kind"] == "insert", sites
    assert sites["SkipLayerNorm_0"]["max_over_median_after"] < sites["SkipLayerNorm_0"]["max_over_median_before"] / 3, sites
    assert sites["BiasGelu_0"]["max_over_median_after"] < sites["BiasGelu_0"]["max_over_median_before"] / 1.5, sites
    onnx.checker.check_model(smooth.model, full_check=True)
    before, after = _error_to_fp32(model, plain.model), _error_to_fp32(model, smooth.model)
    assert after < before / 2, (before, after)


def test_without_fused_gelu_insertion_only_the_normalization_is_smoothed():
    model, data = fused_ffn_block(), _data(8, seed=1)
    res = onnxq.optimize(model, method=["smoothquant", "minmax"], options=[{"insert": ""}, {}], data=data, show_progress=False)
    report = res.report.methods["smoothquant"]
    assert [s["producer"] for s in report["sites"]] == ["SkipLayerNorm_0", "SkipLayerNorm_1"], report["sites"]
    assert any(r["tensor"] == "g" and "BiasGelu" in r["reason"] for r in report["not_smoothed"]), report["not_smoothed"]


def test_smoothquant_on_a_float16_model_is_judged_at_float16_rounding():
    """Smoothing rounds the scaled weights of a float16 model to float16: its outputs moved by 5e-5 to 1e-4, and the
    float-rewrite check, at float32's 1e-5, stopped the run ("changed the float model's outputs ... this is a bug")."""
    rng = np.random.default_rng(0)
    gamma = np.ones(32)
    gamma[[3, 17]] = 20.0  # outlier channels: what smoothquant moves into the weights
    inits = {"gamma": gamma, "beta": rng.normal(0, 0.1, 32), "w1": rng.normal(0, 0.2, (32, 64)), "w2": rng.normal(0, 0.2, (64, 8))}
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["n", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "ffn16", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 6, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 6, 8])],
                              [numpy_helper.from_array(v.astype(np.float16), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = [{"x": rng.normal(0, 1, (8, 6, 32)).astype(np.float16)} for _ in range(4)]
    res = onnxq.optimize(model, method=["smoothquant", "minmax"], target="trt", data=data, show_progress=False)
    assert res.report.quantized_weights == 2
    x = data[0]["x"]
    ref, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].astype(np.float32)
                for m in (model, res.model))
    assert float(np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.999
