"""The FP32 model's BatchNorm running statistics, mapped onto the working (folded) model.

onnxq folds BatchNorm into the conv before it by default, so the working model has no BatchNorm
nodes; the host keeps the model as loaded on ``RunContext.float_model``. For each BatchNorm there:

* folded: its output tensor is now the conv's output ``y = γ(x − μ)/√(σ² + ε) + β``, so the
  pre-BatchNorm value the running statistics describe is ``x = (y − β)·√(σ² + ε)/γ + μ``;
* not folded (a BatchNorm after an Add, or ``--no-fold``): its input tensor is ``x`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper


@dataclass
class BNStat:
    """Running mean/std of one BatchNorm's input channels, read from tensor ``tensor`` of the working
    model through ``x = (y − shift)·gain + offset`` (per channel, axis 1)."""

    name: str
    tensor: str
    mean: np.ndarray
    std: np.ndarray
    gain: np.ndarray
    shift: np.ndarray
    offset: np.ndarray


def _consts(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def batchnorm_stats(float_model: onnx.ModelProto | None, work: onnx.ModelProto) -> dict[str, BNStat]:
    """BatchNorm statistics by working-model tensor (empty without a float model or BatchNorm)."""
    if float_model is None:
        return {}
    consts = _consts(float_model)
    produced = {o for n in work.graph.node for o in n.output}
    work_bn = {n.output[0]: n for n in work.graph.node if n.op_type == "BatchNormalization"}
    out: dict[str, BNStat] = {}
    for n in float_model.graph.node:
        if n.op_type != "BatchNormalization" or len(n.input) < 5 or any(i not in consts for i in n.input[1:5]):
            continue
        gamma, beta, mu, var = (np.asarray(consts[i], np.float64).reshape(-1) for i in n.input[1:5])
        eps = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "epsilon"), 1e-5)
        std = np.sqrt(np.maximum(var, 0.0))
        y = n.output[0]
        if y in work_bn:  # left unfolded: the statistics describe its input directly
            t = work_bn[y].input[0]
            one, zero = np.ones_like(mu), np.zeros_like(mu)
            out[t] = BNStat(n.name, t, mu, std, one, zero, zero)
        elif y in produced and np.all(gamma != 0):
            out[y] = BNStat(n.name, y, mu, std, np.sqrt(var + eps) / gamma, beta, mu)
    return out
