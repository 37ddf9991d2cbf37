"""The graph side: which MatMuls can be factorised, and the model with ``MatMul(x, W)`` as ``MatMul(MatMul(x, A), B)``."""

from __future__ import annotations


import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.graph.edit import Namer, cleanup, replace_nodes
from onnxq.graph.plan import MatMulWeight, QuantPlan, sole_matmul_weights
from onnxq.graph.prepare import infer_shapes


#: a MatMul whose weight may be factorised (onnxq's own selection of sole-reader 2-D MatMul weights)
Target = MatMulWeight


def targets(model: onnx.ModelProto, plan: QuantPlan) -> list[Target]:
    """The plan's MatMul weights (so ``--exclude`` and the target's placement apply) that can be
    factorised: read by their MatMul alone, at least 2 x 2."""
    inits = {t.name: t for t in model.graph.initializer}
    return [t for t in sole_matmul_weights(model, plan) if min(inits[t.weight].dims) >= 2]


def factorised(model: onnx.ModelProto, factors: dict[str, tuple[np.ndarray, np.ndarray]],
               targets_by_node: dict[str, Target]) -> onnx.ModelProto:
    """A copy of ``model`` in which each MatMul named in ``factors`` reads ``x·A`` and multiplies it by ``B``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    namer = Namer.of(out)
    nodes = {n.name: n for n in out.graph.node}
    replacements = {}
    for name, (a, b) in factors.items():
        t, n = targets_by_node[name], nodes[name]
        a_name, b_name = namer.fresh(t.weight + "_asvd_a"), namer.fresh(t.weight + "_asvd_b")
        mid = namer.fresh(name + "_asvd_low")
        out.graph.initializer.extend([numpy_helper.from_array(a, a_name), numpy_helper.from_array(b, b_name)])
        replacements[name] = [
            helper.make_node("MatMul", [t.input, a_name], [mid], name=namer.fresh(name + "_asvd_a")),
            helper.make_node("MatMul", [mid, b_name], list(n.output), name=namer.fresh(name + "_asvd_b")),
        ]
    replace_nodes(out.graph, replacements)
    out = cleanup(out, sort=False)  # the dense weights nobody reads any more
    return infer_shapes(out)[0]
