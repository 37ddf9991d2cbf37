"""The one graph-editing layer: onnx-graphsurgeon underneath, ONNX protos at the edges.

Every rewrite in onnxq that removes what nobody reads, sorts nodes, invents names or maps element
types goes through this module:

* :func:`import_graph` / :func:`export_model` move a model in and out of an onnx-graphsurgeon
  :class:`gs.Graph`; the export puts back what graphsurgeon does not carry (model-level fields,
  top-level initializers read only by If/Loop/Scan bodies, node and graph annotations, the input
  listing IR < 4 requires).
* :func:`cleanup` removes nodes and initializers nobody reads and sorts the nodes (graphsurgeon's
  ``cleanup()`` and ``toposort()``); reads by nodes, by subgraph bodies (outer-scope names) and by
  graph outputs count. An initializer that is also listed in ``graph.input`` (what
  ``torch.onnx.export(..., keep_initializers_as_inputs=True)`` writes) is a constant here, as
  everywhere in onnxq: graphsurgeon treats it so, and the export lists it as an input no more, so
  ONNX Runtime never asks for it to be fed.
* :class:`Namer` is the one unique-name generator and :func:`name_nodes` the one node namer.
* :func:`onnx_dtype`, :func:`numpy_dtype` and :data:`QDTYPE` are the one element-type map (ONNX's
  own helpers, no table).
* Local, order-keeping edits for rewrites that must not re-sort: :func:`insert_after_producers`,
  :func:`replace_nodes`, :func:`with_outputs` (probe models), :func:`with_initializers`.

Rewrites themselves may edit protos (most of onnxq's are small, local and keep node order); they end
with :func:`cleanup`, which is where graphsurgeon does the graph-wide work. Where graphsurgeon
cannot serve, the exception stays in this module (see docs/architecture.md, "The graph layer").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.logger import G_LOGGER

from onnxq.graph.prepare import restore_non_tensor_types

# graphsurgeon prints its warnings on stdout ("[W] Could not convert: UNDEFINED ..." for a scikit-learn ZipMap, and
# that its optional colour module is missing), which broke `onnxq optimize --json`'s document; onnxq says what matters
G_LOGGER.severity = G_LOGGER.ERROR

__all__ = [
    "QDTYPE",
    "Namer",
    "cleanup",
    "export_model",
    "import_graph",
    "insert_after_producers",
    "name_nodes",
    "numpy_dtype",
    "onnx_dtype",
    "outer_scope_reads",
    "replace_nodes",
    "subgraphs",
    "toposort",
    "with_initializers",
    "with_outputs",
]

#: ONNX element type of each integer grid onnxq writes (QParams.dtype -> TensorProto type).
QDTYPE: dict[str, int] = {
    "int8": onnx.TensorProto.INT8,
    "uint8": onnx.TensorProto.UINT8,
    "int4": onnx.TensorProto.INT4,
    "uint4": onnx.TensorProto.UINT4,
}


def onnx_dtype(dtype: np.dtype | type | str) -> int:
    """The ONNX element type (``TensorProto.FLOAT``...) of a numpy dtype."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def numpy_dtype(elem_type: int) -> np.dtype:
    """The numpy dtype of an ONNX element type (int4/uint4 map to ml_dtypes' types)."""
    return helper.tensor_dtype_to_np_dtype(elem_type)


# --------------------------------------------------------------------------------------- names


def _graph_names(g: onnx.GraphProto, into: set[str]) -> None:
    into.update(i.name for i in g.input)
    into.update(o.name for o in g.output)
    into.update(t.name for t in g.initializer)
    into.update(v.name for v in g.value_info)
    for n in g.node:
        if n.name:
            into.add(n.name)
        into.update(o for o in n.output if o)
        into.update(i for i in n.input if i)
        for sg in _node_subgraphs(n):
            _graph_names(sg, into)


class Namer:
    """Unique names: :meth:`fresh` returns ``name``, or ``name_1``, ``name_2``... when taken.

    One namespace holds tensor and node names together (ONNX keeps them apart, but one namespace
    can never collide and keeps generated names readable). Every name returned is recorded.
    """

    def __init__(self, used: Iterable[str] = ()) -> None:
        self.used: set[str] = set(used)

    @classmethod
    def of(cls, model: onnx.ModelProto | onnx.GraphProto) -> Namer:
        """A namer seeded with every name in ``model``: tensors, nodes, value_info, subgraph bodies."""
        names: set[str] = set()
        _graph_names(model.graph if isinstance(model, onnx.ModelProto) else model, names)
        return cls(names)

    def fresh(self, name: str) -> str:
        """``name`` if unused, else the first free ``name_<k>`` (k = 1, 2...); it is reserved."""
        candidate, k = name, 1
        while candidate in self.used:
            candidate = f"{name}_{k}"
            k += 1
        self.used.add(candidate)
        return candidate

    __call__ = fresh

    def __contains__(self, name: str) -> bool:
        return name in self.used


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every top-level node a unique, non-empty name (placement and reports refer to nodes by name)."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        name = n.name or f"{n.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        n.name = name
        seen.add(name)


# ------------------------------------------------------------------------------------ subgraphs


def _node_subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The body graphs of an If/Loop/Scan (or any node with graph attributes); empty for others."""
    return _node_subgraphs(node)


def outer_scope_reads(node_or_graph: onnx.NodeProto | onnx.GraphProto) -> set[str]:
    """Names the subgraph bodies of a node (or a body graph itself) read from enclosing scopes.

    A name a body defines itself (its inputs, initializers, node outputs) is not an outer read;
    nested bodies are followed.
    """
    if isinstance(node_or_graph, onnx.NodeProto):
        reads: set[str] = set()
        for sg in _node_subgraphs(node_or_graph):
            reads |= outer_scope_reads(sg)
        return reads
    g = node_or_graph
    local = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    reads = {i for n in g.node for i in n.input if i} | {o.name for o in g.output}
    for n in g.node:
        reads |= outer_scope_reads(n)
    return reads - local


# --------------------------------------------------------------------------- import and export


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """The model's main graph as an onnx-graphsurgeon graph (initializer values stay lazy).

    Initializers listed in ``graph.input`` become constants, not inputs.
    """
    return gs.import_onnx(model)


_MODEL_SCALARS = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")
_MODEL_LISTS = ("opset_import", "metadata_props", "functions", "training_info")


def export_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """``graph`` as a model carrying ``like``'s model-level fields (ir_version, opsets, producer,
    metadata, doc string, functions), which graphsurgeon does not keep.

    Two repairs on what graphsurgeon writes: a top-level initializer of ``like`` read only inside
    If/Loop/Scan bodies stays a top-level initializer (graphsurgeon moves it into the body, or drops
    it after ``cleanup()``), for IR < 4 an initializer that ``like`` listed in ``graph.input``
    stays listed while it exists (graphsurgeon turns such inputs into constants; IR 4 and later
    need no listing, so there they are constants and no longer inputs), and a value that is not a
    tensor (a sequence, a map: scikit-learn's ZipMap output) keeps ``like``'s type.
    """
    out = gs.export_onnx(graph, do_type_check=False)
    for field in (*_MODEL_SCALARS, *_MODEL_LISTS):
        out.ClearField(field)
    for field in _MODEL_SCALARS:
        if like.HasField(field):
            setattr(out, field, getattr(like, field))
    for field in _MODEL_LISTS:
        getattr(out, field).extend(getattr(like, field))
    _restore_outer_initializers(out.graph, like.graph)
    _restore_annotations(out.graph, like.graph)
    restore_non_tensor_types(out, like)
    if like.ir_version and like.ir_version < 4:
        _relist_initializer_inputs(out.graph, like.graph)
    return out


def _restore_annotations(g: onnx.GraphProto, like: onnx.GraphProto) -> None:
    """Node doc strings and metadata, and the graph's metadata, which graphsurgeon does not carry."""
    if like.metadata_props and not g.metadata_props:
        g.metadata_props.extend(like.metadata_props)
    annotated = {n.name: n for n in like.node if n.name and (n.doc_string or n.metadata_props)}
    if not annotated:
        return
    for n in g.node:
        old = annotated.get(n.name)
        if old is not None and old.op_type == n.op_type:
            if old.doc_string and not n.doc_string:
                n.doc_string = old.doc_string
            if old.metadata_props and not n.metadata_props:
                n.metadata_props.extend(old.metadata_props)


def _relist_initializer_inputs(g: onnx.GraphProto, like: onnx.GraphProto) -> None:
    kept = {t.name for t in g.initializer}
    exported = {i.name: i for i in g.input}
    order = [i for i in like.input if i.name in exported or i.name in kept]
    order += [i for i in g.input if i.name not in {o.name for o in order}]
    chosen = [exported.get(i.name, i) for i in order]
    del g.input[:]
    g.input.extend(chosen)


def _restore_outer_initializers(g: onnx.GraphProto, like: onnx.GraphProto) -> None:
    top = {t.name: t for t in like.initializer}
    defined = {t.name for t in g.initializer}
    like_bodies = {sg.name: {t.name for t in sg.initializer} for n in like.node for sg in _walk_bodies(n)}
    needed: list[str] = []
    for n in g.node:
        for sg in _walk_bodies(n):
            own = like_bodies.get(sg.name, set())
            moved = [t for t in sg.initializer if t.name in top and t.name not in own]
            if moved:
                keep = [t for t in sg.initializer if t not in moved]
                del sg.initializer[:]
                sg.initializer.extend(keep)
        for name in sorted(outer_scope_reads(n)):
            if name in top and name not in defined:
                needed.append(name)
                defined.add(name)
    g.initializer.extend(top[name] for name in needed)


def _walk_bodies(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for sg in _node_subgraphs(node):
        yield sg
        for n in sg.node:
            yield from _walk_bodies(n)


# ------------------------------------------------------------------------------------- cleanup


def cleanup(model: onnx.ModelProto, *, sort: bool = True, keep_nodes: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` without nodes and initializers that nobody reads, topologically sorted.

    Reads by nodes, by If/Loop/Scan bodies (outer-scope names) and by graph outputs count; graph
    inputs stay even when unread (they are the model's interface). An initializer listed in
    ``graph.input`` is a constant: it is no longer listed as an input (IR < 4 keeps the listing
    its version requires). ``sort=False`` keeps the node order (for rewrites that insert nodes in
    place and whose callers rely on the order). ``keep_nodes=True`` removes initializers only:
    a rewrite in the middle of a run keeps every node the plan may name, even one whose outputs
    reach no graph output.
    """
    graph = import_graph(model)
    outputs = list(graph.outputs)
    if keep_nodes:  # every node output counts as read while graphsurgeon cleans up
        listed = {id(t) for t in outputs}
        graph.outputs = outputs + [t for n in graph.nodes for t in n.outputs if t.name and id(t) not in listed]
    graph.cleanup(remove_unused_graph_inputs=False)
    graph.outputs = outputs
    if sort:
        graph.toposort()
    return export_model(graph, model)


def toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with its nodes (and those of its bodies) topologically sorted, nothing removed.

    Outer-scope reads of If/Loop/Scan bodies count as dependencies of the node that owns the body.
    """
    graph = import_graph(model)
    graph.toposort()
    return export_model(graph, model)


# ------------------------------------------------------------------------------ local insertions


def insert_after_producers(graph: onnx.GraphProto, nodes: Iterable[onnx.NodeProto]) -> None:
    """Insert ``nodes`` into ``graph`` in place, each right after the node that produces the
    last-computed of its inputs (at the front when it reads only graph inputs and constants).

    Probes and fake-quantization chains go there so that ONNX Runtime can free a tensor as soon as
    its regular readers and the inserted ones have run; the rest of the order is kept, no sort.
    The new nodes may read each other's outputs (listed producers first); several after one
    producer keep the producer's output order, then the order given.
    """
    # anchor: (position of the producing node, output index); -1: before every node
    anchor = {o: (i, k) for i, n in enumerate(graph.node) for k, o in enumerate(n.output) if o}
    placed: list[tuple[tuple[int, int], int, onnx.NodeProto]] = []
    for order, n in enumerate(nodes):
        at = max((anchor[i] for i in n.input if i in anchor), default=(-1, 0))
        placed.append((at, order, n))
        for o in n.output:
            if o:
                anchor[o] = at
    placed.sort(key=lambda p: (p[0], p[1]))
    after: dict[int, list[onnx.NodeProto]] = {}
    for (pos, _), _, n in placed:
        after.setdefault(pos, []).append(n)
    ordered = list(after.get(-1, []))
    for i, n in enumerate(graph.node):
        ordered.append(n)
        ordered.extend(after.get(i, []))
    del graph.node[:]
    graph.node.extend(ordered)


def replace_nodes(graph: onnx.GraphProto, replacements: Mapping[str, Iterable[onnx.NodeProto]]) -> None:
    """In place: each node named in ``replacements`` gives way to the nodes given for it, at its
    place in the order (still topological when they read only what it read)."""
    ordered: list[onnx.NodeProto] = []
    for n in graph.node:
        ordered.extend(replacements.get(n.name, (n,)))
    del graph.node[:]
    graph.node.extend(ordered)


def with_outputs(model: onnx.ModelProto, outputs: Iterable[tuple[str, int]],
                 extra_nodes: Iterable[onnx.NodeProto] = ()) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are exactly ``outputs`` (name, ONNX element type;
    shape left open), with ``extra_nodes`` appended: the probe form of a model that exposes
    intermediate tensors to ONNX Runtime."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.node.extend(extra_nodes)
    del m.graph.output[:]
    m.graph.output.extend(helper.make_tensor_value_info(name, elem, None) for name, elem in outputs)
    return m


def with_initializers(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` in which each initializer named in ``values`` holds that array instead
    (same name and place, the array's dtype; a float array for a float16 or bfloat16 weight is cast back to it, since a
    method computes in float32 and a float16 model's MatMul takes float16 only): how methods that learn weights write them
    back.

    In a lazy model (``model_io.is_lazy``) large arrays are written to the scratch data file as
    they come (``model_io.spill``) and the copy refers to them."""
    from onnxq.graph.model_io import is_lazy, release, spill

    out = onnx.ModelProto()
    out.CopyFrom(model)
    # a lazy model (weights on disk, over 2 GB) gets its large new weights written out now, not held
    lazy = is_lazy(model)
    for t in out.graph.initializer:
        if t.name in values:
            value = np.asarray(values[t.name])
            if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) and value.dtype.kind == "f" \
                    and value.dtype != helper.tensor_dtype_to_np_dtype(t.data_type):
                value = value.astype(helper.tensor_dtype_to_np_dtype(t.data_type))
            t.CopyFrom(spill(value, t.name) if lazy else numpy_helper.from_array(value, t.name))
            release(value)  # a memory-mapped value's pages, read to write it, do not stay resident
    return out
