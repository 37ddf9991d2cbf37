"""QDQ rewriting: methods emit commands, one transformer applies them.

Commands are plain data. :func:`apply_commands` checks them for conflicts (two methods quantizing
one tensor differently is an error naming both), inserts QuantizeLinear/DequantizeLinear (and a
Clip where the integer range is narrower than the container, e.g. INT7), rewires consumers,
drops float weights nobody uses any more, and topologically sorts the result.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.errors import PlanConflictError
from onnxq.graph import edit
from onnxq.graph.bias_range import bias_step, int32_bias_slot, quantize_bias, reader_counts
from onnxq.graph.edit import QDTYPE, Namer, numpy_dtype
from onnxq.graph.model_io import is_lazy, spill, tensor_array
from onnxq.graph.plan import QuantPlan
from onnxq.graph.prepare import default_opset, infer_shapes, tensor_types
from onnxq.qparams import QParams


@dataclass(frozen=True)
class QuantizeActivation:
    """Insert (Clip →) QuantizeLinear → DequantizeLinear on ``tensor`` for ``consumers``."""

    tensor: str
    qparams: QParams
    consumers: tuple[tuple[str, int], ...]
    origin: str = "onnxq"


@dataclass(frozen=True)
class QuantizeWeight:
    """Replace a float constant by integers + DequantizeLinear for ``consumers``."""

    initializer: str
    qparams: QParams
    consumers: tuple[tuple[str, int], ...]
    origin: str = "onnxq"


Command = QuantizeActivation | QuantizeWeight


def _same(a: QParams, b: QParams) -> bool:
    return (
        a.dtype == b.dtype
        and a.axis == b.axis
        and (a.qmin, a.qmax) == (b.qmin, b.qmax)
        and a.scale.shape == b.scale.shape
        and np.array_equal(a.scale, b.scale)
        and np.array_equal(a.zero_point, b.zero_point)
        and (a.quant_scale is None) == (b.quant_scale is None)
        and (a.quant_scale is None or np.array_equal(a.quant_scale, b.quant_scale))
    )


def commands_from_plan(plan: QuantPlan, origin: str) -> list[Command]:
    """Turn a finished plan (every site has qparams) into rewrite commands."""
    cmds: list[Command] = []
    for site in plan.activations.values():
        if site.qparams is None:
            raise ValueError(f"activation '{site.tensor}' has no qparams")
        cmds.append(QuantizeActivation(site.tensor, site.qparams, tuple(site.consumers), origin))
    consumers: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for site in plan.weights.values():
        consumers[site.initializer].extend([(site.node, site.input_index), *site.shared_with])
    for site in plan.weights.values():
        if site.qparams is None:
            raise ValueError(f"weight '{site.initializer}' has no qparams")
        cmds.append(QuantizeWeight(site.initializer, site.qparams, tuple(consumers[site.initializer]), origin))
    return cmds


def _merge(commands: list[Command]) -> list[Command]:
    by_tensor: dict[tuple[type, str], Command] = {}
    order: list[tuple[type, str]] = []
    for c in commands:
        key = (type(c), c.tensor if isinstance(c, QuantizeActivation) else c.initializer)
        prior = by_tensor.get(key)
        if prior is None:
            by_tensor[key] = c
            order.append(key)
            continue
        if not _same(prior.qparams, c.qparams):
            raise PlanConflictError(
                f"'{key[1]}' is quantized differently by '{prior.origin}' and '{c.origin}'; drop one of them or exclude the tensor from one"
            )
        merged = tuple(dict.fromkeys(prior.consumers + c.consumers))
        by_tensor[key] = type(prior)(key[1], prior.qparams, merged, prior.origin)  # type: ignore[arg-type]
    return [by_tensor[k] for k in order]


def _qparam_initializers(base: str, q: QParams, float_type: type = np.float32) -> list[onnx.TensorProto]:
    # Q/DQ's scale has the type of the float tensor (float16 models: float16 scales, opset 19+),
    # kept at least float16's smallest normal so a tiny range never rounds to a zero scale
    scale_values = np.asarray(q.scale, np.float32)
    if float_type is np.float16:
        scale_values = np.maximum(scale_values, np.finfo(np.float16).tiny)
    scale = numpy_helper.from_array(scale_values.astype(float_type), f"{base}_scale")
    zp_values = np.asarray(q.zero_point)
    if q.dtype in ("int4", "uint4"):
        zp = helper.make_tensor(f"{base}_zero_point", QDTYPE[q.dtype], list(zp_values.shape), zp_values.astype(np.int32).ravel().tolist())
    else:
        zp = numpy_helper.from_array(zp_values.astype(q.np_dtype), f"{base}_zero_point")
    return [scale, zp]


def _axis_attrs(q: QParams) -> dict[str, int]:
    if q.block_size:
        return {"axis": int(q.axis), "block_size": int(q.block_size)}  # type: ignore[arg-type]
    return {"axis": int(q.axis)} if q.axis is not None and q.scale.ndim == 1 else {}


def apply_commands(model: onnx.ModelProto, commands: list[Command]) -> onnx.ModelProto:
    """Return a copy of ``model`` with every command applied (the input is not modified)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes_by_name = {n.name: n for n in g.node}
    inits = {t.name: t for t in g.initializer}
    lazy = is_lazy(model)  # weights on disk (over 2 GB): the quantized ones are written out as they are made
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    fresh = Namer.of(out).fresh
    types = tensor_types(out)
    targets = {c.tensor if isinstance(c, QuantizeActivation) else c.initializer for c in commands}
    if onnx.TensorProto.FLOAT16 in types.values() and not targets <= set(types):
        types = tensor_types(infer_shapes(out)[0])  # a float rewrite's new tensors (Gemm->MatMul) carry no type yet
    half = {n for n, t in types.items() if t == onnx.TensorProto.FLOAT16}

    def float_type(tensor: str) -> type:
        return np.float16 if tensor in half else np.float32

    def rewire(consumers: tuple[tuple[str, int], ...], old: str, new: str) -> None:
        for node_name, idx in consumers:
            node = nodes_by_name.get(node_name)
            if node is None or idx >= len(node.input) or node.input[idx] != old:
                raise PlanConflictError(f"rewrite target {node_name}[{idx}] does not read '{old}' any more")
            node.input[idx] = new

    for cmd in _merge(commands):
        q = cmd.qparams
        if isinstance(cmd, QuantizeActivation):
            base = fresh(f"{cmd.tensor}_q")
            new_inits += _qparam_initializers(base, q, float_type(cmd.tensor))
            src = cmd.tensor
            if q.narrowed:
                lo, hi = q.real_range()
                clipped = fresh(f"{cmd.tensor}_clipped")
                new_inits += [numpy_helper.from_array(np.asarray(lo, float_type(cmd.tensor)), f"{base}_clip_min"),
                              numpy_helper.from_array(np.asarray(hi, float_type(cmd.tensor)), f"{base}_clip_max")]
                new_nodes.append(helper.make_node("Clip", [src, f"{base}_clip_min", f"{base}_clip_max"], [clipped], name=fresh(f"{base}/Clip")))
                src = clipped
            qname, dqname = fresh(f"{cmd.tensor}_quantized"), fresh(f"{cmd.tensor}_dequantized")
            new_nodes.append(helper.make_node("QuantizeLinear", [src, f"{base}_scale", f"{base}_zero_point"], [qname], name=fresh(f"{base}/QuantizeLinear"), **_axis_attrs(q)))
            new_nodes.append(helper.make_node("DequantizeLinear", [qname, f"{base}_scale", f"{base}_zero_point"], [dqname], name=fresh(f"{base}/DequantizeLinear"), **_axis_attrs(q)))
            rewire(cmd.consumers, cmd.tensor, dqname)
        else:
            init = inits.get(cmd.initializer)
            if init is None:
                raise PlanConflictError(f"weight '{cmd.initializer}' is not an initializer")
            value = tensor_array(init)  # memory-mapped when the weight is on disk
            ints = q.quantize(value)
            base = fresh(f"{cmd.initializer}_q")
            qname = fresh(f"{cmd.initializer}_quantized")
            if q.dtype in ("int4", "uint4"):
                new_inits.append(numpy_helper.from_array(ints.astype(numpy_dtype(QDTYPE[q.dtype])), qname))  # packed, no Python list
            else:
                new_inits.append(spill(ints, qname) if lazy else numpy_helper.from_array(ints, qname))
            new_inits += _qparam_initializers(base, q, float_type(cmd.initializer))
            dqname = fresh(f"{cmd.initializer}_dequantized")
            new_nodes.append(helper.make_node("DequantizeLinear", [qname, f"{base}_scale", f"{base}_zero_point"], [dqname], name=fresh(f"{base}/DequantizeLinear"), **_axis_attrs(q)))
            rewire(cmd.consumers, cmd.initializer, dqname)

    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    # float weights nobody reads any more go (with their graph.input listing), and the new nodes
    # move before their readers
    return edit.cleanup(out)


#: layers whose float weights ONNX Runtime (>= 1.21, optimizer WeightBiasQuantization) quantizes itself when their
#: activation input comes from a per-tensor DequantizeLinear
RUNTIME_QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm")


def _input_channels(node: onnx.NodeProto, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(axis, size) of the channel axis of ``node``'s activation input, from its weight's ``shape``."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv" and len(shape) >= 3:
        return 1, int(shape[1]) * int(attrs.get("group", 1))
    if node.op_type == "ConvTranspose" and len(shape) >= 3:
        return 1, int(shape[0])
    if node.op_type == "Gemm" and len(shape) == 2:
        k = int(shape[1] if attrs.get("transB", 0) else shape[0])
        return (0 if attrs.get("transA", 0) else 1), k
    return None


def keep_float_layers_float(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Keep the float Conv/ConvTranspose/Gemm layers of a Q/DQ model float in ONNX Runtime.

    ONNX Runtime 1.21 and later quantize, when a session is created, the float weight of a Conv, ConvTranspose or Gemm
    whose input comes from a DequantizeLinear with one scale and whose output reaches a QuantizeLinear (through
    Relu/Clip, since 1.23 or so): to int8, **one scale for the whole tensor**. A layer onnxq left float on purpose (``--exclude``,
    ``-p auto``'s mixed precision) then runs per-tensor int8: on the zoo's MobileNet with its depthwise convs float after
    ``equalize`` (whose per-channel weight scales differ by orders of magnitude) cosine to FP32 fell from 0.9999 to
    0.06. Such a layer gets its own DequantizeLinear of the same integers with the scale repeated along the channel
    axis: the same values, a per-axis form that optimizer leaves alone (it needs a single input scale), and what the
    layer computes is what onnxq wrote. Returns the model (a copy when anything changed) and the guarded layers."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    todo = []
    for node in model.graph.node:
        if node.op_type not in RUNTIME_QUANTIZED_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        if weight.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 2 or dq.input[1] not in inits:
            continue
        scale = tensor_array(inits[dq.input[1]])
        channels = _input_channels(node, tuple(weight.dims))
        if scale.size != 1 or channels is None or channels[1] < 2:
            continue
        todo.append((node.name, dq, scale, channels))
    if not todo:
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = {n.name: n for n in out.graph.node}
    fresh = Namer.of(out).fresh
    for name, dq, scale, (axis, size) in todo:
        node = nodes[name]
        zp = tensor_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in inits else None
        base = fresh(f"{name}_float_input")
        out.graph.initializer.append(numpy_helper.from_array(np.full(size, scale.reshape(()), scale.dtype), f"{base}_scale"))
        ins = [dq.input[0], f"{base}_scale"]
        if zp is not None:
            out.graph.initializer.append(numpy_helper.from_array(np.full(size, zp.reshape(()), zp.dtype), f"{base}_zero_point"))
            ins.append(f"{base}_zero_point")
        guarded = fresh(f"{node.input[0]}_per_axis")
        out.graph.node.append(helper.make_node("DequantizeLinear", ins, [guarded], name=fresh(f"{base}/DequantizeLinear"), axis=axis))
        node.input[0] = guarded
    return edit.cleanup(out), [name for name, *_ in todo]


#: ops ONNX Runtime's QDQ propagation moves a Q/DQ pair across: they move (or, MaxPool, pick) values without changing
#: them, so values on an integer grid stay on it and a Q/DQ pair after them is exact
MOVE_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "MaxPool"})

#: the first opset whose QuantizeLinear has ``output_dtype``
OUTPUT_DTYPE_OPSET = 21


def propagate_across_moves(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Write the Q/DQ pairs ONNX Runtime adds across moves (:data:`MOVE_OPS`) at load into the model itself.

    ONNX Runtime's QDQPropagationTransformer copies a DequantizeLinear forward past a Reshape/Transpose/... and a
    QuantizeLinear backward before one; its QDQS8ToU8Transformer then turns int8 activations into uint8. At opset 21 and
    later the Q it inserted keeps ``output_dtype`` INT8 while its zero point became uint8, and the session fails to
    load ("output_dtype INT8 does not match y_zero_point type UINT8"): a decoder's projection → Reshape → Transpose
    → rotary, written for ``--target ort-s8`` at opset 23. Written here, the pairs leave that pass nothing to insert.
    Both directions are exact: forward, the moved values are already on the grid; backward, only where every reader of
    the move's output is a QuantizeLinear of the same parameters. Returns the model (a copy when anything changed) and
    the pairs added; models below opset 21 are returned as they are.
    """
    if default_opset(model) < OUTPUT_DTYPE_OPSET:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name for t in g.initializer}
    fresh = Namer.of(out).fresh
    added = 0
    changed = True
    while changed:
        changed = False
        producer = {o: n for n in g.node for o in n.output}
        readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in g.node:
            for i in n.input:
                readers[i].append(n)
        for node in list(g.node):
            if node.op_type not in MOVE_OPS or not node.input or len(node.output) != 1:
                continue
            src, dst = producer.get(node.input[0]), node.output[0]
            after = readers.get(dst, [])
            quantized_after = [r for r in after if r.op_type == "QuantizeLinear"]
            if _is_activation_dq(src, producer) and not quantized_after:
                params = list(src.input[1:3])  # forward: the values read are on src's grid
                target = dst
            elif (quantized_after and len(quantized_after) == len(after) and node.input[0] not in inits
                  and (src is None or src.op_type != "DequantizeLinear")
                  and len({tuple(q.input[1:3]) for q in quantized_after}) == 1 and len(quantized_after[0].input) > 2):
                params = list(quantized_after[0].input[1:3])  # backward: only Qs of one grid read the move
                target = node.input[0]
            else:
                continue
            base = fresh(f"{target}_moved")
            q = fresh(f"{base}_quantized")
            if target == dst:  # forward: move → Q → DQ → the move's readers
                node.output[0] = fresh(f"{base}_float")
                q_in, dq_out = node.output[0], dst
            else:  # backward: the move's input → Q → DQ → move
                q_in, dq_out = target, fresh(f"{base}_dequantized")
                node.input[0] = dq_out
            g.node.extend([helper.make_node("QuantizeLinear", [q_in, *params], [q], name=fresh(f"{base}/QuantizeLinear")),
                           helper.make_node("DequantizeLinear", [q, *params], [dq_out], name=fresh(f"{base}/DequantizeLinear"))])
            added += 1
            changed = True
            break  # the maps are stale: start over
    return (edit.cleanup(out), added) if added else (model, 0)


def _is_activation_dq(node: onnx.NodeProto | None, producer: dict[str, onnx.NodeProto]) -> bool:
    """``node`` is a per-tensor DequantizeLinear of an activation (its integers come from a QuantizeLinear)."""
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
        return False
    q = producer.get(node.input[0])
    return q is not None and q.op_type == "QuantizeLinear" and not any(a.name == "axis" for a in node.attribute)


def int32_biases(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Write the float bias of each quantized Conv and Gemm as int32 behind a DequantizeLinear, as ONNX Runtime's kernels add it.

    ``b_q = round(b / (s_x · s_w))`` per output channel, dequantized with scale ``s_x · s_w``: the form ONNX Runtime's
    QDQ fusions match on every version. With a float bias, versions before 1.32 (1.18-1.22 measured) left onnxq's Conv and
    Gemm layers as float kernels between live Q/DQ pairs (0.3x FP32's speed on a small CNN, where ONNX Runtime's own
    quantizer's model, int32 biases, ran 0.5x and fused). 1.32 fuses a float bias too, but its fused kernels and the
    unfused graph then add it differently (a residual MLP's logits 1.2 apart at 8 bits, top-1 10 % apart on a 4-bit grid):
    with the bias written as the integers the kernels add, every optimization level computes the same, so what the checks
    and the searches measure is what deploys. The layers are those :func:`onnxq.graph.bias_range.int32_bias_layers` names.
    A layer is written so when its activation input has one scale, its weight a scale per output channel (or one), and
    its bias is its own float constant (a Gemm with alpha and beta 1). The steps were widened beforehand where a bias
    would not fit (:mod:`onnxq.graph.bias_range`). Returns the model (a copy when anything changed) and the layers.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    readers = reader_counts(model)
    todo = []
    for node in model.graph.node:
        slot = int32_bias_slot(node, inits, readers)
        if slot is None:
            continue
        bias, out_axis = slot
        dq_x, dq_w = producers.get(node.input[0]), producers.get(node.input[1])
        if any(d is None or d.op_type != "DequantizeLinear" or len(d.input) < 2 or d.input[1] not in inits for d in (dq_x, dq_w)):
            continue
        s_x = tensor_array(inits[dq_x.input[1]])
        s_w = tensor_array(inits[dq_w.input[1]]).reshape(-1)
        w_axis = next((a.i for a in dq_w.attribute if a.name == "axis"), 1)
        channels = int(bias.dims[0])
        if s_x.size != 1 or not (s_w.size == 1 or (s_w.size == channels and w_axis % max(1, len(inits[dq_w.input[0]].dims)) == out_axis)):
            continue
        todo.append((node.name, bias_step(s_x, s_w)))
    if not todo:
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = {n.name: n for n in out.graph.node}
    out_inits = {t.name: t for t in out.graph.initializer}
    fresh = Namer.of(out).fresh
    for name, step in todo:
        node = nodes[name]
        q = quantize_bias(tensor_array(out_inits[node.input[2]]), step)
        base = fresh(node.input[2])  # named after the float bias it replaces
        zero = np.zeros(step.shape, np.int32)
        out.graph.initializer.extend([numpy_helper.from_array(q, f"{base}_quantized"),
                                      numpy_helper.from_array(step.astype(np.float32), f"{base}_scale"),
                                      numpy_helper.from_array(zero, f"{base}_zero_point")])
        deq = fresh(f"{base}_dequantized")
        out.graph.node.append(helper.make_node("DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
                                               [deq], name=fresh(f"{base}/DequantizeLinear"), axis=0))
        node.input[2] = deq
    return edit.cleanup(out), [name for name, _ in todo]
