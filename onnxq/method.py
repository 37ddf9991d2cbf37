"""The method API: what a quantization method is, and what the host gives it.

A method is one :class:`QuantMethod` subclass with a ``name``, a one-line ``summary``, a typed
``Options`` dataclass, its capabilities (class attributes) and the steps it overrides. The host
runs the steps of every selected method in order (``-p cfws -p easyquant`` composes):

1. :meth:`QuantMethod.float_rewrite` — return a changed float graph; the host checks that its
   outputs match to 1e-5 and installs it;
2. :meth:`QuantMethod.declare_statistics` — say which statistics of which tensors it needs;
3. :meth:`QuantMethod.choose_qparams` — fill ranges/qparams into the plan (called for the one
   method that calibrates activations; weights default to per-channel max-abs);
4. :meth:`QuantMethod.refine` — improve the plan in place (scale searches);
5. :meth:`QuantMethod.quantized_rewrite` — return a model changed in ways that depend on the
   chosen qparams (corrected biases, learned weights, packed tables); the host reports what
   changed and how far the outputs moved from the float model, and installs it;
6. the host turns the plan into QDQ rewrite commands (:meth:`QuantMethod.commands` may add more);
7. :meth:`QuantMethod.qdq_rewrite` — return a changed copy of the QDQ model, for transforms that
   act on the integer tensors themselves (SPARQ's trimming of 8-bit activations); the host
   validates it, reports what changed and its output error, and uses it as the result.

Steps 4 and 5 run method by method (refine, then quantized_rewrite, then the next method), so each
method sees the model its predecessors left. Methods never assign ``ctx.model`` or edit it in
place: every model change is a returned model, checked by the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx

from onnxq.calib.statistics import BatchSource, StatRequest, StatsMap, TensorStats
from onnxq.graph.plan import QuantPlan
from onnxq.graph.targets import TargetProfile
from onnxq.options import NoOptions
from onnxq.qparams import per_channel_absmax


@dataclass
class RunContext:
    """What the host hands a method during a run."""

    #: the working model: read it, never assign or edit it (return changes from float_rewrite or quantized_rewrite)
    model: onnx.ModelProto
    profile: TargetProfile
    plan: QuantPlan
    calibration: BatchSource
    stats: StatsMap = field(default_factory=dict)
    #: free-form per-method report sections, keyed by method name; a rewrite that returns None sets its section's
    #: ``changed_nothing`` to why, and the host says so in a warning
    report: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = True
    #: the plugin host running this method (lookups such as task losses; None: the process-wide host)
    host: Any = None
    #: keyword arguments of :func:`onnxq.calib.statistics.collect` the host fixes for :meth:`collect` (batch size, memory budget)
    collect_options: dict[str, Any] = field(default_factory=dict)
    #: the model as loaded, before folding and every rewrite (read only; None where the host has none):
    #: what folding removed, such as the BatchNorm running statistics PD-Quant's distribution correction needs
    float_model: onnx.ModelProto | None = None

    def collect(self, requests: list[StatRequest], **options: Any) -> StatsMap:
        """Collect ``requests`` on the current ``model`` now, in one streaming pass over the
        calibration data (the statistics pass's machinery: memory budget, progress bar). For steps
        that run before the host's statistics pass, such as float rewrites; later steps declare
        their requests in :meth:`QuantMethod.declare_statistics` and read ``stats``."""
        from onnxq.calib.statistics import collect

        kw = {"show_progress": self.show_progress, **self.collect_options, **options}
        return collect(self.model, requests, self.calibration, **kw)

    def weight(self, name: str) -> np.ndarray:
        """The float value of a weight initializer."""
        from onnxq.graph.model_io import tensor_array

        for t in self.model.graph.initializer:
            if t.name == name:
                return tensor_array(t)  # memory-mapped when the weight is on disk (models over 2 GB)
        raise KeyError(name)


class QuantMethod:
    """Base class of quantization methods. Override the steps you need and declare capabilities.

    Capabilities are class attributes the host reads to compose the selected methods; each
    subclass sets those that differ from the defaults here (docs/plugins.md, "Composing methods").
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    calibrates: ClassVar[bool] = False
    """Sets activation ranges in :meth:`choose_qparams`. At most one selected method may, unless
    every later one declares :attr:`follows_calibrator`; with none selected the host adds the
    default calibrator (``trt-entropy``) unless a method declares :attr:`replaces_default_calibrator`."""

    follows_calibrator: ClassVar[bool] = False
    """A calibrating method that, selected after another calibrating method, keeps that method's
    ranges: its own :meth:`choose_qparams` is skipped and its :meth:`refine` starts from them
    (``-p cfws -p easyquant``)."""

    replaces_default_calibrator: ClassVar[bool] = False
    """Needs no activation calibrator: when no selected method calibrates, the host adds no
    default one and calls this method's :meth:`choose_qparams` instead, which must leave every
    remaining plan site with qparams (``emb4bit`` clears the sites it leaves in float)."""

    calibrator_option: ClassVar[str | None] = None
    """The option naming another method as this calibrating method's activation calibrator
    (``cfws``: ``calibrator``): how the host's composition error tells to combine two calibrators."""

    needs_data: ClassVar[bool] = False
    """Needs calibration data even where the target needs none (4-bit weight-only runs)."""

    approximates: ClassVar[bool] = False
    """Its :meth:`float_rewrite` approximates the model instead of preserving it (a compression such
    as a low-rank factorisation of the weights): the host records the rewrite's output error against
    the float model in the report's ``quantized_rewrites`` instead of requiring 1e-5, and places the
    result again, so the placement, the statistics and every later step see the rewritten graph."""

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def float_rewrite(self, ctx: RunContext) -> onnx.ModelProto | None:
        """Return a rewritten float model (outputs must match the input's to 1e-5 unless the class
        declares :attr:`approximates`), or None."""
        return None

    def declare_statistics(self, ctx: RunContext) -> list[StatRequest]:
        """Statistics this method needs; by default min/max of every activation site."""
        return [StatRequest(t, "minmax") for t in ctx.plan.activations]

    def choose_qparams(self, ctx: RunContext) -> None:
        """Set ``site.range``/``site.qparams`` for activations (and weights, if it wants)."""

    def refine(self, ctx: RunContext) -> None:
        """Improve the finished plan in place (scale searches); the model stays as it is."""

    def quantized_rewrite(self, ctx: RunContext) -> onnx.ModelProto | None:
        """Return a changed copy of ``ctx.model`` whose change depends on the chosen qparams, or None.

        Called right after this method's :meth:`refine`. The host records which nodes and
        initializers changed and the output error against the float model, then installs the
        model for the following methods and the QDQ rewrite. Do not edit ``ctx.model`` itself.
        """
        return None

    def commands(self, ctx: RunContext) -> list[Any]:
        """Extra QDQ rewrite commands beyond the plan (rarely needed)."""
        return []

    def qdq_rewrite(self, ctx: RunContext, model: onnx.ModelProto) -> onnx.ModelProto | None:
        """Return a changed copy of the quantized (QDQ) ``model``, or None.

        Called after the host has written the plan as Q/DQ nodes, method by method in ``-p`` order
        (each sees its predecessors' result), for changes that need the integer tensors: nodes
        between a QuantizeLinear and its DequantizeLinear, a weight written as several DQs. The
        host checks the result (ONNX checker, it runs in ONNX Runtime), records the changed nodes
        and initializers and its output error against the float model in the report's
        ``quantized_rewrites``, and makes it the quantized model. ``model`` is the method's own
        copy: it may be edited and returned.
        """
        return None


class RangeMethod(QuantMethod):
    """A calibrator: picks one clip threshold per activation from its statistics.

    Subclasses implement :meth:`threshold`. The activation grid covers
    ``[max(min, −T), min(max, T)]``: symmetric targets use ``T`` (capped at the observed
    max-abs) on both sides, asymmetric ones keep the observed sign range inside the clip.
    """

    calibrates = True
    needs_histogram: ClassVar[bool] = True

    def declare_statistics(self, ctx: RunContext) -> list[StatRequest]:
        kind = "histogram" if self.needs_histogram else "minmax"
        return [StatRequest(t, kind) for t in ctx.plan.activations]  # type: ignore[arg-type]

    def threshold(self, stats: TensorStats, ctx: RunContext) -> float:
        raise NotImplementedError

    def levels(self, stats: TensorStats, profile: TargetProfile) -> int:
        """Grid levels over [0, T]: 2^(b−1) symmetric; 2^b for a one-sided unsigned grid."""
        if not profile.activation_signed and stats.min >= 0:
            return 2**profile.bits
        return profile.activation_levels

    def grid_steps(self, stats: TensorStats, profile: TargetProfile):
        """``steps_of(T)``: the step of the grid ``profile`` deploys for clip threshold ``T`` (vectorised)."""
        from onnxq.calib.thresholds import grid_steps

        if profile.activation_signed:
            return grid_steps(stats, True, 2 ** (profile.bits - 1) - 1)
        return grid_steps(stats, False, 2**profile.bits - 1)

    def choose_qparams(self, ctx: RunContext) -> None:
        set_activation_ranges(ctx, lambda s: self.threshold(s, ctx))
        set_weight_qparams(ctx)


def set_activation_ranges(ctx: RunContext, threshold_of) -> None:
    """Set range and qparams of every activation site from a threshold function, honouring share groups."""
    plan = ctx.plan
    for name, site in plan.activations.items():
        s = ctx.stats[name]
        t = float(threshold_of(s))
        t = min(t, s.amax) if s.amax > 0 else 0.0
        site.range = (max(s.min, -t), min(s.max, t))
    finish_activation_qparams(ctx)


def finish_activation_qparams(ctx: RunContext) -> None:
    """Unify the ranges of each share group, then set every activation site's qparams from its range."""
    plan = ctx.plan
    for group in plan.share_groups:
        lo = min(plan.activations[t].range[0] for t in group)  # type: ignore[index]
        hi = max(plan.activations[t].range[1] for t in group)  # type: ignore[index]
        for t in group:
            plan.activations[t].range = (lo, hi)
    for site in plan.activations.values():
        site.qparams = ctx.profile.activation_qparams(*site.range)  # type: ignore[misc]


def set_weight_qparams(ctx: RunContext, overwrite: bool = False) -> None:
    """Per-channel max-abs symmetric weight qparams for every weight site that has none."""
    for site in ctx.plan.weights.values():
        if site.qparams is not None and not overwrite:
            continue
        w = ctx.weight(site.initializer)
        if ctx.profile.weight_only:
            site.qparams = ctx.profile.weight_block_qparams(w, site.axis or 0)
            continue
        absmax = per_channel_absmax(w, site.axis) if site.axis is not None else np.array(np.abs(w).max())
        site.qparams = ctx.profile.weight_qparams(absmax, site.axis)
