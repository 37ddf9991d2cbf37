"""SPARQ in standard ONNX: the trim between an activation's QuantizeLinear and the DequantizeLinear
that feeds a dot product (Conv, MatMul, Gemm).

bSPARQ is element-wise: ``Cast(int32) → Gather(trim table) → Cast(uint8)`` on the 8-bit tensor.
vSPARQ looks at a value's partner in the dot product's reduction dimension (pairs of adjacent
input channels: 2i with 2i+1): a value whose partner is zero keeps all 8 bits (it may use both
4-bit multiplier slots), the others are trimmed: ``Where(Equal(Gather(x, swap), 0), x, trimmed)``.
Only the dot-product readers see the trimmed values; element-wise readers (a residual Add,
pooling) keep the 8-bit tensor, as on SPARQ hardware, where trimming happens at the multiplier.

The pairing along input channels is our choice: it is the reduction order of a channels-last
(NHWC) layout, where two neighbouring channels at one pixel reach the multiplier together. A
depthwise conv has no channel reduction (its dot product runs over kernel positions, which
needs im2col to pair), so it gets bSPARQ; the report counts such fallbacks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.graph import edit
from onnxq.graph.edit import Namer

from onnxq_sparq.trim import trim_table

INT32, UINT8 = onnx.TensorProto.INT32, onnx.TensorProto.UINT8


@dataclass
class SparqResult:
    """What :func:`apply_sparq` did."""

    trimmed: list[str] = field(default_factory=list)  #: activation tensors trimmed for their dot-product readers
    paired: int = 0  #: dot-product readers given vSPARQ's pairing
    unpaired: dict[str, str] = field(default_factory=dict)  #: reader -> why it got bSPARQ under vsparq
    skipped: dict[str, str] = field(default_factory=dict)  #: activation -> why it stays 8-bit


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _reduction(node: onnx.NodeProto, idx: int, shape_of) -> tuple[str, int, int, int] | str:
    """``(kind, axis, channels, rank)`` of the reduction a dot-product reader runs over its input
    ``idx`` (rank: of a conv's input, 0 when not needed), or why it cannot be paired."""
    if node.op_type == "Conv" and idx == 0:
        w = shape_of(node.input[1])
        if w is None:
            return "conv weight shape unknown"
        per_group, group = int(w[1]), _attr(node, "group", 1)
        if group > 1 and per_group % 2:
            return f"grouped conv with {per_group} channel(s) per group (depthwise: the reduction runs over kernel positions)"
        return ("conv", 1, per_group * group, len(w))
    if node.op_type in ("MatMul", "Gemm") and idx == 0:
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            return "Gemm with transA"
        b = shape_of(node.input[1])
        if b is None or len(b) < 2:
            return "the other operand's shape is unknown (an activation)"
        k = int(b[-1]) if node.op_type == "Gemm" and _attr(node, "transB", 0) else int(b[-2])
        return ("matmul", -1, k, 0)
    return "right-hand operand of a MatMul (pairing along its reduction axis -2 is not emulated)"


def is_dot_input(node: onnx.NodeProto, idx: int) -> bool:
    """Whether input ``idx`` of ``node`` is the activation side of a Conv, MatMul or Gemm."""
    return (node.op_type == "Conv" and idx == 0) or (node.op_type in ("MatMul", "Gemm") and idx in (0, 1))


def apply_sparq(model: onnx.ModelProto, variant: str, bits: int, placements: int, rounding: bool) -> tuple[onnx.ModelProto, SparqResult]:
    """Return a copy of the QDQ ``model`` with SPARQ trimming on every unsigned, zero-point-0
    activation that feeds a dot product, and what was done."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    fresh = Namer.of(out).fresh
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for n in g.node:
        for i, t in enumerate(n.input):
            readers[t].append((n, i))

    def shape_of(name: str) -> list[int] | None:
        """The shape of a constant operand: an initializer, or the integer initializer behind its DequantizeLinear."""
        if name in inits:
            return list(inits[name].dims)
        p = producers.get(name)
        if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits:
            return list(inits[p.input[0]].dims)
        return None

    result = SparqResult()
    table = numpy_helper.from_array(trim_table(bits, placements, rounding), fresh(f"sparq_table_{bits}b{placements}"))
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = [table]
    for q in list(g.node):
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        act = q.input[0]
        zp = inits.get(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        if zp is None or zp.data_type != UINT8:
            result.skipped[act] = "signed 8-bit (SPARQ trims unsigned post-ReLU activations)"
            continue
        if np.any(numpy_helper.to_array(zp) != 0):
            result.skipped[act] = "zero point is not 0 (not a post-ReLU activation)"
            continue
        dot: dict[tuple, list[tuple[onnx.NodeProto, int, onnx.NodeProto]]] = defaultdict(list)
        for dq, _ in readers[q.output[0]]:
            if dq.op_type != "DequantizeLinear":
                continue
            for node, idx in readers[dq.output[0]]:
                if not is_dot_input(node, idx):
                    continue
                key: tuple = ("b",)
                if variant == "vsparq":
                    red = _reduction(node, idx, shape_of)
                    if isinstance(red, str):
                        result.unpaired[node.name] = red
                    else:
                        key = ("v", red[1], red[2], red[3])
                        result.paired += 1
                dot[(dq.name,) + key].append((node, idx, dq))
        if not dot:
            continue
        x32 = fresh(f"{act}_sparq_int32")
        trimmed = fresh(f"{act}_sparq_trimmed")
        new_nodes += [helper.make_node("Cast", [q.output[0]], [x32], name=fresh(f"{act}/sparq/Cast"), to=INT32),
                      helper.make_node("Gather", [table.name, x32], [trimmed], name=fresh(f"{act}/sparq/Gather"))]
        for key, uses in dot.items():
            dq = uses[0][2]
            picked = trimmed
            if key[1] == "v":
                _, axis, channels, rank = key[1:]
                picked = _pair_select(act, x32, trimmed, axis, channels, rank, fresh, new_nodes, new_inits)
            u8 = fresh(f"{act}_sparq")
            deq = fresh(f"{act}_sparq_dequantized")
            new_nodes.append(helper.make_node("Cast", [picked], [u8], name=fresh(f"{act}/sparq/CastBack"), to=UINT8))
            new_nodes.append(helper.make_node("DequantizeLinear", [u8, *dq.input[1:]], [deq], name=fresh(f"{act}/sparq/DequantizeLinear")))
            for node, idx, _ in uses:
                node.input[idx] = deq
        result.trimmed.append(act)
    g.initializer.extend(new_inits)
    edit.insert_after_producers(g, new_nodes)
    return edit.cleanup(out), result


def _pair_select(act: str, x32: str, trimmed: str, axis: int, channels: int, rank: int, fresh, new_nodes: list, new_inits: list) -> str:
    """vSPARQ: ``x`` where its channel partner (2i <-> 2i+1 along ``axis``) is zero, else ``trimmed``."""
    swap = np.arange(channels, dtype=np.int64)
    even = channels - channels % 2
    swap[:even] = swap[:even].reshape(-1, 2)[:, ::-1].reshape(-1)
    swap_t = numpy_helper.from_array(swap, fresh(f"{act}_sparq_swap"))
    zero = numpy_helper.from_array(np.zeros((), np.int32), fresh(f"{act}_sparq_zero"))
    new_inits += [swap_t, zero]
    partner, alone, keep = fresh(f"{act}_sparq_partner"), fresh(f"{act}_sparq_partner_zero"), fresh(f"{act}_sparq_keep")
    new_nodes += [helper.make_node("Gather", [x32, swap_t.name], [partner], name=fresh(f"{act}/sparq/Partner"), axis=axis),
                  helper.make_node("Equal", [partner, zero.name], [alone], name=fresh(f"{act}/sparq/PartnerZero"))]
    if channels % 2:  # the last channel has no partner: its slot's other half is free
        shape = [channels] + [1] * max(rank - 2, 0) if axis == 1 else [channels]
        mask = np.zeros(shape, bool)
        mask[-1] = True
        mask_t = numpy_helper.from_array(mask, fresh(f"{act}_sparq_unpaired"))
        new_inits.append(mask_t)
        either = fresh(f"{act}_sparq_free")
        new_nodes.append(helper.make_node("Or", [alone, mask_t.name], [either], name=fresh(f"{act}/sparq/Free")))
        alone = either
    new_nodes.append(helper.make_node("Where", [alone, x32, trimmed], [keep], name=fresh(f"{act}/sparq/Select")))
    return keep
