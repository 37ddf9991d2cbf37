"""The host's checks of the models methods return: output agreement and what changed."""

from __future__ import annotations

import numpy as np
import onnx

from onnxq.calib.feeds import batch_is_dynamic, model_inputs
from onnxq.calib.readers import Batch
from onnxq.errors import ModelError
from onnxq.runtime import ort as ort_backend

#: largest relative output error a float rewrite may cause
FLOAT_REWRITE_TOLERANCE = 1e-5


def check_feeds(model: onnx.ModelProto, batch: Batch) -> dict[str, np.ndarray]:
    """The part of ``batch`` the checks run on.

    A few samples suffice to catch a wrong rewrite; running one model at a time without an arena
    keeps a large-input model (PP-OCR det: 16 pages of 640x640) from holding two arenas at their peak.
    """
    return {k: v[:4] for k, v in batch.feeds.items()} if batch_is_dynamic(model_inputs(model)) else batch.feeds


def model_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs on ``feeds`` (no graph optimizations, no arena)."""
    return ort_backend.run(ort_backend.make_session(model, "disable", arena=False), feeds)


def relative_error(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Worst output's max |got − reference| / max |reference|."""
    worst = 0.0
    for x, y in zip(reference, got):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12)))
    return worst


def outputs_error(a: onnx.ModelProto, b: onnx.ModelProto, batch: Batch) -> float:
    """Relative output error of model ``b`` against model ``a`` on (part of) ``batch``."""
    feeds = check_feeds(a, batch)
    return relative_error(model_outputs(a, feeds), model_outputs(b, feeds))


def check_float_rewrite(who: str, before: onnx.ModelProto, after: onnx.ModelProto, batch: Batch) -> None:
    """Raise :class:`ModelError` unless ``after`` gives ``before``'s outputs to 1e-5."""
    err = outputs_error(before, after, batch)
    if err > FLOAT_REWRITE_TOLERANCE:
        raise ModelError(f"{who} changed the float model's outputs (relative error {err:.2e} > 1e-5); this is a bug")


def _tensor_key(t: onnx.TensorProto) -> bytes:
    return t.SerializeToString()


def model_changes(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, list[str]]:
    """Nodes and initializers (by name) that ``after`` adds, removes or changes relative to ``before``."""
    nb, na = {n.name for n in before.graph.node}, {n.name for n in after.graph.node}
    ib = {t.name: t for t in before.graph.initializer}
    ia = {t.name: t for t in after.graph.initializer}
    changed = [name for name, t in ia.items() if name in ib and (ib[name] is not t) and _tensor_key(ib[name]) != _tensor_key(t)]
    return {
        "nodes_added": sorted(na - nb),
        "nodes_removed": sorted(nb - na),
        "initializers_added": sorted(set(ia) - set(ib)),
        "initializers_removed": sorted(set(ib) - set(ia)),
        "initializers_changed": sorted(changed),
    }
