"""The calibration samples a search evaluates on, taken by the statistics pass.

A search declares :func:`samples_request` in ``declare_statistics``; the host's statistics pass
then keeps the first ``n`` calibration samples while it streams the data (no pass of their own),
and :func:`take_samples` / :func:`sample_batches` read them back from ``ctx.stats`` in ``refine``.
Called with a context whose statistics lack the request (a method run on its own, a test), they
collect it on the spot with the same reducer, so the samples are the same either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from onnxq.calib.readers import Batch
from onnxq.calib.statistics import MODEL_INPUTS, InputSamples, StatRequest, StatsMap, collect

if TYPE_CHECKING:
    from onnxq.method import RunContext


def samples_request(n: int) -> StatRequest:
    """The request for the first ``n`` calibration samples (declare it in ``declare_statistics``)."""
    return StatRequest(MODEL_INPUTS, InputSamples(n))


def sample_batches(ctx: RunContext, n: int) -> list[Batch]:
    """The first ``n`` calibration samples as the data batched them (the last batch cut to size, labels aligned)."""
    req = samples_request(n)
    if isinstance(ctx.stats, StatsMap) and req in ctx.stats:
        return ctx.stats[req]
    return collect(ctx.model, [req], ctx.calibration, show_progress=False)[req]


def take_samples(ctx: RunContext, n: int) -> list[dict[str, np.ndarray]]:
    """The first ``n`` calibration samples as feed dicts, one chunk when the batch axis is dynamic."""
    chunks = [b.feeds for b in sample_batches(ctx, n)]
    from onnxq.calib.feeds import batch_is_dynamic, model_inputs

    if len(chunks) > 1 and batch_is_dynamic(model_inputs(ctx.model)):
        try:
            return [{k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}]
        except ValueError:
            pass
    return chunks
