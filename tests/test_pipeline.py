"""End-to-end quantization of the bundled digits model through :func:`onnxq.optimize`.

Every model here is checked with the real ONNX Runtime (CPU EP): accuracy on the held-out split,
integer kernels for the ``ort`` target, TensorRT Q/DQ rules for the ``trt`` target, INT7 ranges.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxq
from onnxq.runtime.ort import integer_kernel_report
from onnxq.graph.trt_rules import check_trt_rules

#: a quantized model may lose at most this much top-1 accuracy (fraction) against FP32
MAX_DROP = 0.005


@pytest.fixture(scope="module")
def quantize(digits_model: Path, digits_calib: Path):
    """``quantize(method, target, bits=8)`` → QuantResult, computed once per configuration."""
    done: dict[tuple, onnxq.pipeline.QuantResult] = {}

    def run(method, target: str, bits: int = 8):
        key = (tuple(method) if isinstance(method, list) else method, target, bits)
        if key not in done:
            done[key] = onnxq.optimize(digits_model, method=method, target=target, bits=bits, data=str(digits_calib),
                                       cache_dir=None, show_progress=False)
        return done[key]

    return run


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _qdq_nodes(model: onnx.ModelProto):
    return [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _activation_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Scale of every activation QuantizeLinear, keyed by the tensor it quantizes (Clip looked through)."""
    inits, prod = _inits(model), _producers(model)
    out = {}
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear":
            continue
        src = n.input[0]
        if src in prod and prod[src].op_type == "Clip" and prod[src].name.endswith("/Clip"):
            src = prod[src].input[0]
        out[src] = float(inits[n.input[1]])
    return out


# ---------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["ort", "trt"])
@pytest.mark.parametrize("method", ["trt-entropy", "percentile"])
def test_int8_accuracy_within_half_a_point(quantize, accuracy_of, digits_fp32_accuracy, method, target):
    result = quantize(method, target)
    acc = accuracy_of(result.model)
    assert acc >= digits_fp32_accuracy - MAX_DROP, f"{method}/{target} int8: {acc:.3f} vs fp32 {digits_fp32_accuracy:.3f}"
    assert result.report.method == [method]
    assert result.report.target == target and result.report.bits == 8
    assert result.path is None and result.report.output is None


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_int7_accuracy_stays_close(quantize, accuracy_of, digits_fp32_accuracy, target):
    """INT7 is coarser; on this easy task it must still stay within 2 points of FP32."""
    result = quantize("trt-entropy", target, 7)
    assert accuracy_of(result.model) >= digits_fp32_accuracy - 0.02
    assert result.report.bits == 7 and result.report.int7_note


# ---------------------------------------------------------------------------------------------
# target rules
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 7])
@pytest.mark.parametrize("method", ["trt-entropy", "percentile"])
def test_trt_output_passes_trt_rules_cleanly(quantize, method, bits):
    model = quantize(method, "trt", bits).model
    findings = check_trt_rules(model)
    assert findings == [], "\n".join(f"{f.severity} {f.rule} {f.node}: {f.message}" for f in findings)
    # and it really is a QDQ model: every Conv and the Gemm read dequantized inputs and weights
    prod = _producers(model)
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            assert prod[n.input[0]].op_type == "DequantizeLinear", n.name
            assert prod[n.input[1]].op_type == "DequantizeLinear", n.name


@pytest.mark.parametrize("method", ["trt-entropy", "percentile"])
def test_ort_output_runs_on_integer_kernels(quantize, digits_model, method):
    n_conv = sum(n.op_type == "Conv" for n in onnx.load(str(digits_model)).graph.node)
    assert n_conv == 6
    report = integer_kernel_report(quantize(method, "ort").model)
    assert report["float_compute_ops"] == {}, report
    assert report["integer_ops"].get("QLinearConv", 0) == n_conv, report
    assert report["integer_fraction"] == 1.0


def test_profiles_store_their_activation_types(quantize):
    """Sanity of the two profiles: trt stores int8 symmetric activations, ort uint8 asymmetric."""
    trt, ort_ = quantize("trt-entropy", "trt").model, quantize("trt-entropy", "ort").model
    for model, dtype, symmetric in ((trt, np.int8, True), (ort_, np.uint8, False)):
        inits = _inits(model)
        zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert zps and all(z.dtype == dtype for z in zps)
        if symmetric:
            assert all(np.all(z == 0) for z in zps)


# ---------------------------------------------------------------------------------------------
# structural validity
# ---------------------------------------------------------------------------------------------

CONFIGS = [("trt-entropy", "ort", 8), ("trt-entropy", "trt", 8), ("percentile", "ort", 8), ("percentile", "trt", 8),
           ("trt-entropy", "ort", 7), ("trt-entropy", "trt", 7), ("minmax", "ort-s8", 8)]


@pytest.mark.parametrize("method,target,bits", CONFIGS)
def test_every_scale_is_finite_and_positive(quantize, method, target, bits):
    model = quantize(method, target, bits).model
    inits = _inits(model)
    nodes = _qdq_nodes(model)
    assert len(nodes) >= 13
    for n in nodes:
        scale = inits[n.input[1]]
        assert scale.dtype == np.float32, n.name
        assert scale.size >= 1 and np.all(np.isfinite(scale)) and np.all(scale > 0), (n.name, scale)
        assert len(n.input) == 3 and n.input[2] in inits, f"{n.name} has no explicit zero point"


@pytest.mark.parametrize("method,target,bits", CONFIGS)
def test_output_passes_checker_and_runs_with_full_optimizations(quantize, session_of, digits_eval_arrays, method, target, bits, tmp_path):
    result = quantize(method, target, bits)
    onnx.checker.check_model(result.model, full_check=True)
    meta = {p.key: p.value for p in result.model.metadata_props}
    assert meta == {"onnxq.method": method, "onnxq.target": target, "onnxq.bits": str(bits)}
    assert result.model.producer_name == "onnxq"
    # run from a file too (what users deploy), with every ORT optimization on
    path = tmp_path / "q.onnx"
    onnx.save_model(result.model, str(path))
    x = digits_eval_arrays[0][:37]  # an odd batch size: the batch axis stays dynamic
    (logits,) = session_of(path, "all").run(None, {"input": x})
    assert logits.shape == (37, 10) and np.all(np.isfinite(logits))
    (unopt,) = session_of(path, "disable").run(None, {"input": x})
    # fused integer kernels and the plain QDQ reference agree on the predictions
    assert np.mean(unopt.argmax(1) == logits.argmax(1)) >= 0.97


# ---------------------------------------------------------------------------------------------
# INT7
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["ort", "trt"])
def test_int7_weights_and_activations_stay_in_7_bits(quantize, target):
    model = quantize("trt-entropy", target, 7).model
    inits = _inits(model)
    prod = _producers(model)
    # weights: the integer initializers each layer reads as its input 1, all within [-63, 63] (an ort target's biases are int32)
    weight_inputs = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    weights = [inits[n.input[0]] for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.output[0] in weight_inputs]
    assert len(weights) == 7  # 6 Conv + 1 Gemm
    for w in weights:
        assert w.dtype == np.int8
        assert w.min() >= -63 and w.max() <= 63
    assert max(int(np.abs(w).max()) for w in weights) == 63  # the full 7-bit grid is used
    # activations: every QuantizeLinear reads a Clip whose bounds quantize inside the 7-bit range
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert qs
    for q in qs:
        clip = prod.get(q.input[0])
        assert clip is not None and clip.op_type == "Clip", f"{q.name} is not preceded by a Clip"
        scale, zp = float(inits[q.input[1]]), int(inits[q.input[2]])
        lo, hi = float(inits[clip.input[1]]), float(inits[clip.input[2]])
        qlo, qhi = round(lo / scale) + zp, round(hi / scale) + zp
        if inits[q.input[2]].dtype == np.int8:
            assert zp == 0 and -63 <= qlo and qhi <= 63, (q.name, qlo, qhi)
        else:
            assert 0 <= qlo and qhi <= 127, (q.name, qlo, qhi)


def test_int7_activations_really_are_clipped_at_runtime(quantize, digits_eval_arrays):
    """Expose one INT7 activation's quantized integers and check ORT never produces |q| > 63."""
    model = onnx.ModelProto()
    model.CopyFrom(quantize("trt-entropy", "trt", 7).model)
    qouts = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    for name in qouts:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT8, None))
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    # scale the data up 4× so that clipping is actually exercised
    outs = sess.run(qouts, {"input": digits_eval_arrays[0][:64] * 4})
    for name, q in zip(qouts, outs):
        assert q.dtype == np.int8
        assert q.min() >= -63 and q.max() <= 63, name
    assert any(np.abs(q).max() == 63 for q in outs)


# ---------------------------------------------------------------------------------------------
# Python API variants
# ---------------------------------------------------------------------------------------------

def test_optimize_with_in_memory_feeds_matches_folder(quantize, digits_model, digits_calib_feeds, accuracy_of, digits_fp32_accuracy):
    model = onnx.load(str(digits_model))
    result = onnxq.optimize(model, method="trt-entropy", target="trt", data=digits_calib_feeds, cache_dir=None, show_progress=False)
    assert result.report.model == "<in-memory>" and result.path is None
    assert accuracy_of(result.model) >= digits_fp32_accuracy - MAX_DROP
    # the same samples in the same order give exactly the same quantized model as the .npz folder
    from_folder = quantize("trt-entropy", "trt").model
    a, b = _inits(result.model), _inits(from_folder)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the input proto is left untouched
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in onnx.load(str(digits_model)).graph.node]


def test_optimize_accepts_feeds_with_labels_and_a_generator(digits_model, digits_calib_feeds):
    """(feeds, labels) pairs and a one-shot generator work as data too (the data is re-iterated)."""
    pairs = ((dict(f), np.zeros(len(f["input"]), np.int64)) for f in digits_calib_feeds[:4])
    result = onnxq.optimize(str(digits_model), method="minmax", target="trt", data=pairs, cache_dir=None, show_progress=False)
    assert result.report.quantized_activations > 0
    onnx.checker.check_model(result.model)


def test_optimize_writes_output_atomically(digits_model, digits_calib, tmp_path, session_of):
    out = tmp_path / "sub" / "q.onnx"
    out.parent.mkdir()
    result = onnxq.optimize(digits_model, out, method="minmax", target="trt", data=str(digits_calib), cache_dir=None, show_progress=False)
    assert result.path == out and result.report.output == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx"]  # no temp files left behind
    assert onnx.load(str(out)).SerializeToString() == result.model.SerializeToString()
    session_of(out)
    with pytest.raises(onnxq.OnnxqError, match="already exists"):
        onnxq.optimize(digits_model, out, method="minmax", data=str(digits_calib), cache_dir=None, show_progress=False)


def _with_static_batch(path: Path, b: int) -> onnx.ModelProto:
    model = onnx.load(str(path))
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = b
    return model


def test_static_batch_model_takes_batched_files(quantize, digits_model, digits_calib, session_of, digits_eval_arrays):
    """A batch-1 export calibrates on the same 16-sample .npz files, and gets the same scales."""
    res = onnxq.optimize(_with_static_batch(digits_model, 1), method="trt-entropy", target="trt", data=str(digits_calib),
                         cache_dir=None, show_progress=False)
    a, b = _inits(res.model), _inits(quantize("trt-entropy", "trt").model)
    assert a.keys() == b.keys()
    for k in a:  # ORT's float kernels may differ in the last bit between batch sizes
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=0, err_msg=k)
    (y,) = session_of(res.model).run(None, {"input": digits_eval_arrays[0][:1]})
    assert y.shape == (1, 10)


def test_static_batch_model_rejects_a_partial_batch(digits_model):
    from onnxq.errors import DataError

    feeds = [{"input": np.zeros((5, 1, 16, 16), np.float32)}]
    with pytest.raises(DataError, match=r"expects \[2, 1, 16, 16\] \(axis 0\)"):
        onnxq.optimize(_with_static_batch(digits_model, 2), data=feeds, cache_dir=None, show_progress=False)


def test_two_calibrators_are_one_line_error():
    """Two methods that both set activation ranges would drop one of them: refused, naming both."""
    from onnxq.errors import OptionError
    from onnxq.host import get_host
    from onnxq.pipeline import resolve_methods

    host = get_host()
    with pytest.raises(OptionError, match=r"^methods 'minmax' and 'trt-entropy' both set activation ranges and only one can; select one$"):
        resolve_methods(["minmax", "trt-entropy"], None, host)
    with pytest.raises(OptionError, match=r"methods 'cfws' and 'mse' .*: -p cfws -o cfws\.calibrator mse$"):
        resolve_methods(["cfws", "mse"], None, host)
    # a method that follows a calibrator keeps its ranges: documented compositions still resolve
    assert [m.name for m in resolve_methods(["cfws", "easyquant"], None, host)] == ["cfws", "easyquant"]
    assert [m.name for m in resolve_methods(["minmax", "cfws"], None, host)] == ["minmax", "cfws"]


def test_calibrator_option_composes(quantize, digits_model, digits_calib):
    """``-p cfws -o cfws.calibrator minmax``: on a model with nothing to split, exactly minmax's ranges."""
    composed = onnxq.optimize(digits_model, method="cfws", options={"cfws.calibrator": "minmax"}, target="trt", data=str(digits_calib),
                              cache_dir=None, show_progress=False)
    assert composed.report.methods["cfws"]["split"] == []
    got, minmax = _activation_scales(composed.model), _activation_scales(quantize("minmax", "trt").model)
    assert got.keys() == minmax.keys() and len(got) >= 5
    for k in got:
        assert got[k] == pytest.approx(minmax[k], rel=1e-6), k


def test_shared_option_name_needs_the_method_prefix():
    from onnxq.errors import OptionError
    from onnxq.host import get_host
    from onnxq.pipeline import resolve_methods

    host = get_host()
    with pytest.raises(OptionError, match=r"^option 'samples' belongs to several selected methods \(easyquant, bias-correction\); "
                                          r"say which with a prefix, e\.g\. -o easyquant\.samples 8$"):
        resolve_methods(["easyquant", "bias-correction"], {"samples": "8"}, host)
    eq, bc = resolve_methods(["easyquant", "bias-correction"], {"easyquant.samples": "8", "bias-correction.samples": 4}, host)
    assert eq.options.samples == 8 and bc.options.samples == 4


def test_composed_options_route_to_their_method(digits_model, digits_calib_feeds):
    res = onnxq.optimize(digits_model, method=["percentile", "bias-correction"], options={"percentile": "99.9", "samples": "8"},
                         target="trt", data=digits_calib_feeds[:4], cache_dir=None, show_progress=False)
    opts = res.report.options
    assert opts["percentile"]["percentile"] == pytest.approx(99.9)
    assert opts["bias-correction"]["samples"] == 8


def test_statistics_cache_round_trip(digits_model, digits_calib, tmp_path):
    """A second run with the same data reads the cache and gives the identical model."""
    cache = tmp_path / "cache"
    first = onnxq.optimize(digits_model, method="trt-entropy", target="trt", data=str(digits_calib), cache_dir=cache, show_progress=False)
    assert any(cache.rglob("*")), "nothing was cached"
    second = onnxq.optimize(digits_model, method="trt-entropy", target="trt", data=str(digits_calib), cache_dir=cache, show_progress=False)
    assert _inits(first.model).keys() == _inits(second.model).keys()
    for k, v in _inits(first.model).items():
        np.testing.assert_array_equal(v, _inits(second.model)[k])


def test_report_fields(quantize):
    report = quantize("trt-entropy", "ort").report
    r = report.to_dict()
    for key in ("model", "method", "options", "target", "bits", "quantized_activations", "quantized_weights", "layers",
                "calibration_seconds", "total_seconds", "left_in_float"):
        assert key in r, key
    assert report.quantized_weights == 7 and report.layers == 7
    assert report.left_in_float == []
    defaults = {"zero_bin": "copy_next", "kl": "trt", "edge": "right", "merge": "even"}
    assert {k: report.options["trt-entropy"].get(k) for k in defaults} == defaults
    counts = Counter(n.op_type for n in quantize("trt-entropy", "ort").model.graph.node)
    assert counts["Conv"] == 6 and counts["DequantizeLinear"] >= 7 + r["quantized_activations"]


def test_exclude_takes_none_a_list_and_refuses_a_bare_string(digits_model, digits_calib_feeds):
    """``exclude=None`` is no exclusion; a node named in a list stays float; a bare string is a one-line option error
    (iterated, it would name one node per character and exclude nothing)."""
    model = onnx.load(str(digits_model))
    conv = next(n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.name)
    plain = onnxq.optimize(digits_model, method="minmax", data=digits_calib_feeds, exclude=None, cache_dir=None, show_progress=False)
    kept = onnxq.optimize(digits_model, method="minmax", data=digits_calib_feeds, exclude=[conv], cache_dir=None, show_progress=False)

    def fed_by_dq(m: onnx.ModelProto) -> bool:
        made_by = {o: n.op_type for n in m.graph.node for o in n.output}
        node = next(n for n in m.graph.node if n.name == conv)
        return made_by.get(node.input[0]) == "DequantizeLinear"

    assert fed_by_dq(plain.model) and not fed_by_dq(kept.model)
    with pytest.raises(onnxq.errors.OptionError, match="list of node names"):
        onnxq.optimize(digits_model, method="minmax", data=digits_calib_feeds, exclude=conv, cache_dir=None, show_progress=False)
