"""Fold per-channel affine ops into the weighted op before them (an output-preserving float rewrite).

Real conv nets ship with BatchNormalization unfolded (PP-PicoDet, PP-OCR, most Paddle and many
PyTorch exports), and often with ``Mul``/``Add`` by constants right after a conv. Left in place
they hurt quantization twice: the quantized tensor sits before the per-channel affine map (ORT
quantizes the conv output per tensor, while BatchNorm scales its channels by factors that differ
by orders of magnitude), and every unfolded op is one more tensor to calibrate. Folding them into
the conv's weights and bias is exact in real arithmetic and within float rounding in float32; the
host checks the result to 1e-5 like every float rewrite.

What folds (``y = x * s + t`` per output channel, into the op that produces ``x``):

* ``BatchNormalization`` (inference form) after ``Conv``, ``ConvTranspose``, ``Gemm``, or a
  ``MatMul`` with a constant 2-D weight and a 2-D output (BatchNorm's channel axis 1 is then the
  MatMul's output axis);
* ``Mul``/``Div`` by a constant, ``Add``/``Sub`` of a constant (``x - c``, not ``c - x``), where the
  constant is a scalar or varies only along the op's output-channel axis, so the op neither
  broadcasts the output to a new shape nor mixes positions.

A *uniform* shift (``Add``/``Sub`` of a scalar, or of the same value on every channel) stays in the
graph: a per-tensor activation grid absorbs it exactly where it is, so folding gains nothing, and
folded it moves the quantized conv output off zero, which onnxq's one-threshold calibrators
(clip to ``[max(min, -T), min(max, T)]``) then clip lopsidedly. On PP-OCRv4 rec (28 conv ->
scalar Mul -> scalar Add before hard-swish) folding those shifts cost ``mse`` 2.5 points of
character agreement (docs/methods.md, "Folding").

Only where the weighted op's output is read by that one op alone (not by a graph output, nor by
an If/Loop/Scan body); the weights must be float32/float64 constants (an fp16 weight would round
differently). A MatMul with no bias gains an ``Add`` for the shift. Chains (Conv -> BatchNorm -> Mul -> Add) fold one op at a
time. Nothing else changes: a standalone BatchNorm (after a Concat, an Add, a graph input) stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.graph import edit
from onnxq.graph.index import GraphIndex, node_attr
from onnxq.graph.prepare import tensor_shapes

__all__ = ["FOLD_INTO", "fold_affine"]

#: ops whose weights and bias absorb a following per-channel affine map
FOLD_INTO = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_AFFINE_OPS = frozenset({"BatchNormalization", "Mul", "Div", "Add", "Sub"})
_FOLD_DTYPES = (np.float32, np.float64)


@dataclass
class _Weighted:
    """A weighted op's current weight and bias (float64 while folding; written back at the end)."""

    node: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    dtype: np.dtype
    channels: int
    changed: bool = False


def _channel_count(node: onnx.NodeProto, w: np.ndarray) -> int | None:
    op = node.op_type
    if op == "Conv":
        return w.shape[0]
    if op == "ConvTranspose":
        return w.shape[1] * int(node_attr(node, "group", 1))
    if op == "Gemm":
        return w.shape[0] if node_attr(node, "transB", 0) else w.shape[1]
    if op == "MatMul":
        return w.shape[-1]
    return None


def _scale_weight(node: onnx.NodeProto, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``w`` with output channel ``c`` multiplied by ``s[c]`` (``s`` has one entry per channel)."""
    op = node.op_type
    if op == "Conv":
        return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    if op == "ConvTranspose":
        # weight [Cin, Cout/g, k...]: input-channel row i belongs to group i // (Cin/g), whose output
        # channels are group * (Cout/g) + j
        g = int(node_attr(node, "group", 1))
        cin, per = w.shape[0], w.shape[1]
        groups = np.arange(cin) // (cin // g)
        table = s.reshape(g, per)[groups]  # [Cin, Cout/g]
        return w * table.reshape(table.shape + (1,) * (w.ndim - 2))
    if op == "Gemm" and node_attr(node, "transB", 0):
        return w * s[:, None]
    return w * s  # Gemm [K, N] and MatMul [..., K, N]: the last axis


def _per_channel(c: np.ndarray, rank: int | None, axis: int, channels: int) -> np.ndarray | None:
    """``c`` as one value per output channel, or None when it broadcasts any other way."""
    if c.size == 1 and (c.ndim == 0 or (rank is not None and c.ndim <= rank) or c.shape == (1,)):
        return np.full(channels, float(c.reshape(-1)[0]))
    if rank is None or c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    ax = axis % rank
    if any(d != 1 for i, d in enumerate(shape) if i != ax) or shape[ax] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,)).copy()


def fold_affine(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Fold BatchNorm and constant Mul/Div/Add/Sub into the preceding weighted op (see the module doc).

    Returns the rewritten model (node order kept) and the names of the folded-away nodes, in graph
    order; the model is returned unchanged (same object) when nothing folds.
    """
    idx = GraphIndex(model)
    shapes = tensor_shapes(model)
    producer = dict(idx.producer)
    # tensors If/Loop/Scan bodies read from the main graph: a fold renames the weighted op's output away
    body_reads = set().union(*(edit.outer_scope_reads(n) for n in model.graph.node if edit.subgraphs(n)))
    weighted: dict[str, _Weighted] = {}
    rename: dict[str, str] = {}  # weighted op name -> the output name it takes over
    folded: list[str] = []

    def state(node: onnx.NodeProto) -> _Weighted | None:
        if node.name in weighted:
            return weighted[node.name]
        if node.op_type not in FOLD_INTO or len(node.input) < 2 or len(node.output) != 1:
            return None
        w = idx.constant_value(node.input[1])
        if w is None or w.dtype not in _FOLD_DTYPES or w.ndim < 2:
            return None
        bias = None
        if node.op_type == "MatMul":
            if w.ndim != 2:
                return None
        elif node.op_type == "Gemm":
            if w.ndim != 2 or node_attr(node, "transA", 0) not in (0,) or float(node_attr(node, "alpha", 1.0)) != 1.0:
                return None
        if len(node.input) > 2 and node.input[2]:
            bias = idx.constant_value(node.input[2])
            if bias is None or bias.dtype != w.dtype:
                return None
        channels = _channel_count(node, w)
        if channels is None:
            return None
        if bias is not None:
            if node.op_type == "Gemm":
                beta = float(node_attr(node, "beta", 1.0))
                if beta == 0.0 or bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, channels)):
                    return None
                bias = np.broadcast_to(bias.astype(np.float64) * beta, np.broadcast_shapes(bias.shape, (channels,))).copy()
            elif bias.shape != (channels,):
                return None
            else:
                bias = bias.astype(np.float64)
        st = _Weighted(node, w.astype(np.float64), bias, w.dtype, channels)
        weighted[node.name] = st
        return st

    def affine(node: onnx.NodeProto, st: _Weighted, x_index: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(scale, shift) per channel of ``node`` applied to the weighted op's output, or None."""
        op = node.op_type
        if op == "BatchNormalization":
            if x_index != 0 or len(node.input) != 5 or node_attr(node, "training_mode", 0):
                return None
            if any(o for o in node.output[1:]):
                return None
            if st.node.op_type == "MatMul" or st.node.op_type == "Gemm":
                rank = len(shapes[st.node.output[0]]) if st.node.output[0] in shapes else (2 if st.node.op_type == "Gemm" else None)
                if rank != 2:
                    return None
            vals = [idx.constant_value(n) for n in node.input[1:]]
            if any(v is None or v.shape != (st.channels,) for v in vals):
                return None
            gamma, beta, mean, var = (v.astype(np.float64) for v in vals)
            s = gamma / np.sqrt(var + float(node_attr(node, "epsilon", 1e-5)))
            return s, beta - mean * s
        if len(node.input) != 2:
            return None
        other = node.input[1 - x_index]
        c = idx.constant_value(other)
        if c is None or c.dtype not in _FOLD_DTYPES:
            return None
        if st.node.op_type in ("Conv", "ConvTranspose"):
            rank, axis = st.weight.ndim, 1
        else:
            shape = shapes.get(st.node.output[0])
            rank, axis = (len(shape) if shape is not None else None), -1
            if st.node.op_type == "Gemm":
                rank = 2
        v = _per_channel(c.astype(np.float64), rank, axis, st.channels)
        if v is None:
            return None
        one, zero = np.ones(st.channels), np.zeros(st.channels)
        if op == "Mul":
            return v, zero
        if op == "Div":
            return (1.0 / v, zero) if x_index == 0 and np.all(v != 0) else None
        if op in ("Add", "Sub") and np.all(v == v[0]):
            # a uniform shift: the per-tensor activation grid absorbs it unfolded, and folded it moves the
            # conv output's distribution off zero, where the one-threshold calibrators clip it lopsidedly
            # (PP-OCRv4 rec: 28 scalar shifts before hard-swish cost mse 1.6 points folded)
            return None
        if op == "Add":
            return one, v
        if op == "Sub":
            return (one, -v) if x_index == 0 else None
        return None

    for node in model.graph.node:
        if node.op_type not in _AFFINE_OPS or not node.output:
            continue
        for x_index, name in enumerate(node.input[: 1 if node.op_type == "BatchNormalization" else 2]):
            p = producer.get(name)
            if p is None or p.op_type not in FOLD_INTO:
                continue
            if p.op_type == "MatMul" and node.op_type in ("Add", "Sub"):
                continue  # MatMul + bias Add is already the form runtimes fuse; nothing to gain
            # the weighted op's output must go to this op alone (and not be a graph output)
            if len(idx.consumers.get(name, [])) != 1 or name in idx.graph_outputs or name in body_reads:
                continue
            st = state(p)
            if st is None:
                continue
            sb = affine(node, st, x_index)
            if sb is None:
                continue
            s, b = sb
            st.weight = _scale_weight(p, st.weight, s)
            st.bias = b if st.bias is None else st.bias * s + b
            st.changed = True
            rename[p.name] = node.output[0]
            producer[node.output[0]] = p
            folded.append(node.name)
            break

    if not folded:
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    fresh = edit.Namer.of(out).fresh
    gone = set(folded)
    replacements: dict[str, list[onnx.NodeProto]] = {name: [] for name in gone}
    by_name = {n.name: n for n in g.node}
    for st in weighted.values():
        if not st.changed:
            continue
        n = by_name[st.node.name]
        y = rename[n.name]
        w_name = fresh(f"{n.input[1]}_folded")
        g.initializer.append(numpy_helper.from_array(st.weight.astype(st.dtype), w_name))
        b_name = fresh(f"{n.name}_bias_folded")
        bias = st.bias.astype(st.dtype)
        g.initializer.append(numpy_helper.from_array(bias, b_name))
        new = onnx.NodeProto()
        new.CopyFrom(n)
        new.input[1] = w_name
        new.output[0] = y
        if n.op_type == "MatMul":
            if not np.any(st.bias):  # scaled only: the MatMul writes the folded op's output itself
                replacements[n.name] = [new]
                continue
            mid = fresh(f"{y}_matmul")
            new.output[0] = mid
            replacements[n.name] = [new, helper.make_node("Add", [mid, b_name], [y], name=fresh(f"{n.name}_bias"))]
            continue
        if n.op_type == "Gemm":
            for a in list(new.attribute):
                if a.name == "beta":
                    new.attribute.remove(a)
        while len(new.input) < 3:
            new.input.append("")
        new.input[2] = b_name
        replacements[n.name] = [new]
    edit.replace_nodes(g, replacements)
    # the folded ops' former outputs are gone; their value_info entries would be stale
    stale = {by_name[p].output[0] for p in rename}
    keep = [vi for vi in g.value_info if vi.name not in stale]
    del g.value_info[:]
    g.value_info.extend(keep)
    return edit.cleanup(out, sort=False), folded
