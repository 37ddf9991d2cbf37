"""Side-by-side evaluation of FP32 and quantized models on the same evaluation data."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.runtime import ort as ort_backend
from onnxq.evaluate.metrics import cosine, output_metrics, sqnr_db
from onnxq.calib.readers import Batch
from onnxq.graph import model_io


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


def _collect(model: onnx.ModelProto | str | os.PathLike[str], batches: Iterable[Batch]) -> tuple[list[str], list[list[np.ndarray]], list[np.ndarray | None]]:
    sess = ort_backend.make_session(model, "all")
    names = [o.name for o in sess.get_outputs()]
    outs: list[list[np.ndarray]] = [[] for _ in names]
    labels: list[np.ndarray | None] = []
    for b in batches:
        res = ort_backend.run(sess, b.feeds)
        for i, r in enumerate(res):
            outs[i].append(np.asarray(r))
        labels.append(b.labels)
    return names, outs, labels


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    try:
        return np.concatenate(parts)
    except ValueError:  # variable shapes: compare flattened
        return np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1) if parts else np.empty(0)


def evaluate(reference: onnx.ModelProto | str | os.PathLike[str], candidates: dict[str, onnx.ModelProto | str | os.PathLike[str]],
             batches: Callable[[], Iterable[Batch]], latency_feeds: dict[str, np.ndarray] | None = None,
             threads: Sequence[int] = (1,), latency_repeats: int = 30) -> list[Evaluation]:
    """Evaluate the FP32 ``reference`` and each candidate on the same data, metrics per output."""
    ref_names, ref_outs, labels = _collect(reference, batches())
    have_labels = all(lab is not None for lab in labels) and labels
    lab = np.concatenate(labels) if have_labels else None  # type: ignore[arg-type]
    ref_full = {n: _cat(o) for n, o in zip(ref_names, ref_outs)}
    results = []
    for name, model in [("fp32", reference)] + list(candidates.items()):
        names, outs, _ = _collect(model, batches()) if name != "fp32" else (ref_names, ref_outs, labels)
        per_output = {}
        for n, o in zip(names, outs):
            if n in ref_full:
                per_output[n] = output_metrics(ref_full[n], _cat(o), lab)
        size = model_io.model_size_bytes(model) if isinstance(model, (str, os.PathLike)) else model.ByteSize()
        ev = Evaluation(name, size, per_output)
        if latency_feeds is not None:
            for t in threads:
                ev.latency_ms[f"{t}t"] = round(ort_backend.latency_ms(model, latency_feeds, threads=t, repeats=latency_repeats), 4)
        if name != "fp32":
            ev.integer_kernels = ort_backend.integer_kernel_report(model)
        results.append(ev)
    return results


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
        x, y = _cat(xs), _cat(ys)
        out[n] = {"sqnr_db": round(sqnr_db(x, y), 3), "cosine": round(cosine(x, y), 6)}
    return out


def compare(reference: str | os.PathLike[str], candidates: dict[str, str | os.PathLike[str]], data: str, **kwargs: Any) -> list[Evaluation]:
    """Python entry point mirroring ``onnxq compare``: evaluate models on a data spec."""
    from onnxq.calib.feeds import model_inputs
    from onnxq.host import get_host
    from onnxq.pipeline import batch_source, make_reader

    ref = model_io.load_model(reference)
    inputs = model_inputs(ref)
    reader = make_reader(data, inputs, get_host(), kwargs.pop("data_options", None))
    source = batch_source(reader, inputs, kwargs.pop("batch_size", 64), kwargs.pop("max_samples", None))
    first = next(iter(source()), None)
    if first is None:
        from onnxq.errors import DataError

        raise DataError(f"the evaluation data '{data}' is empty")
    latency_feeds = {k: v[:1] for k, v in first.feeds.items()}
    return evaluate(Path(reference), dict(candidates), source, latency_feeds=latency_feeds, **kwargs)
