"""``gptq``: calibration-driven 4-bit weight-only MatMul (GPTQ-style error compensation), pure numpy.

For every MatMul ``Y = X·W`` (``W`` of shape ``[K, N]``) that the 4-bit weight-only plan quantizes,
the method collects ``H = 2·XᵀX`` from the calibration inputs of that MatMul (``X`` flattened to
``[tokens, K]``) and quantizes ``W`` one input row ``k`` at a time (a *column* in the GPTQ paper's
``[out, in]`` layout), each time spreading the rounding error of row ``k`` over the rows not yet
quantized so that ``‖X·W − X·Ŵ‖²`` stays small (Frantar et al., arXiv 2210.17323, written from the
paper's description):

1. dead inputs (``H_kk = 0``) get ``H_kk = 1`` and a zero weight row; ``H += damp·mean(diag H)·I``
   (``damp`` = 0.01 by default, ×10 until the Cholesky factorisation succeeds);
2. ``U`` = upper Cholesky factor of ``H⁻¹``; rows are processed in lazy batches of whole blocks
   (``lazy`` rows, default 128): inside a batch, row by row, ``err = (w_k − ŵ_k)/U_kk`` and the
   batch's later rows get ``−U_kj·err``; after the batch one matrix product updates every later row;
3. the block-wise grid (``--block-size``, the same blocks as round-to-nearest, so the file and the
   ONNX Runtime kernel are unchanged) of a block is chosen when its first row is reached, from the
   block's *current* (already error-compensated) weights; with ``clip`` the block range is shrunk
   by the factor in ``clip_grid`` that minimises the block's error weighted by ``1/U_kk²`` (the
   cost GPTQ assigns to an error in row ``k``);
4. ``act_order`` (default on) visits the blocks in decreasing order of their summed ``diag H``, and
   inside a block the rows in decreasing ``H_kk``: the most-read inputs are quantized first, while
   the most rows are left to absorb their error. Blocks stay contiguous, so every block still has one
   scale (and zero point) as the kernel stores it.

Inputs are taken *sequentially* (default): the calibration samples run node by node
(:class:`onnxq.search.evaluator.GraphRunner`) with the already-processed MatMuls at their quantized
weights, so each layer compensates what the earlier ones changed (``inputs=float`` collects every
``H`` from the float model instead). Tables rewritten by an earlier method (``-p emb4bit -p gptq``)
are already in the graph the inputs come from.

The result is written through the ordinary plan: the weight initializer is replaced by the dequantized
GPTQ weight ``Ŵ = s·(q − z)`` and the site gets the chosen block qparams, so the QDQ rewrite recovers
exactly the integers ``q`` (``rint(Ŵ/s) + z = q``) and, for ``--target ort``, ``MatMulNBits``.

Mixed precision (opt-in, ``-o keep8 N`` or ``-o keep8_names GLOBS``): the ``N`` MatMuls with the
largest *measured* relative output error at 4 bits, ``‖X(W − Ŵ)‖² / ‖XW‖²`` on the calibration inputs
(from the first, all-4-bit pass), are quantized again with 8-bit blocks (``MatMulNBits bits=8`` on
ONNX Runtime), in a second sequential pass. The report lists every layer's bits and error.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.search.evaluator import GraphRunner
from onnxq.calib.progress import progress
from onnxq.search.footprint import fitted_chunks
from onnxq.calib.readers import sample_count
from onnxq.search.samples import sample_batches, samples_request
from onnxq.calib.statistics import StatRequest
from onnxq.errors import OptionError
from onnxq.graph.edit import with_initializers
from onnxq.graph.model_io import is_lazy, release, spill, tensor_array
from onnxq.hookspecs import hookimpl
from onnxq.runtime.executor import current as current_executor
from onnxq.method import QuantMethod, RunContext
from onnxq.options import option
from onnxq.qparams import MIN_SCALE, QParams, container_for, int_range


# ---------------------------------------------------------------------------------------------
# numpy core
# ---------------------------------------------------------------------------------------------

@dataclass
class GptqResult:
    """One quantized weight ``[K, N]``: integers, block grid and the dequantized weight."""

    ints: np.ndarray  # [K, N] int32, in the grid's integer range
    scale: np.ndarray  # [n_blocks, N] float32
    zero_point: np.ndarray  # [n_blocks, N] int32
    w_hat: np.ndarray  # [K, N] float32 = (ints − zero_point)·scale, exactly what DequantizeLinear computes
    bits: int
    signed: bool
    block_size: int
    #: relative output error on the calibration inputs, ‖X(W − Ŵ)‖² / ‖XW‖²
    rel_error: float = float("nan")
    damp_used: float = 0.0

    def qparams(self) -> QParams:
        qmin, qmax = int_range(self.bits, self.signed, False)
        dtype = container_for(self.bits, self.signed)
        zp = self.zero_point.astype(np.int8 if self.signed else np.uint8)
        return QParams(self.scale, zp, dtype, qmin, qmax, 0, self.block_size)


def block_grid(rows: np.ndarray, bits: int, signed: bool, row_weight: np.ndarray | None = None,
               shrink: np.ndarray | tuple[float, ...] = (1.0,)) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (each ``[N]``) of one block ``rows`` ``[b, N]``.

    Signed: symmetric, step ``p·max|w|/(2^(b−1) − 1)``, zero point 0, integers in
    ``[−2^(b−1), 2^(b−1) − 1]`` (as :func:`onnxq.qparams.blockwise`). Unsigned: ``[p·min(w, 0),
    p·max(w, 0)]`` on ``0 … 2^b − 1`` with an integer zero point. Among the shrink factors ``p`` the
    one with the least ``Σ_k row_weight_k·(w − ŵ)²`` wins per column (``p = 1`` wins ties).
    """
    rows = np.asarray(rows, np.float64)
    rw = np.ones(rows.shape[0]) if row_weight is None else np.asarray(row_weight, np.float64)
    qmin, qmax = int_range(bits, signed, False)
    n = rows.shape[1]
    best_err = np.full(n, np.inf)
    best_s = np.ones(n, np.float32)
    best_z = np.zeros(n, np.int32)
    if signed:
        amax = np.abs(rows).max(axis=0)
    else:
        lo0, hi0 = np.minimum(rows.min(axis=0), 0.0), np.maximum(rows.max(axis=0), 0.0)
    for p in shrink:
        if signed:
            s = np.maximum(amax * p / qmax, MIN_SCALE).astype(np.float32)
            z = np.zeros(n, np.int32)
        else:
            lo, hi = lo0 * p, hi0 * p
            s = np.maximum((hi - lo) / (qmax - qmin), MIN_SCALE).astype(np.float32)
            z = np.clip(np.rint(qmin - lo / s), qmin, qmax).astype(np.int32)
        q = np.clip(np.rint(rows / s) + z, qmin, qmax)
        deq = ((q - z) * s).astype(np.float32)
        err = (rw[:, None] * (rows - deq) ** 2).sum(axis=0)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
    return best_s.astype(np.float32), best_z


def _inverse_cholesky_upper(h: np.ndarray, damp: float) -> tuple[np.ndarray, float]:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``UᵀU = (H + λI)⁻¹``), λ = damp·mean(diag H).

    With ``J`` the reversal permutation and ``L = chol(J·H·J)``, ``H = (JLJ)(JLJ)ᵀ`` with ``JLJ``
    upper triangular, so ``U = (JLJ)⁻¹ = J·L⁻¹·J``: one factorisation and one triangular inverse.
    """
    mean_diag = float(np.mean(np.diag(h)))
    d = damp
    eye = np.eye(h.shape[0])
    for _ in range(6):
        try:
            lower = np.linalg.cholesky((h + d * mean_diag * eye)[::-1, ::-1])
            u = np.linalg.inv(lower)[::-1, ::-1]
            return np.ascontiguousarray(np.triu(u)), d
        except np.linalg.LinAlgError:
            d = d * 10 if d > 0 else 1e-4
    raise np.linalg.LinAlgError("H is not positive definite even with 1e6 x damping")


def gptq_quantize(w: np.ndarray, h: np.ndarray | None, block_size: int, bits: int = 4, signed: bool = False,
                  damp: float = 0.01, act_order: bool = True, shrink: np.ndarray | tuple[float, ...] = (1.0,),
                  lazy: int = 128) -> GptqResult:
    """GPTQ of one MatMul weight ``w`` ``[K, N]`` with block-wise grids along K (module docstring).

    ``h`` is ``XᵀX`` (any positive multiple) ``[K, K]``; ``None`` means identity (no calibration
    data: every row independent, which reduces to round-to-nearest with the clip search).
    """
    w = np.asarray(w, np.float32)
    k, n = w.shape
    H = np.eye(k) if h is None else np.array(h, np.float64)
    dead = np.flatnonzero(np.diag(H) <= 0)
    if dead.size:
        H[dead, dead] = 1.0
    nblocks = -(-k // block_size)
    group = np.arange(k) // block_size
    diag = np.diag(H).copy()
    if act_order:
        gorder = np.argsort(-np.bincount(group, weights=diag, minlength=nblocks), kind="stable")
        perm = np.concatenate([np.flatnonzero(group == g)[np.argsort(-diag[group == g], kind="stable")] for g in gorder])
    else:
        gorder = np.arange(nblocks)
        perm = np.arange(k)
    H = H[np.ix_(perm, perm)]
    U, damp_used = _inverse_cholesky_upper(H, damp)
    del H
    ud = np.diag(U).copy()
    dead_rows = np.isin(perm, dead)  # rows (in processing order) of inputs that are always zero
    # segments: one per block, in processing order; lazy batches hold whole segments
    sizes = [int(np.sum(group == g)) for g in gorder]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    qmin, qmax = int_range(bits, signed, False)
    # results are written straight to their unpermuted rows (no permuted copy to invert at the end)
    ints = np.zeros((k, n), np.int32)
    deq = np.zeros((k, n), np.float32)
    scale = np.ones((nblocks, n), np.float32)
    zp = np.zeros((nblocks, n), np.int32)
    num = den = 0.0
    # every output column is quantized independently of the others (the updates mix rows, never
    # columns), so the columns go in slices: the float64 working copy and the error terms stay
    # within CHUNK_BYTES whatever N is (an LM head of 1536 x 50257 held 4 GB at once otherwise)
    cols = max(1, CHUNK_BYTES // (8 * k))
    for c0 in range(0, n, cols):
        c = slice(c0, min(n, c0 + cols))
        W = w[perm, c].astype(np.float64)
        W[dead_rows] = 0.0
        seg = 0
        while seg < len(sizes):
            i1 = starts[seg]
            last = seg
            while last + 1 < len(sizes) and starts[last + 2] - i1 <= max(lazy, sizes[seg]):
                last += 1
            i2 = starts[last + 1]
            W1 = W[i1:i2].copy()
            U1 = U[i1:i2, i1:i2]
            err1 = np.zeros_like(W1)
            for sg in range(seg, last + 1):
                a, b = starts[sg] - i1, starts[sg + 1] - i1
                g = gorder[sg]
                bs, bz = block_grid(W1[a:b], bits, signed, 1.0 / ud[i1 + a:i1 + b] ** 2, shrink)
                scale[g, c], zp[g, c] = bs, bz
                s64, z64 = bs.astype(np.float64), bz.astype(np.float64)
                for r in range(a, b):
                    row = W1[r]
                    q = np.clip(np.rint(row / s64) + z64, qmin, qmax)
                    dq = ((q - z64) * s64).astype(np.float32)
                    ints[perm[i1 + r], c] = q
                    deq[perm[i1 + r], c] = dq
                    e = (row - dq) / U1[r, r]
                    if r + 1 < W1.shape[0]:
                        W1[r + 1:] -= np.outer(U1[r, r + 1:], e)
                    err1[r] = e
            if i2 < k:
                W[i2:] -= U[i1:i2, i2:].T @ err1
            seg = last + 1
        del W
        if h is not None:
            part_num, part_den = _error_terms(w[:, c], deq[:, c], h)
            num, den = num + part_num, den + part_den
    res = GptqResult(ints, scale, zp, deq, bits, signed, block_size, damp_used=damp_used)
    if h is not None:
        res.rel_error = num / den if den > 0 else 0.0
    return res


#: the most bytes one slice of columns takes in float64 while GPTQ works on it (and for its error terms)
CHUNK_BYTES = 64 << 20


def rtn_quantize(w: np.ndarray, block_size: int, bits: int = 4, signed: bool = False) -> GptqResult:
    """Round-to-nearest with min/max block grids: what ``-p minmax --bits 4`` writes."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    nblocks = -(-k // block_size)
    qmin, qmax = int_range(bits, signed, False)
    ints = np.zeros((k, n), np.int32)
    scale = np.ones((nblocks, n), np.float32)
    zp = np.zeros((nblocks, n), np.int32)
    for g in range(nblocks):
        sl = slice(g * block_size, min(k, (g + 1) * block_size))
        s, z = block_grid(w[sl], bits, signed)
        scale[g], zp[g] = s, z
        ints[sl] = np.clip(np.rint(w[sl].astype(np.float64) / s) + z, qmin, qmax)
    rep = lambda a: np.repeat(a, block_size, axis=0)[:k]  # noqa: E731
    deq = ((ints - rep(zp)) * rep(scale)).astype(np.float32)
    return GptqResult(ints, scale, zp, deq, bits, signed, block_size)


def relative_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """``‖X(W − Ŵ)‖² / ‖XW‖²`` from ``h = XᵀX``."""
    num, den = _error_terms(w, w_hat, h)
    return num / den if den > 0 else 0.0


def _error_terms(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> tuple[float, float]:
    """``‖X(W − Ŵ)‖²`` and ``‖XW‖²`` (sums over the columns given: slices add up)."""
    e = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    num = float(np.sum(e * (h @ e)))
    del e
    w = np.asarray(w, np.float64)
    return num, float(np.sum(w * (h @ w)))


def _one_blas_thread():
    """Limit BLAS to one thread for the small factorisations when threadpoolctl is installed.

    Next to ONNX Runtime's spinning worker threads, a multi-threaded LAPACK Cholesky of a 384 x 384
    matrix took 0.28 s instead of 2 ms on a busy 2-core machine; one thread avoids the contention.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only speed depends on it
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _quantize_layer(w: np.ndarray, h: np.ndarray, block_size: int, bits: int, signed: bool, damp: float, act_order: bool,
                    shrink: tuple[float, ...], lazy: int) -> GptqResult:
    """One MatMul's GPTQ with one BLAS thread: a pure function of its arguments, run here or as a Ray task."""
    with _one_blas_thread():
        return gptq_quantize(w, h, block_size, bits=bits, signed=signed, damp=damp, act_order=act_order, shrink=shrink, lazy=lazy)


def _gram(runner: GraphRunner, tensor: str) -> np.ndarray:
    """``XᵀX`` (float64) of ``tensor`` flattened to ``[rows, K]`` over every calibration chunk.

    Chunks may differ in every axis but the last (sequences padded per batch), so they are
    reduced one by one instead of concatenated.
    """
    producer = runner.idx.producer.get(tensor)
    if producer is not None:
        runner.run_to(runner.position[producer.name])
    parts = runner.values.get(tensor)
    if parts is None:
        parts = [runner.value(tensor)]
    k = parts[0].shape[-1]
    h = np.zeros((k, k))
    for p in parts:
        x = np.asarray(p, np.float32).reshape(-1, k)
        h += (x.T @ x).astype(np.float64)  # float32 products per chunk (GPTQ's own precision), summed in float64
    return h


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GptqOptions:
    """Options of the GPTQ weight-only method (``--bits 4``)."""

    samples: int = option(128, "calibration samples (sequences/images) whose MatMul inputs form H = 2·XᵀX (at most; memory_mb may keep fewer)")
    memory_mb: float = option(384, "memory the sequential pass may hold for its samples (the activations kept between layers plus one ONNX Runtime run); keeps fewer samples than `samples`, in smaller runs, where they do not fit (the report says how many)")
    damp: float = option(0.01, "diagonal damping, as a fraction of mean(diag H)")
    act_order: bool = option(True, "visit blocks by decreasing summed diag(H), rows inside a block by decreasing H_kk")
    clip: bool = option(True, "choose each block's range among the clip_grid shrink factors by H-weighted squared error")
    clip_grid: tuple[float, ...] = option((1.0, 0.95, 0.9, 0.85, 0.8, 0.75), "range shrink factors tried per block when clip is on")
    lazy: int = option(128, "rows per lazy update batch (whole blocks)")
    inputs: Literal["sequential", "float"] = option("sequential", "H from inputs produced by the already-quantized earlier MatMuls, or from the float model")
    keep8: int = option(0, "mixed precision: this many MatMuls with the largest measured 4-bit relative output error get 8-bit blocks instead")
    keep8_names: tuple[str, ...] = option((), "mixed precision: MatMul node names (globs) that get 8-bit blocks")

    def validate(self) -> None:
        if self.samples < 1:
            raise ValueError("samples must be >= 1")
        if not 0 <= self.damp < 10:
            raise ValueError("damp must be in [0, 10)")
        if not self.clip_grid or any(not 0 < p <= 1 for p in self.clip_grid):
            raise ValueError("clip_grid factors must be in (0, 1]")
        if self.lazy < 1 or self.keep8 < 0 or self.memory_mb <= 0:
            raise ValueError("lazy must be >= 1, keep8 >= 0 and memory_mb > 0")


class Gptq(QuantMethod):
    """GPTQ-style error-compensating 4-bit weight-only MatMul quantization (calibration data required)."""

    name = "gptq"
    summary = "4-bit weight-only MatMul with GPTQ error compensation from calibration inputs (H = 2·XᵀX), block grids, act-order, clip search"
    Options = GptqOptions
    #: the host must not substitute a random batch for missing data: the result depends on it
    needs_data = True

    def declare_statistics(self, ctx: RunContext) -> list[StatRequest]:
        if not ctx.profile.weight_only:
            raise OptionError("gptq quantizes MatMul weights to 4 bits, weight-only: use --bits 4")
        return [samples_request(self.options.samples)]  # read back by take_samples in refine

    # -- helpers ----------------------------------------------------------------------------
    def _pass(self, ctx: RunContext, chunks, weights: dict[str, np.ndarray], bits8: set[str], progress_desc: str) -> dict[str, GptqResult]:
        o = self.options
        plan = ctx.plan
        profile = ctx.profile
        signed = profile.activation_signed
        shrink = tuple(o.clip_grid) if o.clip else (1.0,)
        if 1.0 not in shrink:
            shrink = (1.0,) + shrink
        runner = GraphRunner(ctx.model, chunks, plan if o.inputs == "sequential" else None, self._sessions)
        hs: dict[str, np.ndarray] = {}
        out: dict[str, GptqResult] = {}
        # layers whose H is known wait here and are quantized together through the current executor
        # (Ray tasks with --executor ray, H and W put into its object store once); with sequential
        # inputs they are done before the next H is computed, which reads their quantized weights
        pending: list[tuple[Any, Any, tuple[Any, ...]]] = []
        executor = current_executor()
        # a model over 2 GB (weights on disk): each dequantized weight goes to disk as it is made, and the
        # pages of the weights already done are dropped, so the pass never holds every weight at once
        lazy = is_lazy(ctx.model)
        done: list[np.ndarray] = []

        # the last layer reading each input: its H is dropped once that layer is done (one K x K float64
        # per input, 134 MB at K = 4096, would otherwise add up over the whole pass)
        last_use = {layer.inputs[0]: i for i, layer in enumerate(plan.layers) if layer.weight in plan.weights}

        def flush(bar, position: int) -> None:
            results = executor.map(_quantize_layer, [args for _, _, args in pending])
            for array in done:
                release(array)
            done.clear()
            for (layer, site, args), res in zip(pending, results):
                if lazy:
                    release(args[0])
                    res.w_hat = tensor_array(spill(res.w_hat, site.initializer))
                    res.ints = tensor_array(spill(res.ints, f"{site.initializer}_ints"))
                    done.extend((res.w_hat, res.ints))
                out[layer.node] = res
                site.qparams = res.qparams()
                if o.inputs == "sequential":
                    # later layers see the quantized weight, in the model's type (a float16 model's MatMuls take float16)
                    runner.consts[site.initializer] = res.w_hat.astype(runner.consts[site.initializer].dtype, copy=False)
                bar.update(1)
                if last_use[layer.inputs[0]] < position:
                    hs.pop(layer.inputs[0], None)
            pending.clear()

        with progress(progress_desc, ctx.show_progress, total=len(plan.layers), unit="layer") as bar:
            for position, layer in enumerate(plan.layers):
                site = plan.weights.get(layer.weight or "")
                if site is None:
                    continue
                x_name = layer.inputs[0]
                w = weights[site.initializer]
                if x_name not in hs:
                    if o.inputs == "sequential":
                        flush(bar, position)
                    hs[x_name] = _gram(runner, x_name)
                h = hs[x_name]
                bits = 8 if layer.node in bits8 else 4
                pending.append((layer, site, (w, h, profile.block_size, bits, signed, o.damp, o.act_order, shrink, o.lazy)))
            flush(bar, len(plan.layers))
        return out

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        #: dequantized GPTQ weights by initializer, from refine
        self._w_hat: dict[str, np.ndarray] = {}

    def quantized_rewrite(self, ctx: RunContext) -> onnx.ModelProto | None:
        """The working model with the GPTQ weights written over the float ones."""
        return with_initializers(ctx.model, self._w_hat) if self._w_hat else None

    def refine(self, ctx: RunContext) -> None:
        o = self.options
        t0 = time.perf_counter()
        plan = ctx.plan
        self._w_hat = {}
        self._sessions: dict[str, object] = {}
        # the samples kept and the size of each run, bounded by memory_mb whatever the data's batch
        # size and sample count (H itself is accumulated run by run)
        chunks, fit = fitted_chunks(ctx.model, [b.feeds for b in sample_batches(ctx, o.samples)], int(o.memory_mb * 2**20))
        n_samples = sum(sample_count(c) for c in chunks)
        inits = {t.name: t for t in ctx.model.graph.initializer}
        weights = {s.initializer: tensor_array(inits[s.initializer]).astype(np.float32, copy=False) for s in plan.weights.values()}  # memory-mapped when on disk
        names = [layer.node for layer in plan.layers if layer.weight in plan.weights]
        bits8 = {n for n in names if any(fnmatch.fnmatchcase(n, g) for g in o.keep8_names)}
        unknown = [g for g in o.keep8_names if not any(fnmatch.fnmatchcase(n, g) for n in names)]
        if unknown:
            raise OptionError(f"gptq: keep8_names {', '.join(unknown)} match no quantized MatMul")
        results = self._pass(ctx, chunks, weights, bits8, "gptq")
        first_errors = {n: r.rel_error for n, r in results.items()}
        chosen: list[str] = []
        if o.keep8:
            ranked = sorted((n for n in names if n not in bits8), key=lambda n: -first_errors[n])
            chosen = ranked[: o.keep8]
            bits8 |= set(chosen)
        if chosen:
            for site in plan.weights.values():  # the second pass starts from round-to-nearest again
                site.qparams = ctx.profile.weight_block_qparams(weights[site.initializer], site.axis or 0)
            results = self._pass(ctx, chunks, weights, bits8, "gptq (mixed precision)")
        # the dequantized GPTQ weights, written by quantized_rewrite; the QDQ rewrite recovers the integers exactly
        by_init = {plan.weights[layer.weight].initializer: results[layer.node] for layer in plan.layers if layer.node in results}
        self._w_hat = {name: res.w_hat.astype(np.float32, copy=False) for name, res in by_init.items()}  # no copy: on disk when lazy
        self._sessions.clear()
        layers = [{"node": n, "bits": results[n].bits, "rel_error": round(results[n].rel_error, 6),
                   "rel_error_4bit": round(first_errors[n], 6), "shape": list(weights[plan.weights[lw].initializer].shape),
                   "damp": results[n].damp_used}
                  for n, lw in ((layer.node, layer.weight) for layer in plan.layers) if n in results]
        n8 = sum(1 for r in layers if r["bits"] == 8)
        params8 = sum(int(np.prod(r["shape"])) for r in layers if r["bits"] == 8)
        params = sum(int(np.prod(r["shape"])) for r in layers)
        mean4 = float(np.mean([first_errors[n] for n in results])) if results else 0.0
        report: dict[str, Any] = {
            "samples": n_samples,
            "inputs": o.inputs,
            "samples_kept": fit.describe(),
            "layers": layers,
            "bits8_layers": sorted(n for n in results if results[n].bits == 8),
            "bits8_params_share": params8 / params if params else 0.0,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        lines = [f"{len(layers)} MatMuls, H from {n_samples} calibration samples ({o.inputs} inputs), "
                 f"mean relative output error at 4 bits {mean4:.3g}, {report['seconds']:.1f} s"]
        if n8:
            lines.append(f"mixed precision: {n8} MatMuls ({100 * params8 / params:.1f}% of the MatMul weights) at 8 bits: "
                         + ", ".join(report["bits8_layers"]))
        report["summary"] = lines
        ctx.report[self.name] = report


@hookimpl
def register_methods(register) -> None:
    register(Gptq)
