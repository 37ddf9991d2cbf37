"""One comparator over runners: FP32 reference and candidates on the same data, metrics and latency.

``onnxq compare`` (any backend), ``onnxq optimize --eval-data`` and the TensorRT evaluation
(:mod:`onnxq.evaluate.tensorrt`) all come through :func:`compare_runners`. A row is a
:class:`Candidate`: a name and a factory that makes its :class:`~onnxq.runtime.runner.Runner`
when the row's turn comes, so that at most one model (one session, one engine) is loaded at a time.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxq.backends.ort import OrtBackend
from onnxq.calib.feeds import batch_axes
from onnxq.calib.readers import Batch, has_sample_axis, sample_count, samples_disagree
from onnxq.errors import OnnxqError
from onnxq.evaluate.metrics import OutputAccumulator, common_part, row_cosines, sqnr_of_sums
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
    then becomes a note ``"<name>: <skip_note>: <error>"`` instead of failing the comparison, and so
    does an optional row whose runs fail (a baseline quantizer's model that loads and does not run).
    ``extra`` is merged into the row's :attr:`Evaluation.extra` (``make`` may still add to it).
    """

    name: str
    make: Callable[[], Runner]
    extra: dict[str, Any] = field(default_factory=dict)
    optional: bool = False
    skip_note: str = "not loaded"


def one_sample(feeds: Mapping[str, np.ndarray], axes: Mapping[str, int | None] | None = None) -> dict[str, np.ndarray]:
    """The first sample of a batch (latency feeds): each input cut to one along its batch axis, the others as they are
    (all of them when the inputs' batch axes disagree in length: :func:`~onnxq.calib.readers.samples_disagree`)."""
    if samples_disagree(feeds, axes):
        return dict(feeds)
    out = {}
    for name, value in feeds.items():
        axis = axes.get(name, 0) if axes is not None else 0
        value = np.asarray(value)
        out[name] = np.take(value, [0], axis=axis) if axis is not None and value.ndim > axis and value.shape[axis] > 1 else value
    return out


#: evaluation runs at most this many input bytes per inference: a batch of large inputs (16 pages of
#: 640x480) is run a few samples at a time, so a session's working set stays that of a few samples
MAX_INFER_INPUT_BYTES = 8 << 20


def split_batch(batch: Batch, axes: Mapping[str, int | None] | None = None, max_bytes: int | None = None) -> list[Batch]:
    """``batch`` cut along its inputs' batch axes into pieces of at most ``max_bytes`` of input (at least one sample each).

    ``max_bytes`` defaults to :data:`MAX_INFER_INPUT_BYTES`. Inputs without a batch axis go whole
    into every piece. Per-sample metrics do not depend on the cut.
    """
    max_bytes = MAX_INFER_INPUT_BYTES if max_bytes is None else max_bytes
    n = sample_count(batch.feeds, axes)
    size = sum(np.asarray(v).nbytes for v in batch.feeds.values())
    if n <= 1 or size <= max_bytes:  # inputs of different lengths on their batch axes count as one sample (samples_disagree)
        return [batch]
    cut = {k: (axes.get(k, 0) if axes is not None else 0) for k in batch.feeds}
    cut = {k: a for k, a in cut.items() if has_sample_axis(batch.feeds[k], n, a)}
    if not cut:
        return [batch]
    per = max(1, int(max_bytes // max(1, sum(np.asarray(batch.feeds[k]).nbytes for k in cut) // n)))
    pieces = []
    for start in range(0, n, per):
        idx = slice(start, min(n, start + per))
        feeds = {k: (np.asarray(v)[(slice(None),) * cut[k] + (idx,)] if k in cut else v) for k, v in batch.feeds.items()}
        labels = batch.labels[idx] if batch.labels is not None and len(batch.labels) == n else batch.labels
        pieces.append(Batch(feeds, labels, batch.source))
    return pieces


def _pieces(batches: Iterable[Batch], axes: Mapping[str, int | None] | None) -> Iterable[Batch]:
    for b in batches:
        yield from split_batch(b, axes)


def _output_axis(name: str, value: np.ndarray, n: int, axes: Mapping[str, int | None] | None, other: np.ndarray | None = None) -> int | None:
    """The sample axis of one output of a batch of ``n`` samples (None: compare the whole output as one sample).

    ``other``: the compared model's output; where its length along the candidate axis differs from ``value``'s, that
    axis is a length the data decides, not the samples (a batch-1 detector's NMS list [K, 4]: with K = 1 in FP32 and 2
    quantized, the axis read as one sample failed the whole evaluation, "output shapes differ")."""
    found = _sample_axis(name, value, n, axes)
    if found is not None and other is not None and np.ndim(other) == np.ndim(value) and np.shape(other)[found] != np.shape(value)[found]:
        return None
    return found


def _sample_axis(name: str, value: np.ndarray, n: int, axes: Mapping[str, int | None] | None) -> int | None:
    """:func:`_output_axis` from ``value`` alone."""
    axis = axes.get(name, 0) if axes is not None else 0
    if axis is not None and np.ndim(value) > axis and np.shape(value)[axis] == n:
        return axis
    if axis is None and n == 1 and np.ndim(value) >= 1 and np.shape(value)[0] == 1:
        # a model of fixed batch 1 (each batch one sample): its leading 1 is that sample, so [1, C] logits get a top-1 and
        # an accuracy and a [1, 1] probability its explained variance across samples (a streaming VAD's speech
        # probability read cosine 1.0 at 2 dB SQNR: a single value's cosine is its sign)
        return 0
    if axis is None and n == 1 and np.ndim(value) == 3 and np.shape(value)[1] == 1:
        # time-major sequence logits [T, 1, C] (a recurrent CTC reader of fixed batch one, ddddocr's): the 1 is the sample
        # and the positions run along axis 0; compared as one flat sample, 21 % of its captchas changed unseen
        return 1
    if axis is None and n > 1 and np.ndim(value) >= 1 and np.shape(value)[0] == n:
        # declared [1, C] in a model whose input batch was made dynamic by editing the input alone: the runtime gives a row
        # per sample, and comparing the batch as one sample lost the top-1, the accuracy and --max-drop
        return 0
    return None


class _ReferenceStore:
    """The reference's outputs of every batch, kept for the rows after it: in memory up to ``budget`` bytes, then on disk.

    The rows run one after the other (one session or engine loaded at a time), so the reference's
    outputs must wait for them; past the budget they are written to a temporary folder, one file per
    batch, so an evaluation's memory stays one batch's outputs however long the data is.
    """

    def __init__(self, budget: int = 64 << 20) -> None:
        self.budget = budget
        self.held = 0
        self.items: list[dict[str, np.ndarray] | str] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def add(self, outputs: dict[str, np.ndarray]) -> None:
        size = sum(v.nbytes for v in outputs.values())
        if self.held + size <= self.budget:
            self.items.append(outputs)
            self.held += size
            return
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="onnxq-eval-")
        path = os.path.join(self._tmp.name, f"{len(self.items)}.npz")
        np.savez(path, **{f"o{i}": v for i, v in enumerate(outputs.values())})
        self.items.append(path + "\0" + "\0".join(outputs))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        item = self.items[i]
        if isinstance(item, dict):
            return item
        path, *names = item.split("\0")
        with np.load(path) as z:
            return {n: z[f"o{k}"] for k, n in enumerate(names)}

    def __len__(self) -> int:
        return len(self.items)

    def close(self) -> None:
        self.items = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def compare_runners(rows: Sequence[Candidate], batches: Callable[[], Iterable[Batch]], latency_feeds: dict[str, np.ndarray] | None = None,
                    notes: list[str] | None = None, axes: Mapping[str, int | None] | None = None,
                    parts: Mapping[str, tuple[int, tuple[int, ...]]] | None = None,
                    roles: Mapping[str, str] | None = None) -> list[Evaluation]:
    """Run every row on ``batches()``; the first row is the FP32 reference the others are measured against.

    Per output: the metrics of :class:`onnxq.evaluate.metrics.OutputAccumulator` (per-sample mean,
    worst and 1st-percentile cosine, SQNR, top-1 agreement for class scores, accuracy when every
    batch has labels), accumulated batch by batch with each batch's own shapes: batches of
    different sequence lengths are never concatenated. ``axes`` gives the sample axis of inputs
    and outputs by name (:func:`batch_axes`; default: axis 0 where its size is the batch's); ``parts``
    the outputs a Concat makes, each part also compared on its own (:func:`model_parts`); ``roles`` what the graph
    says an output is (:func:`~onnxq.graph.index.output_roles`: an ArgMax map, a TopK's values or indices, an embedding,
    rows the data picks).
    With ``latency_feeds`` each runner also times one inference. The reference row gets no kernel
    report. Notes of skipped optional rows are appended to ``notes``.
    """
    results: list[Evaluation] = []
    ref = _ReferenceStore()
    labels: list[np.ndarray | None] = []
    counts: list[int] = []
    try:
        for i, row in enumerate(rows):
            try:
                runner = row.make()
                ev = _run_row(i, row, runner, batches, axes, parts, roles, ref, labels, counts, latency_feeds)
            except OnnxqError as exc:
                if not row.optional or i == 0:
                    raise
                if notes is not None:
                    notes.append(f"{row.name}: {row.skip_note}: {exc}")
                continue
            results.append(ev)
    finally:
        ref.close()
    return results


def _run_row(i: int, row: Candidate, runner: Runner, batches: Callable[[], Iterable[Batch]], axes: Mapping[str, int | None] | None,
             parts: Mapping[str, tuple[int, tuple[int, ...]]] | None, roles: Mapping[str, str] | None, ref: _ReferenceStore,
             labels: list[np.ndarray | None], counts: list[int], latency_feeds: dict[str, np.ndarray] | None) -> Evaluation:
    """Row ``i``'s :class:`Evaluation` (row 0, the reference, records its outputs in ``ref``, ``labels`` and ``counts``)."""
    with runner:
        acc: dict[str, OutputAccumulator] = {}
        for k, b in enumerate(_pieces(batches(), axes)):
            res = runner.infer(b.feeds)
            if i == 0:
                ref.add(res)
                labels.append(b.labels)
                counts.append(sample_count(b.feeds, axes))
            if k >= len(ref):
                raise OnnxqError("the evaluation data changed between passes (more batches than the reference saw)")
            expected = ref[k] if i else res
            for name, value in res.items():
                if name not in expected:
                    continue
                axis = _output_axis(name, expected[name], counts[k], axes, value)
                acc.setdefault(name, OutputAccumulator((roles or {}).get(name))).update(expected[name], value, axis, labels[k],
                                                                                         (parts or {}).get(name))
        with_accuracy = bool(labels) and all(lab is not None for lab in labels)
        per_output = {n: a.result(with_accuracy) for n, a in acc.items()}
        ev = Evaluation(row.name, runner.size_bytes, per_output)
        if latency_feeds is not None:
            ev.latency_ms.update({k: round(v, 4) for k, v in runner.latency_ms(latency_feeds).items()})
        if i != 0:
            ev.integer_kernels = runner.kernel_report()
        ev.extra.update(row.extra)
        ev.extra.update(runner.details())
    return ev


def model_axes(model: ModelLike) -> dict[str, int | None]:
    """:func:`batch_axes` of a model given in memory or as a path (its weights are not read)."""
    return batch_axes(_graph_of(model))


def _graph_of(model: ModelLike) -> onnx.ModelProto:
    """A model given in memory, or its graph loaded from a path without its weights."""
    return model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model), load_external_data=False)


def model_parts(model: ModelLike) -> dict[str, tuple[int, tuple[int, ...]]]:
    """:func:`~onnxq.graph.index.concatenated_outputs` of a model given in memory or as a path (weights not read)."""
    from onnxq.graph.index import concatenated_outputs

    return concatenated_outputs(_graph_of(model))


def model_roles(model: ModelLike) -> dict[str, str]:
    """:func:`~onnxq.graph.index.output_roles` of a model given in memory or as a path (weights not read)."""
    from onnxq.graph.index import output_roles

    return output_roles(_graph_of(model))


def evaluate(reference: ModelLike, candidates: dict[str, ModelLike], batches: Callable[[], Iterable[Batch]],
             latency_feeds: dict[str, np.ndarray] | None = None, threads: Sequence[int] = (1,), latency_repeats: int = 30,
             backend: Backend | None = None, optional: Mapping[str, str] | None = None, notes: list[str] | None = None) -> list[Evaluation]:
    """Evaluate the FP32 ``reference`` and each candidate on the same data, metrics per output.

    ``backend`` runs the models (default: ONNX Runtime on the CPU, timed at each of ``threads``).
    Sample axes come from the reference's declared shapes (:func:`batch_axes`). ``optional`` names candidates (a
    baseline tool's model) whose failure to load or run is a note in ``notes``, ``{name: what the note says}``, not a
    failed evaluation.
    """
    be = backend or OrtBackend(threads, latency_repeats)
    optional = optional or {}
    rows = [Candidate("fp32", lambda: be.runner(reference, "fp32", reference=True))]
    rows += [Candidate(name, lambda m=model, n=name: be.runner(m, n), optional=name in optional, skip_note=optional.get(name, "not loaded"))
             for name, model in candidates.items()]
    graph = _graph_of(reference)
    return compare_runners(rows, batches, latency_feeds, notes, axes=batch_axes(graph), parts=model_parts(graph), roles=model_roles(graph))


#: op types whose outputs :func:`layer_errors` callers usually inspect (a layer's output)
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


#: both models' exposed layer outputs of one run of :func:`layer_errors` stay below about this many bytes: a 9-s audio
#: clip's conv outputs are [64, 901, 161] floats a sample, and a batch of 16 of them for every layer took the
#: diagnosis after a warning to 15 GB (it measures one sample first, then runs as many as fit)
LAYER_ERROR_BYTES = 256 << 20


def layer_errors(reference: onnx.ModelProto, quantized: onnx.ModelProto, tensors: Sequence[str], batches: Callable[[], Iterable[Batch]],
                 max_batches: int | None = None) -> dict[str, dict[str, float]]:
    """SQNR and cosine of chosen intermediate tensors (layer outputs) of the quantized model vs FP32.

    Both models keep the original tensor names for layer outputs, so the same names are exposed
    as extra outputs of each; tensors missing from either model are left out. Metrics accumulate
    batch by batch (per-sample cosine); ``max_batches`` stops early. Each run takes as many samples as keep the exposed
    outputs within :data:`LAYER_ERROR_BYTES` (one, until the first has been measured).
    """
    from onnxq.graph.edit import with_outputs
    from onnxq.graph.prepare import tensor_types

    def exposed(model: onnx.ModelProto) -> onnx.ModelProto:
        types = tensor_types(model)
        present = {o for n in model.graph.node for o in n.output}
        return with_outputs(model, [(t, types.get(t, onnx.TensorProto.FLOAT)) for t in tensors if t in present])

    axes = batch_axes(reference)
    ref_sess = ort_backend.make_session(exposed(reference), "disable", arena=False)
    q_sess = ort_backend.make_session(exposed(quantized), "disable", arena=False)
    names = [o.name for o in ref_sess.get_outputs()]
    q_names = {o.name for o in q_sess.get_outputs()}
    names = [n for n in names if n in q_names and n in set(tensors)]
    acc = {n: _LayerError() for n in names}
    if not names:
        return {}
    per_run: int | None = None  # input bytes a run may take, once one sample's outputs are measured
    for k, batch in enumerate(batches()):
        if max_batches is not None and k >= max_batches:
            break
        for b in split_batch(batch, axes, max_bytes=1 if per_run is None else per_run):
            out_bytes = _layer_update(acc, names, ref_sess, q_sess, b, axes)
            if per_run is None:
                samples = max(1, sample_count(b.feeds, axes))
                in_bytes = max(1, sum(np.asarray(v).nbytes for v in b.feeds.values()) // samples)
                per_run = in_bytes * max(1, int(LAYER_ERROR_BYTES // max(1, out_bytes // samples)))
    return {n: a.result() for n, a in acc.items()}


class _LayerError:
    """SQNR and mean per-sample cosine of one layer output, accumulated sample by sample (in float64, one sample at a
    time: an output's copy never grows with the batch)."""

    def __init__(self) -> None:
        self.signal = self.noise = 0.0
        self.cosines: list[float] = []

    def update(self, ref: np.ndarray, got: np.ndarray, axis: int | None) -> None:
        if ref.shape != got.shape and ref.ndim == got.ndim:
            ref, got = common_part(ref, got)  # a length the data decides (a decoder's steps): what both computed
        rows = np.moveaxis(ref, axis, 0) if axis is not None and ref.ndim else ref[None]  # views, one sample each
        others = np.moveaxis(got, axis, 0) if axis is not None and got.ndim else got[None]
        for r, g in zip(rows, others):
            r, g = np.asarray(r, np.float64).ravel(), np.asarray(g, np.float64).ravel()
            d = r - g
            self.signal += float(r @ r)
            self.noise += float(d @ d)
            self.cosines.append(float(row_cosines(r[None], g[None])[0]))

    def result(self) -> dict[str, float]:
        return {"sqnr_db": round(sqnr_of_sums(self.signal, self.noise), 3),
                "cosine": round(float(np.mean(self.cosines)) if self.cosines else 1.0, 6)}


def _layer_update(acc: dict[str, _LayerError], names: list[str], ref_sess: Any, q_sess: Any, b: Batch,
                  axes: Mapping[str, int | None]) -> int:
    """Both models on ``b``, each layer's error added; returns the bytes of both models' layer outputs."""
    n_samples = sample_count(b.feeds, axes)
    r = ort_backend.run(ref_sess, dict(b.feeds), names)
    q = ort_backend.run(q_sess, dict(b.feeds), names)
    out_bytes = 0
    for n, x, y in zip(names, r, q):
        x, y = np.asarray(x), np.asarray(y)
        out_bytes += x.nbytes + y.nbytes
        acc[n].update(x, y, 0 if x.ndim and x.shape[0] == n_samples else None)
    return out_bytes
