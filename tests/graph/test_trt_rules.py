"""Tests for onnxq.graph.trt_rules: a clean TensorRT-style graph, then one injected defect per rule."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.graph.trt_rules import RULES, Finding, check_trt_rules, format_findings

FLOAT = TensorProto.FLOAT
RNG_SEED = 0


# ---------------------------------------------------------------------------------------------
# Tiny graph builder
# ---------------------------------------------------------------------------------------------

class Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []

    def const(self, name: str, value) -> str:
        tensor = value if isinstance(value, TensorProto) else numpy_helper.from_array(np.asarray(value), name)
        tensor.name = name
        self.inits.append(tensor)
        return name

    def input(self, name: str, shape, dtype: int = FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, name: str, shape=None, dtype: int = FLOAT) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def qdq(self, x: str, prefix: str, scale: str, zero_point: str, **attrs) -> str:
        """QuantizeLinear ``{prefix}_q`` then DequantizeLinear ``{prefix}_dq``; returns the DQ output."""
        q = self.op("QuantizeLinear", [x, scale, zero_point], f"{prefix}_q", **attrs)
        return self.op("DequantizeLinear", [q, scale, zero_point], f"{prefix}_dq", **attrs)

    def weight(self, prefix: str, shape, axis: int = 0, low: int = -127) -> str:
        """Symmetric per-channel int8 weight ``{prefix}`` behind DequantizeLinear ``{prefix}_dq``."""
        rng = np.random.default_rng(RNG_SEED)
        w = self.const(prefix, rng.integers(low, 128, size=shape, dtype=np.int8))
        s = self.const(f"{prefix}_scale", rng.uniform(0.001, 0.01, size=shape[axis]).astype(np.float32))
        z = self.const(f"{prefix}_zp", np.zeros(shape[axis], np.int8))
        return self.op("DequantizeLinear", [w, s, z], f"{prefix}_dq", axis=axis)

    def model(self, opset: int = 17) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", self.inputs, self.outputs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def clean_trt_model(opset: int = 17) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv -> Relu -> Q/DQ -> Conv -> Add(residual = the quantized relu) -> Q/DQ
    -> Concat with the quantized relu (one shared scale) -> y. Everything TensorRT-friendly."""
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    b.const("s_x", np.float32(0.05))
    b.const("s_r", np.float32(0.04))
    b.const("zp", np.int8(0))
    x_dq = b.qdq(x, "x", "s_x", "zp")
    c1 = b.op("Conv", [x_dq, b.weight("w1", [4, 3, 3, 3]), b.const("b1", np.zeros(4, np.float32))],
              "conv1", pads=[1, 1, 1, 1])
    r1 = b.op("Relu", [c1], "relu1")
    r1_dq = b.qdq(r1, "r1", "s_r", "zp")
    c2 = b.op("Conv", [r1_dq, b.weight("w2", [4, 4, 3, 3]), b.const("b2", np.zeros(4, np.float32))],
              "conv2", pads=[1, 1, 1, 1])
    a = b.op("Add", [c2, r1_dq], "add")
    a_dq = b.qdq(a, "a", "s_r", "zp")
    b.nodes.append(helper.make_node("Concat", [a_dq, r1_dq], ["y"], name="concat", axis=1))
    b.output("y", [1, 8, 8, 8])
    return b.model(opset)


# ---------------------------------------------------------------------------------------------
# Mutation helpers
# ---------------------------------------------------------------------------------------------

def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def set_input(model: onnx.ModelProto, node_name: str, index: int, value) -> None:
    """Point input ``index`` of a node at a fresh initializer holding ``value``."""
    name = f"{node_name}_input{index}"
    tensor = value if isinstance(value, TensorProto) else numpy_helper.from_array(np.asarray(value))
    tensor.name = name
    model.graph.initializer.append(tensor)
    node(model, node_name).input[index] = name


def set_attr(model: onnx.ModelProto, node_name: str, **attrs) -> None:
    n = node(model, node_name)
    for key, value in attrs.items():
        for old in [a for a in n.attribute if a.name == key]:
            n.attribute.remove(old)
        n.attribute.append(helper.make_attribute(key, value))


def assert_only(findings: list[Finding], rule: str, nodes: set[str]) -> None:
    assert {f.rule for f in findings} == {rule}, format_findings(findings)
    assert {f.node for f in findings} == nodes, format_findings(findings)
    severity = next(r.severity for r in RULES if r.id == rule)
    assert all(f.severity == severity for f in findings)


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# ---------------------------------------------------------------------------------------------
# Registry and formatting
# ---------------------------------------------------------------------------------------------

def test_rules_are_registered_and_documented():
    ids = [r.id for r in RULES]
    assert len(ids) == len(set(ids))
    assert {r.severity for r in RULES} <= {"error", "warning"}
    assert all(r.summary and callable(r.check) for r in RULES)
    expected = {"zero-point", "uint8-inside", "int32-bias", "scale-positive", "per-channel-activation",
                "per-channel-axis", "weight-narrow-range", "int4-weight-only", "int4-block-axis", "opset",
                "unquantized-weighted-input", "residual-add", "concat-scales", "q-scalar-input"}
    assert expected <= set(ids)


def test_format_findings_and_rule_selection():
    model = clean_trt_model()
    set_input(model, "x_q", 2, np.int8(3))
    findings = check_trt_rules(model)
    assert format_findings(findings).splitlines()[0].startswith("error zero-point x_q: ")
    assert format_findings([]) == ""
    assert check_trt_rules(model, rules=["residual-add"]) == []
    with pytest.raises(ValueError, match="no-such-rule"):
        check_trt_rules(model, rules=["no-such-rule"])


# ---------------------------------------------------------------------------------------------
# Clean graphs
# ---------------------------------------------------------------------------------------------

def test_clean_trt_graph_has_no_findings():
    model = clean_trt_model()
    onnx.checker.check_model(model, full_check=True)
    (y,) = run_ort(model, {"x": np.ones((1, 3, 8, 8), np.float32)})
    assert y.shape == (1, 8, 8, 8)
    assert check_trt_rules(model) == []


def int4_matmul_model(opset: int = 21, act_type: int = TensorProto.INT8, block_axis: int = 0,
                      w_shape=(32, 8), x_shape=(2, 32)) -> onnx.ModelProto:
    """x -> Q/DQ -> MatMul with an INT4 weight blocked by 16 (or 2 along a batch axis)."""
    b = Builder()
    x = b.input("x", list(x_shape))
    b.const("s_x", np.float32(0.05))
    b.const("zp_x", helper.make_tensor("zp_x", act_type, [], [0]))
    x_dq = b.qdq(x, "x", "s_x", "zp_x")
    block = 16 if w_shape[block_axis] >= 16 else 2
    rng = np.random.default_rng(RNG_SEED)
    values = rng.integers(-7, 8, size=w_shape).ravel().tolist()
    b.const("w", helper.make_tensor("w", TensorProto.INT4, list(w_shape), values))
    s_shape = list(w_shape)
    s_shape[block_axis] //= block
    b.const("w_scale", rng.uniform(0.01, 0.1, size=s_shape).astype(np.float32))
    w_dq = b.op("DequantizeLinear", ["w", "w_scale"], "w_dq", axis=block_axis, block_size=block)
    b.nodes.append(helper.make_node("MatMul", [x_dq, w_dq], ["y"], name="matmul"))
    b.output("y")
    return b.model(opset)


def test_clean_int4_weight_only_graph_has_no_findings():
    model = int4_matmul_model()
    (y,) = run_ort(model, {"x": np.ones((2, 32), np.float32)})
    assert y.shape == (2, 8)
    assert check_trt_rules(model) == []


# ---------------------------------------------------------------------------------------------
# One defect per rule
# ---------------------------------------------------------------------------------------------

def test_zero_point_nonzero():
    model = clean_trt_model()
    set_input(model, "x_q", 2, np.int8(3))
    set_input(model, "x_dq", 2, np.int8(3))
    assert_only(check_trt_rules(model), "zero-point", {"x_q", "x_dq"})


def test_zero_point_not_constant():
    model = clean_trt_model()
    model.graph.input.append(helper.make_tensor_value_info("zp_dynamic", TensorProto.INT8, []))
    node(model, "x_q").input[2] = "zp_dynamic"
    assert_only(check_trt_rules(model), "zero-point", {"x_q"})


def test_zero_point_dtype_differs_from_quantized_type():
    model = clean_trt_model()
    set_input(model, "w1_dq", 2, np.zeros(4, np.uint8))
    assert_only(check_trt_rules(model), "zero-point", {"w1_dq"})


def test_zero_point_missing_means_uint8_in_onnx():
    model = clean_trt_model()
    for name in ("x_q", "x_dq"):
        del node(model, name).input[2]
    assert_only(check_trt_rules(model), "zero-point-missing", {"x_q"})


def test_uint8_inside():
    model = clean_trt_model()
    for name in ("x_q", "x_dq"):
        set_input(model, name, 2, np.uint8(0))
    assert_only(check_trt_rules(model), "uint8-inside", {"x_q", "x_dq"})


def test_uint8_weight_dequantize():
    model = clean_trt_model()
    set_input(model, "w1_dq", 0, np.full((4, 3, 3, 3), 7, np.uint8))
    set_input(model, "w1_dq", 2, np.zeros(4, np.uint8))
    assert_only(check_trt_rules(model), "uint8-inside", {"w1_dq"})


def test_int32_bias():
    model = clean_trt_model()
    g = model.graph
    g.initializer.extend([
        numpy_helper.from_array(np.array([5, -3, 0, 9], np.int32), "b1_int32"),
        numpy_helper.from_array(np.full(4, 2e-4, np.float32), "b1_scale"),
    ])
    g.node.insert(0, helper.make_node("DequantizeLinear", ["b1_int32", "b1_scale"], ["b1_dq_out"],
                                      name="b1_dq", axis=0))
    node(model, "conv1").input[2] = "b1_dq_out"
    assert_only(check_trt_rules(model), "int32-bias", {"b1_dq"})


def test_unsupported_float8_variant():
    model = clean_trt_model(opset=19)
    for name in ("x_q", "x_dq"):
        set_input(model, name, 2, helper.make_tensor("", TensorProto.FLOAT8E5M2, [], [0.0]))
    assert_only(check_trt_rules(model), "quant-type", {"x_q", "x_dq"})


@pytest.mark.parametrize("bad", [0.0, -0.05, float("nan"), float("inf")])
def test_scale_not_positive_per_tensor(bad):
    model = clean_trt_model()
    set_input(model, "x_q", 1, np.float32(bad))
    assert_only(check_trt_rules(model), "scale-positive", {"x_q"})


def test_scale_not_positive_per_channel():
    model = clean_trt_model()
    set_input(model, "w2_dq", 1, np.array([0.01, 0.02, -0.01, 0.03], np.float32))
    assert_only(check_trt_rules(model), "scale-positive", {"w2_dq"})


def test_scale_dtype():
    model = clean_trt_model()
    set_input(model, "x_q", 1, np.float64(0.05))
    assert_only(check_trt_rules(model), "scale-dtype", {"x_q"})


def test_scale_and_zero_point_shapes_differ():
    model = clean_trt_model()
    set_input(model, "w1_dq", 2, np.int8(0))
    assert_only(check_trt_rules(model), "scale-shape", {"w1_dq"})


def test_scalar_input():
    b = Builder()
    t = b.input("t", [])
    b.const("s", np.float32(0.1))
    b.const("zp", np.int8(0))
    t_dq = b.qdq(t, "t", "s", "zp")
    b.nodes.append(helper.make_node("Mul", [t_dq, t_dq], ["y"], name="mul"))
    b.output("y", [])
    assert_only(check_trt_rules(b.model()), "q-scalar-input", {"t_q", "t_dq"})


def test_per_channel_quantize_on_activation():
    model = clean_trt_model()
    for name in ("x_q", "x_dq"):
        set_input(model, name, 1, np.array([0.05, 0.04, 0.03], np.float32))
        set_input(model, name, 2, np.zeros(3, np.int8))
        set_attr(model, name, axis=1)
    assert_only(check_trt_rules(model), "per-channel-activation", {"x_q"})


def test_per_channel_dequantize_on_int8_graph_input():
    b = Builder()
    x = b.input("x", [1, 3, 8, 8], TensorProto.INT8)
    s = b.const("s", np.array([0.1, 0.2, 0.3], np.float32))
    z = b.const("zp", np.zeros(3, np.int8))
    b.nodes.append(helper.make_node("DequantizeLinear", [x, s, z], ["y"], name="x_dq", axis=1))
    b.output("y", [1, 3, 8, 8])
    assert_only(check_trt_rules(b.model()), "per-channel-activation", {"x_dq"})


def test_per_channel_axis_conv():
    model = clean_trt_model()
    set_input(model, "w1_dq", 1, np.full(3, 0.01, np.float32))
    set_input(model, "w1_dq", 2, np.zeros(3, np.int8))
    set_attr(model, "w1_dq", axis=1)
    assert_only(check_trt_rules(model), "per-channel-axis", {"w1_dq"})


def gemm_model(op_type: str, w_shape, axis: int, **attrs) -> onnx.ModelProto:
    b = Builder()
    x = b.input("x", [2, 16])
    b.const("s_x", np.float32(0.05))
    b.const("zp", np.int8(0))
    x_dq = b.qdq(x, "x", "s_x", "zp")
    b.nodes.append(helper.make_node(op_type, [x_dq, b.weight("w", w_shape, axis=axis)], ["y"], name="op", **attrs))
    b.output("y")
    return b.model()


@pytest.mark.parametrize(("op_type", "w_shape", "axis", "attrs", "wrong"), [
    ("MatMul", [16, 8], 1, {}, False),
    ("MatMul", [16, 8], -1, {}, False),
    ("MatMul", [16, 8], 0, {}, True),
    ("Gemm", [16, 8], 1, {}, False),
    ("Gemm", [16, 8], 0, {}, True),
    ("Gemm", [8, 16], 0, {"transB": 1}, False),
    ("Gemm", [8, 16], 1, {"transB": 1}, True),
])
def test_per_channel_axis_gemm_and_matmul(op_type, w_shape, axis, attrs, wrong):
    model = gemm_model(op_type, w_shape, axis, **attrs)
    findings = check_trt_rules(model)
    if wrong:
        assert_only(findings, "per-channel-axis", {"w_dq"})
    else:
        run_ort(model, {"x": np.ones((2, 16), np.float32)})
        assert findings == []


def test_weight_narrow_range_stored_int8():
    model = clean_trt_model()
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1")).copy()
    w[0, 0, 0, 0] = -128
    set_input(model, "w1_dq", 0, w)
    assert_only(check_trt_rules(model), "weight-narrow-range", {"w1_dq"})


@pytest.mark.parametrize(("scale", "wrong"), [(1 / 127, False), (1 / 128, True)])
def test_weight_narrow_range_quantized_in_graph(scale, wrong):
    b = Builder()
    x = b.input("x", [2, 16])
    b.const("s", np.float32(0.05))
    b.const("zp", np.int8(0))
    x_dq = b.qdq(x, "x", "s", "zp")
    w = np.linspace(-1.0, 1.0, 16 * 8, dtype=np.float32).reshape(16, 8)
    b.const("w", w)
    b.const("s_w", np.float32(scale))
    w_dq = b.qdq("w", "w", "s_w", "zp")
    b.nodes.append(helper.make_node("MatMul", [x_dq, w_dq], ["y"], name="matmul"))
    b.output("y")
    findings = check_trt_rules(b.model())
    if wrong:
        assert_only(findings, "weight-narrow-range", {"w_q"})
    else:
        assert findings == []


def test_int4_on_activation():
    model = int4_matmul_model(act_type=TensorProto.INT4)
    assert_only(check_trt_rules(model), "int4-weight-only", {"x_q"})


def test_int4_block_axis_must_be_one_of_the_last_two():
    model = int4_matmul_model(block_axis=0, w_shape=(2, 32, 8), x_shape=(2, 4, 32))
    assert_only(check_trt_rules(model), "int4-block-axis", {"w_dq"})
    ok = int4_matmul_model(block_axis=1, w_shape=(2, 32, 8), x_shape=(2, 4, 32))
    assert check_trt_rules(ok) == []


def test_opset_too_old_for_int4():
    assert_only(check_trt_rules(int4_matmul_model(opset=19)), "opset", {"w_dq"})


def test_opset_too_old_for_per_channel():
    findings = check_trt_rules(clean_trt_model(opset=11))
    assert_only(findings, "opset", {"w1_dq"})
    assert "2 Q/DQ node(s)" in findings[0].message


def test_unquantized_activation_of_weighted_op():
    model = clean_trt_model()
    node(model, "conv1").input[0] = "x"
    assert_only(check_trt_rules(model), "unquantized-weighted-input", {"conv1"})


def test_unquantized_weight_of_weighted_op():
    model = clean_trt_model()
    set_input(model, "conv2", 1, np.full((4, 4, 3, 3), 0.01, np.float32))
    assert_only(check_trt_rules(model), "unquantized-weighted-input", {"conv2"})


def test_residual_add_with_float_input():
    model = clean_trt_model()
    node(model, "add").input[1] = "relu1_out"
    assert_only(check_trt_rules(model), "residual-add", {"add"})


def paddle_bias_model(quantize_bias: bool) -> onnx.ModelProto:
    """The clean graph's conv2 with its bias written as paddle2onnx writes it: Add(Conv, Reshape(bias)),
    the reshaped bias quantized with an activation grid when ``quantize_bias``."""
    model = clean_trt_model()
    conv2 = node(model, "conv2")
    del conv2.input[2]
    model.graph.initializer.extend([numpy_helper.from_array(np.array([0.5, -4.6, 0.1, 0.0], np.float32), "b2p"),
                                    numpy_helper.from_array(np.array([1, -1, 1, 1], np.int64), "b2_shape")])
    bias = "b2r"
    new = [helper.make_node("Reshape", ["b2p", "b2_shape"], [bias], name="bias_reshape")]
    if quantize_bias:
        new += [helper.make_node("QuantizeLinear", [bias, "s_r", "zp"], ["b2_q_out"], name="b2_q"),
                helper.make_node("DequantizeLinear", ["b2_q_out", "s_r", "zp"], ["b2_dq_out"], name="b2_dq")]
        bias = "b2_dq_out"
    new.append(helper.make_node("Add", ["conv2_out", bias], ["conv2_biased"], name="bias_add"))
    at = list(model.graph.node).index(conv2) + 1
    for offset, n in enumerate(new):
        model.graph.node.insert(at + offset, n)
    node(model, "add").input[0] = "conv2_biased"
    return model


def test_quantized_constant_bias():
    # a float reshaped bias is a constant: no residual-add finding, nothing at all
    assert check_trt_rules(paddle_bias_model(quantize_bias=False)) == []
    model = paddle_bias_model(quantize_bias=True)
    findings = check_trt_rules(model)
    assert_only(findings, "quantized-constant", {"b2_q"})
    assert "Reshape 'bias_reshape'" in findings[0].message and "Add 'bias_add'" in findings[0].message
    run_ort(model, {"x": np.zeros((1, 3, 8, 8), np.float32)})  # a valid, runnable graph otherwise


def test_quantized_constant_ignores_weights_computed_at_run_time():
    model = clean_trt_model()
    # conv2's weight as a float constant reshaped at run time, then quantized in the graph: a weight, not a bias
    model.graph.initializer.extend([numpy_helper.from_array(np.full(144, 0.01, np.float32), "w2flat"),
                                    numpy_helper.from_array(np.array([4, 4, 3, 3], np.int64), "w2_shape"),
                                    numpy_helper.from_array(np.float32(0.001), "s_w")])
    conv2 = node(model, "conv2")
    at = list(model.graph.node).index(conv2)
    for offset, n in enumerate([helper.make_node("Reshape", ["w2flat", "w2_shape"], ["w2r"], name="w_reshape"),
                                helper.make_node("QuantizeLinear", ["w2r", "s_w", "zp"], ["w2q"], name="w2_q"),
                                helper.make_node("DequantizeLinear", ["w2q", "s_w", "zp"], ["w2dq"], name="w2_dqr")]):
        model.graph.node.insert(at + offset, n)
    conv2.input[1] = "w2dq"
    assert [f for f in check_trt_rules(model) if f.rule == "quantized-constant"] == []


def test_concat_with_different_scales():
    model = clean_trt_model()
    for name in ("a_q", "a_dq"):
        set_input(model, name, 1, np.float32(0.07))
    assert_only(check_trt_rules(model), "concat-scales", {"concat"})


# ---------------------------------------------------------------------------------------------
# ONNX Runtime's quantizer: defaults break TensorRT, the TensorRT recipe does not
# ---------------------------------------------------------------------------------------------

def float_conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(RNG_SEED)
    b = Builder()
    x = b.input("x", [1, 3, 16, 16])
    w1 = b.const("w1", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32))
    w2 = b.const("w2", rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32))
    b1 = b.const("b1", rng.normal(0, 0.1, 8).astype(np.float32))
    b2 = b.const("b2", rng.normal(0, 0.1, 8).astype(np.float32))
    r1 = b.op("Relu", [b.op("Conv", [x, w1, b1], "conv1", pads=[1, 1, 1, 1])], "relu1")
    c2 = b.op("Conv", [r1, w2, b2], "conv2", pads=[1, 1, 1, 1])
    b.nodes.append(helper.make_node("Add", [c2, r1], ["y"], name="add"))
    b.output("y", [1, 8, 16, 16])
    return b.model(17)


class RandomReader:
    def __init__(self, count: int = 4) -> None:
        rng = np.random.default_rng(RNG_SEED)
        self._feeds = iter([{"x": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(count)])

    def get_next(self):
        return next(self._feeds, None)


def ort_quantize(tmp_path, **kwargs) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, quantize_static

    src, dst = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(float_conv_model(), src)
    quantize_static(str(src), str(dst), RandomReader(), quant_format=QuantFormat.QDQ, per_channel=True, **kwargs)
    return onnx.load(dst)


def has_int32_dequantize(model: onnx.ModelProto) -> bool:
    int32 = {t.name for t in model.graph.initializer if t.data_type == TensorProto.INT32}
    return any(n.op_type == "DequantizeLinear" and n.input[0] in int32 for n in model.graph.node)


# onnxruntime 1.32 defaults quantize_static to asymmetric QInt8 activations; older releases (and the
# get_qdq_config recipe) use QUInt8. Both must be caught.
@pytest.mark.parametrize("activation_type", [None, "QUInt8"])
def test_ort_default_qdq_violates_trt_rules(tmp_path, activation_type):
    from onnxruntime.quantization import QuantType

    kwargs = {} if activation_type is None else {"activation_type": QuantType[activation_type]}
    model = ort_quantize(tmp_path, **kwargs)
    findings = check_trt_rules(model)
    errors = {f.rule for f in findings if f.severity == "error"}
    assert "zero-point" in errors, format_findings(findings)
    assert ("uint8-inside" in errors) == (activation_type == "QUInt8")
    assert ("int32-bias" in errors) == has_int32_dequantize(model)
    assert "int32-bias" in errors  # QuantizeBias defaults to True


def test_ort_trt_recipe_passes(tmp_path):
    from onnxruntime.quantization import QuantType

    model = ort_quantize(
        tmp_path,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "QuantizeBias": False},
    )
    errors = [f for f in check_trt_rules(model) if f.severity == "error"]
    assert errors == [], format_findings(errors)
