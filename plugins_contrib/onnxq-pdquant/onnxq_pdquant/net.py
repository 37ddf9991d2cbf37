"""A run of ONNX nodes as a torch module with learnable activation steps (plugins_contrib/onnxq-pdquant/README.md).

The op converters are onnxq-brecq's public table (``onnxq_brecq.torch_graph.OPS``) plus the few
ops MobileNet-style exports add (HardSwish, HardSigmoid, ReduceMean, Cast), kept in this package's
own table so onnxq-brecq is not changed. Unlike onnxq-brecq's ``TorchBlock``, activation fake
quantization has a learnable step (LSQ-style, straight-through rounding, the zero point fixed), one
step per activation tensor shared by all the edges that read it, as the deployed QDQ graph shares it.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper
from onnxq.qparams import QParams
from onnxq_brecq.torch_graph import OPS, AdaRoundWeight, Unsupported

_CAST = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 11: torch.float64}


def _reduce_mean(ins, a):
    axes = [int(v) for v in ins[1].tolist()] if len(ins) > 1 and ins[1] is not None else list(a.get("axes", []))
    x = ins[0]
    axes = axes or list(range(x.dim()))
    return x.mean(dim=tuple(axes), keepdim=bool(a.get("keepdims", 1)))


def _cast(ins, a):
    to = _CAST.get(int(a["to"]))
    if to is None:
        raise Unsupported(f"Cast to {a['to']}")
    return ins[0].to(to)


#: onnxq-brecq's converters plus the ops of MobileNetV3-style graphs
PD_OPS = {
    **OPS,
    "HardSwish": lambda ins, a: F.hardswish(ins[0]),
    "HardSigmoid": lambda ins, a: torch.clamp(ins[0] * a.get("alpha", 0.2) + a.get("beta", 0.5), 0.0, 1.0),
    "ReduceMean": _reduce_mean,
    "Cast": _cast,
}


class ActStep(torch.nn.Module):
    """Fake quantization of one activation tensor with a learnable step ``s = s0·exp(u)``.

    ``y = s·(clamp(round(x/s) + z, qmin, qmax) − z)``, round straight-through, so the step gets
    LSQ's gradient; the zero point ``z`` and the integer range stay those of the plan. With
    ``prob < 1`` (QDrop, set only while learning) each element is quantized with probability ``prob``
    and passed through in float otherwise.
    """

    def __init__(self, q: QParams) -> None:
        super().__init__()
        self.s0 = float(np.asarray(q.scale).reshape(-1)[0])
        self.z = float(np.asarray(q.zero_point).reshape(-1)[0])
        self.q = q
        self.u = torch.nn.Parameter(torch.zeros(()))
        self.prob = 1.0

    def step(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.step()
        v = x / s
        v = v + (torch.round(v) - v).detach()
        y = s * (torch.clamp(v + self.z, self.q.qmin, self.q.qmax) - self.z)
        return y if self.prob >= 1.0 else torch.where(torch.rand_like(x) < self.prob, y, x)

    def qparams(self) -> QParams:
        """The plan's qparams with the learned step."""
        scale = np.asarray(float(self.step().detach()), np.float32).reshape(np.asarray(self.q.scale).shape)
        return QParams(scale, self.q.zero_point, self.q.dtype, self.q.qmin, self.q.qmax, self.q.axis)


class Net(torch.nn.Module):
    """Nodes in topological order; ``weights`` maps ``(node, input index)`` to an AdaRound variable
    or a fixed float tensor, ``acts`` maps ``(node, input index)`` to the :class:`ActStep` of that edge."""

    def __init__(self, nodes: list[onnx.NodeProto], consts: dict[str, np.ndarray], outputs: list[str],
                 rounding: dict[tuple[str, int], AdaRoundWeight] | None = None, fixed: dict[tuple[str, int], np.ndarray] | None = None,
                 acts: dict[tuple[str, int], ActStep] | None = None) -> None:
        super().__init__()
        for n in nodes:
            if n.op_type not in PD_OPS:
                raise Unsupported(f"op {n.op_type} ('{n.name}')")
        self.nodes = nodes
        self.attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
        read = {i for n in nodes for i in n.input}
        self.consts = {k: torch.from_numpy(np.array(v)) for k, v in consts.items() if k in read}
        self.rounding = rounding or {}
        self.fixed = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in (fixed or {}).items()}
        self.acts = acts or {}
        self.outputs = outputs
        self.quantize = True  # False: the same nodes in float (weights as given, no activation quantization)

    def forward(self, inputs: dict[str, torch.Tensor], keep: set[str] | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """The outputs, and the values of the tensors named in ``keep`` (for the BatchNorm statistics)."""
        values: dict[str, torch.Tensor] = dict(inputs)
        for node, a in zip(self.nodes, self.attrs):
            ins: list[torch.Tensor | None] = []
            for i, name in enumerate(node.input):
                if not name:
                    ins.append(None)
                    continue
                key = (node.name, i)
                if key in self.rounding and self.quantize:
                    v = self.rounding[key]()
                elif key in self.fixed and self.quantize:
                    v = self.fixed[key]
                elif name in values:
                    v = values[name]
                elif name in self.consts:
                    v = self.consts[name]
                else:
                    raise Unsupported(f"input '{name}' of '{node.name}' is not available")
                step = self.acts.get(key)
                if step is not None and self.quantize and v.is_floating_point():
                    v = step(v)
                ins.append(v)
            try:
                out = PD_OPS[node.op_type](ins, a)
            except (KeyError, TypeError, RuntimeError) as exc:
                raise Unsupported(f"{node.op_type} '{node.name}': {type(exc).__name__}: {exc}") from exc
            values[node.output[0]] = out
        kept = {k: values[k] for k in (keep or ()) if k in values}
        return [values[o] for o in self.outputs], kept
