"""GraphRunner: running stretches of nodes as one session gives the node-by-node values exactly."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.search.evaluator import GraphRunner
from onnxq.search.samples import take_samples
from onnxq.plugins.minmax import MinMax

DIGITS = "examples/digits/model.onnx"
CALIB = "examples/digits/calib"


@pytest.fixture(scope="module", params=[("ort", 8), ("trt", 7)], ids=["ort-int8", "trt-int7"])
def captured(request):
    """The RunContext of a real minmax run (plan with calibrated qparams), captured in refine."""
    from onnxq.pipeline import optimize

    target, bits = request.param
    seen = {}
    mp = pytest.MonkeyPatch()
    mp.setattr(MinMax, "refine", lambda self, ctx: seen.setdefault("ctx", ctx), raising=False)
    try:
        optimize(DIGITS, method="minmax", data=CALIB, target=target, bits=bits, show_progress=False)
    finally:
        mp.undo()
    return seen["ctx"]


def _all_values(ctx, segments: bool, plan: bool) -> dict[str, np.ndarray]:
    chunks = take_samples(ctx, 24)
    run = GraphRunner(ctx.model, chunks, ctx.plan if plan else None)
    if not segments:
        run._in_segment = lambda node: node.name in run._const_nodes  # the node-by-node path
    out = {}
    last = len(run.nodes) - 1
    for i in [*range(2, last, 3), last]:  # stretches of three nodes; values are read in between
        run.run_to(i)
        out.update({k: np.concatenate(v) for k, v in run.values.items()})
    assert any(isinstance(k, tuple) for k in run.sessions) == segments  # which path really ran
    return out


@pytest.mark.parametrize("plan", [True, False], ids=["quantized", "float"])
def test_segments_match_node_by_node(captured, plan):
    ref = _all_values(captured, segments=False, plan=plan)
    got = _all_values(captured, segments=True, plan=plan)
    common = set(ref) & set(got)
    assert len(common) >= 5
    for name in common:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    # the fake quantization is really applied: the quantized run differs from the float one
    if plan:
        flt = _all_values(captured, segments=True, plan=False)
        out = captured.model.graph.output[0].name
        assert not np.array_equal(got[out], flt[out])


def test_runners_of_one_graph_share_segment_sessions_and_still_use_their_own_qparams(captured):
    """A second runner of the same graph and layout builds no segment session of its own (they are shared by their
    model's bytes), and with every activation scale doubled its values are those of a runner that built its own."""
    import copy
    import dataclasses

    import onnxq.search.evaluator as ev

    chunks = take_samples(captured, 8)
    out = captured.model.graph.output[0].name
    GraphRunner(captured.model, chunks, captured.plan).run_all()
    before = ev.segment_cache_info()
    coarse = copy.deepcopy(captured.plan)
    for site in coarse.activations.values():
        if site.qparams is not None:
            site.qparams = dataclasses.replace(site.qparams, scale=site.qparams.scale * 2)
    shared = GraphRunner(captured.model, chunks, coarse, keep=[out])
    shared.run_all()
    after = ev.segment_cache_info()
    assert after["builds"] == before["builds"] and after["hits"] > before["hits"], (before, after)
    mp = pytest.MonkeyPatch()
    mp.setattr(ev, "_segments", type(ev._segments)())
    mp.setattr(ev, "SEGMENT_SESSIONS", 0)
    try:
        own = GraphRunner(captured.model, chunks, coarse, keep=[out])
        own.run_all()
    finally:
        mp.undo()
    np.testing.assert_array_equal(shared.value(out), own.value(out))
    first = GraphRunner(captured.model, chunks, captured.plan, keep=[out])
    first.run_all()
    assert not np.array_equal(shared.value(out), first.value(out)), "precondition: the coarser scales change the output"


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]},
    {"pads": [2, 0, 1, 3], "strides": [2, 2]},
    {"pads": [2, 2, 2, 2], "dilations": [2, 2], "group": 4},
    {"auto_pad": "SAME_UPPER", "strides": [2, 1]},
], ids=["same3x3", "asym-stride2", "dilated-grouped", "auto-pad"])
def test_windows_cut_exactly_the_layer_output(attrs):
    """A layer run without padding on the cut-out input patches gives exactly the windows of its
    whole output (so a windowed search scores true layer outputs, only fewer of them)."""
    import onnx
    from onnx import helper, numpy_helper

    from onnxq.search.evaluator import LayerRunner
    from onnxq.graph.plan import Layer

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 8 // attrs.get("group", 1), 3, 3)).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3], **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    runner = LayerRunner(model, Layer("conv", "Conv", ("x",), "w", "y", "y"))
    x = rng.normal(size=(6, 8, 40, 52)).astype(np.float32)
    whole = runner.run(x, w)
    win = runner.windows(x.shape, max_positions=600, seed=3)
    assert win is not None and win.per_sample >= 2
    got = win.runner.run(win.input(x), w)
    np.testing.assert_allclose(got, win.output(whole), rtol=1e-5, atol=1e-5)
    assert got.shape[0] == x.shape[0] * win.per_sample and got.shape[2:] == (8, 8)
    # small maps and small totals are scored whole
    assert runner.windows(x.shape, max_positions=10**6, seed=3) is None
    assert runner.windows((6, 8, 16, 16), max_positions=100, seed=3) is None


def test_a_stretch_of_only_constant_nodes():
    """Advancing onto Constant nodes alone (gptq/detptq call run_to at arbitrary positions) builds
    no session: their values are constants from the start."""
    import onnx
    from onnx import helper, numpy_helper

    const = helper.make_node("Constant", [], ["k"], name="c", value=numpy_helper.from_array(np.array(2.0, np.float32)))
    mul = helper.make_node("Mul", ["x", "k"], ["y"], name="m")
    g = helper.make_graph([const, mul], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    run = GraphRunner(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), [{"x": np.ones((2, 3), np.float32)}])
    run.run_to(0)
    np.testing.assert_array_equal(run.value("y"), np.full((2, 3), 2.0, np.float32))


def test_time_major_values_are_joined_along_their_samples():
    """A recurrent net's tensors are [T, N, H]: chunks of 7 and 3 samples were joined on axis 0 and easyquant stopped
    (exit 4, "all the input array dimensions except for the concatenation axis must match"); chunks of one size would
    have interleaved time steps. Each value is joined along the axis holding each chunk's samples."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (6, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[2, 0, 1], name="time_major"),
             helper.make_node("MatMul", ["t", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "tnc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6, 20])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [20, "batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(0, 1, (10, 6, 20)).astype(np.float32)
    runner = GraphRunner(model, [{"x": x[:7]}, {"x": x[7:]}])
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inner = onnx.ModelProto()
    inner.CopyFrom(model)
    inner.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    y, r = ort.InferenceSession(inner.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y", "r"], {"x": x})
    runner.run_all()
    np.testing.assert_allclose(runner.value("y"), ref.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
    got_r = GraphRunner(model, [{"x": x[:7]}, {"x": x[7:]}], keep=["r"])
    got_r.run_all()
    np.testing.assert_allclose(got_r.value("r"), r, rtol=1e-5, atol=1e-6)
