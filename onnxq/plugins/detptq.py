"""``detptq``: per-layer L_p scale selection guided by a task loss on the model outputs (docs/methods.md: DetPTQ).

DetPTQ (arXiv 2304.09785) observes that the best ``p`` of the L_p metric used to pick clipping
ranges differs from layer to layer, and picks it per layer with a detection output loss (ODOL).
onnxq's procedure (docs/methods.md "DetPTQ" records every choice):

1. **Candidates** (§5.3). For each quantized tensor and each ``p`` in ``p_values``: the clip
   threshold ``T = γ·max|x|`` (γ over ``ratios`` points in [``min_ratio``, 1]) minimising
   ``mean |x − Q_T(x)|^p`` on the grid the target deploys — weights per output channel (exact,
   on the weight values), activations per tensor (on the calibration histogram, 4 points per
   bin, asymmetric grids included). ``inf`` is max-abs; ``kl`` is ``trt-entropy``'s (error-guarded)
   entropy threshold for activations with max-abs weights (the ``trt-entropy`` baseline on the same grid).
2. **Units** get one ``p`` each: by default every weight tensor and every activation tensor
   (share groups move together); with ``granularity=layer`` a layer's weight and input
   activation(s) share one ``p`` (the paper's "p per layer"; an activation read by several
   layers belongs to the first). Units are decided in the order the graph first reads them.
3. **Greedy selection** (§5.5): for unit l, with units < l at their chosen p and units > l left
   in float (``rest=fp``, the spec) or at their current choice (``rest=current``), the task loss
   of the model outputs against the FP32 outputs on ``samples`` calibration samples is computed
   for each candidate; the lowest wins (ties: the p closest to 2). ``GraphRunner`` computes the
   common prefix once (node by node, with the plan's fake quantization); the rest of the graph runs
   as one ONNX Runtime session per unit with the unit's qparams as inputs
   (:class:`~onnxq.search.tail.TailSession`); identical candidates are evaluated once, and a
   unit whose candidates are all one grid not at all.
4. **Memory.** What the search holds grows with the samples it evaluates (the frontier between
   units, per sample) and with the samples per ONNX Runtime run; ``memory_mb`` bounds both
   (:mod:`onnxq.search.footprint`): the first samples that fit are kept, in runs that fit, and the
   report's ``samples_kept`` says how many. The same samples in smaller runs give the same choices.

The task loss is a plugin (``register_task_losses``): ``detection`` (ODOL), ``segmentation-map``,
``classification``, ``mse``. ``-o weight_bits 4 -o act_bits 4`` is the paper's W4A4 setting,
*emulated*: weights are stored as int8 restricted to [−7, 7] and activations get Clip → Q/DQ
restricted to the 4-bit grid, so ONNX Runtime and TensorRT run them on INT8 kernels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from onnxq.search.evaluator import GraphRunner
from onnxq.calib.progress import progress
from onnxq.search.footprint import fitted_chunks
from onnxq.calib.readers import sample_count
from onnxq.search.samples import sample_batches, samples_request
from onnxq.calib.statistics import StatRequest, TensorStats
from onnxq.search.tail import TailSession
from onnxq.calib.thresholds import grid_steps, guarded_entropy_threshold
from onnxq.errors import OptionError
from onnxq.graph.index import GraphIndex
from onnxq.graph.plan import QuantPlan
from onnxq.graph.targets import WEIGHTED_OPS, TargetProfile
from onnxq.hookspecs import hookimpl
from onnxq.method import QuantMethod, RunContext
from onnxq.options import option
from onnxq.qparams import MIN_SCALE, QParams, int_range, per_channel_absmax

DEFAULT_P = ("1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0")
SPECIAL = ("inf", "kl")


@dataclass(frozen=True)
class DetPtqOptions:
    """Options of DetPTQ (defaults: docs/methods.md: DetPTQ, [D] where the paper is unreadable)."""

    task: str = option("detection", "task loss on the model outputs (built-in: detection, segmentation-map, classification, mse; plugins add more)")
    outputs: tuple[str, ...] = option((), "graph outputs the task reads, comma-separated in the task's order (detection: scores,boxes); default: all outputs")
    task_options: str = option("", "the task's options as key=value pairs, e.g. 'box_format=ltrb,logits=true' (';' separates values that hold commas)")
    p_values: tuple[str, ...] = option(DEFAULT_P, "candidate exponents p of the L_p clipping metric; 'inf' = max-abs, 'kl' = trt-entropy's error-guarded entropy (activations) with max-abs weights; one value = no search (a fixed-p baseline)")
    weight_bits: int | None = option(None, "weight grid bits, 2-8 (default: --bits); below 8 the weights are int8 restricted to the narrower range (emulated)")
    act_bits: int | None = option(None, "activation grid bits, 2-8 (default: --bits); below 8 a Clip restricts the int8/uint8 Q/DQ to the narrower grid (emulated)")
    keep_first_last: bool = option(True, "with weight_bits/act_bits below --bits, keep the first and the output layers (and tensors before/after them) at --bits")
    samples: int = option(64, "calibration samples the task loss is computed on (at most; memory_mb may keep fewer)")
    memory_mb: float = option(192, "memory the search may hold for its samples: the activations kept between layers for every sample plus one ONNX Runtime run's working set; keeps fewer samples than `samples`, in smaller runs, where they do not fit (the report says how many)")
    granularity: Literal["tensor", "layer"] = option("tensor", "tensor: every weight and activation tensor gets its own p (onnxq default, measured better); layer: a layer's weights and input activations share one p (the paper's wording, half the evaluations)")
    rest: Literal["fp", "current"] = option("fp", "layers after the one being decided: fp (left in float, docs/methods.md: DetPTQ) or current (quantized at their current choice: p=2 until decided)")
    rounds: int = option(1, "passes over all layers; later passes re-decide each layer with every other layer quantized")
    min_ratio: float = option(0.3, "smallest clip ratio γ (T = γ·max|x|) of the L_p search")
    ratios: int = option(71, "clip ratios tried, evenly spaced in [min_ratio, 1]")

    def validate(self) -> None:
        if not self.p_values:
            raise ValueError("p_values needs at least one value")
        for p in self.p_values:
            if p not in SPECIAL:
                try:
                    v = float(p)
                except ValueError:
                    raise ValueError(f"p value '{p}' is not a number, 'inf' or 'kl'") from None
                if not 0 < v <= 16:
                    raise ValueError(f"p value {p} must be in (0, 16]")
        for name in ("weight_bits", "act_bits"):
            b = getattr(self, name)
            if b is not None and not 2 <= b <= 8:
                raise ValueError(f"{name} must be between 2 and 8")
        if self.samples < 1 or self.rounds < 1 or self.ratios < 2 or self.memory_mb <= 0:
            raise ValueError("samples and rounds must be >= 1, ratios >= 2, memory_mb > 0")
        if not 0 < self.min_ratio < 1:
            raise ValueError("min_ratio must be in (0, 1)")


# -- grids ---------------------------------------------------------------------------------------
def act_grid(profile: TargetProfile, bits: int) -> Callable[[float, float], QParams]:
    """``grid(lo, hi)`` -> activation qparams on a ``bits``-wide grid of the target.

    At the target's own bits this is the target's grid; narrower grids keep the int8/uint8
    container (symmetric narrow [−(2^(b−1)−1), 2^(b−1)−1], or unsigned [0, 2^b − 1]); the QDQ
    rewrite then adds a Clip to the narrower range, which runs on every INT8 runtime.
    """
    if bits == profile.bits:
        return profile.activation_qparams
    if profile.activation_signed:
        qmin, qmax = int_range(bits, True, True)

        def signed(lo: float, hi: float) -> QParams:
            t = max(abs(float(lo)), abs(float(hi)), MIN_SCALE * qmax)
            return QParams(np.float32(t / qmax), np.int8(0), "int8", qmin, qmax)

        return signed
    qmin, qmax = int_range(bits, False, False)

    def unsigned(lo: float, hi: float) -> QParams:
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        scale = max((hi - lo) / (qmax - qmin), MIN_SCALE)
        zp = int(np.clip(np.rint(qmin - lo / scale), qmin, qmax))
        return QParams(np.float32(scale), np.uint8(zp), "uint8", qmin, qmax)

    return unsigned


def weight_grid(profile: TargetProfile, bits: int, axis: int | None) -> Callable[[np.ndarray], QParams]:
    """``grid(T)`` -> symmetric weight qparams with per-channel (or per-tensor) thresholds ``T``."""
    if bits == profile.bits:
        return lambda t: profile.weight_qparams(np.asarray(t), axis)
    qmin, qmax = int_range(bits, True, profile.weight_narrow)

    def grid(t: np.ndarray) -> QParams:
        scale = np.maximum(np.asarray(t, np.float64) / qmax, MIN_SCALE).astype(np.float32)
        if axis is None or not profile.weight_per_channel:
            return QParams(np.float32(np.max(scale)), np.int8(0), "int8", qmin, qmax, None)
        return QParams(scale, np.zeros(scale.shape, np.int8), "int8", qmin, qmax, axis)

    return grid


def _parse_p(label: str) -> float:
    return float("inf") if label in SPECIAL else float(label)


def lp_weight_thresholds(w: np.ndarray, axis: int | None, qmax: int, ps: Sequence[float], ratios: np.ndarray) -> dict[float, np.ndarray]:
    """Per-channel clip thresholds minimising ``mean |w − Q(w)|^p`` over ``T = γ·max|w|``, for each p.

    ``qmax`` is the positive end of the symmetric grid (step = T / qmax). Ratio 1 (max-abs) is
    tried first and wins ties.
    """
    rows = np.abs(np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(w.shape[axis], -1)) if axis is not None else np.abs(np.asarray(w, np.float64)).reshape(1, -1)
    amax = rows.max(axis=1)
    best_t = {p: amax.copy() for p in ps}
    best_e = {p: np.full(len(amax), np.inf) for p in ps}
    for g in sorted(ratios, reverse=True):
        t = amax * g
        s = np.maximum(t / qmax, MIN_SCALE)[:, None]
        d = np.abs(np.minimum(np.rint(rows / s), qmax) * s - rows)  # |w| is symmetric: one side suffices
        for p in ps:
            e = (d**p).mean(axis=1)
            better = e < best_e[p]
            best_t[p][better], best_e[p][better] = t[better], e[better]
    return best_t


def lp_activation_ranges(stats: TensorStats, grid: Callable[[float, float], QParams], ps: Sequence[float], ratios: np.ndarray,
                         subpoints: int = 4) -> dict[float, tuple[float, float]]:
    """Per-tensor clip range ``[max(min, −T), min(max, T)]`` minimising the expected ``|x − Q(x)|^p``.

    The error is taken over the signed calibration histogram (each bin represented by
    ``subpoints`` evenly spaced values) with the grid the target deploys, so asymmetric uint8
    grids are scored exactly. Ratio 1 is tried first and wins ties.
    """
    full = (float(min(stats.min, 0.0)), float(max(stats.max, 0.0)))
    if stats.amax == 0 or stats.hist is None:
        return {p: full for p in ps}
    hist = stats.hist.astype(np.float64)
    width = stats.bin_width
    edges = -stats.amax + width * np.arange(len(hist))
    keep = hist > 0
    x = (edges[keep][:, None] + (np.arange(subpoints) + 0.5)[None, :] / subpoints * width).ravel().astype(np.float32)
    weight = np.repeat(hist[keep] / subpoints, subpoints)
    weight = weight / weight.sum()
    best = {p: (np.inf, full) for p in ps}
    for g in sorted(ratios, reverse=True):
        t = g * stats.amax
        rng = (max(stats.min, -t), min(stats.max, t))
        d = np.abs(x - grid(*rng).fake_quantize(x)).astype(np.float64)
        for p in ps:
            e = float(np.dot(weight, d**p))
            if e < best[p][0]:
                best[p] = (e, rng)
    return {p: (float(r[0]), float(r[1])) for p, (_, r) in best.items()}


# -- units ---------------------------------------------------------------------------------------
@dataclass
class Unit:
    """Sites that get one p together: one tensor (or share group), or a layer's weight and input activation(s)."""

    name: str
    weights: list[str]
    activations: list[list[str]]  # each entry: one share group (a single tensor or several)
    start: int  # position of the first node that reads any of the sites


def _edge_tensors(ctx: RunContext, idx: GraphIndex) -> tuple[set[str], set[str]]:
    """(weighted nodes kept at --bits, activation tensors kept at --bits) for keep_first_last.

    First layers: weighted nodes whose activation inputs are not downstream of any weighted node.
    Output layers: weighted nodes from which a graph output is reached without another weighted
    node. Tensors before the first weighted layers and after the output layers are kept too.
    """
    nodes = list(ctx.model.graph.node)
    downstream: set[str] = set()  # tensors computed from some weighted node's output
    for n in nodes:
        if n.op_type in WEIGHTED_OPS or any(i in downstream for i in n.input):
            downstream.update(o for o in n.output if o)
    weighted = {l.node for l in ctx.plan.layers}
    first = {l.node for l in ctx.plan.layers if not any(t in downstream for t in l.inputs)}
    outputs = set(idx.graph_outputs)
    last: set[str] = set()
    tail: set[str] = set()
    for l in ctx.plan.layers:
        node = idx.nodes[l.node]
        seen, frontier, hit = set(), [o for o in node.output if o], False
        while frontier:
            t = frontier.pop()
            if t in seen:
                continue
            seen.add(t)
            hit |= t in outputs
            for c, _ in idx.consumers.get(t, []):
                if c.name not in weighted and c.op_type not in WEIGHTED_OPS:
                    frontier.extend(o for o in c.output if o)
        if hit:
            last.add(l.node)
            tail |= seen
    edge_nodes = first | last
    edge_acts = {t for t in ctx.plan.activations if t not in downstream or t in tail}
    for l in ctx.plan.layers:
        if l.node in edge_nodes:
            edge_acts.update(t for t in l.inputs if t in ctx.plan.activations)
    return edge_nodes, edge_acts


def build_units(ctx: RunContext, granularity: str = "tensor") -> list[Unit]:
    """The plan's sites grouped into units, in the order the graph first reads them."""
    plan = ctx.plan
    position = {n.name: i for i, n in enumerate(ctx.model.graph.node)}
    group_of = {t: g for g in plan.share_groups for t in g}
    taken_w: set[str] = set()
    taken_a: set[str] = set()
    units: list[Unit] = []

    def first_read(acts: list[list[str]], weights: list[str]) -> int:
        pos = [position[c] for g in acts for t in g for c, _ in plan.activations[t].consumers]
        pos += [position[plan.weights[w].node] for w in weights]
        return min(pos) if pos else 0

    for layer in plan.layers:
        weights = [layer.weight] if layer.weight in plan.weights and layer.weight not in taken_w else []
        acts = []
        for t in layer.inputs:
            if t in plan.activations and t not in taken_a:
                g = list(group_of.get(t, [t]))
                acts.append(g)
                taken_a.update(g)
        taken_w.update(weights)
        if granularity == "tensor":
            for g in acts:
                units.append(Unit(g[0], [], [g], first_read([g], [])))
            if weights:
                units.append(Unit(weights[0], weights, [], first_read([], weights)))
        elif weights or acts:
            units.append(Unit(layer.node, weights, acts, first_read(acts, weights)))
    for t in plan.activations:
        if t not in taken_a:
            g = list(group_of.get(t, [t]))
            taken_a.update(g)
            units.append(Unit(t, [], [g], first_read([g], [])))
    units.sort(key=lambda u: u.start)  # stable: a layer's activation unit stays before its weight unit
    return units


# -- the method ----------------------------------------------------------------------------------
class DetPtq(QuantMethod):
    """Per-layer choice of the L_p clipping metric by a task loss on the outputs (DetPTQ/ODOL)."""

    name = "detptq"
    summary = "DetPTQ: per-layer L_p clipping metric chosen by a task loss on the outputs (detection ODOL, segmentation maps, ...); W4A4 emulation"
    Options = DetPtqOptions
    calibrates = True

    def declare_statistics(self, ctx: RunContext) -> list[StatRequest]:
        self._bits(ctx)
        self._task(ctx)  # a wrong task, output name or task option fails before calibration
        return [StatRequest(t, "histogram") for t in ctx.plan.activations] + [samples_request(self.options.samples)]

    def _task(self, ctx: RunContext):
        from onnxq.host import get_host
        from onnxq.tasks import make_task

        o = self.options
        host = ctx.host or get_host()
        return make_task(host.task(o.task), o.task_options, [out.name for out in ctx.model.graph.output], o.outputs)

    # -- candidates ------------------------------------------------------------------------------
    def _bits(self, ctx: RunContext) -> tuple[int, int]:
        o = self.options
        if ctx.profile.weight_only:
            raise OptionError("detptq searches weight and activation grids; --bits 4 is weight-only. For the W4A4 setting use --bits 8 -o weight_bits 4 -o act_bits 4")
        wb, ab = o.weight_bits or ctx.profile.bits, o.act_bits or ctx.profile.bits
        if wb > ctx.profile.bits or ab > ctx.profile.bits:
            raise OptionError(f"detptq: weight_bits/act_bits ({wb}/{ab}) cannot exceed --bits {ctx.profile.bits}")
        return wb, ab

    def _candidates(self, ctx: RunContext) -> None:
        """Fill ``self.w_cands[w][label]`` and ``self.a_cands[group][label]`` (QParams) for every site."""
        o = self.options
        profile = ctx.profile
        wb, ab = self._bits(ctx)
        idx = GraphIndex(ctx.model)
        low = wb < profile.bits or ab < profile.bits
        self.edge_nodes, self.edge_acts = _edge_tensors(ctx, idx) if (low and o.keep_first_last) else (set(), set())
        labels = list(dict.fromkeys(o.p_values))
        self.labels = labels
        ps = sorted({_parse_p(l) for l in labels if l not in SPECIAL})
        ratios = np.linspace(o.min_ratio, 1.0, o.ratios)
        self.w_bits: dict[str, int] = {}
        self.w_cands: dict[str, dict[str, QParams]] = {}
        for key, site in ctx.plan.weights.items():
            bits = profile.bits if site.node in self.edge_nodes else wb
            self.w_bits[key] = bits
            w = ctx.weight(site.initializer)
            axis = site.axis if profile.weight_per_channel else None
            grid = weight_grid(profile, bits, axis)
            qmax = int_range(bits, True, profile.weight_narrow)[1]
            amax = per_channel_absmax(w, axis) if axis is not None else np.array(np.abs(w).max())
            by_p = lp_weight_thresholds(w, axis, qmax, ps, ratios) if ps else {}
            self.w_cands[key] = {l: grid(amax if l in SPECIAL else by_p[_parse_p(l)]) for l in labels}
        self.a_bits: dict[str, int] = {}
        self.a_cands: dict[tuple[str, ...], dict[str, QParams]] = {}
        self.a_ranges: dict[tuple[str, ...], dict[str, tuple[float, float]]] = {}
        group_of = {t: tuple(g) for g in ctx.plan.share_groups for t in g}
        for t in ctx.plan.activations:
            g = group_of.get(t, (t,))
            if g in self.a_cands:
                continue
            bits = profile.bits if any(m in self.edge_acts for m in g) else ab
            grid = act_grid(profile, bits)
            per_member: dict[str, dict[str, tuple[float, float]]] = {}
            for m in g:
                s = ctx.stats[m]
                by_p = lp_activation_ranges(s, grid, ps, ratios) if ps else {}
                r: dict[str, tuple[float, float]] = {}
                for l in labels:
                    if l == "kl":
                        levels = 2**bits if (not profile.activation_signed and s.min >= 0) else 2 ** (bits - 1)
                        # trt-entropy's guarded KL on this candidate's own grid (TensorRT's exact KL
                        # collapses on normalized inputs: docs/methods.md, Baseline calibrators)
                        qspan = 2 ** (bits - 1) - 1 if profile.activation_signed else 2**bits - 1
                        th = min(guarded_entropy_threshold(s, levels, grid_steps(s, profile.activation_signed, qspan))[0], s.amax) if s.amax > 0 else 0.0
                        r[l] = (max(s.min, -th), min(s.max, th))
                    elif l == "inf":
                        r[l] = (s.min, s.max)
                    else:
                        r[l] = by_p[_parse_p(l)]
                per_member[m] = r
            ranges = {l: (min(per_member[m][l][0] for m in g), max(per_member[m][l][1] for m in g)) for l in labels}
            self.a_ranges[g] = ranges
            self.a_cands[g] = {l: grid(*ranges[l]) for l in labels}
            for m in g:
                self.a_bits[m] = bits

    def _apply(self, ctx: RunContext, unit: Unit, label: str | None) -> None:
        """Set the unit's sites to candidate ``label`` (None: leave them in float while searching)."""
        for w in unit.weights:
            ctx.plan.weights[w].qparams = None if label is None else self.w_cands[w][label]
        for g in unit.activations:
            key = tuple(g)
            for m in g:
                site = ctx.plan.activations[m]
                site.qparams = None if label is None else self.a_cands[key][label]
                site.range = None if label is None else self.a_ranges[key][label]

    def _default_label(self) -> str:
        """The candidate closest to p = 2 (the usual MSE choice; ties in the search go to it)."""
        return min(self.labels, key=lambda l: (abs(_parse_p(l) - 2.0) if l not in SPECIAL else 1e9, self.labels.index(l)))

    def choose_qparams(self, ctx: RunContext) -> None:
        """Without the search (a later refine does it): every site at the default candidate."""
        self._candidates(ctx)
        label = self._default_label()
        for key in ctx.plan.weights:
            ctx.plan.weights[key].qparams = self.w_cands[key][label]
        for g, cands in self.a_cands.items():
            for m in g:
                ctx.plan.activations[m].qparams = cands[label]
                ctx.plan.activations[m].range = self.a_ranges[g][label]

    # -- the search --------------------------------------------------------------------------------
    def refine(self, ctx: RunContext) -> None:
        o = self.options
        t0 = time.perf_counter()
        if getattr(self, "w_cands", None) is None or set(self.w_cands) != set(ctx.plan.weights):
            self._candidates(ctx)
        task = self._task(ctx)
        # the samples the search keeps and the size of its runs, bounded by memory_mb (not by the
        # data's batch size or the number of calibration samples)
        chunks, fit = fitted_chunks(ctx.model, [b.feeds for b in sample_batches(ctx, o.samples)], int(o.memory_mb * 2**20))
        sessions: dict[str, object] = {}
        reference = self._outputs(ctx, chunks, QuantPlan(ctx.profile), task)
        targets = task.prepare(reference)
        units = build_units(ctx, o.granularity)
        default = self._default_label()
        search = len(self.labels) > 1
        layers: dict[str, dict[str, Any]] = {}
        if search and o.rest == "fp":
            for u in units:
                self._apply(ctx, u, None)
        else:
            for u in units:
                self._apply(ctx, u, default)
        chosen = {u.name: default for u in units}
        evaluations = 0
        if search:
            for rnd in range(o.rounds):
                q_run = GraphRunner(ctx.model, chunks, ctx.plan, sessions)
                with progress(f"detptq: tensors (round {rnd + 1})", ctx.show_progress, total=len(units), unit="unit") as bar:
                    for u in units:
                        bar.update(1)
                        if len({self._fingerprint(u, l) for l in self.labels}) == 1:
                            # every candidate is the same grid: nothing to choose, no tail to run
                            self._apply(ctx, u, default)
                            layers[u.name] = {**self._unit_report(u, {}, default), "single_grid": True}
                            continue
                        q_run.run_to(u.start - 1)
                        losses, runs = self._evaluate(ctx, u, q_run, task, targets)
                        evaluations += runs
                        best = min(self.labels, key=lambda l: (round(losses[l], 12), l != default, self.labels.index(l)))
                        chosen[u.name] = best
                        self._apply(ctx, u, best)
                        layers[u.name] = self._unit_report(u, losses, best)
        else:
            for u in units:
                layers[u.name] = self._unit_report(u, {}, default)
        search_seconds = time.perf_counter() - t0
        final_terms = task.terms(self._outputs(ctx, chunks, ctx.plan, task), targets)
        counts: dict[str, int] = {}
        for label in chosen.values():
            counts[label] = counts.get(label, 0) + 1
        wb, ab = self._bits(ctx)
        ctx.report[self.name] = {
            "task": task.name,
            "outputs": task.outputs,
            "samples": sum(sample_count(c) for c in chunks),
            "samples_kept": fit.describe(),
            "p_values": self.labels,
            "rest": o.rest,
            "weight_bits": wb,
            "act_bits": ab,
            "kept_at_target_bits": sorted(self.edge_nodes),
            "layers": self._per_layer(ctx, units, chosen),
            "units": layers,
            "chosen_p_counts": counts,
            "task_loss_final": final_terms,
            "evaluations": evaluations,
            "search_seconds": round(search_seconds, 3),
            "emulation": self._emulation_note(ctx, wb, ab),
            "summary": [
                f"task {task.name} on {', '.join(task.outputs)}; W{wb}A{ab}; p chosen for {len(units)} {'tensors' if o.granularity == 'tensor' else 'layers'} "
                f"({evaluations} loss evaluations, {search_seconds:.1f} s)",
                f"task loss on {fit.describe()}",
                "chosen p: " + ", ".join(f"{k}×{v}" for k, v in sorted(counts.items())) + f"; final task loss {final_terms['loss']:.4g}",
            ],
        }

    def _evaluate(self, ctx: RunContext, u: Unit, q_run: GraphRunner, task, targets) -> tuple[dict[str, float], int]:
        """Task loss of every candidate of unit ``u``: the prefix comes from ``q_run``, the rest of the
        graph runs as one session with ``u``'s sites as inputs; identical candidates run once."""
        probe_acts = {m: self.a_cands[tuple(g)][self.labels[0]].dtype for g in u.activations for m in g}
        live = {t: v[0].dtype for t, v in q_run.values.items() if v}
        tail = TailSession(ctx.model, ctx.plan, u.start, task.outputs, live, u.weights, probe_acts)
        # the frontier stays in the runner's chunks: one tail run per chunk, never one run over all
        # samples (its working set would grow with them)
        n_chunks = max((len(v) for v in q_run.values.values()), default=1)
        frontiers = [{t: q_run.consts[t] if t in q_run.consts else q_run.values[t][c] for t in tail.frontier} for c in range(n_chunks)]
        values = {w: ctx.weight(ctx.plan.weights[w].initializer) for w in u.weights}
        losses: dict[str, float] = {}
        seen: dict[tuple, float] = {}
        for label in self.labels:
            key = self._fingerprint(u, label)
            if key not in seen:
                weights = {w: self.w_cands[w][label].fake_quantize(values[w]) for w in u.weights}
                acts = {m: self.a_cands[tuple(g)][label] for g in u.activations for m in g}
                seen[key] = float(task.loss(_joined([tail.run(f, weights, acts) for f in frontiers], task.outputs), targets))
            losses[label] = seen[key]
        return losses, len(seen)

    def _per_layer(self, ctx: RunContext, units: list[Unit], chosen: dict[str, str]) -> dict[str, dict[str, Any]]:
        """The chosen p of each weighted layer's weight and input activation(s), with their bits."""
        p_of_w = {w: chosen[u.name] for u in units for w in u.weights}
        p_of_a = {m: chosen[u.name] for u in units for g in u.activations for m in g}
        out: dict[str, dict[str, Any]] = {}
        for layer in ctx.plan.layers:
            r: dict[str, Any] = {}
            if layer.weight in p_of_w:
                r["weight_p"] = p_of_w[layer.weight]
                r["weight_bits"] = self.w_bits[layer.weight]
            acts = [t for t in layer.inputs if t in p_of_a]
            if acts:
                r["act_p"] = p_of_a[acts[0]] if len(acts) == 1 else [p_of_a[t] for t in acts]
                r["act_bits"] = self.a_bits[acts[0]]
            out[layer.node] = r
        return out

    def _fingerprint(self, u: Unit, label: str) -> tuple:
        parts: list[Any] = []
        for w in u.weights:
            q = self.w_cands[w][label]
            parts.append((q.scale.tobytes(), q.qmin, q.qmax))
        for g in u.activations:
            q = self.a_cands[tuple(g)][label]
            parts.append((q.scale.tobytes(), q.zero_point.tobytes(), q.qmin, q.qmax))
        return tuple(parts)

    def _unit_report(self, u: Unit, losses: dict[str, float], best: str) -> dict[str, Any]:
        r: dict[str, Any] = {"p": best, "loss": {l: round(v, 6) for l, v in losses.items()}}
        if u.weights:
            r["weight_bits"] = self.w_bits[u.weights[0]]
        if u.activations:
            r["activations"] = [m for g in u.activations for m in g]
            r["act_bits"] = self.a_bits[u.activations[0][0]]
            lo, hi = self.a_ranges[tuple(u.activations[0])][best]
            r["act_range"] = [round(lo, 6), round(hi, 6)]
        return r

    @staticmethod
    def _outputs(ctx: RunContext, chunks, plan: QuantPlan, task) -> dict[str, np.ndarray]:
        """The task's outputs with ``plan``'s Q/DQ (an empty plan: FP32), as one session."""
        dtypes = {k: v.dtype for k, v in chunks[0].items()}
        tail = TailSession(ctx.model, plan, 0, task.outputs, dtypes)
        return _joined([tail.run(c) for c in chunks], task.outputs)

    def _emulation_note(self, ctx: RunContext, wb: int, ab: int) -> str:
        bits = ctx.profile.bits
        if wb == bits and ab == bits:
            return f"INT{bits}: real kernels" + (" (INT7 runs on INT8 kernels)" if bits == 7 else "")
        parts = []
        if wb < bits:
            parts.append(f"{wb}-bit weights are int8 initializers restricted to the {wb}-bit range")
        if ab < bits:
            parts.append(f"{ab}-bit activations are Clip -> QuantizeLinear -> DequantizeLinear on an {'int8' if ctx.profile.activation_signed else 'uint8'} grid restricted to {ab} bits")
        kept = f"; {len(self.edge_nodes)} first/output layers stay at {bits} bits (real INT{bits})" if self.edge_nodes else ""
        why = "neither runtime has low-bit activation kernels" if ab < bits else "their 4-bit weight formats are weight-only MatMul/Gemm, not Conv"
        return ("W%dA%d is emulated: " % (wb, ab)) + "; ".join(parts) + (
            f". ONNX Runtime and TensorRT run these layers on their INT8 kernels: the accuracy of the low-bit grid is "
            f"real, its speed and memory are not ({why})") + kept


def _joined(parts: list[dict[str, np.ndarray]], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-run outputs joined along the batch axis. Runs whose outputs differ beyond the batch axis
    (sequences padded per batch) are joined as rows of their last axis ([tokens, features]): the
    reference and every candidate are joined the same way, so the task loss compares like with like."""
    out = {}
    for n in names:
        arrays = [np.asarray(p[n]) for p in parts]
        if len(arrays) == 1:
            out[n] = arrays[0]
        elif len({a.shape[1:] for a in arrays}) == 1:
            out[n] = np.concatenate(arrays)
        else:
            out[n] = np.concatenate([a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a for a in arrays])
    return out


@hookimpl
def register_methods(register) -> None:
    register(DetPtq)
