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
    with pytest.raises(DataError, match="'nan'"):  # the same check where the range round exposes the tensor
        statistics.collect(model, [statistics.StatRequest("nan", "histogram")], src, show_progress=False, expose_ranges=True)


def test_range_round_exposes_its_tensors_only_where_a_histogram_round_exposes_them_anyway(monkeypatch):
    """Before a histogram round the min/max round makes its tensors outputs and reduces them in numpy (ONNX Runtime's
    ReduceMin/ReduceMax took 2.5x the model's own time on PP-OCR det): ranges and histograms bit for bit those of the
    reductions in the graph. A min/max-only pass, or one whose tensors do not fit the memory budget at once, keeps
    the reductions, which hold no activation past its consumers."""
    model, items = conv_relu_model(), feeds(10)
    inputs = model_inputs(model)
    src = batch_source(make_reader(items, inputs, get_host()), inputs, 4)
    reductions: list[bool] = []
    real = statistics.ort_backend.make_session

    def spy(m, *a, **k):
        reductions.append(any(n.op_type in ("ReduceMin", "ReduceMax") for n in m.graph.node))
        return real(m, *a, **k)

    monkeypatch.setattr(statistics.ort_backend, "make_session", spy)
    hist = [statistics.StatRequest(t, "histogram") for t in ("x", "c", "y")]
    exposed = statistics.collect(model, hist, src, batch_size=4, show_progress=False)
    assert reductions == [False, False]
    reductions.clear()
    in_graph = statistics.collect(model, hist, src, batch_size=4, show_progress=False, expose_ranges=False)
    assert reductions == [True, False]
    for t in ("x", "c", "y"):
        assert (exposed[t].min, exposed[t].max, exposed[t].count) == (in_graph[t].min, in_graph[t].max, in_graph[t].count)
        np.testing.assert_array_equal(exposed[t].hist, in_graph[t].hist)
    reductions.clear()
    statistics.collect(model, [statistics.StatRequest(t, "minmax") for t in ("x", "c", "y")], src, batch_size=4, show_progress=False)
    assert reductions == [True]
    reductions.clear()
    tight = statistics.collect(model, hist, src, batch_size=4, memory_budget=1, show_progress=False)
    assert reductions[0] is True
    for t in ("x", "c", "y"):
        assert (tight[t].min, tight[t].max) == (in_graph[t].min, in_graph[t].max)
        np.testing.assert_array_equal(tight[t].hist, in_graph[t].hist)


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


@pytest.mark.parametrize("amax", [1e-37, 3e-39, 1e-42, 1.4e-45, 1.0, 3e38])
def test_bincount_never_overflows_for_any_finite_positive_range(amax):
    """Issue 16: around ±1e-37 the bin scale overflowed float32 and counts went negative."""
    a = np.float32(amax)
    rng = np.random.default_rng(0)
    x = (rng.uniform(-1, 1, 4000) * a).astype(np.float32)
    x[:4] = [a, -a, 0, a / 2]
    with np.errstate(all="raise"):  # no overflow warning leaks either
        h = statistics.bincount(x, float(a), 4096)
    assert h.shape == (4096,) and h.min() >= 0 and h.sum() == x.size
    assert h[-1] >= 1 and h[0] >= 1  # ±amax land in the outer bins
    # the bin of each value agrees with exact float64 arithmetic up to edge rounding (one bin)
    exact = np.clip(np.floor((x.astype(np.float64) / float(a) + 1) * 2048), 0, 4095).astype(int)
    ours = np.repeat(np.arange(4096), h)
    assert np.abs(np.sort(exact) - ours).max() <= 1
    # values far outside the range are clamped, not lost
    wide = statistics.bincount(np.array([np.float32(3e38), np.float32(-3e38)], np.float32), float(a), 4096)
    assert wide[0] == 1 and wide[-1] == 1


def test_bincount_puts_a_nan_in_the_zero_bin_and_infinities_in_the_outer_ones():
    """A NaN never becomes a negative index (np.bincount would raise); ±inf are clamped like any value out of range."""
    x = np.array([np.nan, np.inf, -np.inf, 0.25, np.nan], np.float32)
    with np.errstate(all="raise"):
        h = statistics.bincount(x, 1.0, 8)
    assert h.sum() == 5 and h[4] == 2 and h[7] == 1 and h[0] == 1 and h[5] == 1


def test_bincount_counts_the_same_whatever_the_chunk_and_a_nan_in_any_chunk(monkeypatch):
    """Binning goes chunk by chunk (in cache); the chunk size changes no count, a NaN in a later chunk still lands in
    the zero bin, and every element is counted once, against a one-shot float64 reference of the bins."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(10_001) * 3).astype(np.float32)
    x[[17, 9_999]] = np.nan
    whole = statistics.bincount(x, 4.0, 256)
    for chunk in (7, 1_000, 10_000):
        monkeypatch.setattr(statistics, "BIN_CHUNK", chunk)
        np.testing.assert_array_equal(statistics.bincount(x, 4.0, 256), whole)
    assert whole.sum() == x.size and whole[128] >= 2
    finite = x[np.isfinite(x)]
    exact = np.bincount(np.clip(np.floor((finite.astype(np.float64) / 4 + 1) * 128), 0, 255).astype(int), minlength=256)
    exact[128] += 2
    assert np.abs(whole - exact).sum() <= 2 * 4  # a value on a bin edge may round into its neighbour


def test_bincount_below_the_smallest_subnormal_is_all_zero():
    h = statistics.bincount(np.zeros(10, np.float32), 1e-50, 4096)
    assert h[2048] == 10 and h.sum() == 10


@pytest.mark.parametrize("method", ["percentile", "mse", "trt-entropy"])
@pytest.mark.parametrize("scale", [1e-37, 1e-42])
def test_histogram_calibrators_on_tiny_signed_inputs(method, scale, run_cli, tiny_model_path, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.savez(data / "a.npz", x=(rng.standard_normal((8, 1, 8, 8)) * scale).astype(np.float32))
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(["optimize", tiny_model_path, "--data", data, "-p", method, "--output", out, "--no-cache", "--quiet"])
    assert code == 0, err
    assert "RuntimeWarning" not in err
    onnx.checker.check_model(onnx.load(str(out)))


def _batches(items: list[dict[str, np.ndarray]], batch_size: int) -> list[Batch]:
    model = conv_relu_model()
    inputs = model_inputs(model)
    return list(batch_source(make_reader(items, inputs, get_host()), inputs, batch_size)())


def test_grouped_collection_equals_one_pass_and_each_group_keeps_its_own_range():
    """collect_groups: the merged statistics are those of one pass over every group's batches, and each group's are
    those of a pass over its batches alone, bit for bit, though its range is narrower than the merged one."""
    from onnxq.calib.sharded import collect_groups

    model = conv_relu_model()
    # the third group reaches 3x the others' range: their own grids are 3x finer than the merged one
    groups = [_batches(feeds(8, seed=k), 4) for k in range(2)] + [_batches([{"x": f["x"] * 3} for f in feeds(8, seed=2)], 4)]
    reqs = [statistics.StatRequest(t, "histogram") for t in ("x", "c", "y")]
    merged, own = collect_groups(model, reqs, groups, batch_size=4)
    every = [b for g in groups for b in g]
    one = statistics.collect(model, reqs, lambda: iter(every), batch_size=4, show_progress=False)
    for t in ("x", "c", "y"):
        assert (merged[t].min, merged[t].max, merged[t].count) == (one[t].min, one[t].max, one[t].count)
        np.testing.assert_array_equal(merged[t].hist, one[t].hist)
    for g, mine in zip(groups, own):
        alone = statistics.collect(model, reqs, lambda g=g: iter(g), batch_size=4, show_progress=False)
        for t in ("x", "c", "y"):
            assert (mine[t].min, mine[t].max, mine[t].count) == (alone[t].min, alone[t].max, alone[t].count)
            np.testing.assert_array_equal(mine[t].hist, alone[t].hist, err_msg=t)
    assert own[0]["x"].amax < merged["x"].amax / 2, "precondition: a group's own range is narrower than the merged one"


def test_each_union_of_groups_equals_a_pass_over_its_batches():
    """collect_unions: the pool (groups 0-1) and the pool with a wider third group (every sample) from one pass, each
    bit for bit a pass over its own batches, though the two ranges and so the two histogram grids differ."""
    from onnxq.calib.sharded import collect_unions

    model = conv_relu_model()
    groups = [_batches(feeds(8, seed=k), 4) for k in range(2)] + [_batches([{"x": f["x"] * 3} for f in feeds(8, seed=2)], 4)]
    reqs = [statistics.StatRequest(t, "histogram") for t in ("x", "c", "y")]
    unions = [[0, 1], [0, 1, 2]]
    merged, own = collect_unions(model, reqs, groups, unions, batch_size=4)
    assert len(merged) == 2 and len(own) == 3
    for u, got in zip(unions, merged):
        every = [b for k in u for b in groups[k]]
        one = statistics.collect(model, reqs, lambda every=every: iter(every), batch_size=4, show_progress=False)
        for t in ("x", "c", "y"):
            assert (got[t].min, got[t].max, got[t].count) == (one[t].min, one[t].max, one[t].count)
            np.testing.assert_array_equal(got[t].hist, one[t].hist, err_msg=f"{u} {t}")
    alone = statistics.collect(model, reqs, lambda: iter(groups[2]), batch_size=4, show_progress=False)
    np.testing.assert_array_equal(own[2]["x"].hist, alone["x"].hist)
    assert merged[0]["x"].amax < merged[1]["x"].amax / 2, "precondition: the two unions' grids differ"


def test_groups_left_out_of_own_are_not_binned_on_their_own_grids(monkeypatch):
    """collect_unions(own=...): the listed groups' own histograms and every union's are what they were; a group left out
    keeps its own range and count but no histogram, and none of its values is binned on its own grid."""
    from onnxq.calib import sharded

    model = conv_relu_model()
    groups = [_batches(feeds(8, seed=k), 4) for k in range(2)] + [_batches([{"x": f["x"] * 0.5} for f in feeds(8, seed=2)], 4)]
    reqs = [statistics.StatRequest(t, "histogram") for t in ("x", "c", "y")]
    unions = [[0, 1], [0, 1, 2]]
    binned: list[tuple[float, int]] = []
    real = sharded.bincount

    def counting(x, amax, nbins2):
        binned.append((float(amax), np.size(x)))
        return real(x, amax, nbins2)

    monkeypatch.setattr(sharded, "bincount", counting)
    every_merged, every_own = sharded.collect_unions(model, reqs, groups, unions, batch_size=4)
    all_values = sum(n for _, n in binned)
    binned.clear()
    merged, own = sharded.collect_unions(model, reqs, groups, unions, batch_size=4, own=[0, 1])
    for t in ("x", "c", "y"):
        for a, b in zip(merged + own[:2], every_merged + every_own[:2]):
            assert (a[t].min, a[t].max, a[t].count) == (b[t].min, b[t].max, b[t].count)
            np.testing.assert_array_equal(a[t].hist, b[t].hist, err_msg=t)
        assert (own[2][t].min, own[2][t].max, own[2][t].count) == (every_own[2][t].min, every_own[2][t].max, every_own[2][t].count)
        assert own[2][t].hist is None
    third = {float(every_own[2][t].amax) for t in ("x", "c", "y")}
    assert not third & {float(u[t].amax) for u in merged for t in ("x", "c", "y")}, "precondition: group 2's own grids are its own"
    assert not any(a in third for a, _ in binned), "group 2 was binned on its own grid"
    assert sum(n for _, n in binned) < all_values
    with pytest.raises(ValueError, match="own"):
        sharded.collect_unions(model, reqs, groups, unions, own=[3])
