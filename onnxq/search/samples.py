"""The calibration samples a search method evaluates on (shared by easyquant and detptq)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from onnxq.method import RunContext


def take_samples(ctx: RunContext, n: int) -> list[dict[str, np.ndarray]]:
    """The first ``n`` calibration samples as feed dicts, one chunk when the batch axis is dynamic."""
    chunks, seen = [], 0
    for b in ctx.calibration():
        size = next(iter(b.feeds.values())).shape[0]
        take = min(size, n - seen)
        chunks.append({k: v[:take] for k, v in b.feeds.items()})
        seen += take
        if seen >= n:
            break
    from onnxq.calib.feeds import batch_is_dynamic, model_inputs

    if len(chunks) > 1 and batch_is_dynamic(model_inputs(ctx.model)):
        try:
            return [{k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}]
        except ValueError:
            pass
    return chunks
