"""``emb4bit``: row-wise 4-bit embedding tables (docs/methods.md: 4-bit embedding tables).

Every ``Gather`` (axis 0) whose data input is a rank-2 float initializer (or the tables named with
``-o tables a,b``) gets its table replaced by 4-bit codes packed two per byte plus a per-row fp16
scale ``Δ`` and bias ``β`` (§4.3), decoded in the graph as ``x̂ = Δ·q + β`` for the gathered rows
only (§4.5). The range ``[lo, hi]`` of each row comes from the greedy search of §4.2 (never worse
than plain per-row min-max) or from min-max (``-o search minmax``); ``-o scheme codebook`` replaces
the uniform grid by 16-entry k-means codebooks (§4.4: one per row, or shared by groups of rows).

How it fits the pipeline: the method is weight-only and data-free. It calibrates nothing and
replaces the default calibrator, so when no selected method calibrates (``-p emb4bit`` alone, or
``-p gptq -p emb4bit``) it clears the activation sites and, except in 4-bit weight-only mode
(``--bits 4``, where the MatMul weights stay in the plan), the weight sites: only the tables
change. To combine it with activation quantization, add an activation method
(``-p minmax -p emb4bit``). The table rewrite itself is no Q/DQ command (a float bias per row is
no ``DequantizeLinear``), so :meth:`Emb4bit.quantized_rewrite` returns the model rewritten by
:func:`quantize_tables`, which keeps every ``Gather`` output name: the plan of the other methods
stays valid and their Q/DQ commands apply on top.

Graph formats (``-o format``):

* ``standard`` (default): standard ONNX ops only. ``Gather`` of the packed uint8 rows →
  ``BitwiseAnd 15`` / ``BitShift 4`` → ``Unsqueeze``+``Concat``+``Reshape`` interleave to
  ``[..., d]`` → ``Cast`` → ``Mul`` by the gathered scale → ``Add`` the gathered bias. Needs opset
  18: an older model is upgraded with the ONNX version converter (``divmod`` if that fails).
* ``divmod``: the same with ``Mod``/``Div`` by 16 (any opset ≥ 13, no upgrade; ~2× slower unpack).
* ``gbq``: ONNX Runtime's contrib op ``com.microsoft.GatherBlockQuantized`` (uint8 data, ``bits=4``,
  one block per row, fp32 scale, zero point 0) for ``Δ·q``, then ``Add`` the gathered fp16 bias:
  exact, but ONNX Runtime only and 1 + 2 bytes more per row (fp32 scale, packed zero point).

All three decode bit-exactly what :meth:`QuantizedTable.decode` computes in numpy (float32
``Δ·q + β``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxq.calib.statistics import StatRequest
from onnxq.errors import ModelError, OptionError
from onnxq.graph import edit
from onnxq.graph.model_io import tensor_array, total_bytes
from onnxq.hookspecs import hookimpl
from onnxq.method import QuantMethod, RunContext
from onnxq.options import option

log = logging.getLogger(__name__)

BITS = 4
LEVELS = 2**BITS - 1  # 15
FP16_MAX = float(np.finfo(np.float16).max)
#: rows processed at once by the vectorised searches (bounds temporary memory to a few tens of MB)
_CHUNK_ELEMS = 1 << 21


# ---------------------------------------------------------------------------------------------
# numpy reference: greedy range search (§4.2), encoding, packing (§4.3)
# ---------------------------------------------------------------------------------------------

def _fp16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to float16 and back (round to nearest even, like at::Half)."""
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def range_loss(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """L2 reconstruction error of each row of ``x`` [R, d] on the 4-bit grid of ``[lo, hi]`` (§4.2 loss).

    Follows the production loss: ``lo`` rounded to fp16, ``Δ = fp16((hi − lo)/15)`` (1 for an empty
    range), codes ``clamp(rint((x − lo)·(1/Δ)), 0, 15)``, all in float32.
    """
    x = np.asarray(x, np.float32)
    lo16 = _fp16(lo)
    span = (np.asarray(hi, np.float32) - lo16).astype(np.float32)
    with np.errstate(over="ignore", divide="ignore"):
        scale = np.where(span == 0, np.float32(1), _fp16(span / np.float32(LEVELS))).astype(np.float32)
        inv = np.where(scale == 0, np.float32(1), np.float32(1) / scale).astype(np.float32)
    q = np.clip(np.rint((x - lo16[:, None]) * inv[:, None]), 0, LEVELS)
    err = x - (q * scale[:, None] + lo16[:, None])
    return np.sqrt(np.einsum("ij,ij->i", err, err, dtype=np.float32))


@dataclass
class GreedyResult:
    lo: np.ndarray
    hi: np.ndarray
    #: loss evaluations of the while-loop per row (2 per iteration)
    iterations: np.ndarray


def greedy_ranges(x: np.ndarray, n_bins: int = 200, ratio: float = 0.16, keep_best: bool = False) -> GreedyResult:
    """Per-row greedy range search of §4.2 (ATen ``choose_qparams_optimized`` semantics), vectorised over rows.

    From the full range, each step evaluates raising the minimum and lowering the maximum by
    ``(max − min)/n_bins``, moves to the better one (ties lower the maximum) and remembers the
    current range when it is a local optimum better than anything seen; it stops once the range is
    no wider than ``int(n_bins·(1 − ratio))`` steps. The best range starts as the full range, so the
    result is never worse than min-max. ``keep_best`` [onnxq design, not in the production code]
    also keeps any range on the path that beats the best so far, not only local optima (the
    production search misses the optimum when the loss falls all the way to the stopping point);
    it is never worse than the production result, which it contains.
    """
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    xmin, xmax = x.min(axis=1), x.max(axis=1)
    step = ((xmax - xmin) / np.float32(n_bins)).astype(np.float32)
    min_bins = int(n_bins * (1.0 - float(np.float32(ratio))))
    thr = (np.float32(min_bins) * step).astype(np.float32)
    cur_lo, cur_hi = xmin.copy(), xmax.copy()
    cur_loss = range_loss(x, cur_lo, cur_hi)
    best_lo, best_hi, best_loss = cur_lo.copy(), cur_hi.copy(), cur_loss.copy()
    iterations = np.zeros(n, np.int32)
    active = np.flatnonzero((cur_lo + thr) < cur_hi)
    while active.size:
        a = active
        xa, lo, hi, st = x[a], cur_lo[a], cur_hi[a], step[a]
        up = (lo + st).astype(np.float32)
        down = (hi - st).astype(np.float32)
        l1 = range_loss(xa, up, hi)  # raise the minimum
        l2 = range_loss(xa, lo, down)  # lower the maximum
        c = cur_loss[a]
        better = (c < l1) & (c < l2) & (c < best_loss[a])
        idx = a[better]
        best_lo[idx], best_hi[idx], best_loss[idx] = cur_lo[idx], cur_hi[idx], c[better]
        left = l1 < l2
        cur_lo[a] = np.where(left, up, lo)
        cur_hi[a] = np.where(left, hi, down)
        cur_loss[a] = np.where(left, l1, l2)
        if keep_best:
            gain = cur_loss[a] < best_loss[a]
            idx = a[gain]
            best_lo[idx], best_hi[idx], best_loss[idx] = cur_lo[idx], cur_hi[idx], cur_loss[idx]
        iterations[a] += 1
        active = a[(cur_lo[a] + thr[a]) < cur_hi[a]]
    return GreedyResult(best_lo, best_hi, iterations)


def minmax_ranges(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float32)
    return x.min(axis=1), x.max(axis=1)


def encode_rows(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Final encoding of §4.2: ``β = fp16(lo)``, ``Δ = fp16((hi − β)/15)`` (1 if 0 or 1/Δ is inf), codes.

    Returns ``(codes uint8 [R, d], scale float16 [R], bias float16 [R])``.
    """
    x = np.asarray(x, np.float32)
    bias = _fp16(lo)
    with np.errstate(over="ignore", divide="ignore"):
        scale = _fp16((np.asarray(hi, np.float32) - bias) / np.float32(LEVELS))
        inv = (np.float32(1) / scale).astype(np.float32)
        bad = (scale == 0) | ~np.isfinite(inv)
    scale = np.where(bad, np.float32(1), scale).astype(np.float32)
    inv = np.where(bad, np.float32(1), inv).astype(np.float32)
    q = np.clip(np.rint((x - bias[:, None]) * inv[:, None]), 0, LEVELS).astype(np.uint8)
    return q, scale.astype(np.float16), bias.astype(np.float16)


def decode_rows(q: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``x̂ = Δ·q + β`` in float32 (what the ONNX graph computes)."""
    s = np.asarray(scale).astype(np.float32)[:, None]
    b = np.asarray(bias).astype(np.float32)[:, None]
    return (q.astype(np.float32) * s + b).astype(np.float32)


def pack4(q: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes [R, d] (d even) two per byte: element j in byte j//2, even j in the low nibble."""
    q = np.asarray(q, np.uint8)
    if q.shape[1] % 2:
        raise ValueError("the row length must be even to pack 4-bit codes")
    return (q[:, 0::2] & 0x0F) | ((q[:, 1::2] & 0x0F) << 4)


def unpack4(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack4`."""
    packed = np.asarray(packed, np.uint8)
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def row_errors(x: np.ndarray, xhat: np.ndarray) -> np.ndarray:
    """L2 error of each row (float64 accumulation, for reports and tests)."""
    d = np.asarray(x, np.float64) - np.asarray(xhat, np.float64)
    return np.sqrt(np.einsum("ij,ij->i", d, d))


# ---------------------------------------------------------------------------------------------
# codebook variant (§4.4)
# ---------------------------------------------------------------------------------------------

def _nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid per value; ``values`` [R, d], ``centroids`` [R, K] sorted per row.

    One ``searchsorted`` over the per-row midpoints, each row shifted into its own disjoint interval
    (float64), so the cost is ``O(R·d·log(R·K))`` without an [R, d, K] distance tensor. Ties go to
    the lower centroid, like ``argmin`` of the distances.
    """
    v = np.asarray(values, np.float64)
    c = np.asarray(centroids, np.float64)
    r, k = c.shape
    if k == 1:
        return np.zeros(v.shape, np.int64)
    lo = min(float(v.min(initial=0.0)), float(c.min()))
    span = max(float(v.max(initial=0.0)), float(c.max())) - lo + 1.0
    off = (np.arange(r, dtype=np.float64) * (2.0 * span))[:, None]
    mids = ((c[:, 1:] + c[:, :-1]) / 2 - lo + off).ravel()
    pos = np.searchsorted(mids, (v - lo + off).ravel(), side="left").reshape(v.shape)
    return pos - (np.arange(r) * (k - 1))[:, None]


def kmeans_rows(x: np.ndarray, init: np.ndarray, iters: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Per-row 1-D Lloyd k-means with ``K = init.shape[1]`` centroids, fp16 centroids at the end.

    ``init`` [R, K] is sorted per row (the greedy grid ``β + kΔ``). Empty clusters are re-seeded at
    the value of the row with the largest current error. Stops after ``iters`` updates or when no
    code changes. Returns ``(codes uint8 [R, d], centroids float16 [R, K])``; the codes are nearest
    to the stored fp16 centroids.
    """
    x = np.asarray(x, np.float32)
    k = init.shape[1]
    rows = max(1, _CHUNK_ELEMS // max(1, x.shape[1]))
    codes = np.empty(x.shape, np.uint8)
    cents = np.empty((x.shape[0], k), np.float16)
    for s in range(0, x.shape[0], rows):
        xs = x[s:s + rows].astype(np.float64)
        n = xs.shape[0]
        c = np.sort(np.asarray(init[s:s + rows], np.float64), axis=1)
        assign = _nearest(xs, c)
        flat_rows = np.repeat(np.arange(n) * k, xs.shape[1])
        for _ in range(iters):
            key = flat_rows + assign.ravel()
            counts = np.bincount(key, minlength=n * k).reshape(n, k)
            sums = np.bincount(key, weights=xs.ravel(), minlength=n * k).reshape(n, k)
            c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
            empty_rows, empty_k = np.nonzero(counts == 0)
            if empty_rows.size:
                err = np.abs(xs - np.take_along_axis(c, assign, axis=1))
                for r, kk in zip(empty_rows, empty_k):
                    j = int(err[r].argmax())
                    c[r, kk] = xs[r, j]
                    err[r, j] = 0.0
            c = np.sort(c, axis=1)
            new = _nearest(xs, c)
            if np.array_equal(new, assign):
                break
            assign = new
        c16 = np.sort(c.astype(np.float32).astype(np.float16), axis=1)
        codes[s:s + rows] = _nearest(xs, c16.astype(np.float64))
        cents[s:s + rows] = c16
    return codes, cents


#: shared codebooks are fitted on at most this many values (whole rows, evenly spaced through the group)
_SHARED_FIT_VALUES = 1 << 20


def kmeans_shared(u: np.ndarray, weights: np.ndarray, iters: int = 20) -> np.ndarray:
    """One 16-entry codebook for normalised values ``u`` [R, d], each row weighted by ``weights`` [R].

    Weighted Lloyd from the uniform grid 0..15 (the weight ``Δ_row²`` makes it minimise the real
    squared error), fitted on at most ``2^20`` values (evenly spaced whole rows). Returns the sorted
    float32 centroids.
    """
    step = max(1, -(-u.size // _SHARED_FIT_VALUES))
    u, weights = u[::step], np.asarray(weights)[::step]
    flat = u.ravel().astype(np.float64)
    w = np.repeat(np.asarray(weights, np.float64), u.shape[1])
    c = np.arange(LEVELS + 1, dtype=np.float64)
    assign = None
    for _ in range(iters):
        mids = (c[1:] + c[:-1]) / 2
        new = np.searchsorted(mids, flat)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        wsum = np.bincount(assign, weights=w, minlength=c.size)
        vsum = np.bincount(assign, weights=w * flat, minlength=c.size)
        empty = wsum == 0
        c = np.where(empty, c, vsum / np.where(empty, 1, wsum))
        if empty.any():  # re-seed at the values with the largest weighted error
            err = w * (flat - c[assign]) ** 2
            for kk in np.flatnonzero(empty):
                j = int(err.argmax())
                c[kk] = flat[j]
                err[j] = 0.0
        c = np.sort(c)
    return c.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# a quantized table: what the graph stores, its size and its decode
# ---------------------------------------------------------------------------------------------

@dataclass
class QuantizedTable:
    name: str
    rows: int
    dim: int
    scheme: str  # uniform | codebook-per_row | codebook-shared
    packed: np.ndarray  # uint8 [rows, dim/2]
    scale: np.ndarray | None = None  # float16 [rows]
    bias: np.ndarray | None = None  # float16 [rows]
    codebook: np.ndarray | None = None  # float16 [rows, 16] (per row) or [groups, 16] (shared)
    group_rows: int = 0  # shared codebook: rows per group (0 = whole table)
    dtype: Any = np.float32
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def codes(self) -> np.ndarray:
        return unpack4(self.packed)

    def nbytes(self) -> int:
        """Stored bytes (codes + per-row scale/bias + codebooks)."""
        total = self.packed.nbytes
        for a in (self.scale, self.bias, self.codebook):
            if a is not None:
                total += a.nbytes
        return total

    def decode(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 reconstruction of the table (or of the given rows), as the graph computes it."""
        sel = slice(None) if rows is None else np.asarray(rows)
        q = unpack4(self.packed[sel])
        if self.scheme == "uniform":
            return decode_rows(q, self.scale[sel], self.bias[sel])  # type: ignore[index]
        if self.scheme == "codebook-per_row":
            cb = self.codebook[sel].astype(np.float32)  # type: ignore[index]
            return np.take_along_axis(cb, q.astype(np.int64), axis=1)
        # shared: codebook of the row's group, then the row's affine map
        ridx = np.arange(self.rows)[sel]
        group = ridx // self.group_rows if self.group_rows else np.zeros_like(ridx)
        cb = self.codebook.astype(np.float32)  # type: ignore[union-attr]
        u = cb[group[:, None], q.astype(np.int64)]
        return (u * self.scale[sel].astype(np.float32)[:, None] + self.bias[sel].astype(np.float32)[:, None]).astype(np.float32)  # type: ignore[index]


def quantize_table(
    table: np.ndarray,
    name: str = "table",
    *,
    search: str = "greedy",
    scheme: str = "uniform",
    codebook: str = "shared",
    codebook_rows: int = 0,
    n_bins: int = 200,
    ratio: float = 0.16,
    keep_best: bool = False,
    kmeans_iters: int = 20,
) -> QuantizedTable:
    """Quantize a float table [N, d] (d even) row-wise to 4 bits; ``stats`` holds the per-row errors."""
    e = np.asarray(table)
    dtype = e.dtype
    x = np.asarray(e, np.float32)  # no copy of a float32 table (a memory-mapped one stays on disk)
    if x.ndim != 2 or x.shape[1] % 2:
        raise ValueError(f"table '{name}' must be 2-D with an even row length, got shape {x.shape}")
    n, d = x.shape
    rows_per_chunk = max(1, _CHUNK_ELEMS // d)
    lo = np.empty(n, np.float32)
    hi = np.empty(n, np.float32)
    iters = np.zeros(n, np.int32)
    for s in range(0, n, rows_per_chunk):
        xs = x[s:s + rows_per_chunk]
        if search == "greedy":
            r = greedy_ranges(xs, n_bins, ratio, keep_best)
            lo[s:s + rows_per_chunk], hi[s:s + rows_per_chunk], iters[s:s + rows_per_chunk] = r.lo, r.hi, r.iterations
        else:
            lo[s:s + rows_per_chunk], hi[s:s + rows_per_chunk] = minmax_ranges(xs)
    # codes and per-row errors chunk by chunk (every step is row-wise): the float64 error terms of a
    # whole 50k x 1536 table took 1.8 GB at once
    q = np.empty((n, d), np.uint8)
    scale, bias = np.empty(n, np.float16), np.empty(n, np.float16)
    uniform_err, minmax_err = np.empty(n), np.empty(n)
    for s in range(0, n, rows_per_chunk):
        xs, rows = x[s:s + rows_per_chunk], slice(s, s + rows_per_chunk)
        q[rows], scale[rows], bias[rows] = encode_rows(xs, lo[rows], hi[rows])
        uniform_err[rows] = row_errors(xs, decode_rows(q[rows], scale[rows], bias[rows]))
        if search != "minmax":
            minmax_err[rows] = row_errors(xs, decode_rows(*encode_rows(xs, *minmax_ranges(xs))))
    if search == "minmax":
        minmax_err = uniform_err
    stats: dict[str, Any] = {"row_l2_minmax": minmax_err, "row_l2_uniform": uniform_err, "greedy_iterations": iters}
    if scheme == "uniform":
        qt = QuantizedTable(name, n, d, "uniform", pack4(q), scale, bias, dtype=dtype, stats=stats)
    elif codebook == "per_row":
        init = bias.astype(np.float32)[:, None] + scale.astype(np.float32)[:, None] * np.arange(LEVELS + 1, dtype=np.float32)
        codes, cents = kmeans_rows(x, init, kmeans_iters)
        qt = QuantizedTable(name, n, d, "codebook-per_row", pack4(codes), codebook=cents, dtype=dtype, stats=stats)
    else:
        s32, b32 = scale.astype(np.float32), bias.astype(np.float32)
        u = (x - b32[:, None]) / s32[:, None]
        g = codebook_rows if 0 < codebook_rows < n else 0
        starts = range(0, n, g) if g else [0]
        books = []
        codes = np.empty((n, d), np.uint8)
        for s in starts:
            stop = min(n, s + g) if g else n
            c = kmeans_shared(u[s:stop], s32[s:stop] ** 2, kmeans_iters).astype(np.float16)
            c32 = c.astype(np.float32)
            for r in range(s, stop, rows_per_chunk):
                r2 = min(stop, r + rows_per_chunk)
                # nearest in real units (Δ > 0 per row, so nearest in u is nearest in x)
                codes[r:r2] = _nearest(u[r:r2], np.broadcast_to(c32, (r2 - r, c32.size))).astype(np.uint8)
            books.append(c)
        qt = QuantizedTable(name, n, d, "codebook-shared", pack4(codes), scale, bias, codebook=np.stack(books), group_rows=g, dtype=dtype, stats=stats)
    stats["row_l2"] = row_errors(x, qt.decode()) if scheme != "uniform" else uniform_err
    return qt


# ---------------------------------------------------------------------------------------------
# ONNX lookup graphs (§4.5)
# ---------------------------------------------------------------------------------------------

FORMATS = ("standard", "divmod", "gbq")
#: smallest default-domain opset each format needs
FORMAT_OPSET = {"standard": 18, "divmod": 13, "gbq": 13}


@dataclass
class _TableTensors:
    """Initializer names of one quantized table in the graph."""

    packed: str
    scale: str | None = None
    scale32: str | None = None  # gbq: fp32 scale [N, 1]
    zero_point: str | None = None  # gbq
    bias: str | None = None
    codebook: str | None = None


def _table_initializers(qt: QuantizedTable, fmt: str, fresh: edit.Namer) -> tuple[_TableTensors, list[onnx.TensorProto]]:
    base = qt.name
    t = _TableTensors(fresh(f"{base}_q4"))
    inits = [numpy_helper.from_array(qt.packed, t.packed)]
    if qt.scale is not None and not (fmt == "gbq" and qt.scheme == "uniform"):
        t.scale = fresh(f"{base}_q4_scale")
        inits.append(numpy_helper.from_array(qt.scale.astype(np.float16), t.scale))
    if qt.bias is not None:
        t.bias = fresh(f"{base}_q4_bias")
        inits.append(numpy_helper.from_array(qt.bias.astype(np.float16), t.bias))
    if qt.codebook is not None:
        t.codebook = fresh(f"{base}_q4_codebook")
        cb = qt.codebook if qt.scheme == "codebook-per_row" else qt.codebook.reshape(-1)
        inits.append(numpy_helper.from_array(cb.astype(np.float16), t.codebook))
    if fmt == "gbq" and qt.scheme == "uniform":
        t.scale32 = fresh(f"{base}_q4_scale_f32")
        t.zero_point = fresh(f"{base}_q4_zero_point")
        inits.append(numpy_helper.from_array(qt.scale.astype(np.float32)[:, None], t.scale32))  # type: ignore[union-attr]
        inits.append(numpy_helper.from_array(np.zeros((qt.rows, 1), np.uint8), t.zero_point))
    return t, inits


def _gbq_block_size(d: int) -> int:
    """Smallest power of two ≥ max(16, d): one block per row (the op allows a block longer than the row)."""
    b = 16
    while b < d:
        b *= 2
    return b


def lookup_nodes(qt: QuantizedTable, t: _TableTensors, indices: str, output: str, fmt: str, fresh: edit.Namer,
                 shared_inits: dict[str, onnx.TensorProto]) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes that compute ``Gather(table, indices)`` from the quantized table into ``output``."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    p = f"{qt.name}_q4"

    def const(name: str, value: np.ndarray, shared: bool = False) -> str:
        if shared:
            if name not in shared_inits:
                shared_inits[name] = numpy_helper.from_array(value, fresh(name))
            return shared_inits[name].name
        n = fresh(name)
        inits.append(numpy_helper.from_array(value, n))
        return n

    def node(op: str, ins: list[str], out: str | None = None, domain: str = "", **attrs: Any) -> str:
        o = out or fresh(f"{p}/{op}_out")
        nodes.append(helper.make_node(op, ins, [o], name=fresh(f"{p}/{op}"), domain=domain or None, **attrs))
        return o

    out_is_float = qt.dtype == np.float32
    final = output if out_is_float else fresh(f"{output}_f32")
    axes_last = const("emb4bit_axes_last", np.array([-1], np.int64), shared=True)

    def row_values(name: str) -> str:
        """Gather a per-row fp16 vector by the indices, as float32 [..., 1]."""
        g = node("Gather", [name, indices], axis=0)
        return node("Unsqueeze", [node("Cast", [g], to=TensorProto.FLOAT), axes_last])

    def target_shape() -> str:
        dim = const(f"{p}_dim", np.array([qt.dim], np.int64))
        return node("Concat", [node("Shape", [indices]), dim], axis=0)

    if fmt == "gbq" and qt.scheme == "uniform":
        gq = node("GatherBlockQuantized", [t.packed, indices, t.scale32, t.zero_point], domain="com.microsoft",  # type: ignore[list-item]
                  bits=4, block_size=_gbq_block_size(qt.dim), gather_axis=0, quantize_axis=1)
        node("Add", [gq, row_values(t.bias)], final)  # type: ignore[arg-type]
    else:
        rows = node("Gather", [t.packed, indices], axis=0)  # [..., d/2] uint8
        if fmt == "divmod":  # opset 13: Mod/Div by 16 on uint8
            sixteen = const("emb4bit_u8_16", np.array(16, np.uint8), shared=True)
            lo, hi = node("Mod", [rows, sixteen]), node("Div", [rows, sixteen])
        else:  # standard: BitwiseAnd/BitShift (opset 18)
            lo = node("BitwiseAnd", [rows, const("emb4bit_u8_15", np.array(15, np.uint8), shared=True)])
            hi = node("BitShift", [rows, const("emb4bit_u8_4", np.array(4, np.uint8), shared=True)], direction="RIGHT")
        # interleave: element 2i is the low nibble of byte i, element 2i+1 its high nibble
        pairs = node("Concat", [node("Unsqueeze", [lo, axes_last]), node("Unsqueeze", [hi, axes_last])], axis=-1)
        codes = node("Reshape", [pairs, target_shape()])  # [..., d] uint8
        if qt.scheme == "uniform":
            values = node("Cast", [codes], to=TensorProto.FLOAT)
            node("Add", [node("Mul", [values, row_values(t.scale)]), row_values(t.bias)], final)  # type: ignore[arg-type]
        else:
            codes = node("Cast", [codes], to=TensorProto.INT64)
            if qt.scheme == "codebook-per_row":
                books = node("Gather", [t.codebook, indices], axis=0)  # type: ignore[list-item]  # [..., 16] fp16
                node("Cast", [node("GatherElements", [books, codes], axis=-1)], final, to=TensorProto.FLOAT)  # type: ignore[list-item]
            else:
                if qt.group_rows:
                    # flat index into the stacked codebooks: code + 16·group(row); Mod first makes negative indices positive
                    row = node("Mod", [indices, const(f"{p}_rows", np.array(qt.rows, np.int64))])
                    group = node("Div", [row, const(f"{p}_group_rows", np.array(qt.group_rows, np.int64))])
                    offset = node("Unsqueeze", [node("Mul", [group, const("emb4bit_i64_16", np.array(16, np.int64), shared=True)]), axes_last])
                    codes = node("Add", [codes, offset])  # type: ignore[list-item]
                u = node("Cast", [node("Gather", [t.codebook, codes], axis=0)], to=TensorProto.FLOAT)  # type: ignore[list-item]
                node("Add", [node("Mul", [u, row_values(t.scale)]), row_values(t.bias)], final)  # type: ignore[arg-type]
    if not out_is_float:
        node("Cast", [final], output, to=helper.np_dtype_to_tensor_dtype(np.dtype(qt.dtype)))
    return nodes, inits


# ---------------------------------------------------------------------------------------------
# finding and rewriting the tables
# ---------------------------------------------------------------------------------------------

@dataclass
class TableCandidate:
    name: str
    gathers: list[onnx.NodeProto]
    value: np.ndarray


def find_tables(model: onnx.ModelProto, names: tuple[str, ...] = (), min_rows: int = 64) -> tuple[list[TableCandidate], list[tuple[str, str]]]:
    """Tables to quantize and ``(table, reason)`` for the Gather tables left in float.

    A table qualifies when it is a rank-2 float initializer with an even row length, read only by
    ``Gather`` nodes on axis 0. Without ``names`` every such table with at least ``min_rows`` rows
    is taken; with ``names`` exactly those (each must qualify, whatever its row count).
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in inits:
                readers.setdefault(name, []).append((n, i))
    graph_outputs = {o.name for o in g.output}
    in_subgraphs = set().union(*(edit.outer_scope_reads(n) for n in g.node))
    gather_tables = [t for t, rs in readers.items() if any(n.op_type == "Gather" and i == 0 for n, i in rs)]
    for name in names:
        if name not in inits:
            raise OptionError(f"table '{name}' is not an initializer of the model")
        if name not in gather_tables:
            raise OptionError(f"table '{name}' is not the data input of a Gather")
    chosen, skipped = [], []
    for name in (names or gather_tables):
        rs = readers[name]
        t = inits[name]
        reason = None
        axis0 = all(n.op_type == "Gather" and i == 0 and next((a.i for a in n.attribute if a.name == "axis"), 0) == 0 for n, i in rs)
        if t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE):
            reason = "not a float table"
        elif len(t.dims) != 2:
            reason = f"rank {len(t.dims)}, not a 2-D table"
        elif not axis0:
            others = sorted({n.op_type for n, i in rs if not (n.op_type == "Gather" and i == 0)})
            reason = f"also read by {', '.join(others) or 'Gather on another axis'} (keeping it float avoids a second copy)"
        elif name in graph_outputs:
            reason = "is a graph output"
        elif name in in_subgraphs:
            reason = "also read inside a subgraph (If/Loop/Scan)"
        elif t.dims[1] % 2:
            reason = f"odd row length {t.dims[1]} (4-bit codes are packed two per byte)"
        elif not names and t.dims[0] < min_rows:
            reason = f"{t.dims[0]} rows < min_rows {min_rows}"
        value = None
        if reason is None:
            value = tensor_array(t)  # memory-mapped on a model over 2 GB
            if not np.all(np.isfinite(value)) or float(np.abs(value).max(initial=0.0)) > FP16_MAX:
                reason = "values are not finite or exceed the float16 range of the scale/bias"
        if reason is not None:
            if names:
                raise OptionError(f"table '{name}' cannot be quantized: {reason}")
            skipped.append((name, reason))
            continue
        chosen.append(TableCandidate(name, [n for n, _ in rs], value))  # type: ignore[arg-type]
    return chosen, skipped


def apply_quantized_tables(model: onnx.ModelProto, tables: dict[str, tuple[QuantizedTable, list[str]]], fmt: str) -> onnx.ModelProto:
    """Copy of ``model`` with each table's Gathers (by node name) replaced by quantized lookups."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    fresh = edit.Namer.of(out)
    shared: dict[str, onnx.TensorProto] = {}
    new_inits: list[onnx.TensorProto] = []
    replaced: dict[str, list[onnx.NodeProto]] = {}
    for table_name, (qt, gather_names) in tables.items():
        tensors, inits = _table_initializers(qt, fmt, fresh)
        new_inits += inits
        for gname in gather_names:
            node = next(n for n in g.node if n.name == gname)
            nodes, extra = lookup_nodes(qt, tensors, node.input[1], node.output[0], fmt, fresh, shared)
            new_inits += extra
            replaced[gname] = nodes
    edit.replace_nodes(g, replaced)
    g.initializer.extend(new_inits + list(shared.values()))
    # the float tables, read by nobody now, go (with their graph.input and value_info entries)
    out = edit.cleanup(out, sort=False, keep_nodes=True)
    if fmt == "gbq" and not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out


def quantize_tables(model: onnx.ModelProto, opts: "Emb4bitOptions") -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Quantize the model's embedding tables; returns the rewritten model and the report section."""
    from onnxq.graph import prepare

    fmt = opts.format
    if fmt == "gbq" and opts.scheme != "uniform":
        raise OptionError("format 'gbq' (GatherBlockQuantized) holds a uniform grid only; use format standard or divmod with scheme codebook")
    candidates, skipped = find_tables(model, opts.tables, opts.min_rows)
    done: dict[str, tuple[QuantizedTable, list[str]]] = {}
    rows_report = []
    for c in candidates:
        qt = quantize_table(c.value, c.name, search=opts.search, scheme=opts.scheme, codebook=opts.codebook,
                            codebook_rows=opts.codebook_rows, n_bins=opts.n_bins, ratio=opts.ratio, keep_best=opts.keep_best,
                            kmeans_iters=opts.kmeans_iters)
        done[c.name] = (qt, [n.name for n in c.gathers])
        fp32 = c.value.shape[0] * c.value.shape[1] * 4
        st = qt.stats
        rows_report.append({
            "table": c.name, "rows": qt.rows, "dim": qt.dim, "gathers": len(c.gathers), "scheme": qt.scheme,
            "bytes_fp32": fp32, "bytes_original": int(c.value.nbytes), "bytes_quantized": qt.nbytes(),
            "ratio_vs_fp32": round(qt.nbytes() / fp32, 5),
            "mean_row_l2": float(np.mean(st["row_l2"])),
            "mean_row_l2_minmax": float(np.mean(st["row_l2_minmax"])),
            "rows_better_than_minmax": float(np.mean(st["row_l2"] < st["row_l2_minmax"])) if qt.rows else 0.0,
            "rows_worse_than_minmax": int(np.sum(st["row_l2"] > st["row_l2_minmax"] * (1 + 1e-6) + 1e-12)),
        })
    note = None
    before = total_bytes(model)
    if done and prepare.default_opset(model) < FORMAT_OPSET[fmt]:
        try:
            model = prepare.upgrade_opset(model, FORMAT_OPSET[fmt])
        except ModelError as exc:  # keep the model's opset: unpack with Mod/Div instead
            fmt, note = "divmod", f"opset upgrade to 18 failed ({exc}); used format divmod"
            log.warning(note)
    out = apply_quantized_tables(model, done, fmt) if done else model
    report = {
        "format": fmt, "scheme": opts.scheme if opts.scheme == "uniform" else f"codebook ({opts.codebook})", "search": opts.search,
        "tables": rows_report, "left_in_float": [{"table": t, "reason": r} for t, r in skipped],
        "table_bytes_fp32": sum(r["bytes_fp32"] for r in rows_report),
        "table_bytes_quantized": sum(r["bytes_quantized"] for r in rows_report),
        "model_bytes_before": before, "model_bytes_after": total_bytes(out),
    }
    if note:
        report["note"] = note
    return out, report


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Emb4bitOptions:
    tables: tuple[str, ...] = option((), "comma-separated table initializers to quantize (default: every rank-2 float Gather table with >= min_rows rows)")
    min_rows: int = option(64, "smallest table (rows) quantized when no tables are named")
    search: Literal["greedy", "minmax"] = option("greedy", "per-row range: greedy search (docs/methods.md: 4-bit embedding tables) or plain min-max")
    scheme: Literal["uniform", "codebook"] = option("uniform", "uniform 4-bit grid with fp16 scale/bias per row, or 16-entry k-means codebooks (§4.4)")
    codebook: Literal["shared", "per_row"] = option("shared", "codebook scheme: one codebook per group of rows over the row-normalised values, or one per row (+32 B/row)")
    codebook_rows: int = option(0, "shared codebook: rows per group (0 = one codebook for the whole table)")
    format: Literal["standard", "divmod", "gbq"] = option("standard", "lookup graph: standard ops with BitwiseAnd/BitShift (opset 18, the model is upgraded), standard ops with Mod/Div (any opset >= 13), or ORT's GatherBlockQuantized")
    n_bins: int = option(200, "greedy search: steps across the row range")
    ratio: float = option(0.16, "greedy search: fraction of the range it may cut in total")
    keep_best: bool = option(False, "greedy search: keep the best range seen anywhere on the path, not only local optima (never worse; not in the production code)")
    kmeans_iters: int = option(20, "codebook: Lloyd iterations (stops early when no code changes)")


class Emb4bit(QuantMethod):
    """Row-wise 4-bit embedding tables with greedy range search (or codebooks); data-free."""

    name = "emb4bit"
    summary = "row-wise 4-bit embedding tables (Gather), greedy range search, fp16 scale/bias per row; data-free"
    Options = Emb4bitOptions
    # it quantizes no activation, so the host adds no default calibrator for it
    replaces_default_calibrator = True

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        #: activation and weight sites its choose_qparams left in float (it runs only as the stand-in calibrator)
        self._left = (0, 0)
        o = self.options
        if o.n_bins < 1 or not 0 < o.ratio < 1:
            raise OptionError("emb4bit: n_bins must be >= 1 and ratio in (0, 1)")
        if o.format == "gbq" and o.scheme != "uniform":
            raise OptionError("emb4bit: format 'gbq' holds a uniform grid only; use format standard or divmod with scheme codebook")
        if o.codebook_rows < 0 or o.min_rows < 0 or o.kmeans_iters < 0:
            raise OptionError("emb4bit: codebook_rows, min_rows and kmeans_iters must be >= 0")

    def declare_statistics(self, ctx: RunContext) -> list[StatRequest]:
        return []

    def choose_qparams(self, ctx: RunContext) -> None:
        # only called when no selected method calibrates: nothing else is quantized
        plan = ctx.plan
        self._left = (len(plan.activations), 0)
        plan.activations.clear()
        plan.share_groups.clear()
        if not getattr(ctx.profile, "weight_only", False):
            self._left = (self._left[0], len(plan.weights))
            plan.weights.clear()
            plan.layers.clear()

    def quantized_rewrite(self, ctx: RunContext) -> onnx.ModelProto | None:
        model, report = quantize_tables(ctx.model, self.options)
        lines = [f"{t['table']} {t['rows']}x{t['dim']}: {t['bytes_fp32']:,} B FP32 -> {t['bytes_quantized']:,} B "
                 f"({100 * t['ratio_vs_fp32']:.2f}%), mean row L2 {t['mean_row_l2']:.4g} (min-max {t['mean_row_l2_minmax']:.4g})"
                 for t in report["tables"]]
        lines += [f"{t['table']} left in float: {t['reason']}" for t in report["left_in_float"]]
        after_note = ", before the 4-bit MatMul weights are written" if getattr(ctx.profile, "weight_only", False) else ""
        lines.append(f"model {report['model_bytes_before']:,} B -> {report['model_bytes_after']:,} B ({report['format']} lookup{after_note})")
        acts, weights = self._left
        if acts or weights:
            report["sites_left_in_float"] = {"activations": acts, "weights": weights}
            lines.append(f"tables only: {acts} activation and {weights} weight sites left in float (put an activation method before emb4bit to quantize them)")
        if ctx.profile.name == "trt" and report["tables"]:
            report["note"] = "TensorRT has no 4-bit gather: gbq is ONNX Runtime only, and TensorRT support of the standard-op lookup is untested"
            lines.append(report["note"])
        if not report["tables"]:
            fused = sorted({n.op_type for n in ctx.model.graph.node if n.op_type == "EmbedLayerNormalization"})
            why = "; ".join(f"{t['table']}: {t['reason']}" for t in report["left_in_float"][:3]) or (
                f"no rank-2 float table read by a Gather has {self.options.min_rows} rows or more (-o min_rows)")
            if fused:
                why += "; the model's tables sit inside ONNX Runtime's fused EmbedLayerNormalization: quantize the model before fusing it"
            report["changed_nothing"] = why
        report["summary"] = lines
        ctx.report[self.name] = report
        return model if model is not ctx.model else None  # no table found: nothing changed


@hookimpl
def register_methods(register) -> None:
    register(Emb4bit)
