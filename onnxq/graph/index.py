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

__all__ = ["FLOAT_TYPES", "GraphIndex", "node_attr"]

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
