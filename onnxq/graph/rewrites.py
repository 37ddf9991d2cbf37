"""Output-preserving float rewrites the host applies for a target before placement."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.graph import edit
from onnxq.graph.index import GraphIndex, node_attr
from onnxq.graph.model_io import tensor_array


def gemm_outputs_to_matmul(model: onnx.ModelProto, every_gemm: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """Rewrite ``Gemm(A, B_const[, c])`` whose output is a graph output as ``MatMul`` (+ ``Add``).

    ONNX Runtime fuses a quantized Gemm only when its output is quantized too (QGemm), which would
    put the model's final outputs on an 8-bit grid; a quantized MatMul with a float output runs as
    MatMulIntegerToFloat instead, keeping the outputs in float. Only plain Gemms (alpha = beta = 1,
    no transA, constant B, 1-D or absent C) are rewritten; ``every_gemm`` rewrites them wherever
    their output goes (4-bit weight-only mode: ORT's 4-bit kernel is a MatMul). Returns the model
    and the rewritten names.
    """
    idx = GraphIndex(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    fresh = edit.Namer.of(out).fresh
    changed: list[str] = []
    new_nodes: list[onnx.NodeProto] = []
    for node in g.node:
        ok = (
            node.op_type == "Gemm"
            and (every_gemm or node.output[0] in idx.graph_outputs)
            and node_attr(node, "alpha", 1.0) == 1.0
            and node_attr(node, "beta", 1.0) == 1.0
            and not node_attr(node, "transA", 0)
            and len(node.input) >= 2
            and node.input[1] in inits
        )
        bias = None
        if ok and len(node.input) > 2 and node.input[2]:
            bias = idx.constant_value(node.input[2])
            ok = bias is not None and bias.ndim <= 1
        if not ok:
            new_nodes.append(node)
            continue
        b = tensor_array(inits[node.input[1]])
        if node_attr(node, "transB", 0):
            b = np.ascontiguousarray(b.T)
        w_name = fresh(f"{node.input[1]}_matmul")
        g.initializer.append(numpy_helper.from_array(b, w_name))
        y = node.output[0]
        if bias is None:
            new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [y], name=node.name))
        else:
            mid = fresh(f"{y}_matmul")
            new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mid], name=node.name))
            new_nodes.append(helper.make_node("Add", [mid, node.input[2]], [y], name=fresh(f"{node.name}_bias")))
        changed.append(node.name)
    if changed:
        del g.node[:]
        g.node.extend(new_nodes)
        out = edit.cleanup(out, sort=False)  # the replaced B goes; the MatMul/Add pairs are in place already
    return out, changed
