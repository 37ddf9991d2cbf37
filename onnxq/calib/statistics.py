"""Streaming calibration statistics with ONNX Runtime (bounded memory, batch-size independent).

Methods *declare* what they need (:class:`StatRequest`); the host merges the requests and runs:

1. a range pass: ReduceMin/ReduceMax nodes are appended for every requested tensor, so only two
   scalars per tensor and batch leave ONNX Runtime;
2. only if a histogram was requested, a histogram pass with the tensors themselves exposed as
   outputs. Each batch is binned into a histogram whose range was fixed by pass 1 and dropped at
   once. Memory is O(tensors × bins) plus one batch of activations, never O(samples); tensors are
   split into groups (extra passes) when one batch of all of them would exceed ``memory_budget``.

Histograms are signed, ``2·bins`` equal bins over ``[−amax, amax]``, counted per element with the
same arithmetic whatever the batching, so results are identical for any batch size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import helper

from onnxq.runtime import ort as ort_backend
from onnxq.calib.progress import progress
from onnxq.calib.readers import Batch
from onnxq.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_BINS = 2048


@dataclass(frozen=True)
class StatRequest:
    """A statistic a method needs for one tensor."""

    tensor: str
    kind: Literal["minmax", "histogram"] = "minmax"
    bins: int = DEFAULT_BINS  # bins of |x| over [0, amax]


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


StatsMap = dict[str, TensorStats]
BatchSource = Callable[[], Iterable[Batch]]


def merge_requests(requests: Iterable[StatRequest]) -> dict[str, StatRequest]:
    """One request per tensor: a histogram wins over minmax; the finest bin count wins."""
    merged: dict[str, StatRequest] = {}
    for r in requests:
        prior = merged.get(r.tensor)
        if prior is None:
            merged[r.tensor] = r
        else:
            kind = "histogram" if "histogram" in (prior.kind, r.kind) else "minmax"
            merged[r.tensor] = StatRequest(r.tensor, kind, max(prior.bins, r.bins))  # type: ignore[arg-type]
    return merged


def _with_outputs(model: onnx.ModelProto, outputs: list[tuple[str, int]], extra_nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.node.extend(extra_nodes)
    del m.graph.output[:]
    for name, elem in outputs:
        m.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    return m


def _range_model(model: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """The model with ReduceMin/ReduceMax of every requested tensor as its only outputs.

    The reductions are placed right after the node producing each tensor, so ONNX Runtime can free
    an activation as soon as its regular consumers and its reductions have run: the pass holds
    one batch of the model's live activations, not every requested tensor at once.
    """
    reductions: dict[str, list[onnx.NodeProto]] = {}
    outs: list[tuple[str, int]] = []
    for i, t in enumerate(tensors):
        f = f"__onnxq_f32_{i}"
        nodes = [helper.make_node("Cast", [t], [f], to=onnx.TensorProto.FLOAT, name=f"__onnxq_cast_{i}")]
        for op in ("ReduceMin", "ReduceMax"):
            o = f"__onnxq_{op.lower()}_{i}"
            nodes.append(helper.make_node(op, [f], [o], keepdims=0, name=o))
            outs.append((o, onnx.TensorProto.FLOAT))
        reductions[t] = nodes
    m = onnx.ModelProto()
    m.CopyFrom(model)
    ordered: list[onnx.NodeProto] = []
    for name in list(reductions):
        if name not in {o for n in model.graph.node for o in n.output}:
            ordered += reductions.pop(name)  # graph inputs (and initializers) first
    for node in model.graph.node:
        ordered.append(node)
        for o in node.output:
            ordered += reductions.pop(o, [])
    del m.graph.node[:]
    m.graph.node.extend(ordered)
    del m.graph.output[:]
    for name, elem in outs:
        m.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    return m, [o for o, _ in outs]


def _tensor_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    from onnxq.graph.prepare import tensor_types

    return tensor_types(model)


def _iterate(source: BatchSource, desc: str, show: bool) -> Iterator[Batch]:
    with progress(desc, show) as bar:
        for batch in source():
            yield batch
            bar.update(next(iter(batch.feeds.values())).shape[0] if batch.feeds else 1)


def _check_finite(name: str, lo: float, hi: float) -> None:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError(f"tensor '{name}' takes non-finite values (NaN/Inf) on the calibration data; the model or the data is broken")


def run_batch_size(model: onnx.ModelProto, batch_size: int, memory_budget: int) -> int:
    """Largest batch (<= ``batch_size``) whose activations fit ``memory_budget`` (at least 1)."""
    from onnxq.graph.prepare import tensor_shapes

    every = [t for t in tensor_shapes(model) if t not in {i.name for i in model.graph.initializer}]
    per_sample = sum(_tensor_bytes_per_sample(model, every).values())
    return max(1, min(batch_size, memory_budget // max(per_sample, 1)))


def collect_ranges(model: onnx.ModelProto, tensors: list[str], source: BatchSource, show_progress: bool = True,
                   run_batch: int | None = None) -> StatsMap:
    """Pass 1: global min and max of every tensor (runs in sub-batches of ``run_batch``)."""
    aug, outs = _range_model(model, tensors)
    sess = ort_backend.make_session(aug, "basic", arena=False)
    lo = np.full(len(tensors), np.inf)
    hi = np.full(len(tensors), -np.inf)
    count = 0
    parts = (p for whole in _iterate(source, "calibration: ranges", show_progress) for p in (_split(whole, run_batch) if run_batch else (whole,)))
    for batch in parts:
        res = ort_backend.run(sess, batch.feeds, outs)
        mins = np.array([float(r) for r in res[0::2]])
        maxs = np.array([float(r) for r in res[1::2]])
        if np.isnan(mins).any() or np.isnan(maxs).any():
            bad = tensors[int(np.flatnonzero(np.isnan(mins) | np.isnan(maxs))[0])]
            raise DataError(f"tensor '{bad}' takes NaN values on the calibration data ({batch.source}); the model or the data is broken")
        lo = np.minimum(lo, mins)
        hi = np.maximum(hi, maxs)
        count += 1
    if count == 0:
        raise DataError("the calibration data is empty")
    stats = {}
    for i, t in enumerate(tensors):
        _check_finite(t, lo[i], hi[i])
        stats[t] = TensorStats(float(lo[i]), float(hi[i]), count)
    return stats


def _bincount(x: np.ndarray, amax: float, nbins2: int) -> np.ndarray:
    """Signed histogram with ``nbins2`` equal bins over [−amax, amax] (values outside are clamped).

    Every element's bin is computed on its own (float32 arithmetic, then truncation of a
    non-negative number), so the counts do not depend on how samples were batched.
    """
    x = np.asarray(x, dtype=np.float32).ravel()
    if amax <= 0:
        out = np.zeros(nbins2, np.int64)
        out[nbins2 // 2] = x.size
        return out
    scale = np.float32(nbins2 / (2.0 * amax))
    pos = (x + np.float32(amax)) * scale
    np.clip(pos, 0, nbins2 - 1, out=pos)
    return np.bincount(pos.astype(np.int32), minlength=nbins2)


def _tensor_bytes_per_sample(model: onnx.ModelProto, tensors: list[str]) -> dict[str, int]:
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


def _split(batch: Batch, size: int) -> Iterator[Batch]:
    """Sub-batches of at most ``size`` samples (no copies: views along axis 0)."""
    n = next(iter(batch.feeds.values())).shape[0] if batch.feeds else 0
    if n <= size:
        yield batch
        return
    for start in range(0, n, size):
        yield Batch({k: v[start : start + size] for k, v in batch.feeds.items()}, None, batch.source)


def collect_histograms(model: onnx.ModelProto, ranges: StatsMap, requests: dict[str, StatRequest], source: BatchSource,
                       batch_size: int, memory_budget: int, show_progress: bool = True, dynamic_batch: bool = True) -> None:
    """Pass 2: fill ``ranges[t].hist`` for every histogram request (in place).

    Exposing every tensor at once costs ``sum(tensor bytes) × batch`` per run. Within
    ``memory_budget`` onnxq first shrinks the run's batch (one pass over the data), and only when a
    single sample of all tensors does not fit does it split the tensors into groups (one pass each).
    """
    tensors = [t for t, r in requests.items() if r.kind == "histogram"]
    if not tensors:
        return
    sizes = _tensor_bytes_per_sample(model, tensors)
    per_sample = sum(sizes.values())
    run_batch = max(1, min(batch_size, memory_budget // max(per_sample, 1))) if dynamic_batch else batch_size
    groups: list[list[str]] = [[]]
    used = 0
    for t in tensors:
        cost = sizes[t] * run_batch
        if groups[-1] and used + cost > memory_budget:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += cost
    types = _tensor_elem_types(model)
    for gi, group in enumerate(groups):
        aug = _with_outputs(model, [(t, types.get(t, onnx.TensorProto.FLOAT)) for t in group], [])
        sess = ort_backend.make_session(aug, "basic", arena=False)
        hists = {t: np.zeros(2 * requests[t].bins, np.int64) for t in group}
        desc = "calibration: histograms" + (f" ({gi + 1}/{len(groups)})" if len(groups) > 1 else "")
        for batch in _iterate(source, desc, show_progress):
            for part in (_split(batch, run_batch) if dynamic_batch else (batch,)):
                res = ort_backend.run(sess, part.feeds, group)
                for t, arr in zip(group, res):
                    hists[t] += _bincount(arr, ranges[t].amax, len(hists[t]))
                del res
        for t in group:
            ranges[t].hist = hists[t]


def collect(model: onnx.ModelProto, requests: Iterable[StatRequest], source: BatchSource, *, batch_size: int = 16,
            cache_dir: str | os.PathLike[str] | None = None, data_fingerprint: str | None = None,
            memory_budget: int = 512 * 2**20, show_progress: bool = True) -> StatsMap:
    """Collect every requested statistic, from the on-disk cache when possible."""
    merged = merge_requests(requests)
    if not merged:
        return {}
    key = None
    if cache_dir is not None and data_fingerprint is not None:
        key = cache_key(model, merged, data_fingerprint)
        cached = load_cache(Path(cache_dir), key)
        if cached is not None and set(cached) >= set(merged):
            log.info("statistics loaded from cache %s", key[:12])
            return cached
    from onnxq.calib.feeds import batch_is_dynamic, model_inputs

    dynamic = batch_is_dynamic(model_inputs(model))
    tensors = list(merged)
    stats = collect_ranges(model, tensors, source, show_progress, run_batch_size(model, batch_size, memory_budget) if dynamic else None)
    collect_histograms(model, stats, merged, source, batch_size, memory_budget, show_progress, dynamic)
    if key is not None:
        save_cache(Path(cache_dir), key, stats)  # type: ignore[arg-type]
    return stats


def cache_key(model: onnx.ModelProto, requests: dict[str, StatRequest], data_fingerprint: str) -> str:
    """Hash of the model, the data and the requests (not the batch size: results don't depend on it)."""
    h = hashlib.sha256()
    h.update(model.SerializeToString(deterministic=True) if model.ByteSize() < 2**31 - 1 else model.graph.name.encode())
    h.update(data_fingerprint.encode())
    h.update(json.dumps(sorted((r.tensor, r.kind, r.bins) for r in requests.values())).encode())
    h.update(b"onnxq-stats-v1")
    return h.hexdigest()


def save_cache(folder: Path, key: str, stats: StatsMap) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"__names__": np.array(list(stats), dtype=object).astype(str)}
    for i, s in enumerate(stats.values()):
        arrays[f"r{i}"] = np.array([s.min, s.max, s.count], np.float64)
        if s.hist is not None:
            arrays[f"h{i}"] = s.hist
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, folder / f"{key}.npz")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_cache(folder: Path, key: str) -> StatsMap | None:
    path = folder / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z["__names__"])
            out = {}
            for i, n in enumerate(names):
                r = z[f"r{i}"]
                out[str(n)] = TensorStats(float(r[0]), float(r[1]), int(r[2]), z[f"h{i}"] if f"h{i}" in z.files else None)
            return out
    except Exception:  # a corrupt cache entry is ignored and rewritten
        log.warning("ignoring unreadable statistics cache %s", path)
        return None
