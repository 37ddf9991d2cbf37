"""Validate reader output against the model's inputs and re-batch it.

Every batch is checked before ONNX Runtime sees it, so a mismatch is a one-line error naming the
input and the data file instead of an ORT stack trace: missing/unknown input names, dtype, rank,
static dimensions, and NaN/Inf values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxq.calib.readers import Batch, InputSpec, samples_disagree
from onnxq.errors import DataError


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs are excluded)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        specs.append(InputSpec(vi.name, dtype, tuple(dims), rank_declared=tt.HasField("shape")))
    limits = _index_limits(model, [s.name for s in specs if s.dtype.kind in "iu"])
    return [dataclasses.replace(s, index_limit=limits[s.name]) if s.name in limits else s for s in specs]


def _index_limits(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    """For each of ``names`` (graph inputs) used as indices into a constant table (``Gather(table, input)``, through casts and
    reshapes), the size of its smallest such table."""
    from onnxq.graph.index import PASS_THROUGH_OPS

    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    limits: dict[str, int] = {}
    if not names:
        return limits
    for name in names:
        stack, seen = [name], set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            for node in readers.get(t, []):
                if node.op_type in PASS_THROUGH_OPS and node.input[0] == t:
                    stack.extend(o for o in node.output if o)
                elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == t and node.input[0] in inits:
                    dims = inits[node.input[0]].dims
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if dims:
                        size = int(dims[axis % len(dims)])
                        limits[name] = min(limits.get(name, size), size)
    return limits


def validate_batch(batch: Batch, inputs: list[InputSpec]) -> Batch:
    """Check one batch against the model's inputs; raise :class:`DataError` naming the problem."""
    where = f" in {batch.source}" if batch.source else ""
    names = {i.name for i in inputs}
    missing = [n for n in names if n not in batch.feeds]
    if missing:
        raise DataError(f"data{where} has no value for model input '{missing[0]}' (it has: {', '.join(sorted(batch.feeds)) or 'nothing'})")
    unknown = [k for k in batch.feeds if k not in names]
    if unknown:
        raise DataError(f"data{where} has '{unknown[0]}', which is not a model input (inputs: {', '.join(sorted(names))})")
    n = None
    named: dict[str, tuple[str, int, int]] = {}  # a symbolic dimension -> (input, axis, size) where it was first seen
    for spec in inputs:
        arr = batch.feeds[spec.name]
        if not isinstance(arr, np.ndarray):
            arr = np.asarray(arr)
            batch.feeds[spec.name] = arr
        if arr.dtype != spec.dtype:
            raise DataError(f"input '{spec.name}'{where} has dtype {arr.dtype}, the model expects {spec.dtype}")
        if (spec.shape or spec.rank_declared) and arr.ndim != len(spec.shape):
            # a scalar input declared rank 0 and given one value per sample was fed whole with every batch: ONNX Runtime
            # then failed inside the graph ("broadcast ... 10 by 64")
            scalar = " (a scalar: one value for every sample)" if not spec.shape else ""
            raise DataError(f"input '{spec.name}'{where} has shape {list(arr.shape)}, the model expects rank {len(spec.shape)} "
                            f"{_fmt(spec.shape)}{scalar}")
        for axis, (got, want) in enumerate(zip(arr.shape, spec.shape)):
            if isinstance(want, int) and want > 0 and got != want:
                raise DataError(f"input '{spec.name}'{where} has shape {list(arr.shape)}, the model expects {_fmt(spec.shape)} (axis {axis})")
            if isinstance(want, str) and want:
                # a mask shorter than its token ids, or inputs with different numbers of samples, failed inside ONNX
                # Runtime with a long message naming neither
                first = named.setdefault(want, (spec.name, axis, got))
                if first[2] != got:
                    raise DataError(f"input '{spec.name}'{where} has {got} on axis {axis} and input '{first[0]}' has {first[2]} on axis "
                                    f"{first[1]}: the model names both '{want}', so they must be equal")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = "NaN" if np.isnan(arr).any() else "Inf"
            raise DataError(f"input '{spec.name}'{where} contains {bad} values")
        if arr.ndim:
            n = arr.shape[0] if n is None else n
    if batch.labels is not None and n is not None and len(batch.labels) != n:
        raise DataError(f"data{where} has {len(batch.labels)} labels for {n} samples")
    return batch


def _fmt(shape: tuple) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def batch_is_dynamic(inputs: list[InputSpec]) -> bool:
    """True if every input has a non-static leading (batch) dimension."""
    return all(s.shape and not (isinstance(s.shape[0], int) and s.shape[0] > 0) for s in inputs)


def split_static(batch: Batch, inputs: list[InputSpec]) -> list[Batch]:
    """Split a reader batch of k·B samples into k batches for a model whose batch dimension is a static B.

    Only when every input has the same static leading dimension B and every array holds a whole
    multiple of B samples along axis 0 (e.g. a batch-1 model fed .npz files of 16 samples); any other
    batch is returned as it is, for :func:`validate_batch` to judge.
    """
    leading = {s.shape[0] if s.shape else None for s in inputs}
    if len(leading) != 1:
        return [batch]
    (b,) = leading
    if not (isinstance(b, int) and b > 0) or set(batch.feeds) != {s.name for s in inputs}:
        return [batch]
    arrays = [batch.feeds[s.name] for s in inputs]
    if any(not isinstance(a, np.ndarray) or a.ndim != len(s.shape) for a, s in zip(arrays, inputs)):
        return [batch]
    counts = {a.shape[0] for a in arrays}
    if len(counts) != 1:
        return [batch]
    (n,) = counts
    if n == b or n % b or (batch.labels is not None and len(batch.labels) != n):
        return [batch]
    return [Batch({k: v[i : i + b] for k, v in batch.feeds.items()}, batch.labels[i : i + b] if batch.labels is not None else None, batch.source)
            for i in range(0, n, b)]


def rebatch(batches: Iterable[Batch], inputs: list[InputSpec], batch_size: int) -> Iterator[Batch]:
    """Validate every batch, then regroup samples into batches of ``batch_size``.

    Models with a static batch dimension B keep the reader's batches, split into batches of B
    when they hold a multiple of B samples. Samples of different shapes (variable-length inputs)
    are never concatenated together.
    """
    dynamic = batch_is_dynamic(inputs)
    pending: list[Batch] = []
    count = 0

    def flush() -> Batch:
        feeds = {k: np.concatenate([b.feeds[k] for b in pending]) for k in pending[0].feeds}
        labels = None
        if all(b.labels is not None for b in pending):
            labels = np.concatenate([b.labels for b in pending])  # type: ignore[misc]
        return Batch(feeds, labels, pending[0].source)

    for raw in batches:
        if not dynamic:
            for piece in split_static(raw, inputs):
                yield validate_batch(piece, inputs)
            continue
        b = validate_batch(raw, inputs)
        if samples_disagree(b.feeds):
            # the inputs' leading axes hold different lengths (a graph network's atoms and edges): one sample, whole
            if pending:
                yield flush()
                pending, count = [], 0
            yield b
            continue
        size = next(iter(b.feeds.values())).shape[0] if b.feeds else 1
        for start in range(0, size, batch_size):
            piece = Batch({k: v[start : start + batch_size] for k, v in b.feeds.items()},
                          b.labels[start : start + batch_size] if b.labels is not None else None, b.source)
            if pending and any(piece.feeds[k].shape[1:] != pending[0].feeds[k].shape[1:] for k in piece.feeds):
                yield flush()
                pending, count = [], 0
            pending.append(piece)
            count += next(iter(piece.feeds.values())).shape[0]
            while count >= batch_size:
                merged = flush()
                head = Batch({k: v[:batch_size] for k, v in merged.feeds.items()}, merged.labels[:batch_size] if merged.labels is not None else None, merged.source)
                rest_n = count - batch_size
                pending = [Batch({k: v[batch_size:] for k, v in merged.feeds.items()}, merged.labels[batch_size:] if merged.labels is not None else None, merged.source)] if rest_n else []
                count = rest_n
                yield head
    if pending and count:
        yield flush()


#: share of a channel's elements its most frequent value must cover for :func:`constant_region` (padding covers 30 % of PP-OCR rec's
#: calibration lines; natural images have no value over 1 %)
CONSTANT_SHARE = 0.1
#: about how many elements of each input :func:`constant_region` reads
CONSTANT_VALUES = 8_000_000


def constant_region(feeds: Sequence[dict[str, np.ndarray]], min_share: float = CONSTANT_SHARE) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    """One synthetic sample filled with each input's dominant value, where every input has one.

    Padded inputs (text-line crops padded to a fixed width, letterboxed images) repeat one exact value
    per channel over a large share of their elements. For each float input of rank >= 3, the channel
    axis is axis 1 or the last axis, whichever is smaller (NCHW or NHWC); each channel's most frequent
    value counts as dominant when at least ``min_share`` of that channel's elements (over ``feeds``)
    equal it. Returns ``(sample, info)``: the sample has batch size 1 and the first feed's shape, or
    is None when some input has no dominant value (``info["reason"]`` says which); ``info`` gives
    each input's values and their least share.
    """
    info: dict[str, Any] = {"inputs": {}}
    if not feeds:
        return None, {**info, "reason": "no calibration samples"}
    sample: dict[str, np.ndarray] = {}
    for name in feeds[0]:
        # the feeds shaped like the first (dynamic sizes may differ), up to about CONSTANT_VALUES elements: a mode
        # needs no more, and a detector's 64 kept pages would be copied whole otherwise
        first = np.asarray(feeds[0][name])
        parts, total = [], 0
        for f in feeds:
            a = np.asarray(f[name])
            if a.shape[1:] != first.shape[1:] or total >= CONSTANT_VALUES:
                continue
            parts.append(a)
            total += a.size
        x = np.concatenate(parts)
        if x.dtype.kind != "f" or x.ndim < 3:
            return None, {**info, "reason": f"input '{name}' is not a float tensor of rank >= 3 ({x.dtype}, rank {x.ndim})"}
        axis = 1 if x.shape[1] <= x.shape[-1] else x.ndim - 1
        per = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        values, shares = [], []
        for row in per:
            u, n = np.unique(row, return_counts=True)
            k = int(np.argmax(n))
            values.append(float(u[k]))
            shares.append(float(n[k]) / row.size)
        info["inputs"][name] = {"axis": axis, "values": values, "share": round(min(shares), 4)}
        if min(shares) < min_share:
            return None, {**info, "reason": f"input '{name}': its most frequent value covers {min(shares):.1%} of a channel "
                                            f"(< {min_share:.0%}): no constant region"}
        shape = [1] * x.ndim
        shape[axis] = -1
        sample[name] = np.broadcast_to(np.asarray(values, x.dtype).reshape(shape), (1, *x.shape[1:])).copy()
    return sample, info


def batch_axes(model: onnx.ModelProto) -> dict[str, int | None]:
    """The sample (batch) axis of every graph input and output, from the declared shapes; None: no batch axis.

    The batch symbol is the leading dimension of the first input whose leading dimension is not a
    fixed size (``batch``, ``N``, unknown). A tensor's batch axis is where that symbol appears (a
    recurrent ``state`` of shape ``[2, batch, 128]`` has it on axis 1); without the symbol, its first
    dimension that is not a fixed size, unless it leads with a fixed 1 (a fixed batch of one: none).
    A scalar, or a tensor whose declared dimensions are all fixed, has none (a voice-activity model's sample rate ``sr``), and is fed as it is.
    """
    inits = {t.name for t in model.graph.initializer}
    values = [vi for vi in model.graph.input if vi.name not in inits] + list(model.graph.output)

    def dims(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            return None  # rank unknown
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]

    symbol: str | None = None
    for vi in values[: len(values) - len(model.graph.output)]:
        d = dims(vi)
        if d and not isinstance(d[0], int):
            symbol = d[0]
            break
    axes: dict[str, int | None] = {}
    for vi in values:
        d = dims(vi)
        if d is None:
            axes[vi.name] = 0  # unknown rank: the usual leading batch axis, checked against the data per batch
        elif symbol is not None and symbol in d:
            axes[vi.name] = d.index(symbol)
        elif d and d[0] == 1:
            # a fixed leading 1 is a fixed batch of one, each batch one sample: a free dimension after it is a width or
            # a length (ddddocr's [1, 1, 64, width]), and reading it as samples made one 171-pixel image 171 samples
            axes[vi.name] = None
        else:
            axes[vi.name] = next((i for i, x in enumerate(d) if not isinstance(x, int) or x <= 0), None)
    return axes
