"""The graph side: which MatMuls can be factorised, and the model with ``MatMul(x, W)`` as ``MatMul(MatMul(x, A), B)``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.graph.edit import Namer, cleanup, replace_nodes
from onnxq.graph.plan import QuantPlan
from onnxq.graph.prepare import infer_shapes


@dataclass(frozen=True)
class Target:
    """A MatMul whose second input is a 2-D constant weight read by nothing else."""

    node: str
    input: str
    weight: str


def targets(model: onnx.ModelProto, plan: QuantPlan) -> list[Target]:
    """The plan's MatMul weights (so ``--exclude`` and the target's placement apply) that can be factorised."""
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    reads = Counter(i for n in model.graph.node for i in n.input)
    out = []
    for site in plan.weights.values():
        n = nodes.get(site.node)
        t = inits.get(site.initializer)
        if n is None or t is None or n.op_type != "MatMul" or site.input_index != 1:
            continue
        if len(t.dims) != 2 or reads[site.initializer] != 1 or min(t.dims) < 2:
            continue
        out.append(Target(n.name, n.input[0], site.initializer))
    return out


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
