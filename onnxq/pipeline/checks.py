"""The host's checks of the models methods return: output agreement and what changed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.calib.feeds import batch_is_dynamic, model_inputs
from onnxq.calib.readers import Batch
from onnxq.errors import ModelError
from onnxq.graph.prepare import has_float16
from onnxq.runtime import ort as ort_backend
from onnxq.runtime.heap import return_freed_memory

#: largest relative output error a float rewrite may always cause
FLOAT_REWRITE_TOLERANCE = 1e-5
#: above :data:`FLOAT_REWRITE_TOLERANCE`, a rewrite may differ by this many times the model's own float32
#: rounding noise (:func:`float_noise_floor`). On PP-OCRv4 det the noise floor is 1.2e-5, CFWS's
#: correct channel split changes the outputs by 1.1e-5, and one output channel of one conv scaled by
#: 1 + 1e-3 (a small real bug) by 1.5e-4 to 5.8e-3 depending on the layer: 4x the noise floor
#: (4.9e-5) is about 4x above the first and 3x below the second (benchmarks/README.md, "Robustness").
NOISE_FLOOR_FACTOR = 4.0
#: never more than this, whatever the noise floor: a change this large is a bug
FLOAT_REWRITE_CEILING = 1e-3
#: a float16 model's floor: float16 keeps 11 significant bits (a relative step of 4.9e-4 per rounding), and a correct
#: rewrite that rounds its new weights to float16 (smoothquant's scaled MatMul weights) moved a small transformer's
#: outputs by 5e-5 to 1e-4, five to ten times the float32 floor; its ceiling is ten times this
FLOAT16_REWRITE_TOLERANCE = 1e-3


def check_feeds(model: onnx.ModelProto, batch: Batch) -> dict[str, np.ndarray]:
    """The part of ``batch`` the checks run on.

    A few samples suffice to catch a wrong rewrite; running one model at a time without an arena
    keeps a large-input model (PP-OCR det: 16 pages of 640x640) from holding two arenas at their peak.
    """
    return {k: v[:4] for k, v in batch.feeds.items()} if batch_is_dynamic(model_inputs(model)) else batch.feeds


def model_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimization: str = "disable") -> list[np.ndarray]:
    """The model's outputs on ``feeds`` (by default without graph optimizations; no arena)."""
    sess = ort_backend.make_session(model, optimization, arena=False)
    try:
        return ort_backend.run(sess, feeds)
    finally:
        del sess
        return_freed_memory()


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


def float_noise_floor(model: onnx.ModelProto, batch: Batch, reference: list[np.ndarray] | None = None) -> float:
    """The model's own float32 rounding noise: the relative output error between ONNX Runtime runs of
    ``model`` with graph optimizations off and on (fusions and kernels that sum in another order).
    ``reference``: the unoptimized outputs on ``check_feeds(model, batch)`` when already computed."""
    feeds = check_feeds(model, batch)
    if reference is None:
        reference = model_outputs(model, feeds)
    return relative_error(reference, model_outputs(model, feeds, "all"))


def check_float_rewrite(who: str, before: onnx.ModelProto, after: onnx.ModelProto, batch: Batch) -> None:
    """Raise :class:`ModelError` unless ``after`` gives ``before``'s outputs within float32 rounding.

    Within :data:`FLOAT_REWRITE_TOLERANCE` always passes. A correct rewrite that reorders float32
    sums (a channel split, an equalization) on a deep net can exceed it by rounding alone, so above
    it the error is compared with :data:`NOISE_FLOOR_FACTOR` times ``before``'s noise floor (one
    more run of the model, only then), capped at :data:`FLOAT_REWRITE_CEILING`.
    """
    verdict = float_rewrite_verdict(before, after, batch)
    if not verdict.ok:
        raise ModelError(f"{who} changed the float model's outputs ({verdict}); this is a bug")


@dataclass(frozen=True)
class RewriteVerdict:
    """How far a float rewrite moved the outputs, against what float32 rounding alone may move them."""

    error: float
    tolerance: float
    noise: float
    floor: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance

    def __str__(self) -> str:
        return (f"relative error {self.error:.2e} {'<=' if self.ok else '>'} {self.tolerance:.1e}, "
                f"{NOISE_FLOOR_FACTOR:g}x the model's float32 rounding noise {self.noise:.1e} or at least {self.floor:g}")


def float_rewrite_verdict(before: onnx.ModelProto, after: onnx.ModelProto, batch: Batch,
                          floor: float = FLOAT_REWRITE_TOLERANCE) -> RewriteVerdict:
    """Whether ``after`` gives ``before``'s outputs within float rounding (:func:`check_float_rewrite`'s rule; a float16
    model's floor and ceiling are float16's, :data:`FLOAT16_REWRITE_TOLERANCE`).

    Within ``floor`` always; above it, within :data:`NOISE_FLOOR_FACTOR` times ``before``'s own noise floor
    (measured only then), never above :data:`FLOAT_REWRITE_CEILING`."""
    ceiling = FLOAT_REWRITE_CEILING
    if has_float16(before):
        floor, ceiling = max(floor, FLOAT16_REWRITE_TOLERANCE), max(ceiling, 10 * FLOAT16_REWRITE_TOLERANCE)
    feeds = check_feeds(before, batch)
    reference = model_outputs(before, feeds)
    err = relative_error(reference, model_outputs(after, feeds))
    if err <= floor:
        return RewriteVerdict(err, floor, 0.0, floor)
    noise = float_noise_floor(before, batch, reference) if err <= ceiling else 0.0
    return RewriteVerdict(err, min(ceiling, max(floor, NOISE_FLOOR_FACTOR * noise)), noise, floor)


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
