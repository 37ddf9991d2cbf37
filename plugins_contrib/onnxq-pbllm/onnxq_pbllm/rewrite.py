"""The graph side: the weight MatMuls PB-LLM rewrites, and their weights written as standard ONNX.

A weight ``W`` becomes ``Add(Add(DQ(q_salient, s, z), DQ(q_binary, α, 0)), μ)`` feeding the MatMul:
an int8 DequantizeLinear per output channel for the salient part (zero at binarized positions), an
int8 DequantizeLinear of values in {−1, 0, +1} with the per-channel ``α`` for the binarized part
(zero at salient positions) and a per-channel offset vector ``μ`` ``[N]``, broadcast over the rows.
Standard opset-13 operators; ONNX Runtime computes it in float (an emulation of the accuracy).
"""

from __future__ import annotations


import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.graph.edit import Namer, cleanup, replace_nodes
from onnxq.graph.plan import MatMulWeight, QuantPlan, sole_matmul_weights
from onnxq_pbllm.binarize import PartialBinary


#: a MatMul PB-LLM may rewrite (onnxq's own selection of sole-reader 2-D MatMul weights)
Target = MatMulWeight


def targets(model: onnx.ModelProto, plan: QuantPlan) -> list[Target]:
    """The plan's MatMul weights (``--exclude`` applies) that PB-LLM can rewrite."""
    return sole_matmul_weights(model, plan)


def partially_binarized(model: onnx.ModelProto, results: dict[str, PartialBinary], by_node: dict[str, Target]) -> onnx.ModelProto:
    """A copy of ``model`` with each rewritten MatMul reading its weight from the PB-LLM subgraph."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    namer = Namer.of(out)
    nodes = {n.name: n for n in out.graph.node}
    replacements = {}
    for name, pb in results.items():
        t, mm = by_node[name], nodes[name]
        base = t.weight + "_pb"
        ints = {key: namer.fresh(f"{base}_{key}") for key in ("qs", "s", "z", "qb", "alpha", "zero", "mu")}
        out.graph.initializer.extend([
            numpy_helper.from_array(pb.q_salient, ints["qs"]),
            numpy_helper.from_array(pb.scale, ints["s"]),
            numpy_helper.from_array(pb.zero_point, ints["z"]),
            numpy_helper.from_array(pb.q_binary, ints["qb"]),
            numpy_helper.from_array(pb.alpha, ints["alpha"]),
            numpy_helper.from_array(np.zeros_like(pb.zero_point), ints["zero"]),
            numpy_helper.from_array(pb.mu, ints["mu"]),
        ])
        sal, bina, both, weight = (namer.fresh(f"{base}_{k}") for k in ("salient", "binary", "sum", "weight"))
        mm_new = onnx.NodeProto()
        mm_new.CopyFrom(mm)
        mm_new.input[1] = weight
        replacements[name] = [
            helper.make_node("DequantizeLinear", [ints["qs"], ints["s"], ints["z"]], [sal], name=namer.fresh(f"{name}_pb_salient"), axis=1),
            helper.make_node("DequantizeLinear", [ints["qb"], ints["alpha"], ints["zero"]], [bina], name=namer.fresh(f"{name}_pb_binary"), axis=1),
            helper.make_node("Add", [sal, bina], [both], name=namer.fresh(f"{name}_pb_sum")),
            helper.make_node("Add", [both, ints["mu"]], [weight], name=namer.fresh(f"{name}_pb_offset")),
            mm_new,
        ]
    replace_nodes(out.graph, replacements)
    return cleanup(out, sort=False, keep_nodes=True)  # the float weights nobody reads any more
