"""One comparator over runners: FP32 reference and candidates on the same data, metrics and latency.

``onnxq compare`` (any backend), ``onnxq optimize --eval-data`` and the TensorRT evaluation
(:mod:`onnxq.evaluate.tensorrt`) all come through :func:`compare_runners`. A row is a
:class:`Candidate`: a name and a factory that makes its :class:`~onnxq.runtime.runner.Runner`
when the row's turn comes, so that at most one model (one session, one engine) is loaded at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.backends.ort import OrtBackend
from onnxq.calib.readers import Batch
from onnxq.errors import OnnxqError
from onnxq.evaluate.metrics import cosine, output_metrics, sqnr_db
from onnxq.graph import model_io
from onnxq.runtime import ort as ort_backend
from onnxq.runtime.runner import Backend, ModelLike, Runner


@dataclass
class Evaluation:
    """Metrics of one model against the FP32 reference."""

    name: str
    size_bytes: int | None
    outputs: dict[str, dict[str, float]]
    latency_ms: dict[str, float] = field(default_factory=dict)
    integer_kernels: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def headline(self) -> dict[str, float]:
        """The first output's metrics (what tables show)."""
        return next(iter(self.outputs.values()), {})


@dataclass
class Candidate:
    """One row of a comparison: its name and how to make its runner.

    ``make`` may fail with an :class:`OnnxqError` (a model a runtime rejects); an ``optional`` row
    then becomes a note ``"<name>: <skip_note>: <error>"`` instead of failing the comparison.
    ``extra`` is merged into the row's :attr:`Evaluation.extra` (``make`` may still add to it).
    """

    name: str
    make: Callable[[], Runner]
    extra: dict[str, Any] = field(default_factory=dict)
    optional: bool = False
    skip_note: str = "not loaded"


def concat_batches(parts: list[np.ndarray]) -> np.ndarray:
    """One output's batches joined along the sample axis (flattened per sample when shapes vary)."""
    try:
        return np.concatenate(parts)
    except ValueError:  # variable shapes: compare flattened
        return np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1) if parts else np.empty(0)


def _collect(runner: Runner, batches: Iterable[Batch]) -> tuple[dict[str, list[np.ndarray]], list[np.ndarray | None]]:
    outs: dict[str, list[np.ndarray]] = {n: [] for n in runner.output_names}
    labels: list[np.ndarray | None] = []
    for b in batches:
        res = runner.infer(b.feeds)
        for n in outs:
            if n in res:
                outs[n].append(res[n])
        labels.append(b.labels)
    return outs, labels


def compare_runners(rows: Sequence[Candidate], batches: Callable[[], Iterable[Batch]], latency_feeds: dict[str, np.ndarray] | None = None,
                    notes: list[str] | None = None) -> list[Evaluation]:
    """Run every row on ``batches()``; the first row is the FP32 reference the others are measured against.

    Per output: the metrics of :func:`onnxq.evaluate.metrics.output_metrics` (accuracy when every
    batch has labels). With ``latency_feeds`` each runner also times one inference. The reference
    row gets no kernel report. Notes of skipped optional rows are appended to ``notes``.
    """
    results: list[Evaluation] = []
    ref_full: dict[str, np.ndarray] = {}
    labels: np.ndarray | None = None
    for i, row in enumerate(rows):
        try:
            runner = row.make()
        except OnnxqError as exc:
            if not row.optional:
                raise
            if notes is not None:
                notes.append(f"{row.name}: {row.skip_note}: {exc}")
            continue
        with runner:
            outs, labs = _collect(runner, batches())
            if i == 0:
                ref_full = {n: concat_batches(v) for n, v in outs.items() if v}
                labels = np.concatenate(labs) if labs and all(lab is not None for lab in labs) else None  # type: ignore[arg-type]
            per_output = {n: output_metrics(ref_full[n], concat_batches(v), labels) for n, v in outs.items() if v and n in ref_full}
            ev = Evaluation(row.name, runner.size_bytes, per_output)
            if latency_feeds is not None:
                ev.latency_ms.update({k: round(v, 4) for k, v in runner.latency_ms(latency_feeds).items()})
            if i != 0:
                ev.integer_kernels = runner.kernel_report()
            ev.extra.update(row.extra)
            ev.extra.update(runner.details())
        results.append(ev)
    return results


def evaluate(reference: ModelLike, candidates: dict[str, ModelLike], batches: Callable[[], Iterable[Batch]],
             latency_feeds: dict[str, np.ndarray] | None = None, threads: Sequence[int] = (1,), latency_repeats: int = 30,
             backend: Backend | None = None) -> list[Evaluation]:
    """Evaluate the FP32 ``reference`` and each candidate on the same data, metrics per output.

    ``backend`` runs the models (default: ONNX Runtime on the CPU, timed at each of ``threads``).
    """
    be = backend or OrtBackend(threads, latency_repeats)
    rows = [Candidate("fp32", lambda: be.runner(reference, "fp32", reference=True))]
    rows += [Candidate(name, lambda m=model, n=name: be.runner(m, n)) for name, model in candidates.items()]
    return compare_runners(rows, batches, latency_feeds)


def layer_errors(reference: onnx.ModelProto, quantized: onnx.ModelProto, tensors: Sequence[str], batches: Callable[[], Iterable[Batch]]) -> dict[str, dict[str, float]]:
    """SQNR and cosine of chosen intermediate tensors (layer outputs) of the quantized model vs FP32.

    Both models keep the original tensor names for layer outputs, so the same names are exposed
    as extra outputs of each.
    """
    from onnxq.graph.edit import with_outputs
    from onnxq.graph.prepare import tensor_types

    def exposed(model: onnx.ModelProto) -> onnx.ModelProto:
        types = tensor_types(model)
        present = {o for n in model.graph.node for o in n.output}
        return with_outputs(model, [(t, types.get(t, onnx.TensorProto.FLOAT)) for t in tensors if t in present])

    ref_sess = ort_backend.make_session(exposed(reference), "disable")
    q_sess = ort_backend.make_session(exposed(quantized), "disable")
    names = [o.name for o in ref_sess.get_outputs()]
    q_names = {o.name for o in q_sess.get_outputs()}
    names = [n for n in names if n in q_names]
    acc: dict[str, list[list[np.ndarray]]] = {n: [[], []] for n in names}
    for b in batches():
        r = ref_sess.run(names, b.feeds)
        q = q_sess.run(names, b.feeds)
        for n, x, y in zip(names, r, q):
            acc[n][0].append(x)
            acc[n][1].append(y)
    out = {}
    for n, (xs, ys) in acc.items():
        x, y = concat_batches(xs), concat_batches(ys)
        out[n] = {"sqnr_db": round(sqnr_db(x, y), 3), "cosine": round(cosine(x, y), 6)}
    return out

