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
)
from onnxq.errors import DataError
from onnxq.runtime.executor import Executor, SerialExecutor, split, using

__all__ = ["RangedHistogram", "collect_ranges"]


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
           memory_budget: int, optimization: str) -> StatsMap:
    """One shard's statistics (a Ray task, or a call here): the serial pass over its batches."""
    model = onnx.load_from_string(model_bytes)
    batches = [Batch(dict(f), None, f"shard batch {i}") for i, f in enumerate(feeds)]
    with using(SerialExecutor()):  # a shard never splits again
        return collect(model, requests, lambda: iter(batches), batch_size=batch_size, memory_budget=memory_budget,
                       show_progress=False, optimization=optimization)


def collect_ranges(model: onnx.ModelProto, ranges: dict[str, StatRequest], source: BatchSource, executor: Executor, *,
                   batch_size: int = 16, memory_budget: int = 512 * 2**20, optimization: str = "basic") -> StatsMap:
    """Min/max (and histograms where asked) of ``ranges``' tensors, collected by shards of the batches
    on ``executor`` and merged exactly: equal to :func:`~onnxq.calib.statistics.collect`'s results."""
    batches = [b.feeds for b in source()]
    if not batches:
        raise DataError("the calibration data is empty")
    shared_model = executor.share(model.SerializeToString())  # a lazy model: the graph only
    shards = [executor.share(part) for part in split(batches, executor.shards)]
    del batches

    def each(requests: list[StatRequest]) -> list[StatsMap]:
        return executor.map(_shard, [(shared_model, part, requests, batch_size, memory_budget, optimization) for part in shards])

    tensors = list(ranges)
    firsts = each([StatRequest(t, "minmax") for t in tensors])
    stats = StatsMap()
    for t in tensors:
        parts = [f[t] for f in firsts]
        stats[t] = TensorStats(min(p.min for p in parts), max(p.max for p in parts), sum(p.count for p in parts))
    hist = [t for t in tensors if ranges[t].kind == "histogram"]
    if hist:
        requests = [StatRequest(t, RangedHistogram(stats[t].amax, ranges[t].bins)) for t in hist]
        seconds = each(requests)
        for t, r in zip(hist, requests):
            counts: Any = np.zeros(2 * r.reducer.bins, np.int64)  # type: ignore[attr-defined]
            for s in seconds:
                counts += s[r]
            stats[t].hist = counts
    return stats
