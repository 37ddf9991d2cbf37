"""``-o unit layer``: one weighted layer per reconstruction unit, the PD loss through the rest of the
network, which inside a residual block also reads the skip branch (the quantized prefix's value)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

pytest.importorskip("onnxq_pdquant", reason="onnxq-pdquant is not installed (pip install -e plugins_contrib/onnxq-pdquant)")
torch = pytest.importorskip("torch", reason="pdquant learns with PyTorch (pip install 'onnxq-pdquant[torch]')")

import onnxq  # noqa: E402
from onnxq_pdquant.net import Net  # noqa: E402
from onnxq_pdquant.reconstruct import Rest  # noqa: E402

W4A8 = {"weight_bits": 4, "act_bits": 8, "iters": 30, "samples": 64, "unit": "layer"}


def _residual_cnn() -> onnx.ModelProto:
    """stem Conv-Relu, then s + Conv(Relu(Conv(s))), Relu, global pooling, Gemm (random weights)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.4).astype(np.float32), n)
             for n, s in (("w0", (8, 3, 3, 3)), ("wa", (8, 8, 3, 3)), ("wb", (8, 8, 3, 3)), ("fc_w", (8, 5)))]
    inits.append(numpy_helper.from_array(np.zeros(5, np.float32), "fc_b"))
    pads = [1, 1, 1, 1]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="stem", pads=pads),
             helper.make_node("Relu", ["c0"], ["s"], name="stem_relu"),
             helper.make_node("Conv", ["s", "wa"], ["ca"], name="conv_a", pads=pads),
             helper.make_node("Relu", ["ca"], ["ra"], name="relu_a"),
             helper.make_node("Conv", ["ra", "wb"], ["cb"], name="conv_b", pads=pads),
             helper.make_node("Add", ["s", "cb"], ["sum"], name="add"),
             helper.make_node("Relu", ["sum"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc")]
    g = helper.make_graph(nodes, "res_cnn", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_rest_of_the_network_reads_the_skip_branch_and_reproduces_fp32():
    """The FP32 rest after conv_a's unit needs the skip tensor ``s`` besides the unit's output; fed
    FP32 values it gives the FP32 model's logits (ONNX Runtime)."""
    import onnxruntime as ort

    model = _residual_cnn()
    x = np.random.default_rng(3).standard_normal((6, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    inter = onnx.helper.make_model(model.graph, opset_imports=model.opset_import)
    inter.graph.output.extend([helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in ("s", "ra")])
    _, s, ra = ort.InferenceSession(inter.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    net = Net(list(model.graph.node)[4:], consts, ["logits"])
    net.quantize = False
    rest = Rest(net, {"s": torch.from_numpy(s)})
    got = rest({"ra": torch.from_numpy(ra[1:4])}, slice(1, 4))  # a mini-batch of the unit output, its rows of the side input
    np.testing.assert_allclose(got.numpy(), want[1:4], rtol=1e-4, atol=1e-4)  # the side input follows the mini-batch
    with pytest.raises(Exception, match="not available"):
        Net(list(model.graph.node)[4:], consts, ["logits"])({"ra": torch.from_numpy(ra)})  # without ``s`` the rest cannot run


def test_layer_units_run_end_to_end_and_lower_the_prediction_difference():
    import onnxruntime as ort

    model = _residual_cnn()
    data = [{"x": np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)}]
    r = onnxq.optimize(model, method="pdquant", data=data, show_progress=False, options=W4A8)
    rep = r.report.methods["pdquant"]
    assert rep["unit"] == "layer"
    blocks = rep["blocks"]
    assert [b["layers"] for b in blocks] == [["stem"], ["conv_a"], ["conv_b"], ["fc"]]  # every weighted layer on its own, none skipped
    assert all(b["pd_start"] > 0 for b in blocks)
    kept = [b for b in blocks if b["kept"] == "learned"]
    assert kept and sum(b["pd_learned"] for b in kept) < sum(b["pd_start"] for b in kept)
    x = np.random.default_rng(2).standard_normal((4, 3, 8, 8)).astype(np.float32)
    out = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert out.shape == (4, 5) and np.all(np.isfinite(out))
    ints = [numpy_helper.to_array(t) for t in r.model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(ints) == 3 and all(int(np.abs(q).max()) <= 7 for q in ints)  # 4-bit weights in int8 storage
    # the default unit stays onnxq-brecq's blocks: the residual block is one unit
    blk = onnxq.optimize(model, method="pdquant", data=data, show_progress=False, options={**W4A8, "unit": None}).report.methods["pdquant"]
    assert blk["unit"] == "block" and any(set(b["layers"]) == {"conv_a", "conv_b"} for b in blk["blocks"])
