"""Cross-layer equalization (``-p equalize``): exact in float, and it rescues narrow channels."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq import optimize
from onnxq.runtime.ort import make_session
from onnxq.graph.equalize import find_equalize_sites
from onnxq.graph.prepare import infer_shapes
from onnxq.testing.contract import MethodContract


def bn_depthwise_model(seed: int = 0) -> onnx.ModelProto:
    """x -> Conv 3x3 (8 ch) -> BatchNorm with channel scales 0.02..8 -> depthwise 3x3 -> Relu ->
    Conv 1x1 (8 -> 6) -> Relu -> Conv 1x1 (6 -> 4) -> y.  The BN leaves channels whose ranges
    differ by ~400x (as PP-OCRv4's recognizer does), so one per-tensor step cannot serve them all."""
    rng = np.random.default_rng(seed)
    f = lambda a, n: numpy_helper.from_array(np.asarray(a, np.float32), n)  # noqa: E731
    gamma = np.array([8.0, 0.02, 3.0, 0.05, 1.0, 0.1, 5.0, 0.03])
    dw = rng.standard_normal((8, 1, 3, 3)) / np.maximum(gamma, 0.2)[:, None, None, None]  # narrow channels carry big filters
    inits = [f(rng.standard_normal((8, 3, 3, 3)) * 0.4, "w0"), f(gamma, "gamma"), f(rng.standard_normal(8) * 0.1, "beta"),
             f(np.zeros(8), "mean"), f(np.ones(8), "var"), f(dw, "wdw"), f(rng.standard_normal(8) * 0.1, "bdw"),
             f(rng.standard_normal((6, 8, 1, 1)) * 0.5, "w2"), f(rng.standard_normal((4, 6, 1, 1)) * 0.5, "w3")]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node("BatchNormalization", ["c0", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Conv", ["bn", "wdw", "bdw"], ["d"], pads=[1, 1, 1, 1], group=8, name="dwconv"),
        helper.make_node("Relu", ["d"], ["dr"], name="relu1"),
        helper.make_node("Conv", ["dr", "w2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3"),
    ]
    g = helper.make_graph(nodes, "bn_dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    return infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))[0]


def _data(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)} for _ in range(n // 16)]


def _rel_error(model: onnx.ModelProto, ref_model: onnx.ModelProto, feeds) -> float:
    q, r = make_session(model, "all"), make_session(ref_model, "all")
    num = sum(float(np.sum((q.run(None, f)[0] - r.run(None, f)[0]) ** 2)) for f in feeds)
    den = sum(float(np.sum(r.run(None, f)[0] ** 2)) for f in feeds)
    return (num / den) ** 0.5


def test_sites_follow_the_rules():
    sites = {s.consumer: s for s in find_equalize_sites(bn_depthwise_model())}
    # BN -> depthwise, and conv2 -> Relu -> conv3 (through the homogeneous Relu); dwconv -> Relu ->
    # conv2 too. conv0 reads the graph input: no producer to fold into.
    assert set(sites) == {"dwconv", "conv2", "conv3"}
    assert sites["dwconv"].depthwise and sites["dwconv"].producer == "bn"
    assert sites["conv3"].through == ["relu2"] and not sites["conv3"].depthwise
    assert find_equalize_sites(bn_depthwise_model(), exclude=["dw*"]) and "dwconv" not in {s.consumer for s in find_equalize_sites(bn_depthwise_model(), exclude=["dw*"])}


@pytest.mark.parametrize("calibrator", ["minmax", "mse"])
def test_equalize_is_exact_in_float_and_cuts_int8_error(calibrator):
    model, calib, held_out = bn_depthwise_model(), _data(64, 1), _data(32, 2)
    plain = optimize(model, method=calibrator, data=calib, show_progress=False)
    eq = optimize(model, method=["equalize", calibrator], data=calib, show_progress=False)
    section = eq.report.methods["equalize"]
    dw = next(e for e in section["equalized"] if e["consumer"] == "dwconv")
    assert dw["spread_before"] > 10 and dw["spread_after"] < 2.0  # depthwise: every channel within (max/2, max]
    err_plain, err_eq = _rel_error(plain.model, model, held_out), _rel_error(eq.model, model, held_out)
    assert err_eq < 0.25 * err_plain  # measured: 10x lower, (err_plain, err_eq)
    onnx.checker.check_model(eq.model, full_check=True)
    scales = [numpy_helper.to_array(t) for t in eq.model.graph.initializer if t.name.endswith("scale")]
    assert scales and all(np.all(np.isfinite(s)) and np.all(s > 0) for s in scales)


def test_power_of_two_factors_make_the_rewrite_bit_exact():
    from onnxq.graph.equalize import apply_equalization, equalize_scales

    model = bn_depthwise_model()
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    sites = find_equalize_sites(model)
    rng = np.random.default_rng(5)
    for s in sites:
        s.scale = equalize_scales(s, rng.uniform(0.01, 10.0, s.channels), inits[nodes[s.consumer].input[1]])
        assert np.all(np.log2(s.scale) == np.round(np.log2(s.scale)))
    out = apply_equalization(model, sites)
    x = _data(16, 6)[0]
    ref, got = make_session(model, "disable").run(None, x)[0], make_session(out, "disable").run(None, x)[0]
    assert np.array_equal(got, ref)


def test_rewrite_keeps_float_outputs_and_leaves_input_alone():
    from onnxq.graph.equalize import apply_equalization

    model = bn_depthwise_model()
    before = model.SerializeToString()
    sites = find_equalize_sites(model)
    rng = np.random.default_rng(3)
    for s in sites:
        s.scale = rng.uniform(0.1, 10.0, s.channels)
    out = apply_equalization(model, sites)
    assert model.SerializeToString() == before
    x = _data(16, 4)[0]
    ref, got = make_session(model, "disable").run(None, x)[0], make_session(out, "disable").run(None, x)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


class TestEqualizeContract(MethodContract):
    method = "equalize"


def test_equalization_passes_through_pooling():
    """A VGG-style or audio CNN reads its next conv through MaxPool (Conv, BatchNorm, Relu, MaxPool, Conv): max and mean
    of k·x are k times those of x, so the factor still folds into the BatchNorm. Before, such a tensor had no site and
    the run changed nothing; the int8 error now falls as it does without the pool."""
    rng = np.random.default_rng(0)
    f = lambda a, n: numpy_helper.from_array(np.asarray(a, np.float32), n)  # noqa: E731
    gamma = np.array([8.0, 0.02, 3.0, 0.05, 1.0, 0.1, 5.0, 0.03])
    inits = [f(rng.standard_normal((8, 3, 3, 3)) * 0.4, "w0"), f(gamma, "gamma"), f(np.abs(gamma) * 0.5, "beta"),
             f(np.zeros(8), "mean"), f(np.ones(8), "var"),
             f(rng.standard_normal((8, 1, 3, 3)) / np.maximum(gamma, 0.2)[:, None, None, None], "wdw"),
             f(rng.standard_normal((4, 8, 1, 1)) * 0.5, "w2")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("BatchNormalization", ["c0", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Conv", ["p", "wdw"], ["d"], pads=[1, 1, 1, 1], group=8, name="dwconv"),
             helper.make_node("Conv", ["d", "w2"], ["y"], name="conv2")]
    g = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])], inits)
    model = infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))[0]
    site = next(s for s in find_equalize_sites(model) if s.consumer == "dwconv")
    assert site.producer == "bn" and site.through == ["pool", "relu"]
    calib, held_out = _data(64, 1), _data(32, 2)
    plain = optimize(model, method="minmax", data=calib, show_progress=False)
    eq = optimize(model, method=["equalize", "minmax"], data=calib, show_progress=False)  # the host checks it exact in float
    assert any(e["consumer"] == "dwconv" for e in eq.report.methods["equalize"]["equalized"])
    assert _rel_error(eq.model, model, held_out) < 0.5 * _rel_error(plain.model, model, held_out)


def _shared_weight_model(share: bool) -> onnx.ModelProto:
    """x -> c1 -> Relu -> c2 -> Relu -> c3, c3 reading c2's weight when ``share`` (a module called twice), else a copy;
    c1's output channels spread widely, so equalization has something to do."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32) * np.geomspace(0.05, 5, 8).astype(np.float32)[:, None, None, None]
    w2 = rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    if not share:
        inits.append(numpy_helper.from_array(w2.copy(), "w3"))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1] * 4), helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Conv", ["ar", "w2"], ["b"], name="c2", pads=[1] * 4), helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Conv", ["br", "w2" if share else "w3"], ["y"], name="c3", pads=[1] * 4)]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_site_whose_weight_another_layer_shares_is_not_one():
    """A site rescaling an initializer another layer reads was listed as equalized (spread 36.5 -> 6.2) while the rewrite
    skipped it: the report described a change the model did not have. Such sites are not found now."""
    assert find_equalize_sites(_shared_weight_model(share=True)) == []
    assert [s.consumer for s in find_equalize_sites(_shared_weight_model(share=False))] == ["c2", "c3"]
    data = [{"x": np.random.default_rng(1).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    res = optimize(_shared_weight_model(share=True), method=["equalize", "minmax"], data=data, show_progress=False)
    section = res.report.methods["equalize"]
    assert section["equalized"] == [] and "shares" in section["changed_nothing"]
