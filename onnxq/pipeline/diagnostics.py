"""What the HTML report draws, measured after the save: per-layer error, histograms with thresholds, weight ranges, lint.

:func:`collect_diagnostics` runs when ``optimize(diagnostics=True)`` (``onnxq optimize --report``
or ``--diagnostics``) and fills ``Report.diagnostics`` compactly: every layer's SQNR and cosine
in graph order, the activation histograms (at most :data:`HISTOGRAM_BINS` bins) of the inputs of
the worst layers with the clip threshold each built-in calibrator would pick, the per-channel
ranges of the weights quantized with the most error, and TensorRT's Q/DQ rule findings on a
``trt`` run. Like the fidelity check it never fails the run: an error is kept in
``Diagnostics.error``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxq.calib.statistics import StatRequest, TensorStats
from onnxq.evaluate.compare import LAYER_OPS, batch_axes, layer_errors, sample_count
from onnxq.evaluate.fidelity import LayerFidelity, limited
from onnxq.options import described

if TYPE_CHECKING:
    from onnxq.pipeline.stages import Run

#: bins of each histogram in the report (the statistics pass's 2x2048 signed bins, cropped to the observed range and merged)
HISTOGRAM_BINS = 128
#: histograms and weight charts kept (the worst ones)
WORST = 5
#: weights with more output channels than this are shown in groups of consecutive channels (min of mins, max of maxes)
MAX_CHANNELS = 512
#: the calibrators whose thresholds every histogram shows (those of them that are registered)
CALIBRATORS = ("minmax", "percentile", "mse", "trt-entropy")
#: the per-layer error is measured on at most this many calibration batches and samples (the fidelity check's sample)
LAYER_BATCHES, LAYER_SAMPLES = 4, 64


@dataclass
class ActivationHistogram:
    """The calibration histogram of one quantized activation and the clip thresholds calibrators pick from it."""

    tensor: str = described("the activation tensor")
    layer: str = described("the worst layer it feeds (node name)")
    min: float = described("smallest observed value")
    max: float = described("largest observed value")
    lo: float = described("left edge of the first bin")
    hi: float = described("right edge of the last bin")
    counts: list[int] = described("values per bin: equal bins over [lo, hi]")
    thresholds: dict[str, float] = described("clip threshold T on |x| each calibrator picks from these statistics (range [max(min, -T), min(max, T)])")
    calibrator: str | None = described("the run's calibrator (null: none set the ranges)")
    range: list[float] | None = described("the range the quantized model deploys [lo, hi] (after refinement and shared scales)")


@dataclass
class WeightRanges:
    """Per-channel value range of one quantized weight against what its grid represents."""

    initializer: str = described("the weight initializer")
    node: str = described("the node it feeds")
    axis: int = described("the channel axis of the chart")
    grouped: int = described("consecutive channels merged into each point (1: one point per channel)")
    channel_min: list[float] = described("smallest float weight per channel")
    channel_max: list[float] = described("largest float weight per channel")
    clip_min: list[float] | None = described("lowest value the channel's grid represents (null: block-wise grid)")
    clip_max: list[float] | None = described("highest value the channel's grid represents (null: block-wise grid)")
    sqnr_db: float = described("SQNR of the quantized weight against the float one, dB")


@dataclass
class LintFinding:
    """One TensorRT Q/DQ rule finding on the quantized model (``onnxq lint``)."""

    rule: str = described("rule id")
    severity: str = described("error or warning")
    node: str = described("node or tensor")
    message: str = described("what is wrong and what to do")


@dataclass
class Diagnostics:
    """What the HTML report charts: per-layer error, the worst layers' histograms, the worst weights, lint findings."""

    data: str = described('"calibration": measured on the first calibration batches')
    samples: int = described("samples the per-layer error was measured on")
    layers: list[LayerFidelity] = described("every layer output's error against FP32, in graph order")
    activations: list[ActivationHistogram] = described("histograms of the activations feeding the worst layers")
    weights: list[WeightRanges] = described("the weights with the lowest quantization SQNR")
    lint: list[LintFinding] | None = described("TensorRT Q/DQ rule findings (trt targets; null otherwise)")
    error: str | None = described("why the diagnostics could not be collected (null: they were)")
    seconds: float = described("time they took")


def collect_diagnostics(run: Run) -> Diagnostics:
    """The diagnostics of a finished run (quantized and saved); errors are reported, never raised."""
    t0 = time.perf_counter()
    diag = Diagnostics("calibration", 0, [], [], [], None, None, 0.0)
    try:
        _layers(run, diag)
        _activations(run, diag)
        diag.weights = worst_weights(run)
        if run.profile is not None and run.profile.name == "trt":
            from onnxq.graph.trt_rules import check_trt_rules

            diag.lint = [LintFinding(f.rule, f.severity, f.node, f.message) for f in check_trt_rules(run.quantized)]
    except Exception as exc:  # the model is saved; diagnostics are a report
        text = str(exc).strip()
        diag.error = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
    diag.seconds = round(time.perf_counter() - t0, 3)
    return diag


def _layers(run: Run, diag: Diagnostics) -> None:
    """Every Conv/ConvTranspose/Gemm/MatMul output of the float model that the quantized one still computes, in graph order.

    Names are the float model's: a Gemm that became MatMul+Add keeps its output's name on the Add.
    """
    present = {o for n in run.quantized.graph.node for o in n.output}
    producer = {n.output[0]: n.name for n in run.float_model.graph.node if n.op_type in LAYER_OPS and n.output and n.output[0] in present}
    tensors = list(producer)
    axes = batch_axes(run.float_model)
    source = limited(run.source, LAYER_BATCHES, LAYER_SAMPLES, axes)
    diag.samples = sum(sample_count(b.feeds, axes) for b in source())
    errors = layer_errors(run.float_model, run.quantized, tensors, source)
    diag.layers = [LayerFidelity(t, producer[t], errors[t]["sqnr_db"], errors[t]["cosine"]) for t in tensors if t in errors]


def _activations(run: Run, diag: Diagnostics) -> None:
    """Histograms of the quantized activations feeding the worst layers, with every calibrator's threshold."""
    ctx = run.ctx
    plan = ctx.plan
    if not plan.activations:
        return
    by_output = {layer.output: layer for layer in plan.layers}
    node_inputs = {n.name: list(n.input) for n in ctx.model.graph.node}
    picked: dict[str, str] = {}
    worst = sorted(diag.layers, key=lambda r: r.sqnr_db if r.sqnr_db is not None and math.isfinite(r.sqnr_db) else math.inf)
    for row in worst:
        layer = by_output.get(row.tensor)
        inputs = list(layer.inputs) if layer is not None else node_inputs.get(row.node, [])
        for t in inputs:
            if t in plan.activations and t not in picked and len(picked) < WORST:
                picked[t] = row.node
        if len(picked) >= WORST:
            break
    if not picked:
        return
    stats = {t: ctx.stats.get(t) for t in picked}
    missing = [t for t, s in stats.items() if s is None or s.hist is None]
    if missing:  # a calibrator without histograms (minmax): one small pass over the tensors shown
        more = ctx.collect([StatRequest(t, "histogram") for t in missing], show_progress=False)
        stats.update({t: more.get(t) for t in missing})
    methods = _calibrators(run)
    own = run.calibrator.name if run.calibrator is not None else None
    for t, node in picked.items():
        s = stats.get(t)
        if s is None or s.hist is None:
            continue
        thresholds = {}
        for name, m in methods.items():
            try:
                thresholds[name] = _round(min(float(m.threshold(s, ctx)), s.amax))
            except Exception:  # a calibrator that cannot score this tensor is left out of its chart
                continue
        lo, hi, counts = rebin(s, HISTOGRAM_BINS)
        site = plan.activations[t]
        rng = [_round(site.range[0]), _round(site.range[1])] if site.range is not None else None
        diag.activations.append(ActivationHistogram(t, node, _round(s.min), _round(s.max), lo, hi, counts, thresholds, own, rng))


def _calibrators(run: Run) -> dict[str, Any]:
    """Fresh instances of the built-in calibrators, and of the run's own with its options (thresholds only: nothing is set)."""
    from onnxq.method import RangeMethod

    out: dict[str, Any] = {}
    for name in CALIBRATORS:
        try:
            cls = run.host.method(name)
        except Exception:
            continue
        if issubclass(cls, RangeMethod):
            out[name] = cls()
    cal = run.calibrator
    if isinstance(cal, RangeMethod):
        out[cal.name] = type(cal)(cal.options)
    return out


def rebin(stats: TensorStats, bins: int) -> tuple[float, float, list[int]]:
    """The signed histogram cropped to its non-empty bins and merged into at most ``bins`` equal bins: ``(lo, hi, counts)``."""
    h = np.asarray(stats.hist, dtype=np.int64)
    w = stats.bin_width
    nz = np.flatnonzero(h)
    if len(nz) == 0 or w == 0:
        return 0.0, 0.0, []
    i0, i1 = int(nz[0]), int(nz[-1]) + 1
    group = max(1, math.ceil((i1 - i0) / bins))
    n = math.ceil((i1 - i0) / group)
    part = np.zeros(n * group, dtype=np.int64)
    part[: i1 - i0] = h[i0:i1]
    lo = -stats.amax + i0 * w
    return _round(lo), _round(lo + n * group * w), part.reshape(n, group).sum(axis=1).tolist()


def worst_weights(run: Run, count: int = WORST) -> list[WeightRanges]:
    """The ``count`` quantized weights with the lowest SQNR against their float values, with per-channel ranges."""
    ctx = run.ctx
    scored = []
    for site in ctx.plan.weights.values():
        q = site.qparams
        if q is None:
            continue
        try:
            w = ctx.weight(site.initializer).astype(np.float32)
        except KeyError:
            continue
        if w.ndim == 0 or w.size == 0:
            continue
        noise = float(np.sum((w - q.fake_quantize(w)).astype(np.float64) ** 2))
        signal = float(np.sum(w.astype(np.float64) ** 2))
        sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
        scored.append((sqnr, site, w))
    scored.sort(key=lambda x: x[0])
    return [_weight_ranges(site, w, sqnr) for sqnr, site, w in scored[:count] if math.isfinite(sqnr)]


def _weight_ranges(site: Any, w: np.ndarray, sqnr: float) -> WeightRanges:
    q = site.qparams
    if q.block_size is not None:  # blocks run along the reduction axis; the channels are the other one
        axis = (1 - q.axis) if w.ndim == 2 and q.axis in (0, 1) else 0
    else:
        axis = site.axis if site.axis is not None else 0
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    cmin, cmax = moved.min(axis=1), moved.max(axis=1)
    clip_lo = clip_hi = None
    if q.block_size is None:
        lo, hi = q.real_range()
        clip_lo = np.broadcast_to(np.asarray(lo, np.float64).ravel(), cmin.shape) if np.size(lo) in (1, len(cmin)) else None
        clip_hi = np.broadcast_to(np.asarray(hi, np.float64).ravel(), cmax.shape) if np.size(hi) in (1, len(cmax)) else None
    group = max(1, math.ceil(len(cmin) / MAX_CHANNELS))

    def merge(x: np.ndarray | None, fn: Any) -> list[float] | None:
        if x is None:
            return None
        n = math.ceil(len(x) / group)
        padded = np.concatenate([x, np.repeat(x[-1:], n * group - len(x))]) if n * group > len(x) else x
        return [_round(v) for v in fn(padded.reshape(n, group), axis=1)]

    return WeightRanges(site.initializer, site.node, int(axis), group, merge(cmin, np.min), merge(cmax, np.max),  # type: ignore[arg-type]
                        merge(clip_lo, np.min), merge(clip_hi, np.max), round(sqnr, 3))


def _round(v: float) -> float:
    """Six significant digits: the report stays small, the charts cannot tell the difference."""
    v = float(v)
    return float(f"{v:.6g}") if math.isfinite(v) else v
