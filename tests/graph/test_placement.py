"""Placement follows the target profile (the rules in onnxq/graph/placement.py's docstring)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.graph.edit import name_nodes
from onnxq.graph.placement import build_plan, weight_axis
from onnxq.graph.prepare import infer_shapes
from onnxq.graph.targets import get_profile
from onnxq.testing.models import residual_concat_model


def test_trt_quantizes_weighted_inputs_and_residual_only():
    plan = build_plan(residual_concat_model(), get_profile("trt"))
    assert set(plan.activations) == {"x", "a", "r", "cat", "flat"}
    assert set(plan.weights) == {"w1", "w2", "w3", "w4", "w5", "fc"}
    # 'a' feeds conv2 and the residual Add: one shared pair rewires both
    assert ("add", 1) in plan.activations["a"].consumers and ("conv2", 0) in plan.activations["a"].consumers
    assert not any(t in plan.activations for t in ("c1", "c2", "logits"))
    assert plan.weights["fc"].axis == 0 and plan.weights["w1"].axis == 0


def test_trt_concat_inputs_share_a_scale_when_quantized():
    m = residual_concat_model()
    # make the concat inputs quantized by feeding them to convs as well
    plan = build_plan(m, get_profile("trt"))
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    m2.graph.node.append(helper.make_node("Conv", ["c3", "w3x"], ["extra"], name="extra"))
    m2.graph.initializer.append(numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w3x"))
    m2.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    plan2 = build_plan(m2, get_profile("trt"))
    assert any({"c3", "cat"} <= set(g) for g in plan2.share_groups)
    assert plan.share_groups == []


def test_ort_quantizes_outputs_and_folds_relu():
    plan = build_plan(residual_concat_model(), get_profile("ort"))
    acts = set(plan.activations)
    assert "a" in acts and "c1" not in acts  # Relu folded into the asymmetric output grid
    assert {"c2", "r", "c3", "c4", "cat", "c5", "gap"} <= acts  # int8 islands for Add/Concat/pool
    assert "logits" not in acts  # graph outputs stay float


def _relu6_net(low: float) -> onnx.ModelProto:
    """x -> Conv -> Clip(low, 6) -> Conv -> y, ReLU6 as tf2onnx writes it (bounds as constant inputs)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (4, 8, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(low, np.float32), "lo"), numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["a"], name="relu6"),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "relu6", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_ort_folds_relu6_as_it_folds_relu():
    """tf2onnx and TFLite write ReLU6 as Clip(0, 6): the conv's own output got a grid too, a second and coarser one
    (MobileNetV2 from Keras: 13.5 dB against ONNX Runtime's quantizer's 16.9 dB; 18.3 dB folded). A Clip whose lower
    bound is below zero is no ReLU: the conv output keeps its grid."""
    acts = set(build_plan(_relu6_net(0.0), get_profile("ort")).activations)
    assert "a" in acts and "c1" not in acts
    assert "c1" in set(build_plan(_relu6_net(-1.0), get_profile("ort")).activations)
    rng = np.random.default_rng(1)
    data = [{"x": rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    res = onnxq.optimize(_relu6_net(0.0), method="minmax", data=data, show_progress=False)
    assert not res.report.fidelity.warned and res.report.fidelity.outputs[0].cosine > 0.99


def test_a_weight_the_model_holds_quantized_is_kept_and_its_layer_quantized():
    """A TFLite model with int8 weights (tf2onnx: DequantizeLinear of int8 constants into the Conv) had those convs left
    float, with the advice to fold a weight that was already integer, and `onnxq lint` then flagged each for TensorRT.
    Its activations are now quantized around the weight as it is."""
    from onnxq.graph.trt_rules import check_trt_rules
    from onnxq.runtime.ort import integer_kernel_report

    rng = np.random.default_rng(0)
    w1 = rng.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(w1, "w1_q"), numpy_helper.from_array(np.full(8, 0.004, np.float32), "w1_scale"),
             numpy_helper.from_array(np.zeros(8, np.int8), "w1_zp"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("DequantizeLinear", ["w1_q", "w1_scale", "w1_zp"], ["w1"], name="w1_dq", axis=0),
             helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a"], name="relu"),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "tflite_int8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    plan = build_plan(model, get_profile("ort"))
    assert "x" in plan.activations and "conv1" not in {n for n, _ in plan.skipped} and "w1" not in plan.weights
    data = [{"x": rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    res = onnxq.optimize(model, method="minmax", data=data, show_progress=False)
    # conv1 runs on an integer kernel with the model's own int8 weight (conv2 writes the float graph output)
    assert integer_kernel_report(res.model)["integer_ops"].get("QLinearConv") == 1
    assert res.report.fidelity.outputs[0].cosine > 0.99
    trt = onnxq.optimize(model, method="minmax", target="trt", data=data, show_progress=False)
    assert not [f for f in check_trt_rules(trt.model) if f.rule == "unquantized-weighted-input"]


def test_exclude_keeps_nodes_in_float():
    plan = build_plan(residual_concat_model(), get_profile("trt"), exclude=["conv5", "Gemm"])
    assert "w5" not in plan.weights and "fc" not in plan.weights
    assert {n for n, _ in plan.skipped} == {"conv5", "fc"}


def test_weight_axes():
    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    convt = helper.make_node("ConvTranspose", ["x", "w"], ["y"])
    gemm_t = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    gemm = helper.make_node("Gemm", ["x", "w"], ["y"])
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"])
    assert weight_axis(conv, 1, 4) == 0 and weight_axis(convt, 1, 4) == 1
    assert weight_axis(gemm_t, 1, 2) == 0 and weight_axis(gemm, 1, 2) == 1
    assert weight_axis(matmul, 1, 2) == 1 and weight_axis(matmul, 1, 3) == 2
    assert weight_axis(conv, 0, 4) is None


def test_name_nodes_gives_unique_names():
    m = residual_concat_model()
    for n in m.graph.node[:3]:
        n.name = ""
    m.graph.node[3].name = m.graph.node[4].name
    name_nodes(m)
    names = [n.name for n in m.graph.node]
    assert all(names) and len(set(names)) == len(names)


def paddle_bias_model() -> onnx.ModelProto:
    """paddle2onnx's conv bias: x -> Conv(w1) -> Add(Reshape(b1, [1,-1,1,1])) -> Relu -> a;
    a -> Conv(w2) -> Add(a) (a real residual) -> r; r -> Conv(Reshape(w3f, [2,4,1,1])) -> y."""
    rng = np.random.default_rng(0)
    w = lambda name, shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    inits = [w("w1", (4, 3, 3, 3)), w("b1", (4,)), w("w2", (4, 4, 3, 3)), w("w3f", (8,)),
             numpy_helper.from_array(np.array([1, -1, 1, 1], np.int64), "bias_shape"),
             numpy_helper.from_array(np.array([2, 4, 1, 1], np.int64), "w3_shape")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Reshape", ["b1", "bias_shape"], ["b1r"], name="bias_reshape"),
        helper.make_node("Add", ["c1", "b1r"], ["c1b"], name="bias_add"),
        helper.make_node("Relu", ["c1b"], ["a"], name="relu1"),
        helper.make_node("Conv", ["a", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "a"], ["r"], name="residual_add"),
        helper.make_node("Reshape", ["w3f", "w3_shape"], ["w3"], name="weight_reshape"),
        helper.make_node("Conv", ["r", "w3"], ["y"], name="conv3"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8])], inits)
    return infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))[0]


def test_a_bias_reshaped_at_run_time_is_a_constant_not_an_activation():
    m = paddle_bias_model()
    for target in ("trt", "ort"):
        plan = build_plan(m, get_profile(target))
        # the bias Add after conv1 is no residual Add: its reshaped bias never gets an activation grid
        assert "b1r" not in plan.activations and "w3" not in plan.activations
        # conv3's weight is computed at run time: no initializer to quantize, so the layer stays float, said why
        assert "conv3" not in {layer.node for layer in plan.layers}
        assert any(n == "conv3" and "computed from constants" in why for n, why in plan.skipped)
    trt = build_plan(m, get_profile("trt"))
    # the real residual Add keeps its Q/DQ (its other input 'a' is quantized for conv2 anyway)
    assert ("residual_add", 1) in trt.activations["a"].consumers


PICODET_PADDLE = Path(__file__).resolve().parents[1] / "fixtures" / "zoo" / "picodet_paddle"


def _detector_f1(model, data: dict[str, np.ndarray]) -> float:
    from onnxq.runtime.ort import make_session
    from onnxq.tasks.detection import box_f1, decode

    scores, boxes = make_session(model, "all").run(None, {"input": data["input"]})
    truth = [(b[lab >= 0], lab[lab >= 0]) for b, lab in zip(data["gt_boxes"], data["gt_labels"])]
    return box_f1(decode(scores, boxes, box_format="centernet", score_threshold=0.3, stride=4), truth)


@pytest.mark.parametrize("method", ["trt-entropy", "minmax", "mse"])
def test_trt_keeps_a_paddle_exported_hard_swish_detector_within_002_of_ort(method: str) -> None:
    """issue 15: a PP-PicoDet-LCNet-style detector as paddle2onnx writes it (tests/fixtures/zoo/picodet_paddle:
    hard-swish as Clip/Mul/Div, BatchNorm unfolded, nearest-upsampling neck, conv biases as
    Add(Conv, Reshape(bias)), one head conv for classes and box distributions).

    ``--target trt`` keeps box F1 within 0.02 of ``--target ort``, and its output passes the lint with
    no error and no quantized constant (the run-time-reshaped biases stay float).
    """
    from onnxq import optimize
    from onnxq.graph.trt_rules import check_trt_rules

    with np.load(PICODET_PADDLE / "eval.npz") as z:
        data = {k: z[k] for k in z.files}
    model = str(PICODET_PADDLE / "model.onnx")
    fp32 = _detector_f1(model, data)
    f1 = {}
    for target in ("ort", "trt"):
        result = optimize(model, method=method, data=str(PICODET_PADDLE / "calib.npz"), target=target, max_samples=32,
                          show_progress=False)
        f1[target] = _detector_f1(result.model, data)
        if target == "trt":
            findings = check_trt_rules(result.model)
            assert not [f for f in findings if f.severity == "error" or f.rule == "quantized-constant"], findings
    assert f1["ort"] >= fp32 - 0.05, (fp32, f1)  # the reference itself holds
    assert f1["trt"] >= f1["ort"] - 0.02, (fp32, f1)


def linear_bottleneck_model() -> onnx.ModelProto:
    """MobileNetV3's linear bottleneck, as paddle exports it: the block input is a projection conv's output with no
    activation after it, so the residual Add reads two conv outputs. x -> Conv(p1) -> s; s -> Conv(e) -> Relu ->
    Conv(p2) -> t; Add(s, t) -> Conv(head) -> y."""
    rng = np.random.default_rng(0)
    w = lambda name, shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)  # noqa: E731
    inits = [w("p1", (8, 3, 3, 3)), w("e", (16, 8, 1, 1)), w("p2", (8, 16, 1, 1)), w("head", (4, 8, 1, 1))]
    nodes = [helper.make_node("Conv", ["x", "p1"], ["s"], pads=[1, 1, 1, 1], name="project1"),
             helper.make_node("Conv", ["s", "e"], ["ex"], name="expand"), helper.make_node("Relu", ["ex"], ["er"], name="relu"),
             helper.make_node("Conv", ["er", "p2"], ["t"], name="project2"),
             helper.make_node("Add", ["s", "t"], ["r"], name="residual_add"),
             helper.make_node("Conv", ["r", "head"], ["y"], name="head")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    return infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))[0]


def test_a_residual_add_of_two_conv_outputs_gets_the_shortcut_quantized_for_tensorrt():
    """Both inputs of the Add come from convs: TensorRT fuses it into the conv whose output only the Add reads
    (project2) and needs the other, the shortcut also read by 'expand', quantized; the linter then has nothing to say
    (it flagged the model, and no pair was placed)."""
    from onnxq.graph.trt_rules import check_trt_rules

    m = linear_bottleneck_model()
    plan = build_plan(m, get_profile("trt"))
    assert ("residual_add", 0) in plan.activations["s"].consumers and "t" not in plan.activations
    data = [{"x": np.random.default_rng(i).standard_normal((4, 3, 8, 8)).astype(np.float32)} for i in range(4)]
    res = onnxq.optimize(m, method="minmax", data=data, target="trt", show_progress=False)
    assert check_trt_rules(res.model) == []


def test_a_sum_of_two_convs_read_by_the_add_alone_is_no_residual():
    """Two convs of one input summed (cfws writes a split conv this way): neither output is read elsewhere, so neither is
    a shortcut, and neither gets a pair (one cost cfws's INT7 fixture 1.6 points of top-1)."""
    rng = np.random.default_rng(0)
    w = lambda name: numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1], name="fine"),
             helper.make_node("Conv", ["x", "wb"], ["b"], pads=[1, 1, 1, 1], name="coarse"),
             helper.make_node("Add", ["a", "b"], ["y"], name="sum")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], [w("wa"), w("wb")])
    plan = build_plan(infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))[0], get_profile("trt"))
    assert "a" not in plan.activations and "b" not in plan.activations


def test_a_projection_shortcut_is_quantized_for_tensorrt():
    """ResNet's downsampling block: Add(conv2(relu(conv1(x))), downsample(x)), BatchNorm folded, neither conv output
    read elsewhere. The downsample conv reads x, which the other branch is computed from: it is the shortcut TensorRT
    adds in INT8 into conv2, so it gets the pair and the linter is quiet (torchvision's resnet18 had three
    residual-add findings with every recipe)."""
    from onnxq.graph.trt_rules import check_trt_rules

    rng = np.random.default_rng(0)
    w = lambda name, shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)  # noqa: E731
    inits = [w("w1", (8, 4, 3, 3)), w("w2", (8, 8, 3, 3)), w("wd", (8, 4, 1, 1))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Conv", ["x", "wd"], ["d"], strides=[2, 2], name="downsample"),
             helper.make_node("Add", ["c2", "d"], ["s"], name="add"), helper.make_node("Relu", ["s"], ["y"], name="relu2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4, 4])], inits)
    m = infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))[0]
    plan = build_plan(m, get_profile("trt"))
    assert ("add", 1) in plan.activations["d"].consumers and "c2" not in plan.activations
    data = [{"x": np.random.default_rng(i).standard_normal((4, 4, 8, 8)).astype(np.float32)} for i in range(4)]
    res = onnxq.optimize(m, method="minmax", data=data, target="trt", show_progress=False)
    assert check_trt_rules(res.model) == []


def test_a_weight_two_layers_share_is_quantized_for_both():
    """A module called twice (``self.c2(self.c2(x))``) exports two Convs reading one initializer: only the first reader
    got the integer weight, the second stayed a float layer, and the run reported every layer quantized (TensorRT's lint
    then flagged that layer as one it cannot run in INT8)."""
    import onnxq
    from onnxq.runtime.ort import optimized_op_counts

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1] * 4), helper.make_node("Relu", ["a"], ["ar"], name="r1"),
             helper.make_node("Conv", ["ar", "w2"], ["b"], name="c2", pads=[1] * 4), helper.make_node("Relu", ["b"], ["br"], name="r2"),
             helper.make_node("Conv", ["br", "w2"], ["c"], name="c2_again", pads=[1] * 4), helper.make_node("Relu", ["c"], ["y"], name="r3")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = [{"x": rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    for target in ("ort", "trt"):
        res = onnxq.optimize(model, method="minmax", target=target, data=data, show_progress=False)
        producers = {o: n.op_type for n in res.model.graph.node for o in n.output}
        convs = {n.name: producers.get(n.input[1]) for n in res.model.graph.node if n.op_type == "Conv"}
        assert convs == {"c1": "DequantizeLinear", "c2": "DequantizeLinear", "c2_again": "DequantizeLinear"}, (target, convs)
        assert not res.report.left_in_float, res.report.left_in_float
        if target == "ort":  # as many integer kernels as the same model with the weight copied for each reader
            unshared = onnx.ModelProto()
            unshared.CopyFrom(model)
            unshared.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(w2), "w2_copy"))
            unshared.graph.node[4].input[1] = "w2_copy"
            plain = onnxq.optimize(unshared, method="minmax", data=data, show_progress=False)
            assert optimized_op_counts(res.model)["QLinearConv"] == optimized_op_counts(plain.model)["QLinearConv"] >= 2


def test_a_matmul_with_its_weight_first_is_left_float_and_said():
    """``W @ x`` (a column-vector layer) had only its activation quantized around a float MatMul, reported as a quantized
    layer: Q/DQ steps for no integer kernel (1.4x the latency), no warning. It is left float, by name and reason."""
    import onnxq

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 16)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["w", "x"], ["h"], name="wx"), helper.make_node("Relu", ["h"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "wx", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    res = onnxq.optimize(model, method="minmax", data=[{"x": rng.normal(0, 1, (4, 16, 4)).astype(np.float32)}], show_progress=False)
    assert res.report.quantized_activations == 0 and res.report.layers == 0
    assert any(e.node == "wx" and "first input" in e.reason for e in res.report.left_in_float), res.report.left_in_float


def test_a_weight_made_by_constant_of_shape_names_the_op_that_keeps_it_float():
    """ONNX's own "light" zoo models make every weight with ConstantOfShape, which constant folding deliberately leaves
    alone; the reason said "fold it into an initializer" although folding was on. It names the op now."""
    import onnxq

    nodes = [helper.make_node("ConstantOfShape", ["wshape"], ["w"], name="make_w",
                              value=numpy_helper.from_array(np.array([0.01], np.float32))),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "light", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [numpy_helper.from_array(np.array([4, 3, 3, 3], np.int64), "wshape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = [{"x": np.random.default_rng(0).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)}]
    res = onnxq.optimize(model, method="minmax", data=data, show_progress=False)
    reason = next(e.reason for e in res.report.left_in_float if e.node == "conv")
    assert "ConstantOfShape 'make_w'" in reason and "fold it" not in reason, reason
