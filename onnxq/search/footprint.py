"""How much memory a layer-by-layer search holds per calibration sample, and how many samples fit.

Searches that run the calibration samples through the graph node by node
(:class:`~onnxq.search.evaluator.GraphRunner`: detptq, bias-correction, gptq) hold, between two
nodes, every tensor a later node still reads (the *frontier*) for every sample they evaluate, and
ONNX Runtime needs a working set per run that grows with the samples in that run. Both grow
linearly with the samples, so a search that takes "the first 64 samples" of 640x640 pages as one
batch needs gigabytes. :func:`footprint` measures the per-sample bytes from the graph's shapes
(ONNX shape inference at batch 1, no run), and :func:`fit_samples` turns a byte budget into the
number of samples a search keeps and the samples per ONNX Runtime run; :func:`rechunk` splits the
kept samples into such runs. The searches report what they kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.calib.feeds import batch_is_dynamic, model_inputs
from onnxq.calib.readers import has_sample_axis, sample_count, sample_rows
from onnxq.graph.prepare import infer_shapes, tensor_shapes, tensor_types

#: bytes of one element per ONNX element type (4 where unknown)
_ITEM = {onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8, onnx.TensorProto.FLOAT16: 2,
         onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT8: 1,
         onnx.TensorProto.UINT8: 1, onnx.TensorProto.BOOL: 1}


@dataclass(frozen=True)
class Footprint:
    """Bytes per calibration sample: ``held`` is the most a node-by-node pass keeps between two
    nodes (the frontier, graph outputs included), ``largest`` the largest single tensor,
    ``total`` every intermediate tensor together (what keeping all activations would cost)."""

    held: int
    largest: int
    total: int

    @property
    def run_bytes(self) -> int:
        """An estimate of one sample's share of an ONNX Runtime run's working set: the frontier plus
        a few of the largest tensors (a run holds its inputs, outputs and the tensors in flight)."""
        return self.held + 4 * self.largest


def _per_sample_model(model: onnx.ModelProto, sample: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs have ``sample``'s shapes at batch 1 (constants kept: shape
    inference reads Reshape targets and Resize scales from them)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for vi in m.graph.input:
        v = sample.get(vi.name)
        if v is None or not vi.type.HasField("tensor_type"):
            continue
        shape = [1] + list(np.shape(v))[1:]
        dims = vi.type.tensor_type.shape.dim
        del dims[:]
        for d in shape:
            dims.add().dim_value = int(d)
    return m


def footprint(model: onnx.ModelProto, sample: Mapping[str, np.ndarray]) -> Footprint:
    """The per-sample :class:`Footprint` of ``model`` for inputs shaped like ``sample`` (any batch).

    Shapes come from ONNX shape inference with the inputs fixed at batch 1; a tensor whose shape
    stays unknown counts as large as the largest known one (an overestimate, never an under-).
    Liveness follows the graph's node order, as :class:`~onnxq.search.evaluator.GraphRunner` runs it.
    """
    m, _ = infer_shapes(_per_sample_model(model, sample))
    shapes = tensor_shapes(m)
    types = tensor_types(m)
    consts = {t.name for t in m.graph.initializer} | {n.output[0] for n in m.graph.node if n.op_type == "Constant"}

    def nbytes(name: str) -> int | None:
        s = shapes.get(name)
        if s is None or any(not isinstance(d, int) for d in s):
            return None
        return int(np.prod(s, dtype=np.int64)) * _ITEM.get(types.get(name, 0), 4)

    nodes = list(m.graph.node)
    inputs = [vi.name for vi in m.graph.input if vi.name not in consts]
    produced = [o for n in nodes for o in n.output if o and o not in consts]
    known = [b for b in (nbytes(t) for t in inputs + produced) if b is not None]
    fallback = max(known, default=4)
    size = {t: (nbytes(t) if nbytes(t) is not None else fallback) for t in inputs + produced}
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t in size:
                last_use[t] = i
    outputs = {o.name for o in m.graph.output}
    for t in outputs:
        last_use[t] = len(nodes)  # a runner keeps the graph outputs
    # +size at the producing node, -size after the last reader
    delta = np.zeros(len(nodes) + 2, np.int64)
    for t in inputs:
        delta[0] += size[t]
        delta[last_use.get(t, 0) + 1] -= size[t]
    for i, n in enumerate(nodes):
        for o in n.output:
            if o in size:
                delta[i] += size[o]
                delta[max(last_use.get(o, i), i) + 1] -= size[o]
    live = np.cumsum(delta)[: len(nodes) + 1]
    return Footprint(held=int(live.max(initial=0)), largest=int(max(size.values(), default=0)), total=int(sum(size.values())))


@dataclass(frozen=True)
class SampleFit:
    """How many samples a search keeps (``samples``, of ``requested``) and how many go through one
    ONNX Runtime run (``chunk``), for a byte budget."""

    requested: int
    samples: int
    chunk: int
    footprint: Footprint
    budget: int

    @property
    def capped(self) -> bool:
        return self.samples < self.requested

    def describe(self) -> str:
        mb = 2**20
        s = f"{self.samples} of {self.requested} samples" if self.capped else f"{self.samples} samples"
        return (f"{s} in runs of at most {self.chunk} (holding {self.footprint.held / mb:.3g} MB per sample, largest tensor "
                f"{self.footprint.largest / mb:.3g} MB; budget {self.budget / mb:.3g} MB)")


def fit_samples(fp: Footprint, requested: int, budget_bytes: int, held_share: float = 0.5, runners: int = 1) -> SampleFit:
    """The samples a search keeps and its run size within ``budget_bytes``.

    ``held_share`` of the budget goes to what the search holds for every kept sample (its frontier,
    ``fp.held`` each, once per runner: bias correction runs a float and a quantized pass side by
    side); the rest to one ONNX Runtime run (``fp.run_bytes`` per sample in it). At least one
    sample is always kept and run.
    """
    keep = max(1, min(requested, int(budget_bytes * held_share // max(fp.held * runners, 1))))
    chunk = max(1, min(keep, int(budget_bytes * (1 - held_share) // max(fp.run_bytes, 1))))
    return SampleFit(requested, keep, chunk, fp, budget_bytes)


def rechunk(chunks: Sequence[Mapping[str, np.ndarray]], size: int, limit: int | None = None, join: bool = False) -> list[dict[str, np.ndarray]]:
    """The first ``limit`` samples of ``chunks`` (feed dicts sharing their batch axis 0) in runs of at
    most ``size`` samples. Runs are cut from the given chunks (views, no copies); with ``join``
    (a model whose batch axis is dynamic) the kept samples are first joined into one array per
    input where their shapes allow (sequences padded per batch to different lengths stay apart)."""
    out: list[dict[str, np.ndarray]] = []
    # an input without the sample axis (a scalar flag, read with every sample of its own batch) keeps its batches apart
    if join and len(chunks) > 1 and all(has_sample_axis(v, sample_count(c)) for c in chunks for v in c.values()):
        kept = rechunk(chunks, max(sample_count(c) for c in chunks), limit)
        try:
            chunks = [{k: np.concatenate([c[k] for c in kept]) for k in kept[0]}]
            limit = None
        except ValueError:
            chunks = kept
    left = limit if limit is not None else sum(sample_count(c) for c in chunks)
    for c in chunks:
        n = sample_count(c)
        for start in range(0, n, size):
            if left <= 0:
                return out
            take = min(size, n - start, left)
            out.append(sample_rows(c, start, start + take))
            left -= take
    return out


def fitted_chunks(model: onnx.ModelProto, chunks: Sequence[Mapping[str, np.ndarray]], budget_bytes: int,
                  held_share: float = 0.5, runners: int = 1) -> tuple[list[dict[str, np.ndarray]], SampleFit]:
    """``chunks`` (a search's calibration samples, e.g. from
    :func:`~onnxq.search.samples.sample_batches`) cut to what fits ``budget_bytes``
    (:func:`fit_samples`): the first samples that fit, in runs of the fitted size."""
    if not chunks:
        return [], SampleFit(0, 0, 1, Footprint(0, 0, 0), budget_bytes)
    n = sum(sample_count(c) for c in chunks)
    fit = fit_samples(footprint(model, chunks[0]), n, budget_bytes, held_share, runners)
    return rechunk(chunks, fit.chunk, fit.samples, join=batch_is_dynamic(model_inputs(model))), fit
