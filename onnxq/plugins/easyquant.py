"""``easyquant``: EasyQuant scale search (arXiv 2006.16669; docs/methods.md: EasyQuant).

Starting from calibrated scales, alternately search every layer's per-output-channel weight
steps and then every layer's input activation step so that the layer's output (after its Relu,
by default) has the highest mean per-sample cosine similarity with the FP32 output, with the
layer's input taken from the *already quantized* earlier layers. Layers are visited in
topological order; the initial scale is always a candidate and wins ties, so no search step can
lower the objective it measured.

Where the paper and the released code disagree, each choice is an option (docs/methods.md: EasyQuant):
``act_init`` (paper: max; code and onnxq default: KL, i.e. ``trt-entropy``, error-guarded), ``grid`` (paper
[0.5, 2]×S with 100 points — the default — or the code's narrower one-sided grids) and
``objective_tensor`` (code and default: post-activation; paper formula: conv output).

An activation tensor read by several weighted layers keeps one shared scale (TensorRT needs it),
chosen with the objective averaged over those layers (the placement rules in onnxq/graph/placement.py).
"""

from __future__ import annotations

import copy
import dataclasses
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx

from onnxq.search.evaluator import GraphRunner, LayerRunner
from onnxq.calib.progress import progress
from onnxq.search.footprint import fitted_chunks
from onnxq.calib.readers import sample_count
from onnxq.search.samples import sample_batches, samples_request
from onnxq.calib.statistics import StatRequest
from onnxq.errors import OnnxqError, OptionError
from onnxq.graph.plan import Layer
from onnxq.graph.index import GraphIndex
from onnxq.hookspecs import hookimpl
from onnxq.method import QuantMethod, RunContext
from onnxq.options import option
from onnxq.qparams import QParams
from onnxq.runtime.executor import SerialExecutor, current as current_executor

COSINE_GUARD = 1e-5

#: row-wise dot product along the last axis (numpy >= 2 has a fast gufunc; einsum before that)
_vecdot = getattr(np, "vecdot", None) or (lambda a, b: np.einsum("...i,...i->...", a, b))


#: ``preset=paper``: the settings of the paper's text (arXiv 2006.16669, §3-4.1), applied to every
#: option left at its onnxq default (docs/methods.md: EasyQuant)
PAPER = {
    "act_init": "minmax", "metric": "cosine", "samples": 50, "search": "grid", "grid": "paper", "n_candidates": 100,
    "search_lo": 0.5, "search_hi": 2.0, "order": "weights_first", "objective_tensor": "conv_output",
    "magnitude_fix": False, "max_positions": 0, "reach_max": False, "keep_start": False, "rounds": 1, "schedule": "passes",
}


@dataclass(frozen=True)
class EasyQuantOptions:
    """Options of EasyQuant (defaults: docs/methods.md: EasyQuant)."""

    preset: Literal["onnxq", "paper"] = option("onnxq", "onnxq: the measured defaults below; paper: the paper's exact settings (max init, cosine, 100-point grid on the conv output, weights first, 50 samples, no onnxq additions) for every option left at its default")
    act_init: str = option("mse", "calibrator giving the initial activation scales (any calibrating method, e.g. minmax = the paper's max init, trt-entropy = the released code's KL)")
    samples: int = option(32, "calibration samples used by the search (at most; memory_mb may keep fewer)")
    memory_mb: float = option(384, "memory the search may hold for its samples (the float and the quantized pass's activations kept between layers, plus one ONNX Runtime run); keeps fewer samples than `samples`, in smaller runs, where they do not fit (the report says how many)")
    search: Literal["zoom", "golden", "grid"] = option("zoom", "zoom: coarse grid over [lo, hi], then zoom_steps finer grids of zoom_points inside each channel's best bracket, each grid one batched evaluation (onnxq default); golden: coarse grid then refine_steps golden-section steps, one candidate per evaluation; grid: every candidate of the grid below")
    grid: Literal["paper", "code"] = option("paper", "candidates for search=grid — paper: n points in [lo, hi]×S; code: the released code's one-sided grids")
    search_lo: float = option(0.5, "lowest scale multiplier of the paper grid")
    search_hi: float = option(2.0, "highest scale multiplier of the paper grid")
    n_candidates: int = option(100, "points of the paper grid")
    rounds: int = option(1, "alternation rounds (one pass over all layers' weights and one over all activations)")
    schedule: Literal["passes", "layerwise"] = option("passes", "passes: every layer's weights, then every layer's activations (paper, Algorithm 1); layerwise: both searches for one layer before the next (half the full-model evaluations)")
    order: Literal["activations_first", "weights_first"] = option("weights_first", "which pass comes first in a round (paper, code and onnxq default: weights_first; each pass is guarded on its own, see keep_start)")
    objective_tensor: Literal["post_activation", "conv_output"] = option("post_activation", "compare the layer output after a sole following Relu/Clip (code) or the raw output (paper formula)")
    search_weights: bool = option(True, "search per-channel weight steps")
    magnitude_fix: bool = option(True, "after the weight search, rescale each channel's dequantization step to restore its output magnitude (cosine ignores it)")
    search_activations: bool = option(True, "search activation steps")
    metric: Literal["cosine", "mse"] = option("mse", "objective: mse = minus the normalised squared error, which also sees magnitude (onnxq default); cosine = the paper's mean per-sample cosine")
    coarse_points: int = option(7, "points of the coarse grid over [search_lo, search_hi] (search=zoom or golden)")
    zoom_steps: int = option(2, "finer grids after the coarse one (search=zoom)")
    zoom_points: int = option(4, "points of each finer grid, evenly inside the bracket around the best so far (search=zoom)")
    refine_steps: int = option(8, "golden-section steps after the coarse grid (search=golden)")
    reach_max: bool = option(True, "the activation grid always reaches the observed max-abs (recovers a start that clipped an outlier-carrying tensor too hard)")
    keep_start: bool = option(True, "after each pass (all layers' weights, or all layers' activations), keep its scales only if they lower the error at the model's outputs on the search samples, else undo the pass (the search never ends worse than its start)")
    threads: int = option(1, "intra-op threads of the search's ONNX Runtime sessions (0: ONNX Runtime's default); its runs are many and small, where a thread pool costs more CPU than it saves")
    chunk_mb: int = option(256, "memory for one batch of stacked candidate outputs, in MB")
    max_positions: int = option(4096, "score a 2-D conv whose output map is larger than 256 positions (16x16) per sample on random 8x8 output windows, about this many output positions over all samples; 0 = whole outputs")

    def __post_init__(self) -> None:
        if self.preset == "paper":  # options still at their onnxq default take the paper's value
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for key, value in PAPER.items():
                if getattr(self, key) == defaults[key]:
                    object.__setattr__(self, key, value)

    def validate(self) -> None:
        if self.samples < 1 or self.rounds < 1 or self.n_candidates < 2 or self.coarse_points < 3 or self.refine_steps < 0:
            raise ValueError("samples and rounds must be >= 1, n_candidates >= 2, coarse_points >= 3, refine_steps >= 0")
        if self.zoom_steps < 0 or self.zoom_points < 1:
            raise ValueError("zoom_steps must be >= 0 and zoom_points >= 1")
        if not 0 < self.search_lo < 1 < self.search_hi:
            raise ValueError("need 0 < search_lo < 1 < search_hi")
        if self.chunk_mb < 1 or self.max_positions < 0 or self.memory_mb <= 0 or self.threads < 0:
            raise ValueError("chunk_mb must be >= 1, max_positions >= 0, memory_mb > 0 and threads >= 0")


def _grid(lo: float, hi: float, n: int) -> np.ndarray:
    g = np.linspace(lo, hi, n)
    g[np.argmin(np.abs(g - 1.0))] = 1.0  # exactly 1: the initial scale is a candidate
    return g


def cosine_rows(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Cosine of matching rows along the last axis (``cand`` may carry leading candidate axes).

    Computed as ``1 - ||r/|r| - c/|c|||² / 2`` in float32: candidates differ in ``1 - cos``
    (often 1e-5 or less), and this form keeps that difference to float32's *relative* precision,
    where ``dot / (|r||c|)`` would lose it to rounding near 1 unless done in float64 (which is
    several times slower). Guard from the released code: when either vector sums to zero in L1
    (its squared norm is zero), 1e-5 is added to every element of both before the cosine is taken
    (done algebraically, without copies).
    """
    ref = np.asarray(ref, np.float32)
    cand = np.asarray(cand, np.float32)
    nr2 = _vecdot(ref, ref).astype(np.float64)
    nc2 = _vecdot(cand, cand).astype(np.float64)
    inv_r = (1.0 / np.sqrt(np.where(nr2 > 0, nr2, 1.0))).astype(np.float32)
    inv_c = (1.0 / np.sqrt(np.where(nc2 > 0, nc2, 1.0))).astype(np.float32)
    diff = cand * inv_c[..., None] - ref * inv_r[..., None]
    cos = 1.0 - 0.5 * _vecdot(diff, diff).astype(np.float64)
    nr2 = np.broadcast_to(nr2, nc2.shape)
    guard = (nr2 == 0) | (nc2 == 0)
    if np.any(guard):
        e, size = COSINE_GUARD, ref.shape[-1]
        dot = _vecdot(cand, ref).astype(np.float64)
        sr = np.broadcast_to(ref.sum(-1, dtype=np.float64), nc2.shape)
        sc = cand.sum(-1, dtype=np.float64)
        dot = dot + e * (sr + sc) + e * e * size
        gr2 = nr2 + 2 * e * sr + e * e * size
        gc2 = nc2 + 2 * e * sc + e * e * size
        cos = np.where(guard, dot / np.sqrt(np.maximum(gr2 * gc2, 1e-300)), cos)
    return cos


class EasyQuant(QuantMethod):
    """Alternating per-channel weight / per-tensor activation scale search maximising layer-output cosine."""

    name = "easyquant"
    summary = "EasyQuant: alternating weight/activation scale search maximising per-layer output cosine (INT8/INT7)"
    Options = EasyQuantOptions
    calibrates = True
    follows_calibrator = True  # -p cfws -p easyquant: the search starts from cfws's ranges
    calibrator_option = "act_init"

    def _calibrator(self, ctx: RunContext) -> QuantMethod:
        from onnxq.host import get_host

        cls = get_host().method(self.options.act_init)
        if not cls.calibrates or cls is EasyQuant:
            raise OptionError(f"easyquant: act_init '{self.options.act_init}' is not a calibrator")
        return cls()

    def declare_statistics(self, ctx: RunContext) -> list[StatRequest]:
        return self._calibrator(ctx).declare_statistics(ctx) + [samples_request(self.options.samples)]

    def choose_qparams(self, ctx: RunContext) -> None:
        self._calibrator(ctx).choose_qparams(ctx)

    # -- the search ------------------------------------------------------------------------
    def refine(self, ctx: RunContext) -> None:
        o = self.options
        if ctx.profile.weight_only:
            raise OptionError("easyquant searches 8- and 7-bit weights and activations; for --bits 4 use minmax (round to nearest) or mse")
        self._sessions: dict[str, object] = {}
        self._threads = o.threads or None
        self._fp_cache: dict[str, np.ndarray] = {}
        self._fp_bytes = 0
        # the samples kept and the size of each run, bounded by memory_mb whatever the data's batch
        chunks, fit = fitted_chunks(ctx.model, [b.feeds for b in sample_batches(ctx, o.samples)], int(o.memory_mb * 2**20), runners=2)
        chunks = _same_shapes(chunks)
        idx = GraphIndex(ctx.model)
        layers = [self._objective(l) for l in ctx.plan.layers]
        runners = {l.node: LayerRunner(ctx.model, l, idx, threads=self._threads) for l in layers if l.weight in ctx.plan.weights}
        w_init = {w: s.qparams for w, s in ctx.plan.weights.items()}
        a_init = {t: s.range for t, s in ctx.plan.activations.items()}
        self._observed = {t: (ctx.stats[t].min, ctx.stats[t].max) for t in ctx.plan.activations if t in ctx.stats}
        report: dict[str, dict[str, Any]] = {l.node: {} for l in layers}
        skipped = [l.node for l in layers if l.node not in runners]
        passes = [("weights", o.search_weights), ("activations", o.search_activations)]
        if o.order == "activations_first":
            passes.reverse()
        steps = [self._search_weights if kind == "weights" else self._search_activation for kind, enabled in passes if enabled]
        guard = _PassGuard(self, ctx, chunks) if o.keep_start else None
        for r in range(o.rounds):
            if o.schedule == "layerwise":
                before = _Scales.of(ctx.plan)
                self._run_pass(ctx, chunks, layers, runners, w_init, a_init, report, steps, "easyquant")
                if guard is not None:
                    guard.settle(before, f"round {r + 1}")
            else:
                for step, label in zip(steps, [k for k, e in passes if e]):
                    before = _Scales.of(ctx.plan)
                    self._run_pass(ctx, chunks, layers, runners, w_init, a_init, report, [step], f"easyquant: {label}")
                    if guard is not None:
                        guard.settle(before, f"{label} (round {r + 1})")
        self._fp_cache.clear()
        outcome = guard.outcome() if guard is not None else None
        ctx.report[self.name] = {
            "samples": sum(sample_count(c) for c in chunks),
            "sample_fit": fit.describe(),
            "preset": o.preset,
            "outcome": outcome,
            "layers": report,
            "skipped_layers": skipped,
            "note": "INT7 runs on INT8 kernels in ONNX Runtime and TensorRT" if ctx.profile.bits == 7 else None,
        }

    def _objective(self, layer: Layer) -> Layer:
        if self.options.objective_tensor == "conv_output":
            return dataclasses.replace(layer, objective=layer.output)
        return layer

    def _weight_grid(self, s0: np.ndarray, qmax: int) -> np.ndarray:
        """Multipliers g (step = Δ0 / g); the code grid is per channel: [K, C]."""
        o = self.options
        if o.grid == "paper":
            return _grid(o.search_lo, o.search_hi, o.n_candidates)[:, None] * np.ones_like(s0)[None, :]
        # released code: 98 multipliers linearly between 1 and S0 (= 1/Δ0), plus S0 itself
        mult0 = 1.0 / s0
        mults = np.linspace(1.0, mult0, 98)
        return np.concatenate([np.ones((1,) + s0.shape), mults * s0[None, :]])

    def _act_grid(self) -> np.ndarray:
        o = self.options
        if o.grid == "paper":
            return _grid(o.search_lo, o.search_hi, o.n_candidates)
        return np.concatenate([[1.0], np.linspace(0.8, 1.0, 198)])

    def _chunk(self, per_candidate_bytes: int, total: int) -> int:
        return int(max(1, min(total, self.options.chunk_mb * 2**20 // max(per_candidate_bytes, 1))))

    def _run_pass(self, ctx, chunks, layers, runners, w_init, a_init, report, steps, label: str) -> None:
        """One sweep over the layers in topological order, running ``steps`` on each."""
        plan = ctx.plan
        readers: dict[str, list[Layer]] = {}
        for l in layers:
            if l.node in runners and l.inputs and l.inputs[0] in plan.activations:
                readers.setdefault(l.inputs[0], []).append(l)
        st = _Sweep(ctx, GraphRunner(ctx.model, chunks, plan, self._sessions, threads=self._threads),
                    GraphRunner(ctx.model, chunks, None, self._sessions, threads=self._threads),
                    runners, w_init, a_init, report, readers, {t: g for g in plan.share_groups for t in g}, chunks)
        # --executor ray: the weight searches of layers reading one input (attention's Q, K and V) are
        # independent (their input comes before all of them), so they run as parallel tasks; the
        # model goes to the object store once per pass (docs/scale.md)
        executor = current_executor()
        parallel = steps == [self._search_weights] and not isinstance(executor, SerialExecutor)
        model_ref, worker = (executor.share(ctx.model), self._for_workers()) if parallel else (None, None)
        with progress(label, ctx.show_progress, total=len(layers), unit="layer") as bar:
            i = 0
            while i < len(layers):
                group = _same_input_run(layers, i) if parallel else layers[i : i + 1]
                if len(group) > 1:
                    jobs = [(layer, self._weights_job(st, layer)) for layer in group]
                    jobs = [(layer, job) for layer, job in jobs if job is not None]
                    results = executor.map(_weight_search_task, [(worker, model_ref, layer, *job) for layer, job in jobs])
                    for (layer, job), result in zip(jobs, results):
                        self._apply_weights(st, layer, job, result)
                else:
                    for step in steps:
                        step(st, group[0])
                bar.update(len(group))
                i += len(group)

    def _for_workers(self) -> "EasyQuant":
        """A copy to send to Ray tasks: the options and search code, without sessions or cached tensors."""
        light = copy.copy(self)
        light._sessions, light._fp_cache, light._observed = {}, {}, {}
        return light

    def _fp_value(self, st: "_Sweep", tensor: str) -> np.ndarray:
        """FP32 objective tensor; kept (up to ``chunk_mb``) so a later pass need not run the float model again.

        A tensor read by several layers makes the float runner jump ahead for its far readers'
        objectives; an objective it has already released is then recomputed by a fresh runner.
        """
        v = self._fp_cache.get(tensor)
        if v is None:
            try:
                v = st.f_run.value(tensor)
            except OnnxqError:
                st.f_run = GraphRunner(st.ctx.model, st.chunks, None, self._sessions, threads=self._threads)
                v = st.f_run.value(tensor)
            if self._fp_bytes + v.nbytes <= self.options.chunk_mb * 2**20:
                self._fp_cache[tensor] = v
                self._fp_bytes += v.nbytes
        return v

    def _search_weights(self, st: "_Sweep", layer: Layer) -> None:
        job = self._weights_job(st, layer)
        if job is not None:
            self._apply_weights(st, layer, job, _weight_search(self, st.runners[layer.node], *job))

    def _weights_job(self, st: "_Sweep", layer: Layer) -> tuple[np.ndarray, np.ndarray, np.ndarray, QParams, int] | None:
        """What one layer's weight search reads: (input, FP32 objective, weight, start qparams, axis); None: nothing to search."""
        ctx, plan, runners, w_init, report = st.ctx, st.ctx.plan, st.runners, st.w_init, st.report
        runner = runners.get(layer.node)
        if runner is None or not runner.stackable:
            return None
        site = plan.weights[layer.weight]
        x = self._layer_input(st.q_run, layer, plan)
        w = ctx.weight(layer.weight)
        q0: QParams = w_init[layer.weight]
        if np.array_equal(q0.fake_quantize(w), w):
            report[layer.node]["weight_search"] = "skipped: the initial grid represents the weights exactly"
            return None
        return x, self._fp_value(st, layer.objective), w, q0, site.axis if site.axis is not None else 0

    def _score_name(self) -> str:
        """What the report's ``*_score_before/after`` hold: the objective's value under ``metric``."""
        return "cosine" if self.options.metric == "cosine" else "minus normalised squared error"

    def _apply_weights(self, st: "_Sweep", layer: Layer, job: tuple[Any, ...], result: tuple[np.ndarray, ...]) -> None:
        """Install a weight search's result in the plan and the report."""
        q0 = job[3]
        step, alpha, chosen, before, after = result
        shape = (lambda a: a if q0.scale.ndim else np.float32(a[0]))
        st.ctx.plan.weights[layer.weight].qparams = dataclasses.replace(q0, scale=shape((step * alpha).astype(np.float32)),
                                                                        quant_scale=None if np.all(alpha == 1) else shape(step))
        r = st.report[layer.node]
        r["score"] = self._score_name()
        r["weight_score_before"] = float(before.mean())
        r["weight_score_after"] = float(after.mean())
        r["weight_multiplier_mean"] = float(chosen.mean())

    def _magnitude_fix(self, runner, x, w, q0, step, axis, ch_axis, ref_c, after, group):
        """[D] Cosine ignores magnitude, so a search that clips a channel's weights can shrink its
        output. The stored integers stay those of the chosen step; the dequantization scale of each
        channel gets the least-squares factor that restores the output's magnitude (kept only where
        the objective does not drop). Returns (factor per channel, objective per channel)."""
        wq = _fq_weight(w, step, q0, axis)
        both = runner.run_stacked_rows(x, np.stack([w, wq]), axis, linear=True)  # [N, C, 2, S]: one run for both
        y_fp, y_q = both[:, :, 0], both[:, :, 1]
        num = _vecdot(y_fp, y_q).astype(np.float64).sum(axis=0)
        den = _vecdot(y_q, y_q).astype(np.float64).sum(axis=0)
        alpha = np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)
        alpha = np.clip(np.nan_to_num(alpha, nan=1.0), 0.5, 2.0)
        shape = [1] * w.ndim
        shape[axis] = -1
        y = runner.run(x, (wq * alpha.reshape(shape)).astype(np.float32))
        fixed = _channel_score(ref_c, group(_channels(y, ch_axis))[None], self.options.metric)[0]
        keep = fixed >= after
        return np.where(keep, alpha, 1.0), np.where(keep, fixed, after)

    def _windowed(self, runner: LayerRunner, x: np.ndarray, ref: np.ndarray):
        """[D] A large 2-D conv is scored on random output windows (``max_positions``): returns
        (runner, input, reference, regroup) for the windows, or the arguments unchanged. ``regroup``
        gathers each sample's windows into one row for the per-sample cosine ([N·per, C, ...]
        -> [N, C, ..., per·S]); sums over rows (mse) need no regrouping."""
        win = runner.windows(x.shape, self.options.max_positions, zlib.crc32(runner.layer.node.encode()))
        if win is None:
            return runner, x, ref, _same
        per = win.per_sample
        group = _same if self.options.metric == "mse" else (lambda a: _by_sample(a, per))
        return win.runner, win.input(x), win.output(ref), group

    def _search(self, evaluate, ncols: int, grid: np.ndarray | None, lo: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Maximise ``evaluate`` per column over multipliers; returns (chosen g, score at g=1, best score).

        ``grid`` given: evaluate every row of it. Otherwise a ``coarse_points`` grid over
        [search_lo, search_hi], then (search=zoom) ``zoom_steps`` finer grids or (search=golden)
        golden-section steps inside each column's best bracket.
        g = 1 is always evaluated and kept unless something is strictly better.
        """
        o = self.options
        if grid is None:
            grid = np.repeat(_grid(o.search_lo if lo is None else lo, o.search_hi, o.coarse_points)[:, None], ncols, axis=1)
        scores = evaluate(grid)
        base = _base_index(grid)
        base_score = scores[base].copy()
        best = _pick(scores, base)
        cols = np.arange(ncols)
        best_g = grid[best, cols].copy()
        best_s = scores[best, cols].copy()
        if o.search == "zoom":
            # [D] each finer grid is one batched evaluation (all its candidates in one ONNX Runtime
            # run), where golden section needs one run per candidate: on small layers the run, not
            # the arithmetic, is the cost
            lo = grid[np.maximum(best - 1, 0), cols]
            hi = grid[np.minimum(best + 1, len(grid) - 1), cols]
            frac = np.arange(1, o.zoom_points + 1) / (o.zoom_points + 1)
            for _ in range(o.zoom_steps):
                pts = lo[None, :] + frac[:, None] * (hi - lo)[None, :]  # [zoom_points, C]
                f = evaluate(pts)
                k = np.argmax(f, axis=0)
                better = f[k, cols] > best_s
                best_g[better], best_s[better] = pts[k, cols][better], f[k, cols][better]
                half = (hi - lo) / (o.zoom_points + 1)
                lo, hi = np.maximum(best_g - half, lo), np.minimum(best_g + half, hi)
        if o.search == "golden":
            lo = grid[np.maximum(best - 1, 0), cols]
            hi = grid[np.minimum(best + 1, len(grid) - 1), cols]
            phi = (np.sqrt(5) - 1) / 2
            c, d = hi - phi * (hi - lo), lo + phi * (hi - lo)
            sc_cd = evaluate(np.stack([c, d]))
            fc, fd = sc_cd[0], sc_cd[1]
            for g_arr, f_arr in ((c, fc), (d, fd)):
                better = f_arr > best_s
                best_g[better], best_s[better] = g_arr[better], f_arr[better]
            for _ in range(max(0, o.refine_steps - 1)):
                left = fc >= fd  # maximum lies in [lo, d]
                hi = np.where(left, d, hi)
                lo = np.where(left, lo, c)
                new = np.where(left, hi - phi * (hi - lo), lo + phi * (hi - lo))
                f_new = evaluate(new[None, :])[0]
                d, fd, c, fc = np.where(left, c, new), np.where(left, fc, f_new), np.where(left, new, d), np.where(left, f_new, fd)
                better = f_new > best_s
                best_g[better], best_s[better] = new[better], f_new[better]
        return best_g, base_score, best_s

    def _layer_input(self, run: GraphRunner, layer: Layer, plan) -> np.ndarray:
        t = layer.inputs[0]
        x = run.value(t)
        site = plan.activations.get(t)
        if site is not None and site.qparams is not None and (layer.node, 0) in [tuple(c) for c in site.consumers]:
            return site.qparams.fake_quantize(x)
        return x

    def _search_activation(self, st: "_Sweep", layer: Layer) -> None:
        ctx, plan, runners, a_init, report = st.ctx, st.ctx.plan, st.runners, st.a_init, st.report
        q_run, readers, groups, done = st.q_run, st.readers, st.groups, st.done
        t = layer.inputs[0] if layer.inputs else None
        if t is None or t in done or t not in readers:
            return
        done.add(t)
        consumers = readers[t]
        if not all(runners[c.node].samples_first for c in consumers):
            # a Gemm reading its input transposed has its samples on axis 1; its calibrated range stays
            report[consumers[0].node]["activation_search"] = "skipped: a reader takes the input transposed (Gemm transA)"
            return
        x = q_run.value(t)
        n = x.shape[0]
        views = [self._windowed(runners[c.node], x, self._fp_value(st, c.objective)) for c in consumers]
        wq = [_fq_weight(ctx.weight(c.weight), plan.weights[c.weight].qparams.scale, plan.weights[c.weight].qparams, plan.weights[c.weight].axis or 0) for c in consumers]
        lo0, hi0 = a_init[t]
        step = self._chunk(max(v[1].nbytes for v in views) + sum(v[2].nbytes for v in views), 10**9)

        score = neg_nmse_rows if self.options.metric == "mse" else cosine_rows

        def evaluate(g: np.ndarray) -> np.ndarray:  # g: [k, 1] -> layer objective [k, 1]
            out = np.zeros((len(g), 1))
            for start in range(0, len(g), step):
                part = g[start : start + step, 0]
                qps = [ctx.profile.activation_qparams(lo0 / gk, hi0 / gk) for gk in part]
                done_x: dict[int, np.ndarray] = {}
                for (runner, xc, ref, _), w in zip(views, wq):
                    xs = done_x.get(id(xc))
                    if xs is None:  # consumers without windows share one candidate batch
                        xs = done_x[id(xc)] = np.concatenate([q.fake_quantize(xc) for q in qps])
                    # rows are sample-major, so each sample's windows form one row of the objective
                    y = runner.run(xs, w).reshape(len(part), n, -1)
                    out[start : start + step, 0] += score(ref.reshape(n, -1), y).mean(axis=1) / len(consumers)
            return out

        amax = max(abs(lo0), abs(hi0), 1e-12)
        amax_seen = max(abs(v) for v in self._observed[t]) if t in self._observed else amax
        # [D] the range always reaches the observed max-abs: a calibrator that clipped an
        # outlier-carrying tensor far too hard (KL does, on some real models) is recoverable
        lo_g = min(self.options.search_lo, amax / max(amax_seen, 1e-12)) if self.options.reach_max else self.options.search_lo
        chosen, before, after = self._search(evaluate, 1, self._act_grid()[:, None] if self.options.search == "grid" else None, lo=lo_g)
        g_best = float(chosen[0])
        new = ctx.profile.activation_qparams(lo0 / g_best, hi0 / g_best)
        for member in groups.get(t, [t]):
            plan.activations[member].qparams = new
            plan.activations[member].range = (lo0 / g_best, hi0 / g_best)
        for c in consumers:
            r = report[c.node]
            r["score"] = self._score_name()
            r["activation_score_before"] = float(before[0])
            r["activation_score_after"] = float(after[0])
            r["activation_multiplier"] = g_best


def _weight_search(method: EasyQuant, runner: LayerRunner, x: np.ndarray, ref: np.ndarray, w: np.ndarray, q0: QParams,
                   axis: int) -> tuple[np.ndarray, ...]:
    """One layer's weight-scale search (a pure function of its arguments: the same result in this
    process or in a Ray task). Returns (step, magnitude factor, chosen multiplier, objective at the
    start, objective after), per channel."""
    runner, x, ref, group = method._windowed(runner, x, ref)
    s0 = np.asarray(q0.scale, np.float64).reshape(-1)
    ch_axis = runner.channel_axis % ref.ndim
    ref_c = group(_channels(ref, ch_axis))
    step = method._chunk(ref.nbytes * 2, 10**9)

    def evaluate(g: np.ndarray) -> np.ndarray:  # g: [k, C] multipliers -> per-channel cosines [k, C]
        out = np.empty(g.shape)
        for start in range(0, len(g), step):
            part = g[start : start + step]
            cands = np.stack([_fq_weight(w, s0 / (gk if s0.size > 1 else gk[:1]), q0, axis) for gk in part])
            y = group(runner.run_stacked_rows(x, cands, axis))  # [N, C, k, S]
            out[start : start + step] = _stacked_channel_score(ref_c, y, method.options.metric, inplace=True)
        return out

    ncols = s0.size
    chosen, before, after = method._search(evaluate, ncols, method._weight_grid(s0, q0.qmax) if method.options.search == "grid" else None)
    new_step = (s0 / chosen).astype(np.float32)
    alpha = np.ones(ncols)
    if method.options.magnitude_fix and ncols > 1:
        alpha, after = method._magnitude_fix(runner, x, w, q0, new_step, axis, ch_axis, ref_c, after, group)
    return new_step, alpha, chosen, before, after


def _weight_search_task(method: EasyQuant, model: onnx.ModelProto, layer: Layer, *job: Any) -> tuple[np.ndarray, ...]:
    """:func:`_weight_search` in a Ray task: the layer's runner is built there, from the shared model."""
    return _weight_search(method, LayerRunner(model, layer, threads=method._threads), *job)


def _same_input_run(layers: list[Layer], i: int) -> list[Layer]:
    """``layers[i]`` and the layers right after it that read the same input tensor."""
    j = i + 1
    while layers[i].inputs and j < len(layers) and layers[j].inputs[:1] == layers[i].inputs[:1]:
        j += 1
    return layers[i:j]


class _PassGuard:
    """[D] The layer objectives are local: a pass that improves every layer's objective can still
    move the model's outputs further from FP32 (errors compound differently downstream; on PP-OCRv4
    rec the activation pass does, the weight pass does not). After each pass the model's float
    outputs on the search samples are compared with FP32 (normalised squared error); the pass is
    kept only if it lowers that error, otherwise its scales are undone, so the search never ends
    worse than its start and a harmful pass does not take a useful one with it."""

    def __init__(self, method: "EasyQuant", ctx: RunContext, chunks: list[dict[str, np.ndarray]]) -> None:
        self.method, self.ctx, self.chunks = method, ctx, chunks
        idx = GraphIndex(ctx.model)
        self.outs = [o.name for o in ctx.model.graph.output
                     if o.type.WhichOneof("value") in (None, "tensor_type") and idx.types.get(o.name, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT]
        self.ref: dict[str, np.ndarray] = {}
        self.passes: list[dict[str, Any]] = []
        if self.outs:
            fp = GraphRunner(ctx.model, chunks, None, method._sessions, keep=self.outs, threads=method._threads)
            fp.run_all()
            self.ref = {t: fp.value(t) for t in self.outs}
            del fp
        self.start = self.best = self.error() if self.outs else None

    def error(self) -> float:
        """Mean over the float outputs of the normalised squared error against FP32 on the search samples."""
        m = self.method
        run = GraphRunner(self.ctx.model, self.chunks, self.ctx.plan, m._sessions, keep=self.outs, threads=m._threads)
        run.run_all()
        return float(np.mean([-neg_nmse_rows(self.ref[t].reshape(1, -1), run.value(t).reshape(1, -1))[0] for t in self.outs]))

    def settle(self, before: "_Scales", label: str) -> None:
        """Keep the pass that just ran if it lowered the output error, else go back to ``before``."""
        if self.best is None:
            return
        e = self.error()
        kept = e < self.best
        if kept:
            self.best = e
        else:
            before.apply(self.ctx.plan)
        self.passes.append({"pass": label, "output_nmse": e, "kept": kept})

    def outcome(self) -> dict[str, Any]:
        if self.start is None:
            return {"kept": "search", "reason": "no float output to compare"}
        kept = any(p["kept"] for p in self.passes)
        return {"kept": "search" if kept else "start", "output_nmse_start": self.start, "output_nmse_search": self.best,
                "passes": self.passes}


@dataclass
class _Scales:
    """The plan's quantization parameters at one moment (to go back to them)."""

    weights: dict[str, QParams | None]
    activations: dict[str, tuple[QParams | None, Any]]

    @classmethod
    def of(cls, plan) -> "_Scales":
        return cls({w: s.qparams for w, s in plan.weights.items()}, {t: (s.qparams, s.range) for t, s in plan.activations.items()})

    def apply(self, plan) -> None:
        for w, q in self.weights.items():
            plan.weights[w].qparams = q
        for t, (q, r) in self.activations.items():
            plan.activations[t].qparams, plan.activations[t].range = q, r


@dataclass
class _Sweep:
    """What one sweep over the layers shares: the quantized and float runners and bookkeeping."""

    ctx: RunContext
    q_run: GraphRunner
    f_run: GraphRunner
    runners: dict[str, LayerRunner]
    w_init: dict[str, QParams]
    a_init: dict[str, tuple[float, float]]
    report: dict[str, dict[str, Any]]
    readers: dict[str, list[Layer]]
    groups: dict[str, Any]
    chunks: list[dict[str, np.ndarray]]
    done: set[str] = dataclasses.field(default_factory=set)


def _same_shapes(chunks: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The chunks whose inputs have the first chunk's shapes past the batch axis: the search joins
    its samples into one array per tensor, which sequences padded per batch to different lengths
    (token batches) do not allow."""
    first = {k: np.shape(v)[1:] for k, v in chunks[0].items()} if chunks else {}
    return [c for c in chunks if all(np.shape(v)[1:] == first[k] for k, v in c.items())]


def _channels(y: np.ndarray, ch_axis: int) -> np.ndarray:
    """[N, C, rest] view of an output with its channel axis at ``ch_axis``."""
    y = np.moveaxis(y, ch_axis, 1)
    return y.reshape(y.shape[0], y.shape[1], -1)


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _by_sample(a: np.ndarray, per: int) -> np.ndarray:
    """[N·per, C, ..., S] (each sample's windows in consecutive rows) -> [N, C, ..., per·S]."""
    a = a.reshape(a.shape[0] // per, per, *a.shape[1:])
    return np.moveaxis(a, 1, -2).reshape(*a.shape[:1], *a.shape[2:-1], per * a.shape[-1])


def neg_nmse_rows(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Minus the squared error of matching rows relative to the reference row's energy (higher is better)."""
    ref = np.asarray(ref, np.float32)
    diff = np.asarray(cand, np.float32) - ref
    err = _vecdot(diff, diff).astype(np.float64)
    energy = _vecdot(ref, ref).astype(np.float64)
    return -err / np.maximum(energy, 1e-30)


def _channel_score(ref: np.ndarray, cand: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Per-channel objective, [k, C], of candidates ``cand`` [k, N, C, S] against ``ref`` [N, C, S]."""
    return _stacked_channel_score(ref, np.moveaxis(cand, 0, 2), metric)


def _stacked_channel_score(ref: np.ndarray, y: np.ndarray, metric: str = "cosine", inplace: bool = False) -> np.ndarray:
    """Per-channel objective, [k, C], of candidates laid out ``y`` [N, C, k, S] against ``ref`` [N, C, S].

    cosine: mean over samples of the cosine over each channel's positions; a channel with a
    single position per sample (fully connected layers) would give a cosine of ±1, so there the
    cosine is taken over the samples instead [D]. mse: minus the channel's squared error over
    all samples and positions relative to its energy. ``inplace`` lets the mse path overwrite
    ``y`` (a search's own scratch output) instead of allocating the difference.
    """
    ref = np.asarray(ref, np.float32)
    if metric == "mse":
        diff = np.subtract(y, ref[:, :, None, :], out=y if inplace else None)
        err = _vecdot(diff, diff).astype(np.float64).sum(axis=0)  # [C, k]
        energy = _vecdot(ref, ref).astype(np.float64).sum(axis=0)  # [C]
        return -(err / np.maximum(energy, 1e-30)[:, None]).T
    if ref.shape[-1] == 1:
        return cosine_rows(ref[..., 0].T, np.transpose(y[..., 0], (2, 1, 0)))
    return cosine_rows(ref[:, :, None, :], y).mean(axis=0).T


def _base_index(grid: np.ndarray) -> int:
    g = grid if grid.ndim == 1 else grid[:, 0]
    return int(np.flatnonzero(np.isclose(g, 1.0))[0]) if np.any(np.isclose(g, 1.0)) else 0


def _pick(scores: np.ndarray, base: int) -> np.ndarray:
    """Per column: the best candidate, but the initial one unless another is strictly better."""
    best = np.argmax(scores, axis=0)
    keep = scores[best, np.arange(scores.shape[1])] <= scores[base]
    best[keep] = base
    return best


def _fq_weight(w: np.ndarray, scale: np.ndarray, q0: QParams, axis: int) -> np.ndarray:
    s = np.asarray(scale, np.float32)
    if s.ndim == 1 and s.size > 1:
        shape = [1] * w.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    q = np.clip(np.rint(w / s), q0.qmin, q0.qmax)
    return (q * s).astype(np.float32)


@hookimpl
def register_methods(register) -> None:
    register(EasyQuant)
