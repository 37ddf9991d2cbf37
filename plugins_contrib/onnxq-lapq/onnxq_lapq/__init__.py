"""``lapq``: Loss-Aware Post-training Quantization (Nahshan et al., arXiv 1911.07190; plugins_contrib/onnxq-lapq/README.md).

1. For each ``p`` in ``linspace(p_min, p_max, p_points)`` (default 2..4, 10 points): every
   quantized tensor gets its Lp-optimal clip (activations per tensor from the calibration
   histogram, weights per output channel), and the whole quantized model's calibration loss
   ``L(p)`` is measured.
2. A parabola through ``(p, L(p))`` gives ``p*`` (its vertex, kept inside the range; the best
   sampled ``p`` if that is better); the clips at ``p*`` are the initialisation.
3. Powell's derivative-free method (scipy) optimises all clips jointly against the calibration
   loss: one multiplier per activation (share groups move together) and one per weight tensor
   (scaling its per-channel Lp steps), bounded to ``[lower, upper]``. The best point seen is
   kept, so the result is never worse on the calibration loss than the ``p*`` initialisation.

The loss is cross-entropy when the calibration data carry labels (a ``label`` key), else
KL(FP32 ‖ quantized) of the softmax outputs (MSE to the FP32 output for non-classifier outputs).
Every evaluation runs one ONNX Runtime session of the model whose qparams are graph inputs
(:mod:`onnxq_lapq.loss_model`). ``weight_bits``/``act_bits`` narrow the grids below the target's
``--bits`` (``-o weight_bits 4 -o act_bits 4`` is the paper's W4A4, emulated with int8 storage and
a Clip). Not done: the optional weight bias correction of the reference code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
from onnxq.calib.statistics import StatRequest
from onnxq.search.samples import sample_batches, samples_request
from onnxq.errors import OnnxqError, OptionError
from onnxq.hookspecs import hookimpl
from onnxq.method import QuantMethod, RunContext
from onnxq.options import option
from onnxq.qparams import QParams, int_range

from onnxq_lapq.clips import act_lp_clip, act_qparams, channel_rows, clipped_range, weight_lp_steps, weight_qparams

__version__ = "0.1.0"


@dataclass(frozen=True)
class LapqOptions:
    """Options of LAPQ (defaults: plugins_contrib/onnxq-lapq/README.md)."""

    weight_bits: int | None = option(None, "weight grid bits, 2-8 (default: the target's --bits), int8 storage restricted to that range")
    act_bits: int | None = option(None, "activation grid bits, 2-8 (default: the target's --bits); below it a Clip emulates the grid in 8-bit storage")
    p_min: float = option(2.0, "smallest p of the Lp sweep")
    p_max: float = option(4.0, "largest p of the Lp sweep")
    p_points: int = option(10, "points of the Lp sweep (1: use p_min, no parabola)")
    maxiter: int = option(1, "Powell iterations (paper: 1 for ResNet-50, 2 for ResNet-18); 0 stops after the Lp init")
    max_evals: int = option(3000, "cap on loss evaluations during Powell")
    lower: float = option(0.2, "lowest clip multiplier Powell may try (relative to the Lp init)")
    upper: float = option(1.5, "highest clip multiplier Powell may try")
    loss: Literal["auto", "ce", "kl", "mse"] = option("auto", "calibration loss: auto = cross-entropy with labels, else KL to the FP32 softmax (MSE for non-classifier outputs)")
    samples: int = option(512, "calibration samples in every loss evaluation")
    optimize: Literal["all", "activations", "weights"] = option("all", "which clips Powell optimises")

    def validate(self) -> None:
        for b in (self.weight_bits, self.act_bits):
            if b is not None and not 2 <= b <= 8:
                raise ValueError("weight_bits and act_bits must be between 2 and 8")
        if not 0 < self.p_min <= self.p_max or self.p_points < 1:
            raise ValueError("need 0 < p_min <= p_max and p_points >= 1")
        if self.maxiter < 0 or self.max_evals < 1 or self.samples < 1:
            raise ValueError("maxiter must be >= 0, max_evals and samples >= 1")
        if not 0 < self.lower <= 1 <= self.upper:
            raise ValueError("need 0 < lower <= 1 <= upper")


class _Budget(Exception):
    pass


class Lapq(QuantMethod):
    """Lp-norm clip initialisation with a parabola-fitted p, then Powell on the calibration loss."""

    name = "lapq"
    summary = "LAPQ: Lp-norm clip init (parabola-fitted p) then joint Powell optimisation of all clips against the task loss"
    Options = LapqOptions
    calibrates = True

    def declare_statistics(self, ctx: RunContext) -> list[StatRequest]:
        return [StatRequest(t, "histogram") for t in ctx.plan.activations] + [samples_request(self.options.samples)]

    # -- grids -----------------------------------------------------------------------------
    def _bits(self, ctx: RunContext) -> tuple[int, int]:
        return self.options.weight_bits or ctx.profile.bits, self.options.act_bits or ctx.profile.bits

    def _units(self, ctx: RunContext) -> list[list[str]]:
        """Activation tensors that move together (share groups), each group one Powell variable."""
        grouped = {t for g in ctx.plan.share_groups for t in g}
        units = [list(g) for g in ctx.plan.share_groups]
        units += [[t] for t in ctx.plan.activations if t not in grouped]
        return units

    def _act_qparams(self, ctx: RunContext, alphas: dict[str, float]) -> dict[str, QParams]:
        _, abits = self._bits(ctx)
        ranges = {t: clipped_range(ctx.stats[t], a) for t, a in alphas.items()}
        for g in ctx.plan.share_groups:
            lo = min(ranges[t][0] for t in g)
            hi = max(ranges[t][1] for t in g)
            for t in g:
                ranges[t] = (lo, hi)
        return {t: act_qparams(ctx.profile, lo, hi, abits) for t, (lo, hi) in ranges.items()}

    def _weight_qparams(self, ctx: RunContext, steps: dict[str, np.ndarray]) -> dict[str, QParams]:
        wbits, _ = self._bits(ctx)
        qmin, qmax = int_range(wbits, True, ctx.profile.weight_narrow)
        return {k: weight_qparams(s, ctx.plan.weights[k].axis, qmin, qmax) for k, s in steps.items()}

    def _lp_init(self, ctx: RunContext, p: float) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        wbits, abits = self._bits(ctx)
        qmin, qmax = int_range(wbits, True, ctx.profile.weight_narrow)
        alphas = {t: act_lp_clip(ctx.stats[t], p, ctx.profile, abits) for t in ctx.plan.activations}
        steps = {k: weight_lp_steps(ctx.weight(s.initializer), s.axis, qmin, qmax, p) for k, s in ctx.plan.weights.items()}
        return alphas, steps

    def _apply(self, ctx: RunContext, alphas: dict[str, float], steps: dict[str, np.ndarray]) -> None:
        acts = self._act_qparams(ctx, alphas)
        for t, q in acts.items():
            site = ctx.plan.activations[t]
            site.qparams = q
            site.range = tuple(float(v) for v in q.real_range())  # type: ignore[assignment]
        for k, q in self._weight_qparams(ctx, steps).items():
            ctx.plan.weights[k].qparams = q

    def choose_qparams(self, ctx: RunContext) -> None:
        """Lp clips at ``p_min`` (refine replaces them by the sweep's and Powell's result)."""
        _refuse_weight_only(ctx)
        self._apply(ctx, *self._lp_init(ctx, self.options.p_min))

    # -- the search ------------------------------------------------------------------------
    def refine(self, ctx: RunContext) -> None:
        o = self.options
        _refuse_weight_only(ctx)
        t0 = time.perf_counter()
        missing = [t for t in ctx.plan.activations if ctx.stats.get(t) is None or ctx.stats[t].hist is None]
        if missing:
            raise OnnxqError(f"lapq: no histogram for '{missing[0]}'")
        import importlib.util

        if importlib.util.find_spec("scipy") is None:
            raise OnnxqError("lapq needs scipy: pip install scipy")
        from onnxq_lapq.loss_model import LossModel

        feeds, labels = _take_samples(ctx, o.samples)
        lm = LossModel(ctx.model, ctx.plan, feeds, labels, o.loss, int32_bias=ctx.profile.int32_bias)

        def loss_of(alphas, steps) -> float:
            return lm.loss(self._act_qparams(ctx, alphas), self._weight_qparams(ctx, steps))

        # 1-2. Lp sweep and parabola
        ps = np.linspace(o.p_min, o.p_max, o.p_points)
        inits = [self._lp_init(ctx, float(p)) for p in ps]
        losses = np.array([loss_of(*i) for i in inits])
        p_star, init, init_loss = self._pick_p(ctx, ps, inits, losses, loss_of)
        max_alphas = {t: ctx.stats[t].amax for t in ctx.plan.activations}
        max_steps = {k: np.maximum(np.abs(channel_rows(ctx.weight(s.initializer), s.axis)).max(axis=1) / int_range(self._bits(ctx)[0], True, ctx.profile.weight_narrow)[1], 1e-8)
                     for k, s in ctx.plan.weights.items()}
        max_loss = loss_of(max_alphas, max_steps)

        # 3. Powell on clip multipliers
        alphas0, steps0 = init
        units = self._units(ctx) if o.optimize in ("all", "activations") else []
        wkeys = list(ctx.plan.weights) if o.optimize in ("all", "weights") else []
        n = len(units) + len(wkeys)
        best = {"x": np.ones(n), "f": init_loss}
        evals_before = lm.evaluations

        def unpack(x: np.ndarray):
            alphas = dict(alphas0)
            for u, m in zip(units, x[: len(units)]):
                for t in u:
                    alphas[t] = alphas0[t] * float(m)
            steps = dict(steps0)
            for k, m in zip(wkeys, x[len(units) :]):
                steps[k] = steps0[k] * float(m)
            return alphas, steps

        def objective(x: np.ndarray) -> float:
            if lm.evaluations - evals_before >= o.max_evals:
                raise _Budget
            if np.any(x <= 0):
                return float("inf")  # negative clips are rejected (as in the paper's code)
            f = loss_of(*unpack(np.asarray(x, np.float64)))
            if f < best["f"]:
                best["x"], best["f"] = np.array(x, np.float64), f
            return f

        stopped = "maxiter"
        if o.maxiter > 0 and n > 0:
            from scipy.optimize import minimize

            try:
                minimize(objective, np.ones(n), method="Powell", bounds=[(o.lower, o.upper)] * n,
                         options={"maxiter": o.maxiter, "xtol": 1e-3, "ftol": 1e-5})
            except _Budget:
                stopped = "max_evals"
        self._apply(ctx, *unpack(best["x"]))
        ctx.report[self.name] = {
            "loss": lm.loss_kind,
            "samples": int(sum(len(next(iter(f.values()))) for f in feeds)),
            "weight_bits": self._bits(ctx)[0],
            "act_bits": self._bits(ctx)[1],
            "p_sweep": {f"{p:.3f}": float(v) for p, v in zip(ps, losses)},
            "p_star": p_star,
            "loss_max_clip": max_loss,
            "loss_lp_init": init_loss,
            "loss_final": float(best["f"]),
            "variables": n,
            "powell_evaluations": lm.evaluations - evals_before,
            "powell_stopped_by": stopped,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    def _pick_p(self, ctx, ps, inits, losses, loss_of):
        """Parabola vertex (inside [p_min, p_max]) if it beats every sampled p, else the best sampled p."""
        k = int(np.argmin(losses))
        best_p, best_init, best_loss = float(ps[k]), inits[k], float(losses[k])
        finite = np.isfinite(losses)
        if len(ps) >= 3 and finite.sum() >= 3:
            a, b, _ = np.polyfit(ps[finite], losses[finite], 2)
            if a > 0:
                p_v = float(np.clip(-b / (2 * a), ps[0], ps[-1]))
                init_v = self._lp_init(ctx, p_v)
                loss_v = loss_of(*init_v)
                if loss_v <= best_loss:
                    return p_v, init_v, loss_v
        return best_p, best_init, best_loss


def _refuse_weight_only(ctx: RunContext) -> None:
    if getattr(ctx.profile, "weight_only", False):
        raise OptionError("lapq quantizes activations and weights; for 4-bit weights use --bits 8 with -o weight_bits 4 "
                          "(the --bits 4 block-wise weight-only format is not supported)")


def _take_samples(ctx: RunContext, n: int) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """Up to ``n`` calibration samples (one batch where the model allows), with labels if every batch has them.

    The samples are the ones the host's statistics pass kept for :func:`samples_request`."""
    feeds: list[dict[str, np.ndarray]] = []
    labels: list[np.ndarray] | None = []
    for b in sample_batches(ctx, n):
        feeds.append(b.feeds)
        if b.labels is None or labels is None:
            labels = None
        else:
            labels.append(b.labels)
    from onnxq.calib.feeds import batch_is_dynamic, model_inputs

    if len(feeds) > 1 and batch_is_dynamic(model_inputs(ctx.model)):
        try:
            feeds = [{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}]
        except ValueError:
            pass  # samples of different shapes: one run per batch
    return feeds, (np.concatenate(labels) if labels else None)


@hookimpl
def register_methods(register) -> None:
    register(Lapq)
