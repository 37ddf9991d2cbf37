"""Fold weights computed at run time into initializers (an output-preserving float rewrite).

Torch exports often compute a weight from an initializer inside the graph: ``Linear`` becomes
``MatMul(x, Transpose(W))``, and Reshape/Cast/Unsqueeze of weights are common too. Placement
quantizes a weighted op's weight only when it is a constant, so such a MatMul kept a float weight
and only its activation was quantized (the ``attention_padded`` zoo fixture quantized only its
classifier on ``--target ort``). Folding every node whose inputs are all constants into an
initializer, with onnx-graphsurgeon's ``Graph.fold_constants``, turns those weights into constants
before placement, as ONNX Runtime's ``quant_pre_process`` does.

Memory stays bounded: ops that make a tensor from a shape (``Expand``, ``Tile``,
``ConstantOfShape``, ``Range``, ...) are not folded, nor is any folded tensor larger than the
model's largest initializer (at least :data:`MIN_SIZE_THRESHOLD`); a lazily loaded model (weights
left on disk, over :data:`onnxq.graph.model_io.LAZY_ABOVE`) is left alone, since folding would
read its weights into memory. Shape computations are not folded from declared shapes
(``fold_shapes=False``): a dynamic dimension stays dynamic. Q/DQ pairs of a model that is already
quantized and random generators stay as they are.
"""

from __future__ import annotations

import logging
import math

import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxq.graph import edit
from onnxq.graph.model_io import is_lazy
from onnxq.runtime.ort import quiet_default_logger

__all__ = ["KEEP_OPS", "MIN_SIZE_THRESHOLD", "fold_constants"]

log = logging.getLogger(__name__)

#: ops never folded: they grow a tensor from a shape, are random, or are a quantized model's own Q/DQ
KEEP_OPS = frozenset({
    "Expand", "Tile", "ConstantOfShape", "Range", "EyeLike", "Resize", "Upsample", "Pad",
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
})
#: smallest size limit (bytes) of a folded tensor, for models whose weights are all tiny
MIN_SIZE_THRESHOLD = 1 << 20


def _largest_initializer(model: onnx.ModelProto) -> int:
    """Bytes of the model's largest initializer (from its dims and type: no values are read)."""
    largest = 0
    for t in model.graph.initializer:
        itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 8
        largest = max(largest, math.prod(t.dims) * itemsize)
    return largest


#: a Constant's list and scalar attributes, with the element type the ONNX standard gives its output
_LIST_ATTRIBUTES = {"value_float": onnx.TensorProto.FLOAT, "value_floats": onnx.TensorProto.FLOAT,
                    "value_int": onnx.TensorProto.INT64, "value_ints": onnx.TensorProto.INT64}


def _typed_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each ``Constant`` given by ``value_float(s)`` / ``value_int(s)`` written as a typed ``value`` tensor.

    graphsurgeon reads such an attribute as a Python list, and the folded initializer came out float64 where the
    standard says float32: torch's exporter with ``optimize=False`` writes a Resize's scales as
    ``Constant(value_floats=[1, 1, 2, 2])``, and the folded model did not load ("Type 'tensor(double)' of input
    parameter ... of operator (Resize)"). A copy only when there is such a node.
    """
    nodes = [(i, n) for i, n in enumerate(model.graph.node) if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
             and any(a.name in _LIST_ATTRIBUTES for a in n.attribute)]
    if not nodes:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, _ in nodes:
        node = out.graph.node[i]
        attr = next(a for a in node.attribute if a.name in _LIST_ATTRIBUTES)
        value = helper.get_attribute_value(attr)
        dims = [len(value)] if isinstance(value, list) else []
        tensor = helper.make_tensor(node.output[0], _LIST_ATTRIBUTES[attr.name], dims, value if dims else [value])
        node.attribute.remove(attr)
        node.attribute.append(helper.make_attribute("value", tensor))
    return out


def fold_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Return a copy of ``model`` whose constant-only nodes are folded into initializers, and the
    names of the nodes folded (empty, and ``model`` itself, when nothing folds).

    Only the main graph is folded (If/Loop/Scan bodies stay as they are); see the module docstring
    for what is never folded.
    """
    if is_lazy(model):
        log.info("weights left on disk (lazily loaded model): not folding constant subgraphs, which would read them into memory")
        return model, []
    graph = edit.import_graph(_typed_constants(model))
    before = {n.name for n in graph.nodes}
    threshold = max(MIN_SIZE_THRESHOLD, _largest_initializer(model))
    # graphsurgeon evaluates the constant subgraph in a default ONNX Runtime session, whose optimizer
    # logs a warning for every Unsqueeze it cannot remove: quiet while folding (back to ORT's default after)
    with quiet_default_logger():
        graph.fold_constants(fold_shapes=False, recurse_subgraphs=False, flatten_subgraphs=False, error_ok=True,
                             size_threshold=threshold, recurse_functions=False,
                             should_exclude_node=lambda node: node.op in KEEP_OPS or node.domain not in (None, "", "ai.onnx"))
    # drop the folded nodes only: a node nobody reads stays, as the run's other rewrites keep it
    outputs = list(graph.outputs)
    listed = {id(t) for t in outputs}
    graph.outputs = outputs + [t for n in graph.nodes for t in n.outputs
                               if t.name and id(t) not in listed and not isinstance(t, gs.Constant)]
    graph.cleanup(remove_unused_graph_inputs=False)
    graph.outputs = outputs
    folded = sorted(before - {n.name for n in graph.nodes})
    if not folded:
        return model, []
    graph.toposort()
    return edit.export_model(graph, model), folded
