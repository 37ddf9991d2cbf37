"""Numeric quantizers match ONNX QuantizeLinear/DequantizeLinear exactly."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.qparams import QParams, asymmetric, int_range, per_channel_absmax, symmetric


def run_qdq(x: np.ndarray, q: QParams) -> np.ndarray:
    inits = [numpy_helper.from_array(q.scale, "s"), numpy_helper.from_array(q.zero_point, "z")]
    attrs = {"axis": q.axis} if q.axis is not None else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_int_ranges():
    assert int_range(8, True, False) == (-128, 127)
    assert int_range(8, True, True) == (-127, 127)
    assert int_range(7, True, True) == (-63, 63)
    assert int_range(8, False, False) == (0, 255)


def test_symmetric_fake_quant_matches_onnxruntime():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 32)) * 3).astype(np.float32)
    x[0, :4] = [0.5, 1.5, -2.5, 2.5]  # ties: round half to even
    q = symmetric(4.0, 8, narrow=False)
    np.testing.assert_array_equal(q.fake_quantize(x), run_qdq(x, q))


def test_asymmetric_fake_quant_matches_onnxruntime():
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.3, 5.0, (128,)).astype(np.float32)
    q = asymmetric(-0.3, 5.0, 8)
    assert q.dtype == "uint8" and 0 < int(q.zero_point) < 255
    np.testing.assert_allclose(q.fake_quantize(x), run_qdq(x, q), atol=1e-6)
    lo, hi = q.real_range()
    assert lo <= -0.29 and hi >= 4.99


def test_per_channel_axis_matches_onnxruntime():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)[:, None, None, None]
    q = symmetric(per_channel_absmax(w, 0), 8, narrow=True, axis=0)
    assert q.scale.shape == (6,)
    ints = q.quantize(w)
    assert ints.min() >= -127 and ints.max() <= 127
    np.testing.assert_array_equal(np.abs(ints).reshape(6, -1).max(1), 127)
    np.testing.assert_allclose(q.fake_quantize(w), run_qdq(w, q), atol=1e-7)


@pytest.mark.parametrize("target,bits", [("ort", 8), ("ort", 7), ("trt", 8), ("trt", 7)])
def test_activation_grids_for_many_ranges_at_once_are_each_the_single_ranges_grid(target, bits):
    # a calibrator scores all its candidate ranges in one array operation: each must be the grid it deploys
    from onnxq.graph.targets import get_profile

    profile = get_profile(target, bits)
    rng = np.random.default_rng(3)
    lo = np.concatenate([-rng.exponential(2.0, 60), rng.uniform(0.1, 1.0, 4), [0.0, -1e-12]])
    hi = np.concatenate([rng.exponential(3.0, 60), rng.uniform(1.0, 2.0, 4), [0.0, 1e-12]])
    many = profile.activation_qparams(lo, hi, axis=0)
    assert many.axis == 0 and many.scale.shape == lo.shape
    for k in range(len(lo)):
        one = profile.activation_qparams(float(lo[k]), float(hi[k]))
        assert (many.scale[k], many.zero_point[k], many.qmin, many.qmax, many.dtype) == (one.scale, one.zero_point, one.qmin, one.qmax, one.dtype)
    if bits == 8:  # INT7's narrower range is a Clip in the graph, not QuantizeLinear's
        x = rng.uniform(-6, 6, (1, 256)).astype(np.float32)
        np.testing.assert_allclose(many.fake_quantize(x), run_qdq(np.repeat(x, len(lo), 0), many), atol=1e-6)


def test_int7_uses_narrow_range():
    q = symmetric(1.0, 7, narrow=True)
    assert (q.qmin, q.qmax) == (-63, 63) and q.narrowed and q.dtype == "int8"
    x = np.linspace(-3, 3, 101, dtype=np.float32)
    assert np.abs(q.quantize(x)).max() == 63


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_scales_must_be_finite_and_positive(bad):
    with pytest.raises(ValueError):
        QParams(np.float32(bad), np.int8(0), "int8", -128, 127)


def test_several_scales_without_an_axis_are_refused():
    """Many ranges at once need the channel axis: without it they would be written as one per-tensor Q/DQ."""
    with pytest.raises(ValueError, match="per-tensor scale must be one value"):
        asymmetric(np.array([-1.0, -2.0]), np.array([1.0, 3.0]), 8)
    with pytest.raises(ValueError, match="per-tensor scale must be one value"):
        symmetric(np.array([1.0, 2.0]), 8, True)
    assert asymmetric(np.array([-1.0, -2.0]), np.array([1.0, 3.0]), 8, axis=0).scale.shape == (2,)
    assert symmetric(np.array([2.0]), 8, True).scale.size == 1  # one value in an array is still per-tensor


def test_all_zero_tensor_gets_a_tiny_positive_scale():
    q = symmetric(0.0, 8, narrow=True)
    assert float(q.scale) > 0
    assert np.all(q.fake_quantize(np.zeros(4, np.float32)) == 0)
