"""Statistics requests with their own reducers: exact for any batch size, one pass, under the memory budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxq.calib import statistics
from onnxq.calib.feeds import model_inputs
from onnxq.calib.statistics import (MODEL_INPUTS, ChannelAbsMax, Histogram, InputSamples, MinMax, Reducer, StatRequest, StatsMap,
                                    TensorSamples)
from onnxq.host import get_host
from onnxq.pipeline import batch_source, make_reader
from onnxq.testing.models import conv_relu_model


def feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 2, 6, 6)).astype(np.float32) * (1 + k % 3)} for k in range(n)]


class CountingSource:
    """A batch source that counts how often the data is read from the start (one per pass)."""

    def __init__(self, model: onnx.ModelProto, items, batch_size: int, labels: bool = False) -> None:
        inputs = model_inputs(model)
        data = [(f, np.arange(k, k + 1)) for k, f in enumerate(items)] if labels else items
        self.inner = batch_source(make_reader(data, inputs, get_host()), inputs, batch_size)
        self.passes = 0
        self.batches = 0

    def __call__(self):
        self.passes += 1
        for b in self.inner():
            self.batches += 1
            yield b


def tensors_of(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """The values of ``names`` on all of ``x`` in one plain ONNX Runtime run."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # as the statistics pass runs it
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(names, {"x": x})


@dataclass(frozen=True)
class PositiveCount(Reducer):
    """A third-party reducer: how many elements are > 0 (reads the whole tensor)."""

    kind: ClassVar[str] = "positive_count"

    def start(self) -> int:
        return 0

    def update(self, acc: int, values: np.ndarray, stats) -> int:
        return acc + int((values > 0).sum())


@dataclass(frozen=True)
class SpreadOverRange(Reducer):
    """A third-party reducer that needs the range pass first: the share of |x| above half the max-abs."""

    kind: ClassVar[str] = "upper_half"
    needs_range: ClassVar[bool] = True

    def start(self) -> list[int]:
        return [0, 0]

    def update(self, acc: list[int], values: np.ndarray, stats) -> list[int]:
        return [acc[0] + int((np.abs(values) > stats.amax / 2).sum()), acc[1] + values.size]

    def finish(self, acc: list[int]) -> float:
        return acc[0] / acc[1]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_channel_absmax_equals_numpy_on_the_concatenated_data(batch_size):
    model, items = conv_relu_model(), feeds(11)
    x = np.concatenate([f["x"] for f in items])
    c, y = tensors_of(model, x, ["c", "y"])
    reqs = [StatRequest(t, ChannelAbsMax(axis)) for t in ("x", "c", "y") for axis in (1, -1)]
    got = statistics.collect(model, reqs, CountingSource(model, items, batch_size), batch_size=batch_size, show_progress=False)
    for t, v in (("x", x), ("c", c), ("y", y)):
        np.testing.assert_array_equal(got[StatRequest(t, ChannelAbsMax(1))], np.abs(v).max(axis=(0, 2, 3)))
        np.testing.assert_array_equal(got[StatRequest(t, ChannelAbsMax(-1))], np.abs(v).reshape(-1, v.shape[-1]).max(axis=0))


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_channel_absmax_of_the_first_samples_only(batch_size):
    model, items = conv_relu_model(), feeds(13)
    x = np.concatenate([f["x"] for f in items])
    src = CountingSource(model, items, batch_size)
    req = StatRequest("c", ChannelAbsMax(1, samples=6))
    got = statistics.collect(model, [req], src, batch_size=batch_size, show_progress=False)
    (c,) = tensors_of(model, x[:6], ["c"])
    np.testing.assert_array_equal(got[req], np.abs(c).max(axis=(0, 2, 3)))
    assert src.batches == -(-6 // batch_size)  # reading stops once every request has its samples


@pytest.mark.parametrize("batch_size", [1, 4, 5])
def test_samples_are_exactly_the_first_n(batch_size):
    model, items = conv_relu_model(), feeds(12)
    x = np.concatenate([f["x"] for f in items])
    src = CountingSource(model, items, batch_size, labels=True)
    inputs, tensor = StatRequest(MODEL_INPUTS, InputSamples(7)), StatRequest("y", TensorSamples(7))
    got = statistics.collect(model, [inputs, tensor], src, batch_size=batch_size, show_progress=False)
    batches = got[inputs]
    assert [len(b.labels) for b in batches] == [next(iter(b.feeds.values())).shape[0] for b in batches]
    np.testing.assert_array_equal(np.concatenate([b.feeds["x"] for b in batches]), x[:7])
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), np.arange(7))
    np.testing.assert_array_equal(got[tensor], tensors_of(model, x[:7], ["y"])[0])
    assert src.passes == 1 and src.batches == -(-7 // batch_size)


def test_take_samples_reads_the_statistics_pass_and_falls_back_to_collecting():
    from onnxq.graph.placement import build_plan
    from onnxq.graph.targets import get_profile
    from onnxq.method import RunContext
    from onnxq.search.samples import samples_request, take_samples

    model, items = conv_relu_model(), feeds(9)
    src = CountingSource(model, items, 4)
    profile = get_profile("ort")
    ctx = RunContext(model, profile, build_plan(model, profile, ()), src)
    alone = take_samples(ctx, 6)  # no statistics pass: collected on the spot
    ctx.stats = statistics.collect(model, [StatRequest("y", "minmax"), samples_request(6)], src, show_progress=False)
    passes = src.passes
    kept = take_samples(ctx, 6)
    assert src.passes == passes  # read back, not read again
    np.testing.assert_array_equal(alone[0]["x"], kept[0]["x"])
    np.testing.assert_array_equal(kept[0]["x"], np.concatenate([f["x"] for f in items])[:6])


def test_third_party_reducer_rides_in_the_one_pass():
    model, items = conv_relu_model(), feeds(10)
    x = np.concatenate([f["x"] for f in items])
    c, y = tensors_of(model, x, ["c", "y"])
    src = CountingSource(model, items, 3)
    reqs = [StatRequest("y", "minmax"), StatRequest("c", PositiveCount()), StatRequest("y", PositiveCount()),
            StatRequest("c", ChannelAbsMax(1)), StatRequest(MODEL_INPUTS, InputSamples(4))]
    got = statistics.collect(model, reqs, src, batch_size=3, show_progress=False)
    assert src.passes == 1  # one ONNX Runtime pass over the data for all of them
    assert got[StatRequest("c", PositiveCount())] == int((c > 0).sum())
    assert got[StatRequest("y", PositiveCount())] == int((y > 0).sum())
    assert got["y"].max == float(y.max()) and "c" not in got  # no min/max was asked for c
    # a reducer that needs the range gets a second pass, like histograms
    src2 = CountingSource(model, items, 3)
    req = StatRequest("c", SpreadOverRange())
    got2 = statistics.collect(model, [req, StatRequest("y", "histogram")], src2, batch_size=3, show_progress=False)
    assert src2.passes == 2
    assert got2[req] == pytest.approx(float((np.abs(c) > np.abs(c).max() / 2).mean()))
    assert set(got2) == {"y"}


def test_memory_budget_splits_apply_to_the_new_reducers():
    model, items = conv_relu_model(), feeds(10)
    reqs = [StatRequest(t, PositiveCount()) for t in ("x", "c", "y")] + [StatRequest("c", TensorSamples(5)), StatRequest("y", "minmax")]
    tight, roomy = CountingSource(model, items, 4), CountingSource(model, items, 4)
    small = statistics.collect(model, reqs, tight, batch_size=4, memory_budget=1, show_progress=False)
    big = statistics.collect(model, reqs, roomy, batch_size=4, show_progress=False)
    assert roomy.passes == 1 and tight.passes == 3  # one group per tensor when not even one sample fits
    for r in reqs:
        np.testing.assert_array_equal(np.asarray(small[r] if not r.is_range else small[r].max), np.asarray(big[r] if not r.is_range else big[r].max))
    # and within a budget that fits one sample of everything, the run's batch shrinks instead
    per_sample = sum(statistics.tensor_bytes_per_sample(model, ["x", "c", "y"]).values())
    shrunk = CountingSource(model, items, 4)
    statistics.collect(model, reqs, shrunk, batch_size=4, memory_budget=per_sample, show_progress=False)
    assert shrunk.passes == 1


def test_cache_keeps_cacheable_results_and_recollects_samples(tmp_path):
    model, items = conv_relu_model(), feeds(8)
    absmax, samples = StatRequest("c", ChannelAbsMax(1)), StatRequest(MODEL_INPUTS, InputSamples(3))
    reqs = [StatRequest("y", "histogram"), absmax, samples]
    first = statistics.collect(model, reqs, CountingSource(model, items, 4), cache_dir=tmp_path, data_fingerprint="fp", show_progress=False)
    src = CountingSource(model, items, 4)
    again = statistics.collect(model, reqs, src, cache_dir=tmp_path, data_fingerprint="fp", show_progress=False)
    np.testing.assert_array_equal(first[absmax], again[absmax])
    np.testing.assert_array_equal(first["y"].hist, again["y"].hist)
    assert src.passes == 1 and src.batches == 1  # only the samples, which are not cached, were read
    np.testing.assert_array_equal(again[samples][0].feeds["x"], first[samples][0].feeds["x"])
    # the kinds are part of the key
    keys = {statistics.cache_key(model, [r], "fp") for r in (StatRequest("c", "minmax"), StatRequest("c", "histogram"), absmax,
                                                                   StatRequest("c", ChannelAbsMax(-1)))}
    assert len(keys) == 4


def test_string_kinds_are_shorthands_and_statsmap_answers_by_request():
    assert StatRequest("t", "minmax").reducer == MinMax() and StatRequest("t").kind == "minmax"
    h = StatRequest("t", "histogram", 1024)
    assert h.reducer == Histogram(1024) and h == StatRequest("t", Histogram(1024)) and h.bins == 1024 and h.kind == "histogram"
    assert StatRequest("t", ChannelAbsMax(1)).kind == "channel_absmax"
    with pytest.raises(ValueError):
        StatRequest("t", "median")
    s = StatsMap({"t": statistics.TensorStats(-1.0, 2.0, 1)}, {StatRequest("t", ChannelAbsMax(1)): np.ones(3)})
    assert s["t"].amax == 2.0 and s[StatRequest("t", "minmax")] is s["t"] and StatRequest("t", "minmax") in s
    assert StatRequest("t", "histogram") not in s and s.get(StatRequest("t", "histogram")) is None  # no histogram was collected
    assert s[StatRequest("t", ChannelAbsMax(1))].sum() == 3 and "t" in s and "u" not in s


def test_reducer_example_in_docs_runs(monkeypatch):
    """docs/plugins.md, "Statistics requests": the example reducer is collected in a real run."""
    import re
    import sys
    import types
    from pathlib import Path

    from onnxq.hookspecs import hookimpl
    from onnxq.host import Host
    from onnxq.pipeline import optimize

    text = (Path(__file__).resolve().parents[2] / "docs" / "plugins.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "(Reducer)" in b)
    module = types.ModuleType("docs_reducer_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses resolve the module
    exec(compile(code, "docs/plugins.md", "exec"), module.__dict__)
    module.register_methods = hookimpl(lambda register: register(module.Energy))
    host = Host(load_entry_points=True)
    assert host.register_module("docs-reducer", module).ok
    items = feeds(6)
    result = optimize(conv_relu_model(), method=["minmax", "energy"], data=items, host=host, show_progress=False)
    (x,) = tensors_of(conv_relu_model(), np.concatenate([f["x"] for f in items]), ["x"])
    assert result.report.methods["energy"]["x"] == pytest.approx(float(np.mean(x.astype(np.float64) ** 2)))
