"""ChannelRange: per-channel max and min through the statistics pass equal numpy's, for either
channel axis, whatever the batching, over the first N samples when asked, and through the cache."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.calib.readers import Batch
from onnxq.calib.statistics import ChannelRange, StatRequest, collect


def _model(opset: int) -> onnx.ModelProto:
    """x [N, 6, 5] -> t = x * w (w per last-axis channel) -> y = Relu(t): ``t`` has channels on either axis."""
    w = numpy_helper.from_array(np.array([1.0, -2.0, 3.0, 0.5, -0.25], np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["t"]), helper.make_node("Relu", ["t"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 6, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6, 5])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _data(n: int, batch: int) -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(0).standard_normal((n, 6, 5)).astype(np.float32)
    x[:, 2] *= 40  # an outlier channel along axis 1
    return [{"x": x[i:i + batch]} for i in range(0, n, batch)]


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("batch", [3, 16])
def test_channel_range_matches_numpy(opset, batch):
    model, feeds = _model(opset), _data(16, batch)
    x = np.concatenate([f["x"] for f in feeds])
    t = x * np.array([1.0, -2.0, 3.0, 0.5, -0.25], np.float32)
    last, first = StatRequest("t", ChannelRange(-1)), StatRequest("t", ChannelRange(1))
    head = StatRequest("t", ChannelRange(-1, samples=5))
    got = collect(model, [last, first, head], lambda: iter(Batch(f) for f in feeds), batch_size=4, show_progress=False)
    flat = t.reshape(-1, 5)
    np.testing.assert_array_equal(got[last], np.stack([flat.max(0), flat.min(0)]))
    per_row = t.transpose(1, 0, 2).reshape(6, -1)
    np.testing.assert_array_equal(got[first], np.stack([per_row.max(1), per_row.min(1)]))
    five = t[:5].reshape(-1, 5)
    np.testing.assert_array_equal(got[head], np.stack([five.max(0), five.min(0)]))
    assert got[last].dtype == np.float32 and got[last].shape == (2, 5)
    assert np.all(got[first][0] >= got[first][1])


def test_channel_range_is_cached(tmp_path):
    model, feeds = _model(17), _data(8, 4)
    req = StatRequest("t", ChannelRange(-1))
    kw = dict(batch_size=4, show_progress=False, cache_dir=tmp_path, data_fingerprint="fixed")
    first = collect(model, [req], lambda: iter(Batch(f) for f in feeds), **kw)
    again = collect(model, [req], lambda: iter(()), **kw)  # no data: only the cache can answer
    np.testing.assert_array_equal(first[req], again[req])
