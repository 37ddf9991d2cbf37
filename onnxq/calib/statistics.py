"""Streaming calibration statistics with ONNX Runtime (bounded memory, batch-size independent).

Methods *declare* what they need: a :class:`StatRequest` names a tensor and carries a
:class:`Reducer`, the object that turns that tensor's values, batch by batch, into a result.
Built in: :class:`MinMax` and :class:`Histogram` (``"minmax"``/``"histogram"`` are shorthands for
them), :class:`ChannelAbsMax` (per-channel ``max |x|``), :class:`ChannelRange` (per-channel max and min), :class:`TensorSamples` (the first N
samples of a tensor) and :class:`InputSamples` (the first N calibration batches' feeds, for
searches). Third parties subclass :class:`Reducer`. The host merges every request of a run and
streams the data through ONNX Runtime:

1. a first pass: ReduceMin/ReduceMax nodes are appended for every min/max or histogram tensor,
   so only two scalars per tensor and batch leave ONNX Runtime; reducers that reduce inside the
   graph (:attr:`Reducer.in_graph`, e.g. per-channel abs-max) add their nodes to the same session,
   reducers that read whole tensors and need no range ride along as extra outputs, and the
   model-input samples are taken from the batches read on the way;
2. only if a reducer needs the range first (histograms), a second pass with those tensors exposed
   as outputs. Each batch is binned into a histogram whose range was fixed by pass 1 and dropped at
   once.

Memory is O(results) plus one batch of activations, never O(samples) (except for sample
requests, which keep what they ask for). Every reducer says what one sample of its tensor costs
when it leaves ONNX Runtime (:meth:`Reducer.bytes_per_sample`); the run's batch shrinks, and only
when a single sample of all exposed tensors does not fit ``memory_budget`` are they split into
groups (one extra pass each).

Histograms are signed, ``2·bins`` equal bins over ``[−amax, amax]``, counted per element with the
same arithmetic whatever the batching, so results are identical for any batch size; reducers
merge per batch with an exact operation (max, sums of integer counts, concatenation in order), so
theirs are too.

Results: :class:`StatsMap`, a ``tensor name -> TensorStats`` mapping (min/max and histograms, as
methods always read them) that also answers ``stats[request]`` for any request (a TensorStats for
min/max and histograms, the reducer's result for the others).

Who asks when: methods declare requests in ``declare_statistics`` and the host collects them all
in its one statistics pass, after the float rewrites (searches ask for their calibration samples
this way, :mod:`onnxq.search.samples`). A float rewrite runs before that pass, on a model the pass
will never see, so it calls ``ctx.collect(requests)``, which runs :func:`collect` on the model as
it is at that point (smoothquant, equalize).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import helper

from onnxq.runtime import ort as ort_backend
from onnxq.runtime.executor import current as current_executor
from onnxq.graph.edit import Namer, insert_after_producers, with_outputs
from onnxq.graph.model_io import external_chunks
from onnxq.graph.prepare import tensor_types
from onnxq.calib.progress import progress
from onnxq.calib.readers import Batch
from onnxq.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_BINS = 2048
#: the tensor name of requests about the model inputs themselves (:class:`InputSamples`)
MODEL_INPUTS = "<model inputs>"


# ---------------------------------------------------------------------------------------------
# reducers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reducer:
    """How one request turns a tensor's values into its result, one run of the model at a time.

    Subclass it (a frozen dataclass, so equal reducers are collected once) and override
    :meth:`update` and, if needed, :meth:`start`/:meth:`finish`. The pass calls ``start()`` once,
    ``update(acc, values, stats)`` for every run of the model (``values``: the tensor's value on
    that run's samples, batch on axis 0; ``stats``: the tensor's min/max when :attr:`needs_range`)
    and ``finish(acc)`` at the end. ``update`` must merge exactly (max, integer sums,
    concatenation in order), since the run's batch size depends on the memory budget.
    """

    #: short name; with the dataclass fields it identifies the statistic in the cache key
    kind: ClassVar[str] = "custom"
    #: the tensor's global min/max must be known first (a second pass): histograms
    needs_range: ClassVar[bool] = False
    #: results may be stored in the on-disk cache (they must then be numpy arrays)
    cacheable: ClassVar[bool] = False
    #: the reduction is added to the graph (:meth:`add_to_graph`): only its small result leaves ONNX Runtime
    in_graph: ClassVar[bool] = False

    @property
    def limit(self) -> int | None:
        """Read only the first ``limit`` samples (None: all of them)."""
        return None

    def token(self) -> str:
        """A string identifying this statistic (class and parameters) for the cache key."""
        return f"{type(self).__module__}.{self!r}"

    def bytes_per_sample(self, tensor_bytes: int) -> int:
        """Bytes one sample costs when it leaves ONNX Runtime (``tensor_bytes``: one sample of the tensor)."""
        return 0 if self.in_graph else tensor_bytes

    def add_to_graph(self, model: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, list[str]]:
        """For :attr:`in_graph` reducers: ``model`` with one extra output per tensor (its reduction per run)."""
        raise NotImplementedError

    def start(self) -> Any:
        """The empty accumulator."""
        return None

    def update(self, acc: Any, values: np.ndarray, stats: TensorStats | None) -> Any:
        """Fold one run's values into the accumulator and return it."""
        raise NotImplementedError

    def finish(self, acc: Any) -> Any:
        """The result from the final accumulator."""
        return acc


@dataclass(frozen=True)
class MinMax(Reducer):
    """Global min and max of a tensor (reduced inside the graph). Result: :class:`TensorStats`."""

    kind: ClassVar[str] = "minmax"
    cacheable: ClassVar[bool] = True


@dataclass(frozen=True)
class Histogram(Reducer):
    """Signed histogram of ``2·bins`` equal bins over ``[−amax, amax]`` (range from the min/max pass).

    Result: :class:`TensorStats` with ``hist`` set."""

    bins: int = DEFAULT_BINS  # bins of |x| over [0, amax]
    kind: ClassVar[str] = "histogram"
    needs_range: ClassVar[bool] = True
    cacheable: ClassVar[bool] = True

    def start(self) -> np.ndarray:
        return np.zeros(2 * self.bins, np.int64)

    def update(self, acc: np.ndarray, values: np.ndarray, stats: TensorStats | None) -> np.ndarray:
        acc += bincount(values, stats.amax if stats is not None else 0.0, len(acc))
        return acc


@dataclass(frozen=True)
class ChannelReducer(Reducer):
    """Base of the per-channel reducers computed inside the graph along ``axis`` (-1: ``[..., C]``;
    1: ``[N, C, ...]``) over the first ``samples`` samples (None: all)."""

    axis: int = -1
    samples: int | None = None
    cacheable: ClassVar[bool] = True
    in_graph: ClassVar[bool] = True

    @property
    def limit(self) -> int | None:
        return self.samples


@dataclass(frozen=True)
class ChannelAbsMax(ChannelReducer):
    """``max |x|`` per channel along ``axis``, reduced inside the graph. Result: float32 ``[C]``."""

    kind: ClassVar[str] = "channel_absmax"

    def add_to_graph(self, model: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, list[str]]:
        from onnxq.graph.smoothing import channel_absmax_model

        return channel_absmax_model(model, tensors, channel_axis=self.axis)

    def update(self, acc: np.ndarray | None, values: np.ndarray, stats: TensorStats | None) -> np.ndarray:
        v = np.asarray(values, np.float32).reshape(-1)
        return v if acc is None else np.maximum(acc, v)


@dataclass(frozen=True)
class ChannelRange(ChannelReducer):
    """Per-channel ``max`` and ``min`` along ``axis``, reduced inside the graph. Result: float32
    ``[2, C]``, row 0 the maxima and row 1 the minima (RPTQ's clustering of channels by their ranges)."""

    kind: ClassVar[str] = "channel_range"

    def add_to_graph(self, model: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, list[str]]:
        from onnxq.graph.smoothing import channel_range_model

        return channel_range_model(model, tensors, channel_axis=self.axis)

    def update(self, acc: np.ndarray | None, values: np.ndarray, stats: TensorStats | None) -> np.ndarray:
        v = np.asarray(values, np.float32).reshape(2, -1)
        if acc is None:
            return v.copy()
        return np.stack([np.maximum(acc[0], v[0]), np.minimum(acc[1], v[1])])


@dataclass(frozen=True)
class TensorSamples(Reducer):
    """The first ``samples`` samples of a tensor, in data order. Result: one array (batch on axis 0),
    or a list of per-run arrays when their shapes differ."""

    samples: int = 1
    kind: ClassVar[str] = "samples"

    @property
    def limit(self) -> int | None:
        return self.samples

    def start(self) -> list[np.ndarray]:
        return []

    def update(self, acc: list[np.ndarray], values: np.ndarray, stats: TensorStats | None) -> list[np.ndarray]:
        acc.append(np.asarray(values))
        return acc

    def finish(self, acc: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
        try:
            return np.concatenate(acc) if len(acc) > 1 else acc[0]
        except ValueError:
            return acc


@dataclass(frozen=True)
class InputSamples(Reducer):
    """The first ``samples`` calibration samples themselves (request tensor :data:`MODEL_INPUTS`):
    the data's batches, the last one cut to size, labels kept aligned. Needs no ONNX Runtime run.
    Result: ``list[Batch]`` (views of the data, no copies)."""

    samples: int = 1
    kind: ClassVar[str] = "input_samples"

    @property
    def limit(self) -> int | None:
        return self.samples

    def start(self) -> list[Batch]:
        return []

    def take(self, acc: list[Batch], batch: Batch, seen: int) -> int:
        """Add the head of one data batch (``seen`` samples taken so far); returns how many were taken."""
        take = min(batch.size, self.samples - seen)
        acc.append(batch.rows(0, take))
        return take


_SHORTHANDS: dict[str, type[Reducer]] = {"minmax": MinMax, "histogram": Histogram}


@dataclass(frozen=True)
class StatRequest:
    """A statistic a method needs for one tensor: the tensor and the reducer that computes it.

    ``kind`` is a :class:`Reducer` or one of the shorthands ``"minmax"`` and ``"histogram"``
    (with ``bins``); after construction ``kind`` is always the reducer's short name and
    ``reducer`` the reducer.
    """

    tensor: str
    kind: str | Reducer = "minmax"
    bins: int = DEFAULT_BINS  # bins of |x| over [0, amax] (histograms)
    reducer: Reducer = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        red = self.kind if isinstance(self.kind, Reducer) else self.reducer
        if red is None:
            if self.kind not in _SHORTHANDS:
                raise ValueError(f"unknown statistic kind {self.kind!r} (use a Reducer or one of {', '.join(_SHORTHANDS)})")
            red = Histogram(self.bins) if self.kind == "histogram" else MinMax()
        if isinstance(red, Histogram):
            object.__setattr__(self, "bins", red.bins)
        object.__setattr__(self, "reducer", red)
        object.__setattr__(self, "kind", red.kind)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StatRequest):
            return NotImplemented
        return (self.tensor, self.reducer) == (other.tensor, other.reducer)

    def __hash__(self) -> int:
        return hash((self.tensor, self.reducer))

    @property
    def is_range(self) -> bool:
        """A min/max or histogram request (its result is the tensor's :class:`TensorStats`)."""
        return isinstance(self.reducer, (MinMax, Histogram))


@dataclass
class TensorStats:
    """Collected statistics of one tensor."""

    min: float
    max: float
    count: int = 0
    hist: np.ndarray | None = None  # signed counts: 2·bins over [−amax, amax]

    @property
    def amax(self) -> float:
        return max(abs(self.min), abs(self.max))

    @property
    def bins(self) -> int:
        return 0 if self.hist is None else len(self.hist) // 2

    @property
    def bin_width(self) -> float:
        """Width of one bin (same for the signed and the |x| histogram)."""
        return self.amax / self.bins if self.bins else 0.0

    def abs_hist(self) -> np.ndarray:
        """Histogram of |x|: ``bins`` equal bins over ``[0, amax]`` (the signed one folded at 0)."""
        if self.hist is None:
            raise ValueError("no histogram was collected for this tensor")
        b = self.bins
        return self.hist[b:] + self.hist[:b][::-1]


class StatsMap(dict):
    """The statistics of a run: ``tensor name -> TensorStats`` (min/max and histograms), and every
    result by its request: ``stats[StatRequest(t, ChannelAbsMax(1))]``, ``stats.get(request)``,
    ``request in stats`` (min/max and histogram requests answer the tensor's TensorStats)."""

    def __init__(self, stats: Mapping[str, TensorStats] | None = None, results: Mapping[StatRequest, Any] | None = None) -> None:
        super().__init__(stats or {})
        self.results: dict[StatRequest, Any] = dict(results or {})

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, StatRequest):
            if key.is_range:
                s = dict.__getitem__(self, key.tensor)
                if key.kind == "histogram" and s.hist is None:
                    raise KeyError(key)
                return s
            return self.results[key]
        return dict.__getitem__(self, key)

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        if isinstance(key, StatRequest):
            return key in self.results if not key.is_range else self.get(key) is not None
        return dict.__contains__(self, key)


BatchSource = Callable[[], Iterable[Batch]]


def merge_requests(requests: Iterable[StatRequest]) -> dict[str, StatRequest]:
    """One min/max-or-histogram request per tensor: a histogram wins over minmax; the finest bin
    count wins. (Other reducers are not merged: see :func:`plan_requests`.)"""
    merged: dict[str, StatRequest] = {}
    for r in requests:
        if not r.is_range:
            continue
        prior = merged.get(r.tensor)
        if prior is None:
            merged[r.tensor] = r
        else:
            kind = "histogram" if "histogram" in (prior.kind, r.kind) else "minmax"
            merged[r.tensor] = StatRequest(r.tensor, kind, max(prior.bins, r.bins))
    return merged


def plan_requests(requests: Iterable[StatRequest]) -> tuple[dict[str, StatRequest], list[StatRequest]]:
    """The requests of a run as collected: merged min/max/histogram ones by tensor, then every
    other distinct request once, in first-asked order."""
    requests = list(requests)
    others: dict[StatRequest, None] = {}
    for r in requests:
        if not r.is_range:
            others.setdefault(r, None)
    return merge_requests(requests), list(others)


def _range_model(model: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """The model with ReduceMin/ReduceMax of every requested tensor as its only outputs.

    The reductions are placed right after the node producing each tensor, so ONNX Runtime can free
    an activation as soon as its regular consumers and its reductions have run: the pass holds
    one batch of the model's live activations, not every requested tensor at once.
    """
    fresh = Namer.of(model)
    reductions: list[onnx.NodeProto] = []
    outs: list[str] = []
    for i, t in enumerate(tensors):
        f = fresh(f"__onnxq_f32_{i}")
        reductions.append(helper.make_node("Cast", [t], [f], to=onnx.TensorProto.FLOAT, name=fresh(f"__onnxq_cast_{i}")))
        for op in ("ReduceMin", "ReduceMax"):
            o = fresh(f"__onnxq_{op.lower()}_{i}")
            reductions.append(helper.make_node(op, [f], [o], keepdims=0, name=o))
            outs.append(o)
    m = with_outputs(model, [(o, onnx.TensorProto.FLOAT) for o in outs])
    insert_after_producers(m.graph, reductions)
    return m, outs


def _iterate(source: BatchSource, desc: str, show: bool) -> Iterator[Batch]:
    with progress(desc, show) as bar:
        for batch in source():
            yield batch
            bar.update(batch.size)


def _check_finite(name: str, lo: float, hi: float) -> None:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError(f"tensor '{name}' takes non-finite values (NaN/Inf) on the calibration data; the model or the data is broken")


def run_batch_size(model: onnx.ModelProto, batch_size: int, memory_budget: int) -> int:
    """Largest batch (<= ``batch_size``) whose activations fit ``memory_budget`` (at least 1)."""
    from onnxq.graph.prepare import tensor_shapes

    weights = {i.name for i in model.graph.initializer}
    every = [t for t in tensor_shapes(model) if t not in weights]
    return _run_batch(sum(tensor_bytes_per_sample(model, every).values()), batch_size, memory_budget, True)


#: elements binned at a time by :func:`bincount`: the intermediate arrays stay in cache
BIN_CHUNK = 1 << 18


def bincount(x: np.ndarray, amax: float, nbins2: int) -> np.ndarray:
    """Signed histogram with ``nbins2`` equal bins over [−amax, amax] (values outside are clamped).

    Every element's bin is computed on its own (float32 arithmetic, then truncation of a
    non-negative number), so the counts do not depend on how samples were batched. The value is
    divided by ``amax`` first and only then scaled by the bin count, so no intermediate overflows
    for any finite ``amax > 0``, tiny and subnormal ranges included (a precomputed
    ``nbins2 / (2·amax)`` is infinite in float32 below ~1e-35 and turned counts negative).
    """
    x = np.asarray(x, dtype=np.float32).ravel()
    a = np.float32(amax) if np.isfinite(amax) else np.float32(0)
    if not amax > 0 or a == 0:  # a range below float32's smallest subnormal holds only zeros
        out = np.zeros(nbins2, np.int64)
        out[nbins2 // 2] = x.size
        return out
    # chunk by chunk, so the float positions and their integer copy stay in cache instead of making four passes over
    # arrays of the tensor's size in memory, and cost 1.25 MiB instead of 12 bytes per element: a tensor of 1.6M / 6.5M
    # values bins 1.4x / 1.8x faster, one under 0.5M as before (PP-OCR det by hand with mse: binning 4.0 -> 3.7 s, peak
    # RSS 1096 -> 1037 MiB); the same arithmetic per element, so the same counts
    out = np.zeros(nbins2, np.int64)
    pos_buf = np.empty(min(BIN_CHUNK, x.size), np.float32)
    idx_buf = np.empty(pos_buf.size, np.intp)
    half = np.float32(nbins2 / 2)
    for start in range(0, x.size, BIN_CHUNK):
        chunk = x[start:start + BIN_CHUNK]
        pos, idx = pos_buf[:chunk.size], idx_buf[:chunk.size]
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # |x| >> amax goes to ±inf and is clamped
            np.divide(chunk, a, out=pos)
            pos += np.float32(1)
            pos *= half
        np.clip(pos, 0, nbins2 - 1, out=pos)
        # a NaN (unreachable for finite data, checked earlier) must never become a negative index; min() carries any
        # NaN, so finite data skips the boolean mask
        if np.isnan(pos.min()):
            pos[np.isnan(pos)] = nbins2 // 2
        # np.bincount takes intp indices: truncating into an intp buffer saves it a conversion copy
        np.copyto(idx, pos, casting="unsafe")
        out += np.bincount(idx, minlength=nbins2)
    return out


def tensor_bytes_per_sample(model: onnx.ModelProto, tensors: list[str]) -> dict[str, int]:
    """Bytes of one sample of each tensor as float32 (unknown dimensions count as 64)."""
    from onnxq.graph.prepare import tensor_shapes

    shapes = tensor_shapes(model)
    out = {}
    for t in tensors:
        shape = shapes.get(t)
        n = 1
        if shape:
            for d in shape[1:]:
                n *= d if isinstance(d, int) and d > 0 else 64
        out[t] = 4 * n
    return out


# ---------------------------------------------------------------------------------------------
# the streaming passes
# ---------------------------------------------------------------------------------------------


@dataclass
class _Item:
    """One request being collected: its accumulator and how many samples it has read."""

    request: StatRequest
    acc: Any
    seen: int = 0

    @property
    def reducer(self) -> Reducer:
        return self.request.reducer

    def wants(self) -> int | None:
        """Samples still wanted (None: all that come)."""
        lim = self.reducer.limit
        return None if lim is None else max(lim - self.seen, 0)


def _run_batch(per_sample: int, batch_size: int, memory_budget: int, dynamic: bool) -> int:
    """Samples per run when ``per_sample`` bytes are exposed per sample: the data's batch, cut to fit ``memory_budget``
    where the model's batch axis is dynamic (at least one)."""
    return max(1, min(batch_size, memory_budget // max(per_sample, 1))) if dynamic else batch_size


def _groups(model: onnx.ModelProto, items: list[_Item], batch_size: int, memory_budget: int, dynamic: bool) -> tuple[int, list[list[_Item]]]:
    """The run batch and the groups (one pass each) of tensor-reading items under ``memory_budget``.

    Within the budget the run's batch shrinks first (one pass over the data); only when a single
    sample of every exposed tensor does not fit are the tensors split into groups. Items reading
    the same tensor share its cost and its group.
    """
    tensors = list(dict.fromkeys(i.request.tensor for i in items))
    raw = tensor_bytes_per_sample(model, tensors)
    sizes = {t: max(i.reducer.bytes_per_sample(raw[t]) for i in items if i.request.tensor == t) for t in tensors}
    run_batch = _run_batch(sum(sizes.values()), batch_size, memory_budget, dynamic)
    groups: list[list[str]] = [[]]
    used = 0
    for t in tensors:
        cost = sizes[t] * run_batch
        if groups[-1] and used + cost > memory_budget:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += cost
    return run_batch, [[i for i in items if i.request.tensor in set(g)] for g in groups]


def _parts(batch: Batch, run_batch: int | None, cuts: Iterable[int]) -> Iterator[tuple[int, Batch]]:
    """(offset, sub-batch) views of ``batch``: at most ``run_batch`` samples (None: no limit), with
    a boundary at every position in ``cuts`` so no sub-batch straddles a request's sample limit."""
    n = batch.size if batch.feeds else 0
    bounds = sorted({0, n} | {c for c in cuts if 0 < c < n})
    if len(bounds) == 2 and (run_batch is None or n <= run_batch):
        yield 0, batch
        return
    for lo, hi in zip(bounds, bounds[1:]):
        step = run_batch or (hi - lo)
        for s in range(lo, hi, step):
            e = min(s + step, hi)
            yield s, Batch(batch.rows(s, e).feeds, None, batch.source)


def _run_pass(model: onnx.ModelProto, source: BatchSource, desc: str, show: bool, run_batch: int | None, optimization: str,
              ranges: list[str], items: list[_Item], stats: Mapping[str, TensorStats],
              expose_ranges: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """One pass over the data: min/max of ``ranges`` and every item's reducer, in one ONNX Runtime session.

    The minima and maxima are ReduceMin/ReduceMax nodes in the graph, or with ``expose_ranges`` numpy's of the
    tensors made outputs (:func:`_collect` says when). Returns the minima, maxima and number of runs (for ``ranges``)."""
    takers = [i for i in items if isinstance(i.reducer, InputSamples)]
    ort_items = [i for i in items if not isinstance(i.reducer, InputSamples)]
    lo = np.full(len(ranges), np.inf)
    hi = np.full(len(ranges), -np.inf)
    count = 0
    sess = None
    out_of: dict[int, str] = {}
    range_outs: list[str] = []
    if ranges or ort_items:
        if expose_ranges:
            types = tensor_types(model)
            aug, range_outs = with_outputs(model, [(t, types.get(t, onnx.TensorProto.FLOAT)) for t in ranges]), list(ranges)
        else:
            aug, range_outs = _range_model(model, ranges)
        in_graph: dict[Reducer, list[_Item]] = {}
        for i in ort_items:
            if i.reducer.in_graph:
                in_graph.setdefault(i.reducer, []).append(i)
        for red, its in in_graph.items():
            aug, outs = red.add_to_graph(aug, [i.request.tensor for i in its])
            out_of.update({id(i): o for i, o in zip(its, outs)})
        raw = [i for i in ort_items if not i.reducer.in_graph]
        if raw:
            types = tensor_types(model)
            reduced = [(o.name, onnx.TensorProto.FLOAT) for o in aug.graph.output]
            exposed = list(dict.fromkeys(i.request.tensor for i in raw))
            aug = with_outputs(aug, reduced + [(t, types.get(t, onnx.TensorProto.FLOAT)) for t in exposed])
            out_of.update({id(i): i.request.tensor for i in raw})
        sess = ort_backend.make_session(aug, optimization, arena=False)

    def finished() -> bool:
        return not ranges and all(i.wants() == 0 for i in items)

    if finished():
        return lo, hi, count
    for batch in _iterate(source, desc, show):
        for i in takers:
            if i.wants():
                i.seen += i.reducer.take(i.acc, batch, i.seen)
        if sess is not None:
            cuts = [w for i in ort_items if (w := i.wants())]
            for offset, part in _parts(batch, run_batch, cuts):
                active = [i for i in ort_items if i.wants() is None or i.wants() > 0]  # type: ignore[operator]
                if not active and not ranges:
                    break
                names = list(dict.fromkeys(range_outs + [out_of[id(i)] for i in active]))
                res = dict(zip(names, ort_backend.run(sess, part.feeds, names)))
                if ranges:
                    if expose_ranges:
                        mins, maxs = np.array([_extremes(res[t]) for t in range_outs]).T
                    else:
                        mins = np.array([float(res[o]) for o in range_outs[0::2]])
                        maxs = np.array([float(res[o]) for o in range_outs[1::2]])
                    if np.isnan(mins).any() or np.isnan(maxs).any():
                        bad = ranges[int(np.flatnonzero(np.isnan(mins) | np.isnan(maxs))[0])]
                        raise DataError(f"tensor '{bad}' takes NaN values on the calibration data ({batch.source}); the model or the data is broken")
                    lo = np.minimum(lo, mins)
                    hi = np.maximum(hi, maxs)
                    count += 1
                n = part.size
                for i in active:
                    i.acc = i.reducer.update(i.acc, res[out_of[id(i)]], stats.get(i.request.tensor))
                    i.seen += n
                del res
        if finished():
            break
    return lo, hi, count


def _extremes(x: np.ndarray) -> tuple[float, float]:
    """Min and max of ``x`` as float32 values, what ReduceMin/ReduceMax after a Cast to float give (an empty tensor
    leaves the range as it is)."""
    if x.size == 0:
        return np.inf, -np.inf
    return float(np.float32(np.min(x))), float(np.float32(np.max(x)))


def _exposure_batch(model: onnx.ModelProto, tensors: list[str], batch_size: int, memory_budget: int, dynamic: bool) -> int | None:
    """The run batch at which every one of ``tensors`` can be an output at once within ``memory_budget``, as
    :func:`_groups` sizes it (None: not even one sample of them fits)."""
    per_sample = sum(tensor_bytes_per_sample(model, tensors).values())
    run = _run_batch(per_sample, batch_size, memory_budget, dynamic)
    return run if per_sample * run <= memory_budget else None


def _collect(model: onnx.ModelProto, ranges: dict[str, StatRequest], others: list[StatRequest], source: BatchSource, batch_size: int,
             memory_budget: int, show_progress: bool, optimization: str, expose_ranges: bool | None = None) -> StatsMap:
    from onnxq.calib.feeds import batch_is_dynamic, model_inputs

    dynamic = batch_is_dynamic(model_inputs(model))
    items = [_Item(r, r.reducer.start()) for r in others]
    hist_items = [_Item(r, r.reducer.start()) for r in ranges.values() if r.kind == "histogram"]
    range_tensors = list(ranges) + [t for t in dict.fromkeys(i.request.tensor for i in items if i.reducer.needs_range) if t not in ranges]
    first_raw = [i for i in items if not i.reducer.needs_range and not i.reducer.in_graph and not isinstance(i.reducer, InputSamples)]
    second = hist_items + [i for i in items if i.reducer.needs_range]
    first = [i for i in items if i.reducer.in_graph or isinstance(i.reducer, InputSamples)]
    run_batch = run_batch_size(model, batch_size, memory_budget) if dynamic else None
    extra: list[list[_Item]] = []
    raw_batch = batch_size
    if first_raw:
        raw_batch, groups = _groups(model, first_raw, batch_size, memory_budget, dynamic)
        first += groups[0]
        extra = groups[1:]
        if dynamic:
            run_batch = min(run_batch or raw_batch, raw_batch)
    # In-graph ReduceMin/ReduceMax hold no activation past its consumers, but without ONNX Runtime's arena (off in these
    # passes, for their peak) they made the round cost several times the model (PP-OCR det, 253 tensors, 32 pages: 10.3 s,
    # the bare model 2.7 s, the tensors exposed and reduced by numpy 3.8 s; docs/architecture.md). Where a histogram
    # round follows that exposes the range tensors anyway (or the caller says one does), and nothing else is exposed
    # now, the range round exposes them too when they fit the memory budget at once: the same values, the same bound on
    # memory, a third of the time. A min/max-only pass keeps the reductions and its lower peak.
    if expose_ranges is None:
        expose_ranges = bool(second) and set(range_tensors) <= {i.request.tensor for i in second}
    expose = False
    if range_tensors and expose_ranges and not first_raw:
        batch = _exposure_batch(model, range_tensors, batch_size, memory_budget, dynamic)
        if batch is not None:
            expose = True
            run_batch = batch if dynamic else run_batch
    stats = StatsMap()
    desc = "calibration: ranges" if range_tensors else "calibration: statistics"
    lo, hi, count = _run_pass(model, source, desc, show_progress, run_batch, optimization, range_tensors, first, stats, expose)
    if range_tensors:
        if count == 0:
            raise DataError("the calibration data is empty")
        empty = []
        for k, t in enumerate(range_tensors):
            if lo[k] > hi[k]:  # no element on any batch (the +inf/-inf a range starts from): nothing to range, taken as 0
                empty.append(t)
                lo[k] = hi[k] = 0.0
            _check_finite(t, lo[k], hi[k])
            stats[t] = TensorStats(float(lo[k]), float(hi[k]), count)
        if empty:
            # a decoder's cache is empty at its first step: a graph input that is so on every sample is left float with what
            # is computed from it alone, as a constant input is (pipeline.stages.leave_constant_inputs_float)
            log.warning("%d tensor(s) held no element on any calibration batch ('%s'%s: a decoder's cache at its first step?); "
                        "taken as 0: calibrate with steps where they hold values", len(empty), empty[0], ", ..." if len(empty) > 1 else "")
    for gi, group in enumerate(extra):
        _run_pass(model, source, f"calibration: statistics ({gi + 2}/{len(extra) + 1})", show_progress, raw_batch if dynamic else None,
                  optimization, [], group, stats)
    if second:
        run2, groups2 = _groups(model, second, batch_size, memory_budget, dynamic)
        for gi, group in enumerate(groups2):
            desc = "calibration: histograms" + (f" ({gi + 1}/{len(groups2)})" if len(groups2) > 1 else "")
            _run_pass(model, source, desc, show_progress, run2 if dynamic else None, optimization, [], group, stats)
    for i in hist_items:
        stats[i.request.tensor].hist = i.reducer.finish(i.acc)
    for i in items:
        stats.results[i.request] = i.reducer.finish(i.acc)
    for t in [t for t in stats if t not in ranges]:  # ranges only a range-needing reducer asked for stay internal
        dict.__delitem__(stats, t)
    return stats


def collect(model: onnx.ModelProto, requests: Iterable[StatRequest], source: BatchSource, *, batch_size: int = 16,
            cache_dir: str | os.PathLike[str] | None = None, data_fingerprint: str | None = None,
            memory_budget: int = 512 * 2**20, show_progress: bool = True, optimization: str = "basic",
            expose_ranges: bool | None = None) -> StatsMap:
    """Collect every requested statistic in as few passes as the memory budget allows, cacheable
    ones from the on-disk cache when possible.

    The cache is never trusted blindly: its key hashes the model's content (graph and weights'
    bytes), the data's fingerprint, the requests and the onnxq version; an entry that does not
    match the requests (tensors, histogram bins, finite ranges) is discarded with a warning, and a
    cache that cannot be read or written is a warning, never the end of the run.

    ``optimization`` is the ONNX Runtime graph optimization level of the passes' sessions
    (``"disable"`` keeps every tensor exactly as the graph computes it, before fusions). ``expose_ranges``: whether the
    min/max round may make its tensors outputs and reduce them in numpy, within ``memory_budget`` (None: where a
    histogram round of this call exposes them anyway; True: the caller runs one in another call)."""
    ranges, others = plan_requests(requests)
    if not ranges and not others:
        return StatsMap()
    key = None
    cacheable = [r for r in others if r.reducer.cacheable]
    if cache_dir is not None and data_fingerprint is not None and (ranges or cacheable):
        key = cache_key(model, [*ranges.values(), *cacheable], data_fingerprint)
        cached = load_cache(Path(cache_dir), key, cacheable, expect=ranges)
        if cached is not None and set(cached) >= set(ranges) and all(r in cached.results for r in cacheable):
            log.info("statistics loaded from cache %s", key[:12])
            rest = [r for r in others if not r.reducer.cacheable]
            if rest:
                cached.results.update(_collect(model, {}, rest, source, batch_size, memory_budget, show_progress, optimization).results)
            return cached
    executor = current_executor()
    if executor.shards > 1 and ranges:  # --executor ray: ranges and histograms by shards of the batches, merged exactly
        from onnxq.calib.sharded import collect_ranges

        stats = collect_ranges(model, ranges, source, executor, batch_size=batch_size, memory_budget=memory_budget, optimization=optimization)
        if others:
            stats.results.update(_collect(model, {}, others, source, batch_size, memory_budget, show_progress, optimization).results)
    else:
        stats = _collect(model, ranges, others, source, batch_size, memory_budget, show_progress, optimization, expose_ranges)
    if key is not None:
        save_cache(Path(cache_dir), key, stats)  # type: ignore[arg-type]
    return stats


def _onnxq_version() -> str:
    try:
        from importlib.metadata import version

        return version("onnxq")
    except Exception:  # not installed as a distribution (a bare checkout): the key still hashes the code's format tag
        return "unknown"


def _hash_tensor(h: Any, t: onnx.TensorProto) -> None:
    """Feed one tensor's identity and bytes to ``h`` without serializing the whole model."""
    h.update(f"{t.name}|{t.data_type}|{list(t.dims)}|".encode())
    if t.HasField("raw_data"):
        h.update(t.raw_data)
    elif t.data_location == onnx.TensorProto.EXTERNAL:
        # weights left on disk (models over 2 GB): their bytes, streamed from the data file, never
        # their location (two fine-tunes saved alike would share a key)
        for chunk in external_chunks(t):
            h.update(chunk)
    else:
        h.update(t.SerializeToString(deterministic=True))


def model_digest(model: onnx.ModelProto) -> str:
    """SHA-256 of what the model computes: opsets, inputs/outputs, nodes (subgraphs included) and
    every initializer's bytes, hashed one tensor at a time (never the whole model serialized at
    once, and never a name such as ``graph.name`` that every exporter sets alike)."""
    h = hashlib.sha256(b"onnxq-model-v2|")
    h.update(f"ir{model.ir_version}|".encode())
    for o in model.opset_import:
        h.update(o.SerializeToString(deterministic=True))
    g = model.graph
    for field_ in (g.input, g.output, g.node, g.sparse_initializer):
        h.update(f"|{len(field_)}|".encode())
        for item in field_:
            h.update(item.SerializeToString(deterministic=True))
    h.update(f"|init{len(g.initializer)}|".encode())
    for t in g.initializer:
        _hash_tensor(h, t)
    return h.hexdigest()


def cache_key(model: onnx.ModelProto, requests: Mapping[str, StatRequest] | Iterable[StatRequest], data_fingerprint: str) -> str:
    """Hash of the model's content, the data, the requests with their kinds and the onnxq version
    (not the batch size: results don't depend on it)."""
    h = hashlib.sha256()
    h.update(model_digest(model).encode())
    h.update(data_fingerprint.encode())
    reqs = list(requests.values() if isinstance(requests, Mapping) else requests)
    h.update(json.dumps(sorted((r.tensor, r.kind, r.bins) for r in reqs if r.is_range)).encode())
    rest = sorted(json.dumps([r.tensor, r.kind, r.reducer.token()]) for r in reqs if not r.is_range)
    if rest:
        h.update(json.dumps(rest).encode())
    h.update(f"onnxq-stats-v2|{_onnxq_version()}".encode())
    return h.hexdigest()


def save_cache(folder: Path, key: str, stats: StatsMap) -> bool:
    """Store the tensor statistics and the cacheable request results under ``key`` (atomically).

    A cache that cannot be written (unwritable folder, full disk) is a warning: the statistics
    were computed and the run goes on. Returns whether the entry was written."""
    arrays: dict[str, np.ndarray] = {"__names__": np.array(list(stats), dtype=object).astype(str)}
    for i, s in enumerate(stats.values()):
        arrays[f"r{i}"] = np.array([s.min, s.max, s.count], np.float64)
        if s.hist is not None:
            arrays[f"h{i}"] = s.hist
    extra = [(r, v) for r, v in getattr(stats, "results", {}).items() if r.reducer.cacheable]
    if extra:
        arrays["__results__"] = np.array([json.dumps([r.tensor, r.kind, r.reducer.token()]) for r, _ in extra])
        for i, (_, v) in enumerate(extra):
            arrays[f"x{i}"] = np.asarray(v)
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, folder / f"{key}.npz")
        tmp = None
        return True
    except OSError as exc:
        log.warning("cannot write the statistics cache in '%s' (%s); continuing without it (--no-cache skips it)",
                    folder, exc.strerror or exc)
        return False
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


class _BadEntry(Exception):
    """A cache entry that does not hold what its key promises."""


def _check_stats(name: str, s: TensorStats, want: StatRequest | None) -> None:
    if not (np.isfinite(s.min) and np.isfinite(s.max)) or s.min > s.max:
        raise _BadEntry(f"tensor '{name}' has an invalid range [{s.min}, {s.max}]")
    if s.count < 1:
        raise _BadEntry(f"tensor '{name}' has a sample count of {s.count}")
    if s.hist is not None:
        h = s.hist
        if h.ndim != 1 or h.dtype.kind not in "iu" or (h.size and h.min() < 0):
            raise _BadEntry(f"tensor '{name}' has a malformed histogram ({h.dtype}, shape {h.shape})")
    if want is not None and want.kind == "histogram":
        if s.hist is None:
            raise _BadEntry(f"tensor '{name}' has no histogram")
        if len(s.hist) != 2 * want.bins:
            raise _BadEntry(f"tensor '{name}' has a histogram of {len(s.hist) // 2} bins where {want.bins} were asked for")


def load_cache(folder: Path, key: str, requests: Iterable[StatRequest] = (),
               expect: Mapping[str, StatRequest] | None = None) -> StatsMap | None:
    """The statistics stored under ``key``, with the results of those ``requests`` that were stored.

    The entry is validated (finite, ordered ranges, positive counts, non-negative integer
    histograms with the bins ``expect`` asks for, every expected tensor present, finite numeric
    results); a malformed or unreadable entry is discarded with a warning (None: recompute)."""
    path = folder / f"{key}.npz"
    try:
        if not path.is_file():
            return None
    except OSError:
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [str(n) for n in z["__names__"]]
            out = StatsMap()
            for i, n in enumerate(names):
                r = np.asarray(z[f"r{i}"], dtype=np.float64)
                if r.shape != (3,):
                    raise _BadEntry(f"tensor '{n}' has a range record of shape {r.shape}")
                count = int(r[2]) if np.isfinite(r[2]) else 0
                hist = z[f"h{i}"] if f"h{i}" in z.files else None
                out[n] = TensorStats(float(r[0]), float(r[1]), count, hist)
                _check_stats(n, out[n], (expect or {}).get(n))
            missing = [t for t in (expect or {}) if t not in out]
            if missing:
                raise _BadEntry(f"tensor '{missing[0]}' is missing")
            if "__results__" in z.files:
                by_token = {json.dumps([r.tensor, r.kind, r.reducer.token()]): r for r in requests}
                for i, tok in enumerate(z["__results__"]):
                    if str(tok) in by_token:
                        v = z[f"x{i}"]
                        if v.dtype.kind not in "biuf" or (v.dtype.kind == "f" and not np.isfinite(v).all()):
                            raise _BadEntry(f"the result {tok} is not finite numbers")
                        out.results[by_token[str(tok)]] = v
            return out
    except _BadEntry as exc:
        log.warning("ignoring the statistics cache entry %s: %s; recomputing", path.name, exc)
        return None
    except Exception as exc:  # a corrupt or unreadable entry is ignored and rewritten
        log.warning("ignoring unreadable statistics cache entry %s (%s: %s); recomputing", path.name, type(exc).__name__, exc)
        return None
