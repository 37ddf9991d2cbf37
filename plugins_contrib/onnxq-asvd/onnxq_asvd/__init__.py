"""onnxq-asvd: activation-aware low-rank factorisation of weight MatMuls (ASVD, Yuan et al., arXiv 2312.05821).

``-p asvd`` replaces each weight MatMul ``x·W`` (``W``: ``[K, N]``) by two MatMuls ``(x·A)·B`` of
rank ``r``, from the SVD of the weight with its rows scaled by ``(mean |x| per input channel)^α``
(:mod:`onnxq_asvd.factorize`); the ranks are chosen per layer to meet a parameter ratio or an error
target (:mod:`onnxq_asvd.ranks`). The factorisation is a float rewrite that *approximates* the model
(the class declares ``approximates``): the host reports its output error and places the new graph,
so both factor MatMuls are ordinary weight MatMuls for the calibrator and any weight method after
it (``-p asvd -p minmax`` gives INT8 factors, ``-p asvd -p gptq --bits 4`` 4-bit ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import onnx

from onnxq.calib.readers import Batch
from onnxq.calib.statistics import StatRequest, collect
from onnxq.graph.placement import build_plan
from onnxq.graph.plan import QuantPlan
from onnxq.graph.targets import get_profile
from onnxq.hookspecs import hookimpl
from onnxq.method import QuantMethod, RunContext
from onnxq.options import option
from onnxq_asvd.factorize import Decomposition, InputMoments, decompose, dense_params
from onnxq_asvd.ranks import Choice, for_ratio, for_threshold
from onnxq_asvd.rewrite import Target, factorised, targets

__all__ = ["Asvd", "AsvdOptions", "compress", "input_moments", "plan_ranks"]


@dataclass(frozen=True)
class AsvdOptions:
    alpha: float = option(0.5, "exponent of mean |x| per input channel that scales W's rows before the SVD (0: plain SVD)")
    ratio: float = option(0.8, "fraction of the factorisable MatMuls' weight parameters to keep, summed over them (per-layer ranks)")
    target_error: float = option(0.0, "instead of ratio: largest relative output error per layer on the calibration inputs (0: use ratio)")
    align: int = option(1, "ranks are multiples of this (8 or 16 suit vectorised kernels)")

    def validate(self) -> None:
        if not 0 <= self.alpha <= 4:
            raise ValueError("alpha must be in [0, 4]")
        if not 0 < self.ratio <= 1:
            raise ValueError("ratio must be in (0, 1]")
        if not 0 <= self.target_error < 1:
            raise ValueError("target_error must be in [0, 1)")
        if self.align < 1:
            raise ValueError("align must be >= 1")


def plan_ranks(decs: dict[str, Decomposition], options: AsvdOptions) -> tuple[dict[str, Choice], float]:
    """Per-layer ranks for the options' target (error target if set, else parameter ratio), and the shared threshold."""
    if options.target_error > 0:
        return for_threshold(decs, options.target_error, options.align), options.target_error
    return for_ratio(decs, options.ratio, options.align)


def _factorise(model: onnx.ModelProto, found: list[Target], stats: dict[str, Any], weight_of,
               options: AsvdOptions) -> tuple[onnx.ModelProto | None, dict[str, Any]]:
    decs = {}
    for t in found:
        mean_abs, gram = stats[t.input]
        decs[t.node] = decompose(weight_of(t.weight), mean_abs, gram, options.alpha)
    choices, threshold = plan_ranks(decs, options)
    factors = {name: decs[name].factors(c.rank) for name, c in choices.items() if c.rank is not None}
    before = sum(dense_params(d.shape) for d in decs.values())
    after = sum(c.params for c in choices.values())
    summary = {
        "alpha": options.alpha, "threshold": threshold, "params_before": before, "params_after": after,
        "ratio": after / before if before else 1.0,
        "layers": {name: {"shape": list(decs[name].shape), "rank": c.rank, "error": c.error} for name, c in choices.items()},
    }
    return (factorised(model, factors, {t.node: t for t in found}) if factors else None), summary


def input_moments(model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]], plan: QuantPlan | None = None) -> dict[str, Any]:
    """Mean |x| and ``XᵀX / T`` of every factorisable MatMul's input (by input tensor), in one pass
    over ``batches``; reusable across :func:`compress` calls with other options."""
    found = targets(model, plan or build_plan(model, get_profile("ort")))
    feeds = list(batches)
    reqs = {t.input: StatRequest(t.input, InputMoments()) for t in found}
    stats = collect(model, list(reqs.values()), lambda: iter(Batch(f) for f in feeds), show_progress=False)
    return {x: stats[r] for x, r in reqs.items()}


def compress(model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]] | None, options: AsvdOptions | None = None,
             plan: QuantPlan | None = None, moments: dict[str, Any] | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """ASVD as a library function on a float model, without quantization: the factorised model and its summary.

    ``batches``: calibration feed dicts (or ``moments`` from :func:`input_moments`). The MatMuls
    considered are those the ``ort`` target quantizes (or those of ``plan``), as in a run; nodes
    must be named.
    """
    options = options or AsvdOptions()
    options.validate()
    plan = plan or build_plan(model, get_profile("ort"))
    found = targets(model, plan)
    if moments is None:
        moments = input_moments(model, batches or [], plan)
    inits = {t.name: t for t in model.graph.initializer}
    rewritten, summary = _factorise(model, found, moments, lambda name: onnx.numpy_helper.to_array(inits[name]), options)
    return (rewritten if rewritten is not None else model), summary


class Asvd(QuantMethod):
    """Activation-aware SVD of weight MatMuls, as a float rewrite that approximates the model."""

    name = "asvd"
    summary = "ASVD: weight MatMuls as two low-rank MatMuls (activation-aware SVD, per-layer ranks for a parameter ratio or error target)"
    Options = AsvdOptions
    approximates = True
    needs_data = True

    def float_rewrite(self, ctx: RunContext) -> onnx.ModelProto | None:
        found = targets(ctx.model, ctx.plan)
        if not found:
            ctx.report[self.name] = {"layers": {}, "note": "no MatMul with a constant 2-D weight to factorise"}
            return None
        requests = {t.input: StatRequest(t.input, InputMoments()) for t in found}
        stats = ctx.collect(list(requests.values()))
        rewritten, summary = _factorise(ctx.model, found, {k: stats[r] for k, r in requests.items()}, ctx.weight, self.options)
        ctx.report[self.name] = summary
        return rewritten


@hookimpl
def register_methods(register) -> None:
    register(Asvd)
