"""The graph side of RPTQ: which activations it clusters, the permutation folded into weights, and
each consuming MatMul split along K into one MatMul per cluster.

**Sites.** An activation ``X`` that the plan quantizes and that feeds MatMuls with constant 2-D
weights read by them alone (``onnxq.graph.plan.sole_matmul_weights``): Q/K/V reading a LayerNorm
output, the attention output projection, FFN up and down projections.

**Permutation fold.** Where ``X`` comes out of a MatMul with a constant weight ``Wp`` (and a bias
Add), possibly through element-wise ops with scalar constants (the exported GELU between the two
FFN MatMuls), the channel permutation ``π`` is pure weight arithmetic: ``Wp[:, π]``, ``b[π]`` in
the producer and ``W[π, :]`` in every consumer; element-wise ops commute with it, so ``X`` comes
out reordered with no runtime op, and every cluster is a contiguous range of channels. A
LayerNorm producer cannot take the permutation in ONNX: it normalises each token over its
channels, so permuting ``γ``/``β`` alone does not reorder its output (RPTQ's own code reorders
inside its LayerNorm kernel with an index select). Those sites, and the attention output (whose
channels pass through the per-head attention), read each cluster with a ``Gather`` instead.

**Split.** ``X·W = Σ_c X[:, S_c]·W[S_c, :]``: each consuming MatMul becomes one MatMul per
cluster ``c`` (rows ``S_c`` of its weight) and a ``Sum``. Every cluster's slice is a separate MatMul
input, so onnxq places a per-tensor Q/DQ pair on it and the calibrator gives it its own scale:
cluster-wise activation scales in standard ONNX that ONNX Runtime runs on its integer MatMul
kernels. Both steps are exact float rewrites (the sum only reassociates float additions).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.graph.edit import Namer, cleanup, replace_nodes, with_initializers
from onnxq.graph.index import GraphIndex
from onnxq.graph.plan import MatMulWeight, QuantPlan, sole_matmul_weights
from onnxq.graph.prepare import infer_shapes

#: element-wise ops that commute with a channel permutation when their constants are scalars
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Gelu", "Neg", "Abs",
                         "Sqrt", "Exp", "Log", "Softplus", "HardSigmoid", "HardSwish", "Identity", "Pow", "Clip", "Max", "Min"})


@dataclass(frozen=True)
class Fold:
    """Where a site's permutation goes on the producer side: the columns of ``weight`` (and ``bias``)."""

    matmul: str  #: the producing MatMul node
    weight: str  #: its [K', C] weight initializer
    bias: str | None  #: the [C] bias initializer of the Add after it, if any


@dataclass
class Site:
    """An activation whose channels RPTQ clusters, and the MatMuls that read it."""

    tensor: str
    channels: int
    matmuls: list[MatMulWeight] = field(default_factory=list)
    #: the producer-side fold of the permutation (None: the clusters are read with Gathers)
    fold: Fold | None = None


def _scalar(idx: GraphIndex, name: str) -> bool:
    v = idx.constant_value(name)
    return v is not None and v.size == 1


def _vector(idx: GraphIndex, name: str, channels: int) -> bool:
    v = idx.constant_value(name)
    return v is not None and name in idx.initializers and v.size == channels and v.shape[-1] == channels


def _fold_of(idx: GraphIndex, x: str, channels: int, readers: set[str], weight_reads: dict[str, int]) -> Fold | None:
    """The producer-side fold for ``x``, or None when its producer cannot absorb a permutation."""
    if x in idx.graph_outputs or {c.name for c, _ in idx.consumers.get(x, [])} - readers:
        return None  # another reader would see the channels reordered
    region: set[str] = set()  # element-wise nodes between the root and x
    roots: set[str] = set()
    stack, seen = [x], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        p = idx.producer.get(t)
        if p is None:
            return None
        if p.op_type == "Add" and any(_vector(idx, i, channels) for i in p.input):
            other = [i for i in p.input if not _vector(idx, i, channels)]
            mm = idx.producer.get(other[0]) if len(other) == 1 else None
            if mm is None or mm.op_type != "MatMul" or idx.sole_consumer(mm.output[0]) is not p:
                return None
            roots.add(p.name)
            continue
        if p.op_type == "MatMul" and p.input[1] in idx.initializers:
            roots.add(p.name)
            continue
        if p.op_type not in ELEMENTWISE or any(i and idx.is_constant(i) and not _scalar(idx, i) for i in p.input):
            return None
        region.add(p.name)
        stack.extend(i for i in p.input if i and not idx.is_constant(i))
    if len(roots) != 1:
        return None
    root = idx.nodes[roots.pop()]
    inside = region | {root.name}
    for name in inside:  # nothing outside the region reads a reordered tensor
        for o in idx.nodes[name].output:
            outside = {c.name for c, _ in idx.consumers.get(o, [])} - region - (readers if o == x else set())
            if o in idx.graph_outputs or outside:
                return None
    if root.op_type == "Add":
        bias = next(i for i in root.input if _vector(idx, i, channels))
        mm = idx.producer[next(i for i in root.input if i != bias)]
    else:
        bias, mm = None, root
    w = idx.constant_value(mm.input[1])
    if w is None or w.ndim != 2 or w.shape[1] != channels or weight_reads[mm.input[1]] != 1 or (bias and weight_reads[bias] != 1):
        return None
    return Fold(mm.name, mm.input[1], bias)


def find_sites(model: onnx.ModelProto, plan: QuantPlan) -> list[Site]:
    """The plan's quantized MatMul inputs RPTQ can cluster, with the fold of each where there is one."""
    idx = GraphIndex(model)
    reads: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        for i in n.input:
            reads[i] += 1
    by_input: dict[str, list[MatMulWeight]] = defaultdict(list)
    for t in sole_matmul_weights(model, plan):
        if t.input in plan.activations:
            by_input[t.input].append(t)
    sites = []
    for x, mms in by_input.items():
        ks = {int(idx.initializers[t.weight].dims[0]) for t in mms}
        if len(ks) != 1:
            continue
        channels = ks.pop()
        site = Site(x, channels, mms)
        site.fold = _fold_of(idx, x, channels, {t.node for t in mms}, reads)
        sites.append(site)
    return sites


def permuted(model: onnx.ModelProto, sites: list[Site], orders: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with each folded site's channels reordered by ``orders[site.tensor]`` (position ``j``
    holds channel ``order[j]``): producer columns and bias, consumer rows. Same function, same names."""
    inits = {t.name: t for t in model.graph.initializer}
    values: dict[str, np.ndarray] = {}

    def current(name: str) -> np.ndarray:
        return values[name] if name in values else numpy_helper.to_array(inits[name])

    for s in sites:
        if s.fold is None or s.tensor not in orders:
            continue
        order = np.asarray(orders[s.tensor])
        values[s.fold.weight] = current(s.fold.weight)[:, order]
        if s.fold.bias:
            b = current(s.fold.bias)
            values[s.fold.bias] = b.reshape(-1)[order].reshape(b.shape)
        for t in s.matmuls:
            values[t.weight] = current(t.weight)[order, :]
    return with_initializers(model, values)


def split(model: onnx.ModelProto, sites: list[Site], members: dict[str, list[np.ndarray]]) -> onnx.ModelProto:
    """``model`` with every MatMul of each site split along K into one MatMul per cluster, summed.

    ``members[site.tensor]`` lists each cluster's channels (in the model's current channel order):
    contiguous ranges covering the channels in order are cut with one ``Split``, anything else
    is read with one ``Gather`` per cluster."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    namer = Namer.of(out)
    nodes = {n.name: n for n in out.graph.node}
    position = {n.name: i for i, n in enumerate(out.graph.node)}
    inits = {t.name: t for t in out.graph.initializer}
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 13)
    replacements: dict[str, list[onnx.NodeProto]] = {}
    for s in sites:
        parts = [np.asarray(m, np.int64) for m in members.get(s.tensor, [])]
        if len(parts) < 2:
            continue
        first = min(s.matmuls, key=lambda t: position[t.node])
        base = s.tensor.strip("/").replace("/", "_")
        pieces = [namer.fresh(f"{base}_rptq{c}") for c in range(len(parts))]
        readers: list[onnx.NodeProto] = []
        contiguous = np.array_equal(np.concatenate(parts), np.arange(s.channels)) and all(
            np.array_equal(p, np.arange(p[0], p[0] + len(p))) for p in parts)
        if contiguous:
            sizes = np.array([len(p) for p in parts], np.int64)
            if opset >= 13:
                sz = namer.fresh(f"{base}_rptq_sizes")
                out.graph.initializer.append(numpy_helper.from_array(sizes, sz))
                readers.append(helper.make_node("Split", [s.tensor, sz], pieces, name=namer.fresh(f"{base}_rptq_split"), axis=-1))
            else:
                readers.append(helper.make_node("Split", [s.tensor], pieces, name=namer.fresh(f"{base}_rptq_split"), axis=-1,
                                                split=sizes.tolist()))
        else:
            for c, idx in enumerate(parts):
                ix = namer.fresh(f"{base}_rptq{c}_channels")
                out.graph.initializer.append(numpy_helper.from_array(idx, ix))
                readers.append(helper.make_node("Gather", [s.tensor, ix], [pieces[c]], name=namer.fresh(f"{base}_rptq{c}_gather"), axis=-1))
        for t in s.matmuls:
            w = numpy_helper.to_array(inits[t.weight])
            mm = nodes[t.node]
            partial, new = [], []
            for c, idx in enumerate(parts):
                wn = namer.fresh(f"{t.weight}_rptq{c}")
                out.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[idx]), wn))
                y = namer.fresh(f"{mm.output[0]}_rptq{c}")
                new.append(helper.make_node("MatMul", [pieces[c], wn], [y], name=namer.fresh(f"{t.node}_rptq{c}")))
                partial.append(y)
            new.append(helper.make_node("Sum", partial, list(mm.output), name=namer.fresh(f"{t.node}_rptq_sum")))
            replacements[t.node] = (readers if t is first else []) + new
    replace_nodes(out.graph, replacements)
    out = cleanup(out, sort=False)  # the unsplit weights nobody reads any more
    return infer_shapes(out)[0]
