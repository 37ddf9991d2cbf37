"""SPARQ as an onnxq method: the emulation's arithmetic, where it applies, and what it buys at 3-bit windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("onnxq_sparq", reason="onnxq-sparq is not installed (pip install -e plugins_contrib/onnxq-sparq)")

import onnxq  # noqa: E402
from onnxq.runtime.ort import make_session  # noqa: E402
from onnxq.testing.contract import MethodContract  # noqa: E402
from onnxq_sparq.emulate import apply_sparq  # noqa: E402
from onnxq_sparq.trim import trim  # noqa: E402

ZOO = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "zoo"


class TestSparqContract(MethodContract):
    method = "sparq"
    targets = ("ort",)  # TensorRT stores activations signed and rejects integer ops between Q and DQ


def _identity_matmul(k: int) -> onnx.ModelProto:
    """x (integers 0..255 as float) -> Q(scale 1, zp 0) -> DQ -> MatMul with an exact identity weight."""
    w = numpy_helper.from_array(np.eye(k, dtype=np.int8), "w_q")
    inits = [w, numpy_helper.from_array(np.float32(1), "s"), numpy_helper.from_array(np.uint8(0), "zp"),
             numpy_helper.from_array(np.int8(0), "wzp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w_q", "s", "wzp"], ["wd"], name="wdq"),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
             helper.make_node("Relu", ["xd"], ["side"], name="side_reader")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, k]),
                           helper.make_tensor_value_info("side", TensorProto.FLOAT, [None, k])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def _vsparq_reference(v: np.ndarray) -> np.ndarray:
    """vSPARQ from its definition: pairs (2i, 2i+1) along the last axis; a value whose partner is zero
    (or that has no partner) keeps 8 bits, the others are trimmed to 4-bit windows."""
    out = trim(v).copy()
    k = v.shape[-1]
    for i in range(k):
        j = i ^ 1  # the partner: 0<->1, 2<->3, ...
        keep = (v[..., j] == 0) if j < k else np.ones(v.shape[:-1], bool)
        out[..., i] = np.where(keep, v[..., i], out[..., i])
    return out


@pytest.mark.parametrize("k", [6, 5])
@pytest.mark.parametrize("variant", ["bsparq", "vsparq"])
def test_emulation_computes_the_definition_and_leaves_other_readers_8bit(k, variant):
    rng = np.random.default_rng(k)
    v = rng.integers(0, 256, (64, k))
    v[rng.random(v.shape) < 0.3] = 0  # zeros, as after a ReLU: vSPARQ's free slots
    model, res = apply_sparq(_identity_matmul(k), variant, 4, 5, True)
    onnx.checker.check_model(model, full_check=True)
    y, side = make_session(model, "all").run(None, {"x": v.astype(np.float32)})
    want = _vsparq_reference(v) if variant == "vsparq" else trim(v)
    assert np.array_equal(y.astype(np.int64), want)
    assert np.array_equal(side.astype(np.int64), v), "an element-wise reader keeps the 8-bit values"
    assert res.trimmed == ["x"] and res.paired == (1 if variant == "vsparq" else 0)


def test_signed_or_offset_activations_stay_8bit():
    model = _identity_matmul(4)
    for t in model.graph.initializer:
        if t.name == "zp":
            t.CopyFrom(numpy_helper.from_array(np.uint8(3), "zp"))
    out, res = apply_sparq(model, "bsparq", 4, 5, True)
    assert not res.trimmed and "zero point" in res.skipped["x"]


def _fixture(name: str):
    d = ZOO / name
    ev = np.load(d / "eval.npz")
    names = [i.name for i in make_session(str(d / "model.onnx"), "all").get_inputs()]
    return d, {n: ev[n] for n in names}, ev["label"]


def _score(model, feeds, labels, ref):
    out = make_session(model, "all").run(None, feeds)[0]
    sqnr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((out - ref).astype(np.float64) ** 2))
    return float(np.mean(out.argmax(-1) == labels)), float(sqnr)


def test_windows_beat_plain_low_bit_activations_on_a_normalized_cnn():
    """3-bit windows on the ImageNet-style fixture, against plain 3-bit activations over the same
    8-bit ranges (the same tensors trimmed): bSPARQ keeps more accuracy and SQNR, vSPARQ at least as much."""
    d, feeds, labels = _fixture("imagenet_norm_cnn")
    ref = make_session(str(d / "model.onnx"), "all").run(None, feeds)[0]

    def run(**opts):
        res = onnxq.optimize(d / "model.onnx", method=["mse", "sparq"], data=str(d / "calib.npz"), target="ort",
                             options={"bits": 3, **opts}, show_progress=False, check=False)
        assert res.report.methods["sparq"]["trimmed_activations"] >= 3
        return _score(res.model, feeds, labels, ref)

    uniform, bsparq, vsparq = run(placements=1), run(placements=6), run(placements=6, variant="vsparq")
    print(f"3-bit top-1 / SQNR: uniform {uniform}, bSPARQ {bsparq}, vSPARQ {vsparq}")
    assert bsparq[0] >= uniform[0] + 0.005 and bsparq[1] >= uniform[1] + 3.0
    assert vsparq[0] >= bsparq[0] and vsparq[1] >= bsparq[1]


def test_only_dot_product_readers_see_trimmed_values():
    d = ZOO / "mnist_norm_resnet"  # residual Adds read post-ReLU activations beside the convs
    res = onnxq.optimize(d / "model.onnx", method="sparq", data=str(d / "calib.npz"), target="ort", show_progress=False, check=False)
    m = res.model
    producer = {o: n for n in m.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in m.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    sparq_dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and producer.get(n.input[0]) is not None
                 and producer[n.input[0]].op_type == "Cast"]
    assert sparq_dqs
    for dq in sparq_dqs:
        assert {r.op_type for r in readers[dq.output[0]]} <= {"Conv", "MatMul", "Gemm"}
    rewrite = [r for r in res.report.quantized_rewrites if r.method == "sparq"]
    assert rewrite and rewrite[0].nodes_added and rewrite[0].output_error is not None


@pytest.mark.parametrize("target,bits,match", [("trt", 8, "unsigned"), ("ort", 4, "weight-only")])
def test_refused_where_it_cannot_apply(target, bits, match):
    d = ZOO / "mnist_norm_resnet"
    with pytest.raises(onnxq.OnnxqError, match=match):
        onnxq.optimize(d / "model.onnx", method="sparq", data=str(d / "calib.npz"), target=target, bits=bits, show_progress=False, check=False)
