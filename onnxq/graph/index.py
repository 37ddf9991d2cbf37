"""A read-only index of a model's main graph: who produces and who reads each tensor.

Placement, the float rewrites, the searches and the TensorRT rules look tensors up here; nothing in
this module changes the model (edits go through :mod:`onnxq.graph.edit`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.graph.model_io import tensor_array
from onnxq.graph.prepare import tensor_types

__all__ = ["FLOAT_TYPES", "PASS_THROUGH_OPS", "GraphIndex", "concatenated_outputs", "node_attr", "output_roles"]

#: element types onnxq treats as float activations.
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def node_attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of attribute ``name`` of ``node``, or ``default`` when it is absent."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class GraphIndex:
    """Producer/consumer lookups over a model's main graph.

    ``nodes`` maps node names to nodes, so it needs unique, non-empty names (see
    :func:`onnxq.graph.edit.name_nodes`); ``node_list`` keeps every node in graph order, named or
    not, and the producer/consumer maps never depend on names. Initializers that are also listed in
    ``graph.input`` count as constants, not as graph inputs.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.model = model
        self.node_list: list[onnx.NodeProto] = list(g.node)
        self.nodes = {n.name: n for n in g.node}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for n in g.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i, name in enumerate(n.input):
                if name:
                    self.consumers[name].append((n, i))
        self.initializers = {t.name: t for t in g.initializer}
        self.constants = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
        self.graph_inputs = {i.name for i in g.input} - set(self.initializers)
        self.graph_outputs = {o.name for o in g.output}
        self.types = tensor_types(model)

    @property
    def opset(self) -> int | None:
        """The default-domain opset, or None when the model imports none."""
        return next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), None)

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def constant_value(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return tensor_array(self.initializers[name])  # memory-mapped when the weight is on disk
        node = self.constants.get(name)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def is_float(self, name: str) -> bool:
        """Known float tensor; unknown types count as float (weighted-op inputs in a float model)."""
        t = self.types.get(name)
        return t is None or t in FLOAT_TYPES

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        cons = self.consumers.get(name, [])
        if len(cons) == 1 and name not in self.graph_outputs:
            return cons[0][0]
        return None


def concatenated_outputs(model: onnx.ModelProto) -> dict[str, tuple[int, tuple[int, ...]]]:
    """The graph outputs a ``Concat`` makes, as ``{output: (axis, size of each part along it)}``.

    A detector often joins parts of different kinds in one output: YOLOv8 and later concatenate the
    boxes (pixels, in the hundreds) and the class scores (probabilities, below one) into [N, 4 +
    classes, anchors], so a comparison of the whole output reads the boxes alone. Concats on the
    same axis nested inside one another (YOLOv8-pose: the keypoints joined to the boxes and scores)
    give their parts; an ``Identity`` after the Concat is looked through. Sizes come from the
    inferred shapes: an output with a part of unknown size is left out.
    """
    from onnxq.graph.prepare import infer_shapes, tensor_shapes

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    shapes: dict[str, tuple[Any, ...]] | None = None
    found: dict[str, tuple[int, tuple[int, ...]]] = {}
    for name in outputs:
        node = producer.get(name)
        while node is not None and node.op_type == "Identity":
            node = producer.get(node.input[0])
        if node is None or node.op_type != "Concat" or len(node.input) < 2:
            continue
        if shapes is None:
            shapes = tensor_shapes(infer_shapes(model)[0])
        rank = len(shapes.get(node.output[0], ()))
        if not rank:
            continue
        axis = node_attr(node, "axis", 0) % rank
        sizes: list[int] = []
        stack = list(reversed(node.input))
        while stack:
            part = stack.pop()
            inner = producer.get(part)
            if inner is not None and inner.op_type == "Concat" and node_attr(inner, "axis", 0) % rank == axis:
                stack.extend(reversed(inner.input))
                continue
            dims = shapes.get(part)
            if dims is None or len(dims) != rank or not isinstance(dims[axis], int):
                sizes = []
                break
            sizes.append(dims[axis])
        if len(sizes) >= 2:
            found[name] = (axis, tuple(sizes))
    return found


#: ops that pass values through unchanged (a type, a shape or an order of axes): an output behind them is what the
#: op before them computed
PASS_THROUGH_OPS = frozenset({"Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "Transpose", "Expand"})


def output_roles(model: onnx.ModelProto) -> dict[str, str]:
    """What the graph outputs that hold decisions rather than scores are, as ``{output: role}``.

    * ``argmax``: an ``ArgMax``/``ArgMin`` the model computes (a class id per sample, a segmentation class map, a
      greedy CTC decode), looked through :data:`PASS_THROUGH_OPS` ops;
    * ``topk_values`` / ``topk_indices``: a ``TopK``'s sorted values and their indices (the first column of the
      indices is the arg-max class; the values' own arg-max is their first column whatever the model does);
    * ``embedding``: a vector divided by its norm (``F.normalize``, ``LpNormalization``): its largest channel is no
      class, whatever a labelled data set says;
    * ``selected``: rows picked by the data (behind a ``NonMaxSuppression``, or gathered by a ``TopK``'s indices):
      a detector's padded [N, 100, 6] list, whose row order follows near-ties in the scores, so a sample's cosine
      reads which rows swapped as much as what they hold.

    Other outputs are absent. Only the main graph is walked; nothing is inferred, so this is cheap.
    """
    g = model.graph
    producer = {o: (n, i) for n in g.node for i, o in enumerate(n.output) if o}
    roles: dict[str, str] = {}
    for out in (o.name for o in g.output):
        name = out
        hit = producer.get(name)
        while hit is not None and hit[0].op_type in PASS_THROUGH_OPS and hit[0].input:
            name = hit[0].input[0]
            hit = producer.get(name)
        if hit is not None and hit[0].op_type in ("ArgMax", "ArgMin"):
            roles[out] = "argmax"
            continue
        if hit is not None and hit[0].op_type == "TopK":
            roles[out] = "topk_values" if hit[1] == 0 else "topk_indices"
            continue
        if hit is not None and _l2_normalized(producer, hit[0]):
            roles[out] = "embedding"
            continue
        if _selected_by_data(producer, out):
            roles[out] = "selected"
    return roles


def _l2_normalized(producer: dict[str, tuple[onnx.NodeProto, int]], node: onnx.NodeProto) -> bool:
    """Whether ``node`` divides by a vector norm (``LpNormalization``; torch's ``F.normalize``: Div by ReduceL2, clipped
    and expanded; Div by Sqrt of a sum of squares): an embedding, whose clearest channel is no class."""
    if node.op_type == "LpNormalization":
        return True
    if node.op_type != "Div" or len(node.input) < 2:
        return False
    stack, depth = [(node.input[1], 0)], 0
    while stack:
        t, depth = stack.pop()
        hit = producer.get(t)
        if hit is None or depth > 4:
            continue
        if hit[0].op_type in ("ReduceL2", "ReduceSumSquare", "Sqrt"):
            return True
        stack.extend((i, depth + 1) for i in hit[0].input[:1] if i)
    return False


def _selected_by_data(producer: dict[str, tuple[onnx.NodeProto, int]], tensor: str) -> bool:
    """Whether ``tensor`` depends on a NonMaxSuppression or on a TopK's indices."""
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t in seen or t not in producer:
            continue
        seen.add(t)
        node, slot = producer[t]
        if node.op_type == "NonMaxSuppression" or (node.op_type == "TopK" and slot == 1):
            return True
        stack.extend(i for i in node.input if i)
    return False
