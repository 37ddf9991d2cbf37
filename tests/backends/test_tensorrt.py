"""The TensorRT backend.

Two layers of tests (no stand-in for TensorRT: the glue is only exercised by the real thing):

* pure Python, always run: version gate, build settings, optimization-profile derivation, network
  recipes, the float16 rewrite (run in ONNX Runtime), and the one-line errors without TensorRT;
* ``@pytest.mark.gpu``: real TensorRT on a real GPU (INT8/INT7 engines vs ONNX Runtime). They skip
  with the reason ("tensorrt not installed", "no NVIDIA GPU") where either is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq.backends.tensorrt as trtb
from onnxq.evaluate.metrics import cosine
from onnxq.backends.trt_fp16 import FP16_OPS, convert_to_fp16
from onnxq.errors import DataError, ModelError, OnnxqError, OptionError

# ---------------------------------------------------------------------------------------------
# version gate and recipes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version,implicit,deprecated,always_st", [
    ("10.0.1.6", True, False, False),
    ("10.1.0", True, True, False),
    ("10.16.1.11", True, True, False),
    ("11.0.0.114", False, False, True),
    ("11.4.0.106", False, False, True),
    ("12.0", False, False, True),
])
def test_version_gate(version, implicit, deprecated, always_st):
    g = trtb.version_gate(version)
    assert (g.implicit_calibrators, g.calibrators_deprecated, g.always_strongly_typed) == (implicit, deprecated, always_st)
    assert g.precision_flags == implicit
    note = g.note()
    if implicit:
        assert "implicit INT8 calibrator" in note and ("deprecated" in note) == deprecated
    else:
        assert "no longer exist" in note and "trt-entropy" in note and "removed in 11.0" in note


def test_version_gate_refuses_old_and_garbage():
    with pytest.raises(trtb.TensorRTUnavailable, match="too old"):
        trtb.version_gate("8.6.1")
    with pytest.raises(OnnxqError, match="cannot read"):
        trtb.version_gate("unknown")


def test_recipes():
    ten, eleven = trtb.version_gate("10.8.0"), trtb.version_gate("11.1.0")
    s, s16 = trtb.BuildSettings(), trtb.BuildSettings(fp16=True, tf32=False)
    r = trtb.network_recipe(ten, s, "explicit")
    assert r.strongly_typed_flag and r.set_flags == () and not r.fp16_graph_rewrite and not r.calibrator
    r = trtb.network_recipe(eleven, s16, "explicit")
    assert not r.strongly_typed_flag and r.set_flags == () and r.fp16_graph_rewrite and r.clear_flags == ("TF32",)  # 11: typed by the graph
    r = trtb.network_recipe(ten, s16, "fp32")
    assert r.strongly_typed_flag and not r.fp16_graph_rewrite  # the reference stays FP32
    r = trtb.network_recipe(ten, s16, "implicit")
    assert not r.strongly_typed_flag and r.set_flags == ("INT8", "FP16") and r.calibrator and not r.fp16_graph_rewrite
    assert trtb.network_recipe(ten, s, "implicit").set_flags == ("INT8",)
    with pytest.raises(OnnxqError, match="no longer exist"):
        trtb.network_recipe(eleven, s, "implicit")


def test_build_settings_validation(tmp_path):
    s = trtb.BuildSettings(timing_cache=str(tmp_path / "t.cache"), optimization_level=5)
    assert s.timing_cache == tmp_path / "t.cache" and s.workspace_bytes == 2 << 30
    with pytest.raises(OptionError):
        trtb.BuildSettings(workspace_bytes=10)
    with pytest.raises(OptionError):
        trtb.BuildSettings(optimization_level=6)


# ---------------------------------------------------------------------------------------------
# optimization profiles
# ---------------------------------------------------------------------------------------------

class Spec:
    def __init__(self, name, shape):
        self.name, self.shape = name, shape


def test_derive_profiles_dynamic_batch():
    observed = {"x": [(16, 1, 16, 16)] * 3 + [(4, 1, 16, 16), (1, 1, 16, 16)]}
    p = trtb.derive_profiles([Spec("x", ("N", 1, 16, 16))], observed)["x"]
    assert (p.min, p.opt, p.max) == ((1, 1, 16, 16), (16, 1, 16, 16), (16, 1, 16, 16))


def test_derive_profiles_several_dynamic_dims_and_static_inputs():
    observed = {"img": [(2, 3, 224, 320), (2, 3, 224, 320), (1, 3, 320, 224)], "scale": [(2,)]}
    ps = trtb.derive_profiles([Spec("img", (None, 3, "h", "w")), Spec("scale", (2,)), Spec("fixed", (1, 4))], observed)
    assert ps["img"].min == (1, 3, 224, 224) and ps["img"].max == (2, 3, 320, 320) and ps["img"].opt == (2, 3, 224, 320)
    assert ps["scale"] == trtb.ShapeRange.fixed((2,)) and ps["fixed"] == trtb.ShapeRange.fixed((1, 4))


def test_derive_profiles_opt_tie_takes_larger():
    p = trtb.derive_profiles([Spec("x", (-1, 8))], {"x": [(4, 8), (8, 8)]})["x"]
    assert p.opt == (8, 8)


@pytest.mark.parametrize("spec,observed,match", [
    (("N", 1, 16, 16), {"x": [(2, 3, 16, 16)]}, "static dim 1 on axis 1"),
    (("N", 1, 16, 16), {"x": [(2, 1, 16)]}, "rank 4"),
    (("N", 1, 16, 16), {}, "no data"),
    ((None, None), {"x": [(2, 3), (2, 3, 4)]}, "rank"),
])
def test_derive_profiles_errors(spec, observed, match):
    with pytest.raises(DataError, match=match):
        trtb.derive_profiles([Spec("x", spec)], observed)


def test_shape_range_validation():
    with pytest.raises(OptionError):
        trtb.ShapeRange((2, 3), (1, 3), (4, 3))
    with pytest.raises(OptionError):
        trtb.ShapeRange((0, 3), (1, 3), (4, 3))
    with pytest.raises(OptionError):
        trtb.ShapeRange((1,), (1, 3), (4, 3))


def test_observed_shapes_reads_batches_and_feeds():
    from onnxq.calib.readers import Batch

    seen = trtb.observed_shapes([Batch({"x": np.zeros((4, 2))}), {"x": np.zeros((1, 2))}], [{"x": np.zeros((3, 2))}])
    assert seen == {"x": [(4, 2), (1, 2), (3, 2)]}


# ---------------------------------------------------------------------------------------------
# FP16 rewrite ("FP16 fallback the strongly typed way"), checked in ONNX Runtime
# ---------------------------------------------------------------------------------------------

def _init_dtypes(model):
    return {t.name: t.data_type for t in model.graph.initializer}


@pytest.fixture(scope="module")
def digits_qdq(digits_model, digits_calib_feeds):
    from onnxq.pipeline import optimize

    return {bits: optimize(digits_model, method="trt-entropy", target="trt", bits=bits, data=digits_calib_feeds, show_progress=False).model for bits in (8, 7)}


@pytest.mark.parametrize("bits", [8, 7])
def test_fp16_rewrite_of_qdq_model_runs_and_stays_close(digits_qdq, digits_eval_arrays, session_of, bits):
    from onnxq.graph.trt_rules import check_trt_rules, format_findings

    q = digits_qdq[bits]
    conv = convert_to_fp16(q)
    m = conv.model
    onnx.checker.check_model(m, full_check=True)
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 19
    # I/O keep float32; every Q/DQ scale is float16 and matches its Q input type
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [TensorProto.FLOAT]
    dtypes = _init_dtypes(m)
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(dtypes[n.input[1]] == TensorProto.FLOAT16 for n in qdq)
    assert not [t for t, d in dtypes.items() if d == TensorProto.FLOAT], "float32 constants left"
    assert conv.float32_nodes == [] and conv.scales_converted > 0 and conv.max_scale_relative_change < 1e-3
    errors = [f for f in check_trt_rules(m) if f.severity == "error"]
    assert not errors, format_findings(errors)
    x, y = digits_eval_arrays
    ref = session_of(q).run(None, {"input": x})[0]
    got = session_of(m).run(None, {"input": x})[0]
    assert got.dtype == np.float32
    assert cosine(ref, got) > 0.999
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.99
    assert abs(np.mean(got.argmax(1) == y) - np.mean(ref.argmax(1) == y)) <= 0.01


def test_fp16_rewrite_of_float_model(digits_model, digits_eval_arrays, session_of):
    m = onnx.load(str(digits_model))
    conv = convert_to_fp16(m)
    assert next(o.version for o in conv.model.opset_import if o.domain in ("", "ai.onnx")) == 17  # no Q/DQ: opset untouched
    x, _ = digits_eval_arrays
    ref = session_of(m).run(None, {"input": x})[0]
    got = session_of(conv.model).run(None, {"input": x})[0]
    assert np.max(np.abs(ref - got)) < 0.05 * np.max(np.abs(ref)) and cosine(ref, got) > 0.9999
    assert m.SerializeToString() == onnx.load(str(digits_model)).SerializeToString()  # the input is not modified


def _mixed_model():
    """x -> Conv -> Exp (kept fp32) -> Resize(scales const) -> Mul(Constant) -> out y; y also feeds Add with ConstantOfShape -> z."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (2, 1, 3, 3)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    shape = numpy_helper.from_array(np.array([1, 2, 8, 8], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Exp", ["c"], ["e"], name="exp"),
        helper.make_node("Resize", ["e", "", "scales"], ["r"], mode="nearest", name="resize"),
        helper.make_node("Constant", [], ["k"], value_float=0.5, name="k"),
        helper.make_node("Mul", ["r", "k"], ["y"], name="mul"),
        helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32)), name="cos"),
        helper.make_node("Add", ["y", "ones"], ["z"], name="add"),
        helper.make_node("Cast", ["z"], ["zc"], to=TensorProto.FLOAT, name="cast"),
    ]
    g = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8]), helper.make_tensor_value_info("zc", TensorProto.FLOAT, [1, 2, 8, 8])],
                          [w, scales, shape])
    return _model(g)


def _model(graph):
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8  # loadable by older ONNX Runtime releases too
    return m


def test_fp16_rewrite_handles_islands_constants_and_fp32_slots(session_of):
    assert "Exp" not in FP16_OPS
    m = _mixed_model()
    conv = convert_to_fp16(m)
    out = conv.model
    onnx.checker.check_model(out, full_check=True)
    assert conv.float32_nodes == ["exp"]
    dtypes = _init_dtypes(out)
    assert dtypes["scales"] == TensorProto.FLOAT  # Resize scales must stay float32
    assert next(n for n in out.graph.node if n.name == "cast").attribute[0].i == TensorProto.FLOAT16
    x = np.random.default_rng(1).uniform(-1, 1, (1, 1, 4, 4)).astype(np.float32)
    ref = session_of(m).run(None, {"x": x})
    got = session_of(out).run(None, {"x": x})
    for a, b in zip(ref, got):
        assert b.dtype == np.float32 and np.allclose(a, b, rtol=5e-3, atol=5e-3)
    # the graph output 'y' is also consumed inside: it is produced in fp16 and cast at the output
    assert [o.name for o in out.graph.output] == ["y", "zc"]
    assert any(n.op_type == "Cast" and n.output[0] == "y" for n in out.graph.node)


def test_fp16_rewrite_clips_out_of_range_constants(session_of):
    big = numpy_helper.from_array(np.array([1e6], np.float32), "big")
    g = helper.make_graph([helper.make_node("Min", ["x", "big"], ["y"], name="min")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [big])
    conv = convert_to_fp16(_model(g))
    assert conv.clipped_constants == ["big"]
    assert np.allclose(session_of(conv.model).run(None, {"x": np.array([1.0, 2.0], np.float32)})[0], [1.0, 2.0])


def test_fp16_rewrite_refuses_control_flow():
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then, name="if")], "g",
                          [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(ModelError, match="control flow"):
        convert_to_fp16(_model(g))


# ---------------------------------------------------------------------------------------------
# Without TensorRT: one clear line, and onnxq still imports
# ---------------------------------------------------------------------------------------------

def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


def test_onnxq_imports_without_tensorrt():
    code = ("import sys; sys.modules['tensorrt'] = None\n"
            "import onnxq, onnxq.backends.tensorrt as t, onnxq.cli.main\n"
            "r = t.unavailable_reason(); assert r.startswith('tensorrt is not installed'), r\n"
            "try:\n    t.require_tensorrt()\nexcept t.TensorRTUnavailable as e:\n    print('ERR', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ERR tensorrt is not installed")


@pytest.mark.skipif(_tensorrt_importable(), reason="tensorrt is installed here")
def test_compare_backend_trt_without_tensorrt_is_one_line(run_cli, digits_model, digits_eval):
    code, out, err = run_cli(["compare", digits_model, "--data", digits_eval, "--backend", "trt"])
    assert code == 1 and out == ""
    assert err.startswith("onnxq: error: --backend trt: tensorrt is not installed") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Real TensorRT on a real GPU
# ---------------------------------------------------------------------------------------------

def _require_cuda():
    """Skip unless CUDA memory can be used (cuda-python or torch, and a GPU)."""
    try:
        return trtb.cuda_device()
    except trtb.TensorRTUnavailable as exc:
        pytest.skip(str(exc))


def _require_trt_gpu():
    """Skip with the reason ("tensorrt not installed", "no NVIDIA GPU ...") unless TensorRT can run."""
    trt = pytest.importorskip("tensorrt", reason="tensorrt not installed (pip install 'onnxq[trt]')")
    reason = trtb.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return trt


@pytest.mark.gpu
@pytest.mark.parametrize("binding", ["cuda-python", "torch"])
def test_gpu_cuda_buffers_round_trip(binding, monkeypatch):
    if binding == "torch":
        pytest.importorskip("torch", reason="torch not installed")
        monkeypatch.setitem(sys.modules, "cuda", None)  # hide cuda-python: the torch path is used
        monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    else:
        try:
            from cuda.bindings import runtime  # noqa: F401
        except ImportError:
            pytest.importorskip("cuda.cudart", reason="cuda-python not installed")
    cuda = _require_cuda()
    assert cuda.kind == binding
    x = np.arange(1000, dtype=np.float32).reshape(10, 100)
    ptr = cuda.malloc(x.nbytes)
    try:
        cuda.to_device(ptr, x)
        assert np.array_equal(cuda.to_host(ptr, x.shape, x.dtype), x)
        assert cuda.stream_handle() != 0 or cuda.kind == "torch"
    finally:
        cuda.free(ptr)


def _gpu_digits_engine_vs_ort(qdq, x, session_of, settings=None):
    settings = settings or trtb.BuildSettings(profiles={"input": trtb.ShapeRange((1, 1, 16, 16), (100, 1, 16, 16), (100, 1, 16, 16))})
    built = trtb.build_engine(qdq, settings, "explicit")
    with trtb.TrtEngine(built.serialized) as eng:
        got = np.concatenate([eng.run({"input": x[i:i + 100]})["logits"] for i in range(0, len(x), 100)])
        lat = eng.latency_ms({"input": x[:1]}, repeats=20)
    ref = session_of(qdq).run(None, {"input": x})[0]
    return ref, got, lat


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 7])
def test_gpu_int8_int7_engines_match_onnxruntime(digits_qdq, digits_eval_arrays, session_of, bits):
    _require_trt_gpu()
    x, y = digits_eval_arrays
    ref, got, lat = _gpu_digits_engine_vs_ort(digits_qdq[bits], x, session_of)
    assert got.shape == ref.shape and np.all(np.isfinite(got)) and lat > 0
    assert cosine(ref, got) > 0.995
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.98
    assert np.mean(got.argmax(1) == y) >= 0.97


@pytest.mark.gpu
def test_gpu_fp16_engine_and_fp32_reference(digits_model, digits_qdq, digits_eval_arrays, session_of):
    _require_trt_gpu()
    x, _ = digits_eval_arrays
    prof = {"input": trtb.ShapeRange((1, 1, 16, 16), (100, 1, 16, 16), (100, 1, 16, 16))}
    ref, got, _ = _gpu_digits_engine_vs_ort(digits_qdq[8], x, session_of, trtb.BuildSettings(fp16=True, profiles=prof))
    assert cosine(ref, got) > 0.99
    fp32 = onnx.load(str(digits_model))
    built = trtb.build_engine(fp32, trtb.BuildSettings(tf32=False, profiles=prof), "fp32")
    with trtb.TrtEngine(built.serialized) as eng:
        got = eng.run({"input": x[:100]})["logits"]
    assert np.allclose(got, session_of(fp32).run(None, {"input": x[:100]})[0], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_tensorrt_own_calibrator_on_10(digits_model, digits_calib_feeds, tmp_path):
    trt = _require_trt_gpu()
    if not trtb.version_gate(trt.__version__).implicit_calibrators:
        pytest.skip(f"TensorRT {trt.__version__} has no implicit calibrators (removed in 11.0)")
    from onnxq.calib.trt_cache import parse_cache
    from onnxq.calib.readers import Batch

    cuda = trtb.cuda_device()
    cal = trtb.make_calibrator("entropy", lambda: (Batch(f) for f in digits_calib_feeds), cuda)
    prof = {"input": trtb.ShapeRange((1, 1, 16, 16), (16, 1, 16, 16), (16, 1, 16, 16))}
    built = trtb.build_engine(digits_model, trtb.BuildSettings(profiles=prof), "implicit", cal, cal.first_shapes())
    cache = parse_cache(built.calibration_cache)
    assert cache.algorithm == "EntropyCalibration2" and "input" in cache.scales and cal.used == 16
