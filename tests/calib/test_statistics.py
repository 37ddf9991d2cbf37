"""Streaming statistics: exact, independent of batch size, cached, and clear about bad data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.calib import statistics
from onnxq.calib.feeds import model_inputs
from onnxq.calib.readers import Batch
from onnxq.errors import DataError
from onnxq.pipeline import batch_source, make_reader
from onnxq.host import get_host
from onnxq.testing.models import conv_relu_model


def feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 2, 6, 6)).astype(np.float32) * (1 + k % 3)} for k in range(n)]


def collect(model, items, batch_size, cache_dir=None, fingerprint=None):
    inputs = model_inputs(model)
    src = batch_source(make_reader(items, inputs, get_host()), inputs, batch_size)
    reqs = [statistics.StatRequest(t, "histogram") for t in ("x", "c", "y")]
    return statistics.collect(model, reqs, src, batch_size=batch_size, cache_dir=cache_dir, data_fingerprint=fingerprint, show_progress=False)


def test_histograms_identical_for_batch_size_1_and_16():
    model, items = conv_relu_model(), feeds(40)
    a = collect(model, items, 1)
    b = collect(model, items, 16)
    for t in a:
        assert a[t].min == b[t].min and a[t].max == b[t].max
        np.testing.assert_array_equal(a[t].hist, b[t].hist)


def test_ranges_and_histogram_match_numpy():
    model, items = conv_relu_model(), feeds(12)
    s = collect(model, items, 5)
    x = np.concatenate([f["x"] for f in items])
    assert s["x"].min == pytest.approx(x.min()) and s["x"].max == pytest.approx(x.max())
    assert s["x"].hist.sum() == x.size
    ref, _ = np.histogram(np.abs(x), bins=2048, range=(0, s["x"].amax))
    # folding the signed histogram only moves values sitting exactly on a bin edge
    assert np.abs(s["x"].abs_hist() - ref).sum() <= 2
    assert s["y"].min >= 0


def test_histograms_of_very_different_batches_do_not_depend_on_grouping():
    model = conv_relu_model()
    items = feeds(7, seed=3) + [{"x": np.full((1, 2, 6, 6), 50.0, np.float32)}]
    a, b = collect(model, items, 3), collect(model, items, 8)
    np.testing.assert_array_equal(a["c"].hist, b["c"].hist)


def test_cache_roundtrip(tmp_path):
    model, items = conv_relu_model(), feeds(8)
    first = collect(model, items, 4, tmp_path, "fp-1")
    assert len(list(tmp_path.glob("*.npz"))) == 1
    # the cache is used: poisoned data would otherwise raise
    bad = [{"x": np.full((1, 2, 6, 6), np.nan, np.float32)}]
    second = collect(model, bad, 4, tmp_path, "fp-1")
    for t in first:
        np.testing.assert_array_equal(first[t].hist, second[t].hist)
    with pytest.raises(DataError):
        collect(model, bad, 4, tmp_path, "fp-2")


def test_nan_produced_inside_model_is_reported():
    model = conv_relu_model()
    log = helper.make_node("Log", ["y"], ["z"], name="log")  # log(0) = -inf, log(<0) impossible after relu
    model.graph.node.append(log)
    sub = helper.make_node("Sub", ["z", "z"], ["nan"], name="sub")  # -inf - -inf = NaN
    model.graph.node.append(sub)
    inputs = model_inputs(model)
    items = [{"x": np.zeros((1, 2, 6, 6), np.float32)}]
    src = batch_source(make_reader(items, inputs, get_host()), inputs, 1)
    with pytest.raises(DataError, match="'nan'"):
        statistics.collect(model, [statistics.StatRequest("nan", "minmax")], src, show_progress=False)


def test_memory_budget_splits_histogram_pass_without_changing_results():
    model, items = conv_relu_model(), feeds(10)
    inputs = model_inputs(model)
    src = batch_source(make_reader(items, inputs, get_host()), inputs, 4)
    reqs = [statistics.StatRequest(t, "histogram") for t in ("x", "c", "y")]
    small = statistics.collect(model, reqs, src, batch_size=4, memory_budget=1, show_progress=False)
    big = statistics.collect(model, reqs, src, batch_size=4, show_progress=False)
    for t in big:
        np.testing.assert_array_equal(small[t].hist, big[t].hist)


def test_merge_requests_prefers_histograms():
    merged = statistics.merge_requests([statistics.StatRequest("a"), statistics.StatRequest("a", "histogram", 1024), statistics.StatRequest("a", "minmax", 4096)])
    assert merged["a"].kind == "histogram" and merged["a"].bins == 4096


def test_batches_with_labels_keep_labels_aligned():
    model = conv_relu_model()
    inputs = model_inputs(model)
    items = [({"x": np.zeros((3, 2, 6, 6), np.float32)}, np.array([0, 1, 2]))]
    src = batch_source(make_reader(items, inputs, get_host()), inputs, 2)
    batches = list(src())
    assert [len(b.labels) for b in batches] == [2, 1]
    assert isinstance(batches[0], Batch)
