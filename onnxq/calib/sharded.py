"""The statistics pass split by calibration batches over an executor, merged exactly.

With more than one shard (``--executor ray``, or ``local:N``), :func:`onnxq.calib.statistics.collect`
hands its min/max and histogram requests here. The calibration batches are dealt round-robin into
shards and each shard is collected on its own (``onnxq.runtime.executor``: a Ray task per shard),
in two rounds, as the serial pass does in two passes:

1. min/max: every shard's min, max and run count; merged with min, max and a sum;
2. histograms, only if asked for: every shard bins its tensors over the *merged* range
   (:class:`RangedHistogram`); the integer counts are summed.

Every element's bin depends only on its value and the range (``statistics.bincount``), and each
batch is split into runs the same way wherever it is collected, so the merged results equal the
serial ones bit for bit, whatever the number of shards. What travels: the model's bytes once (a
model over 2 GB is a graph with references to its data files, which every worker must be able to
read at the same path), and each shard's batches once, reused by both rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx

from onnxq.calib.readers import Batch
from onnxq.calib.statistics import (
    DEFAULT_BINS,
    BatchSource,
    Reducer,
    StatRequest,
    StatsMap,
    TensorStats,
    bincount,
    collect,
    plan_requests,
)
from onnxq.errors import DataError
from onnxq.runtime.executor import Executor, SerialExecutor, split, using

__all__ = ["RangedHistogram", "collect_groups", "collect_ranges", "collect_unions"]


@dataclass(frozen=True)
class RangedHistogram(Reducer):
    """Signed histogram of ``2·bins`` equal bins over ``[−amax, amax]``, with ``amax`` given in advance
    (the merged range of every shard) instead of taken from this pass's own min/max."""

    amax: float = 0.0
    bins: int = DEFAULT_BINS
    kind: ClassVar[str] = "ranged-histogram"

    def start(self) -> np.ndarray:
        return np.zeros(2 * self.bins, np.int64)

    def update(self, acc: np.ndarray, values: np.ndarray, stats: TensorStats | None) -> np.ndarray:
        acc += bincount(values, self.amax, len(acc))
        return acc


def _shard(model_bytes: bytes, feeds: list[dict[str, np.ndarray]], requests: list[StatRequest], batch_size: int,
           memory_budget: int, optimization: str, expose_ranges: bool | None = None) -> StatsMap:
    """One shard's statistics (a Ray task, or a call here): the serial pass over its batches."""
    model = onnx.load_from_string(model_bytes)
    batches = [Batch(dict(f), None, f"shard batch {i}") for i, f in enumerate(feeds)]
    with using(SerialExecutor()):  # a shard never splits again
        return collect(model, requests, lambda: iter(batches), batch_size=batch_size, memory_budget=memory_budget,
                       show_progress=False, optimization=optimization, expose_ranges=expose_ranges)


def collect_ranges(model: onnx.ModelProto, ranges: dict[str, StatRequest], source: BatchSource, executor: Executor, *,
                   batch_size: int = 16, memory_budget: int = 512 * 2**20, optimization: str = "basic") -> StatsMap:
    """Min/max (and histograms where asked) of ``ranges``' tensors, collected by shards of the batches
    on ``executor`` and merged exactly: equal to :func:`~onnxq.calib.statistics.collect`'s results."""
    batches = [b.feeds for b in source()]
    if not batches:
        raise DataError("the calibration data is empty")
    merged, _ = _two_rounds(model, ranges, split(batches, executor.shards), executor, batch_size, memory_budget, optimization, own_grids=())
    return merged[0]


def collect_groups(model: onnx.ModelProto, requests: list[StatRequest], groups: Sequence[Sequence[Batch]], executor: Executor | None = None, *,
                   batch_size: int = 16, memory_budget: int = 512 * 2**20, optimization: str = "basic") -> tuple[StatsMap, list[StatsMap]]:
    """The statistics of every batch of ``groups`` together, and each group's own min/max and histograms, in one pass.

    The first result equals :func:`~onnxq.calib.statistics.collect` over the groups' batches in order, bit for bit
    (each group is a shard). Each group's :class:`TensorStats` has its own min, max and count, and its histogram
    is counted on its own range in the same pass: both equal a pass over those batches alone, and ``-p auto`` gets the
    statistics of its disjoint calibration subsets from the pool's pass instead of one more pass per subset. Other
    requests (samples, per-channel reducers) are collected for the merged result only."""
    merged, per_group = collect_unions(model, requests, groups, [range(len(groups))], executor, batch_size=batch_size,
                                       memory_budget=memory_budget, optimization=optimization)
    return merged[0], per_group


def collect_unions(model: onnx.ModelProto, requests: list[StatRequest], groups: Sequence[Sequence[Batch]],
                   unions: Sequence[Sequence[int]], executor: Executor | None = None, *, batch_size: int = 16,
                   memory_budget: int = 512 * 2**20, optimization: str = "basic",
                   own: Sequence[int] | None = None) -> tuple[list[StatsMap], list[StatsMap]]:
    """:func:`collect_groups` for several unions of the groups at once: the statistics of each union (a list of group
    indices), each equal to a pass over that union's batches in group order, bit for bit, and each group's own.

    The model runs over every batch once. Where two unions' ranges differ, each batch is binned once more, on the other
    union's grid: ``-p auto`` gets its calibration pool's statistics and those of the pool with its held-out samples
    (the refit on every sample) from one pass. Other requests (samples, per-channel reducers) cost one pass per union.
    ``own`` (default: every group) lists the groups whose own histograms are wanted; the others keep their own min, max
    and count only, and their batches are not binned on their own grids (``-p auto`` resamples on its subsets, not on
    its held-out group: on PP-OCR det, 7 % of the values its pool pass bins)."""
    ranges, others = plan_requests(requests)
    parts = [[b.feeds for b in g] for g in groups]
    if not parts or not any(parts):
        raise DataError("the calibration data is empty")
    if any(not part for part in parts):
        raise DataError("a calibration group is empty")
    if not unions or any(not u for u in unions) or any(not 0 <= k < len(parts) for u in unions for k in u):
        raise ValueError(f"unions must be non-empty lists of group indices below {len(parts)}")
    executor = executor or SerialExecutor()
    if own is not None and any(not 0 <= k < len(parts) for k in own):
        raise ValueError(f"own must list group indices below {len(parts)}")
    merged, per_group = _two_rounds(model, ranges, parts, executor, batch_size, memory_budget, optimization,
                                    own_grids=range(len(parts)) if own is None else own, unions=[list(u) for u in unions])
    if others:
        for u, stats in zip(unions, merged):
            every = [b for k in u for b in groups[k]]
            stats.results.update(collect(model, others, lambda every=every: iter(every), batch_size=batch_size,
                                         memory_budget=memory_budget, show_progress=False, optimization=optimization).results)
    return merged, per_group


def _two_rounds(model: onnx.ModelProto, ranges: dict[str, StatRequest], parts: list[list[dict[str, np.ndarray]]], executor: Executor,
                batch_size: int, memory_budget: int, optimization: str, own_grids: Sequence[int],
                unions: list[list[int]] | None = None) -> tuple[list[StatsMap], list[StatsMap]]:
    """Min/max of every part, merged per union of parts (default: one union of all); then histograms of every part
    over each of its unions' merged ranges, summed per union, and of the parts in ``own_grids`` over their own range too.
    Returns each union's statistics and each part's own (histograms only for ``own_grids``), each equal to a pass
    over those batches alone."""
    unions = unions if unions is not None else [list(range(len(parts)))]
    shared_model = executor.share(model.SerializeToString())  # a lazy model: the graph only
    shards = [executor.share(part) for part in parts]

    def each(requests: list[list[StatRequest]], expose: bool | None = None) -> list[StatsMap]:
        return executor.map(_shard, [(shared_model, part, reqs, batch_size, memory_budget, optimization, expose)
                                     for part, reqs in zip(shards, requests)])

    tensors = list(ranges)
    hist = [t for t in tensors if ranges[t].kind == "histogram"]
    # the histogram round exposes these tensors in the second call: the min/max round may expose them too (collect())
    firsts = each([[StatRequest(t, "minmax") for t in tensors]] * len(shards), expose=bool(hist))
    merged = [StatsMap() for _ in unions]
    for u, stats in zip(unions, merged):
        for t in tensors:
            got = [firsts[k][t] for k in u]
            stats[t] = TensorStats(min(p.min for p in got), max(p.max for p in got), sum(p.count for p in got))
    own = [StatsMap({t: TensorStats(f[t].min, f[t].max, f[t].count) for t in tensors}) for f in firsts]
    if hist:
        def grid(t: str, amax: float) -> StatRequest:
            return StatRequest(t, RangedHistogram(amax, ranges[t].bins))

        # every part bins its values on the grid of each union it belongs to and, with own_grids, on its own range, so
        # that each result is the histogram a pass over those batches alone would count, not an approximation from
        # another grid (equal grids are one request; the shards of collect_ranges only merge: they skip their own)
        wanted: list[dict[StatRequest, None]] = [{} for _ in parts]
        for u, stats in zip(unions, merged):
            for k in u:
                wanted[k].update((grid(t, stats[t].amax), None) for t in hist)
        for k in own_grids:
            wanted[k].update((grid(t, own[k][t].amax), None) for t in hist)
        seconds = each([list(w) for w in wanted])
        for u, stats in zip(unions, merged):
            for t in hist:
                counts: Any = np.zeros(2 * ranges[t].bins, np.int64)
                for k in u:
                    counts += seconds[k][grid(t, stats[t].amax)]
                stats[t].hist = counts
        for k in own_grids:
            for t in hist:
                own[k][t].hist = seconds[k][grid(t, own[k][t].amax)].copy()
    return merged, own
