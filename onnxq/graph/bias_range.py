"""Activation steps large enough for an int32 bias.

A quantized Conv or Gemm on ONNX Runtime adds its bias in the int32 accumulator: the float bias
becomes ``round(b / (s_x · s_w))`` (ONNX Runtime's own QDQ fusion does this to a float bias; onnxq
does it itself where the target asks for an int32 bias DequantizeLinear). An activation that is
nearly zero on the calibration data (a dead branch, a layer of an untrained or pruned model) gets a
step of 1e-9 or less, and then a bias of order one is billions of steps: it overflows int32 and the
layer computes something else entirely, in the runtime only (the checks' unfused sessions show
nothing at that layer). A conv whose input's step was 7e-8 and whose biases were of order one kept
cosine 0.73 to FP32 on ``--target ort`` (0.99998 with the step widened to 2e-7) and 1.0 on
``--target trt``, whose bias stays float.

:func:`raise_steps_for_bias` widens such an input's step to the smallest that keeps every bias of
the layers reading it within :data:`BIAS_LIMIT`, half of int32's range so that the products summed
beside it cannot overflow either. The activation is nearly zero, so the wider step costs it nothing
that matters next to the bias.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx

from onnxq.graph.index import GraphIndex, node_attr
from onnxq.graph.plan import QuantPlan

__all__ = ["BIAS_LIMIT", "Int32Bias", "bias_step", "int32_bias_layers", "int32_bias_slot", "quantize_bias", "raise_steps_for_bias",
           "reader_counts"]

#: the largest integer bias onnxq lets a layer have: 2^30, half of int32's range (the accumulator adds the products to it)
BIAS_LIMIT = float(2**30)


def raise_steps_for_bias(model: onnx.ModelProto, plan: QuantPlan) -> list[tuple[str, float, float]]:
    """Widen the step of every activation whose readers' biases would not fit :data:`BIAS_LIMIT` steps.

    Returns ``(activation, old step, new step)`` for each step widened (the plan's qparams are
    replaced; the zero point is kept, so the grid still covers the calibrated range).
    """
    idx = GraphIndex(model)
    need: dict[str, float] = {}
    for layer in plan.layers:
        node = idx.nodes.get(layer.node)
        if node is None or node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        bias = idx.constant_value(node.input[2])
        weight = plan.weights.get(layer.weight) if layer.weight else None
        act = plan.activations.get(node.input[0])
        if bias is None or weight is None or weight.qparams is None or act is None or act.qparams is None:
            continue
        b = np.abs(np.asarray(bias, np.float64)).reshape(-1) * abs(float(node_attr(node, "beta", 1.0)))
        sw = np.asarray(weight.qparams.scale, np.float64).reshape(-1)
        act_step = float(np.max(act.qparams.scale))
        if sw.size == b.size and b.size > 1 and float((b / sw).max()) > act_step * BIAS_LIMIT:  # weights read only then
            live = _widen_dead_channels(idx, weight, b, act_step)
            b, sw = b[live], np.asarray(weight.qparams.scale, np.float64).reshape(-1)[live]
        # per output channel where the weight's steps are; else the finest step bounds every channel
        per = b / sw if sw.size == b.size else b / float(sw.min()) if b.size else np.zeros(0)
        if per.size:
            need[act.tensor] = max(need.get(act.tensor, 0.0), float(per.max()) / BIAS_LIMIT)
    raised = []
    for tensor, step in need.items():
        site = plan.activations[tensor]
        old = float(np.max(site.qparams.scale))
        if step > old:
            site.qparams = replace(site.qparams, scale=np.full_like(site.qparams.scale, step, dtype=np.float32))
            raised.append((tensor, old, step))
    return raised


#: a channel whose largest weight is this much smaller than its layer's largest counts as zero for the bias rule
DEAD_CHANNEL_RATIO = 1e-4


def _widen_dead_channels(idx: GraphIndex, weight, bias: np.ndarray, act_step: float) -> np.ndarray:
    """Give each output channel whose weights are (nearly) zero a weight step its bias fits; returns the other channels.

    Such a channel (pruned, or scaled to nearly nothing by a folded BatchNorm) has the finest step there is, so its bias
    alone set the input's step: PP-OCRv5's text detector had such channels (weights of order 1e-7) in 14 convs, one
    input's step went 700x wider and the text mask's IoU with FP32 fell to 0.015 (0.871 on `--target trt`, whose biases
    stay float; 0.855 with this rule). Its weights count for nothing beside its bias at any step, so its own step is
    widened instead, to the smallest that keeps its bias within :data:`BIAS_LIMIT` steps of the input's step as it
    stands (widening that step later only makes the bias smaller in steps).
    """
    q = weight.qparams
    w = idx.constant_value(weight.initializer)
    live = np.ones(bias.size, bool)
    if w is None or q.axis is None:
        return live
    steps = np.asarray(q.scale, np.float64).reshape(-1)
    rows = np.moveaxis(np.asarray(w), q.axis, 0).reshape(steps.size, -1)
    # all of it rounds to zero, or it is 10^4 times smaller than the layer's largest channel (a BatchNorm scale near
    # zero folded in: PP-OCRv5's channels held weights of order 1e-7 beside channels of order 0.1)
    absmax = np.abs(rows).max(1) if rows.shape[1] else np.zeros(steps.size)
    dead = (absmax < steps / 2) | (absmax < DEAD_CHANNEL_RATIO * float(absmax.max(initial=0.0)))
    if not dead.any():
        return live
    wanted = np.where(dead, np.maximum(steps, bias / max(act_step, 1e-30) / BIAS_LIMIT), steps).astype(np.float32)
    extra = {} if q.quant_scale is None else {"quant_scale": np.where(dead, wanted, np.asarray(q.quant_scale).reshape(-1)).astype(np.float32).reshape(np.shape(q.quant_scale))}
    weight.qparams = replace(q, scale=wanted.reshape(np.shape(q.scale)), **extra)
    return ~dead


@dataclass(frozen=True)
class Int32Bias:
    """A layer whose float bias a target that adds biases in int32 writes as integers (:func:`int32_bias_layers`)."""

    node: str
    bias: str  # the float bias initializer
    activation: str  # the quantized input 0, whose step times the weight's is the bias's step
    weight: str  # the plan's weight key


def bias_step(activation_scale: np.ndarray, weight_scale: np.ndarray) -> np.ndarray:
    """The int32 bias's step ``s_x · s_w`` in float32, as the runtime forms its accumulator's scale: one value for a
    per-tensor weight, one per output channel for a per-channel one."""
    step = np.float32(np.asarray(activation_scale, np.float32).reshape(())) * np.asarray(weight_scale, np.float32).reshape(-1)
    return step.astype(np.float32).reshape(()) if step.size == 1 else step.astype(np.float32)


def quantize_bias(bias: np.ndarray, step: np.ndarray) -> np.ndarray:
    """``round(b / step)`` as int32 (saturated; :func:`raise_steps_for_bias` keeps it within :data:`BIAS_LIMIT`)."""
    q = np.rint(np.asarray(bias, np.float64) / np.asarray(step, np.float64))
    return np.clip(q, -(2**31), 2**31 - 1).astype(np.int32)


def int32_bias_layers(model: onnx.ModelProto, plan: QuantPlan) -> list[Int32Bias]:
    """The layers of ``plan`` whose bias an int32-bias target writes as ``DequantizeLinear(int32, s_x · s_w)``.

    The same layers :func:`onnxq.graph.qdq.int32_biases` finds in the written graph, found in the float model and
    its plan, for searches that emulate the deployed model (onnxq-lapq's loss model): a Conv or a Gemm (alpha and
    beta 1, A not transposed) whose bias is a 1-D float initializer read by it alone, whose input 0 is a quantized
    activation and whose weight is quantized per tensor or along its output channels.
    """
    idx = GraphIndex(model)
    inits = {t.name: t for t in model.graph.initializer}
    readers = reader_counts(model)
    found = []
    for layer in plan.layers:
        node = idx.nodes.get(layer.node)
        slot = int32_bias_slot(node, inits, readers) if node is not None else None
        weight = plan.weights.get(layer.weight) if layer.weight else None
        act = plan.activations.get(node.input[0]) if node is not None else None
        if slot is None or weight is None or weight.qparams is None or weight.input_index != 1 or act is None or act.qparams is None:
            continue
        bias, out_axis = slot
        per_tensor = np.asarray(weight.qparams.scale).size == 1 and weight.qparams.axis is None
        if np.asarray(act.qparams.scale).size == 1 and (per_tensor or weight.qparams.axis == out_axis):
            found.append(Int32Bias(node.name, bias.name, act.tensor, layer.weight))
    return found


def reader_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many node inputs read each tensor."""
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    return readers


def int32_bias_slot(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto], readers: Mapping[str, int]) -> tuple[onnx.TensorProto, int] | None:
    """The bias a target adding biases in int32 writes as integers, and the axis of the weight's output channels; None
    where the node has none such: a Conv or a Gemm (alpha and beta 1, A not transposed) whose bias is a 1-D float
    initializer it alone reads. What the activation and weight steps must be is its callers' to check, on the plan
    (:func:`int32_bias_layers`) or on the written graph (:func:`onnxq.graph.qdq.int32_biases`)."""
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
        return None
    bias = inits[node.input[2]]
    if readers.get(bias.name) != 1 or bias.data_type != onnx.TensorProto.FLOAT or len(bias.dims) != 1:
        return None
    if node.op_type == "Gemm" and (node_attr(node, "alpha", 1.0) != 1.0 or node_attr(node, "beta", 1.0) != 1.0 or node_attr(node, "transA", 0)):
        return None
    return bias, 0 if node.op_type == "Conv" or node_attr(node, "transB", 0) else 1
