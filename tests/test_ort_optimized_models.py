"""Transformers already run through ONNX Runtime's transformer optimizer (``onnxruntime.transformers.optimizer``), and
converted to float16 by it, as users often hand them over.

The optimizer fuses the embeddings into ``com.microsoft.EmbedLayerNormalization`` (its mask index is int32, which ONNX's
shape inference does not know: the layer-wise search guessed float and its sessions failed, so ``-p gptq`` could not
run), and Q, K and V into ``com.microsoft.Attention``, whose weights onnxq does not quantize: they were neither listed
as float nor counted as float compute ("int-kernels 100%"). Its float16 conversion keeps float16 weights, which the
4-bit writers and GPTQ wrote back as float32 ("MatMul bound to different types"). The models here are small graphs of
the same contrib ops, built node by node.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq

HIDDEN, HEADS, SEQ, VOCAB = 32, 4, 8, 50


def _fused_encoder(half: bool = False) -> onnx.ModelProto:
    """EmbedLayerNormalization -> Attention -> MatMul+Add -> SkipLayerNormalization -> MatMul (the classifier head)."""
    rng = np.random.default_rng(0)
    ft = np.float16 if half else np.float32

    def init(name: str, *shape: int, scale: float = 0.2) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, scale, shape).astype(ft), name)

    inits = [init("word", VOCAB, HIDDEN, scale=1.0), init("pos", SEQ, HIDDEN, scale=0.5),
             numpy_helper.from_array(np.ones(HIDDEN, ft), "gamma"), numpy_helper.from_array(np.zeros(HIDDEN, ft), "beta"),
             init("qkv_w", HIDDEN, 3 * HIDDEN), init("qkv_b", 3 * HIDDEN, scale=0.02), init("out_w", HIDDEN, HIDDEN),
             init("out_b", HIDDEN, scale=0.02), init("head_w", HIDDEN, 6)]
    ms = "com.microsoft"
    nodes = [
        helper.make_node("EmbedLayerNormalization", ["input_ids", "", "word", "pos", "", "gamma", "beta"], ["emb", "mask_index"],
                         name="EmbedLayerNormalization_0", domain=ms, epsilon=1e-5),
        helper.make_node("Attention", ["emb", "qkv_w", "qkv_b"], ["att"], name="Attention_0", domain=ms, num_heads=HEADS),
        helper.make_node("MatMul", ["att", "out_w"], ["proj"], name="out_proj/MatMul"),
        helper.make_node("SkipLayerNormalization", ["proj", "emb", "gamma", "beta", "out_b"], ["norm"], name="SkipLayerNorm_0",
                         domain=ms, epsilon=1e-5),
        helper.make_node("MatMul", ["norm", "head_w"], ["logits"], name="head/MatMul"),
    ]
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", SEQ])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT16 if half else TensorProto.FLOAT,
                                                             ["batch", SEQ, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)])


def _data(n: int = 6, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB, (4, SEQ)).astype(np.int32)} for _ in range(n)]


def _cosine_to_fp32(reference: onnx.ModelProto, model: onnx.ModelProto) -> float:
    feeds = _data(2, seed=3)
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (reference, model)]
    a, b = (np.concatenate([r.run(None, f)[0].astype(np.float64).ravel() for f in feeds]) for r in runs)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_fused_attention_is_listed_float_and_counted_as_float_compute():
    from onnxq.runtime.ort import integer_kernel_report

    res = onnxq.optimize(_fused_encoder(), method="minmax", data=_data(), show_progress=False)
    assert res.report.quantized_weights == 2  # the two MatMuls
    skipped = {e.node: e.reason for e in res.report.left_in_float}
    assert "Attention_0" in skipped and "before fusing" in skipped["Attention_0"]
    kernels = integer_kernel_report(res.model)
    assert kernels["float_compute_ops"].get("Attention") == 1 and kernels["integer_fraction"] < 1.0
    assert _cosine_to_fp32(_fused_encoder(), res.model) > 0.98


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("method", ["gptq", "minmax"])
def test_weight_only_4bit_runs_on_an_optimized_and_a_float16_model(method, half):
    model = _fused_encoder(half)
    res = onnxq.optimize(model, method=method, bits=4, data=_data(), show_progress=False)
    assert res.report.quantized_weights == 2
    assert "Attention_0" in {e.node for e in res.report.left_in_float}  # its weights stay float at 4 bits too
    half_inits = {t.name for t in res.model.graph.initializer if t.data_type == TensorProto.FLOAT16}
    assert not half or half_inits, "a float16 model stays float16"
    assert _cosine_to_fp32(model, res.model) > 0.98


def test_tensorrt_lint_flags_the_contrib_ops_it_cannot_import(caplog):
    """`--target trt` on a fused model kept Attention, SkipLayerNormalization and EmbedLayerNormalization, which
    TensorRT's parser has no importer for, and `onnxq lint` said nothing; `optimize` says it too, as a warning (it
    wrote the model with exit 0 and nothing said)."""
    from onnxq.graph.trt_rules import check_trt_rules

    with caplog.at_level("WARNING", logger="onnxq"):
        res = onnxq.optimize(_fused_encoder(), method="minmax", target="trt", data=_data(), show_progress=False)
    said = [r.getMessage() for r in caplog.records if "contrib ops TensorRT cannot import" in r.getMessage()]
    assert len(said) == 1 and "Attention x1" in said[0] and "will not build" in said[0]
    flagged = {f.node for f in check_trt_rules(res.model) if f.rule == "contrib-op" and f.severity == "error"}
    assert {"EmbedLayerNormalization_0", "Attention_0", "SkipLayerNorm_0"} <= flagged
