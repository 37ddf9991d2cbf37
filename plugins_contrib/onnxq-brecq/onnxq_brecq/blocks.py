"""Block discovery on an ONNX graph (plugins_contrib/onnxq-brecq/README.md, "block discovery in ONNX").

The graph is cut at single-tensor articulation points: walking the nodes in topological order,
a tensor is a cut when it is the only non-constant tensor still needed by later nodes (or by the
graph outputs). Residual blocks come out whole, because their skip tensor stays live until the
``Add``. Segments without a weighted node (a trailing ``Relu`` or ``Flatten``) are merged into
the block before them (or, at the start of the graph, into the block after them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx


@dataclass
class Block:
    """Consecutive nodes reconstructed together: ``inputs`` are read from outside, ``outputs`` compared."""

    nodes: list[onnx.NodeProto]
    inputs: list[str]
    outputs: list[str]
    learnable: list[str] = field(default_factory=list)  # names of weighted nodes inside

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]


def constant_names(model: onnx.ModelProto) -> set[str]:
    """The names of the model's initializers and Constant nodes' outputs."""
    names = {t.name for t in model.graph.initializer}
    names |= {n.output[0] for n in model.graph.node if n.op_type == "Constant" and n.output}
    return names


def external_inputs(nodes: list[onnx.NodeProto], consts: set[str]) -> list[str]:
    """The tensors ``nodes`` read that no node among them produces and that are not constants, in first-read order."""
    produced = {o for n in nodes for o in n.output if o}
    out: list[str] = []
    for n in nodes:
        for i in n.input:
            if i and i not in consts and i not in produced and i not in out:
                out.append(i)
    return out


def find_blocks(model: onnx.ModelProto, learnable: set[str], mode: str = "block") -> list[Block]:
    """Split the graph into reconstruction blocks; ``mode='layer'`` makes one block per weighted node."""
    nodes = [n for n in model.graph.node if n.op_type != "Constant"]
    consts = constant_names(model)
    outputs = {o.name for o in model.graph.output}
    if mode == "layer":
        return _layer_blocks(nodes, consts, outputs, learnable)
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t and t not in consts:
                last_use[t] = i
    for t in outputs:
        last_use[t] = len(nodes)
    live = {i.name for i in model.graph.input if i.name not in consts}
    segments: list[tuple[list[onnx.NodeProto], str | None]] = []
    current: list[onnx.NodeProto] = []
    for i, n in enumerate(nodes):
        current.append(n)
        live |= {o for o in n.output if o and last_use.get(o, -1) > i}
        live = {t for t in live if last_use.get(t, -1) > i}
        if len(live) == 1 and i < len(nodes) - 1:
            segments.append((current, next(iter(live))))
            current = []
    if current:
        segments.append((current, None))

    merged: list[list[onnx.NodeProto]] = []
    pending: list[onnx.NodeProto] = []  # weightless segments before the first weighted one
    for seg, _cut in segments:
        has_weight = any(n.name in learnable for n in seg)
        if has_weight:
            merged.append(pending + seg)
            pending = []
        elif merged:
            merged[-1].extend(seg)
        else:
            pending.extend(seg)
    if pending:
        if not merged:
            return []
        merged[-1].extend(pending)

    blocks = []
    for seg in merged:
        produced = {o for n in seg for o in n.output if o}
        later_reads = _reads_after(nodes, seg[-1], consts) | outputs
        outs = [o for n in seg for o in n.output if o and o in later_reads]
        blocks.append(Block(seg, external_inputs(seg, consts), [o for o in outs if o in produced], [n.name for n in seg if n.name in learnable]))
    return blocks


def _reads_after(nodes: list[onnx.NodeProto], last: onnx.NodeProto, consts: set[str]) -> set[str]:
    idx = next(i for i, n in enumerate(nodes) if n is last)
    return {t for n in nodes[idx + 1 :] for t in n.input if t and t not in consts}


def _layer_blocks(nodes: list[onnx.NodeProto], consts: set[str], outputs: set[str], learnable: set[str]) -> list[Block]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for t in n.input:
            if t:
                consumers.setdefault(t, []).append(n)
    blocks = []
    for n in nodes:
        if n.name not in learnable:
            continue
        seg = [n]
        nxt = consumers.get(n.output[0], [])
        if len(nxt) == 1 and n.output[0] not in outputs and nxt[0].op_type in ("Relu", "Clip", "LeakyRelu"):
            seg.append(nxt[0])
        blocks.append(Block(seg, external_inputs(seg, consts), [seg[-1].output[0]], [n.name]))
    return blocks
