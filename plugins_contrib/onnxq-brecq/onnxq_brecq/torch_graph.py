"""Run a block of ONNX nodes in PyTorch, with AdaRound weights and fake-quantized activations.

A small converter (plugins_contrib/onnxq-brecq/README.md): enough ops for CNNs and MLPs exported from PyTorch
(Conv, Gemm, MatMul, element-wise arithmetic, Relu/Clip/LeakyRelu/Sigmoid/Tanh, pooling,
Flatten/Reshape/Transpose/Concat/Squeeze/Unsqueeze, BatchNormalization). Anything else raises
:class:`Unsupported`, and the method falls back to per-layer reconstruction, then to nearest
rounding, for the layers concerned.

Activation fake quantization uses the plan's fixed qparams with a straight-through gradient
(round half to even, as ONNX QuantizeLinear), applied on exactly the consumer edges where the
deployed graph has Q/DQ.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper
from onnxq.qparams import QParams

from onnxq_brecq.grid import broadcast_steps

ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch (AdaRound)


class Unsupported(Exception):
    """The block holds an op (or attribute) the converter does not handle."""


class AdaRoundWeight(torch.nn.Module):
    """``W̃ = Δ·clamp(⌊W/Δ⌋ + h(V), qmin, qmax)`` with ``h(V) = clamp(σ(V)(ζ−γ)+γ, 0, 1)``."""

    def __init__(self, w: np.ndarray, q: QParams) -> None:
        super().__init__()
        step = broadcast_steps(q, w.ndim).astype(np.float32)
        scaled = np.asarray(w, np.float32) / step
        floor = np.floor(scaled)
        rest = np.clip(scaled - floor, 1e-4, 1 - 1e-4)  # h(V) = fractional part at the start
        v0 = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)
        self.register_buffer("step", torch.from_numpy(step))
        self.register_buffer("floor", torch.from_numpy(floor.astype(np.float32)))
        self.register_buffer("nearest", torch.from_numpy(np.rint(scaled).astype(np.float32)))
        self.v = torch.nn.Parameter(torch.from_numpy(v0.astype(np.float32)))
        self.qmin, self.qmax = q.qmin, q.qmax
        #: "soft" while learning, "hard" (V ≥ 0 rounds up) or "nearest" (round half to even) to evaluate
        self.mode = "soft"
        #: the plan's weight-site key this variable belongs to (set by the reconstructor)
        self.site = ""

    def h(self) -> torch.Tensor:
        if self.mode == "hard":
            return (self.v >= 0).to(self.v.dtype)
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def forward(self) -> torch.Tensor:
        if self.mode == "nearest":
            return self.step * torch.clamp(self.nearest, self.qmin, self.qmax)
        return self.step * torch.clamp(self.floor + self.h(), self.qmin, self.qmax)

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()

    def integers(self, mode: str = "hard") -> np.ndarray:
        """Integers inside ``[qmin, qmax]``: hardened (``V ≥ 0`` rounds up) or round-to-nearest."""
        with torch.no_grad():
            base = self.nearest if mode == "nearest" else self.floor + (self.v >= 0).float()
            q = torch.clamp(base, self.qmin, self.qmax)
        return q.numpy().astype(np.int64)


def fake_quant(x: torch.Tensor, q: QParams) -> torch.Tensor:
    """Straight-through fake quantization with the deployed grid (per-tensor activation qparams)."""
    s = float(np.asarray(q.scale).reshape(-1)[0])
    z = float(np.asarray(q.zero_point).reshape(-1)[0])
    y = (torch.clamp(torch.round(x / s) + z, q.qmin, q.qmax) - z) * s
    return x + (y - x).detach()


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pads(pads: list[int], spatial: int) -> tuple[list[int] | None, list[int]]:
    """(torch symmetric padding or None, explicit F.pad list) from ONNX begin/end pads."""
    if not pads:
        return [0] * spatial, []
    begin, end = pads[:spatial], pads[spatial:]
    if begin == end:
        return list(begin), []
    flat: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return None, flat


def _check_auto_pad(a: dict) -> None:
    ap = a.get("auto_pad", b"NOTSET")
    ap = ap.decode() if isinstance(ap, bytes) else ap
    if ap not in ("NOTSET", "VALID"):
        raise Unsupported(f"auto_pad={ap}")


def _conv(x, w, b, a):
    _check_auto_pad(a)
    spatial = w.dim() - 2
    sym, explicit = _pads(list(a.get("pads", [])), spatial)
    if explicit:
        x = F.pad(x, explicit)
        sym = [0] * spatial
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(spatial)
    if fn is None:
        raise Unsupported("Conv rank")
    return fn(x, w, b, stride=a.get("strides", 1), padding=sym, dilation=a.get("dilations", 1), groups=a.get("group", 1))


def _gemm(x, w, b, a):
    if a.get("transA", 0):
        x = x.t()
    if a.get("transB", 0):
        w = w.t()
    y = a.get("alpha", 1.0) * (x @ w)
    if b is not None:
        y = y + a.get("beta", 1.0) * b
    return y


def _pool(x, a, kind):
    _check_auto_pad(a)
    k = list(a["kernel_shape"])
    spatial = len(k)
    sym, explicit = _pads(list(a.get("pads", [])), spatial)
    if explicit:
        x = F.pad(x, explicit, value=-math.inf if kind == "max" else 0.0)
        sym = [0] * spatial
    strides = list(a.get("strides", [1] * spatial))
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "max":
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
        return fn(x, k, strides, sym, dilation=list(a.get("dilations", [1] * spatial)), ceil_mode=ceil)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    return fn(x, k, strides, sym, ceil_mode=ceil, count_include_pad=bool(a.get("count_include_pad", 0)))


def _flatten(x, axis):
    axis = axis % x.dim() if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis])) if axis else 1, -1)


def _reshape(x, shape, a):
    dims = [int(d) for d in shape.tolist()]
    if not a.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _axes(node_inputs, a, ins):
    if len(ins) > 1 and ins[1] is not None:
        return [int(v) for v in ins[1].tolist()]
    return list(a.get("axes", []))


def _unsqueeze(x, axes):
    for ax in sorted(a % (x.dim() + len(axes)) for a in axes):
        x = x.unsqueeze(ax)
    return x


def _clip(ins, a):
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else a.get("min")
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else a.get("max")
    lo = float(lo) if lo is not None else None
    hi = float(hi) if hi is not None else None
    return torch.clamp(ins[0], lo, hi)


def _bn(ins, a):
    x, scale, bias, mean, var = ins[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))


OPS: dict[str, Callable] = {
    "Conv": lambda ins, a: _conv(ins[0], ins[1], ins[2] if len(ins) > 2 else None, a),
    "Gemm": lambda ins, a: _gemm(ins[0], ins[1], ins[2] if len(ins) > 2 else None, a),
    "MatMul": lambda ins, a: torch.matmul(ins[0], ins[1]),
    "Add": lambda ins, a: ins[0] + ins[1],
    "Sub": lambda ins, a: ins[0] - ins[1],
    "Mul": lambda ins, a: ins[0] * ins[1],
    "Div": lambda ins, a: ins[0] / ins[1],
    "Relu": lambda ins, a: F.relu(ins[0]),
    "LeakyRelu": lambda ins, a: F.leaky_relu(ins[0], a.get("alpha", 0.01)),
    "Sigmoid": lambda ins, a: torch.sigmoid(ins[0]),
    "Tanh": lambda ins, a: torch.tanh(ins[0]),
    "Clip": _clip,
    "Identity": lambda ins, a: ins[0],
    "MaxPool": lambda ins, a: _pool(ins[0], a, "max"),
    "AveragePool": lambda ins, a: _pool(ins[0], a, "avg"),
    "GlobalAveragePool": lambda ins, a: ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda ins, a: ins[0].amax(dim=tuple(range(2, ins[0].dim())), keepdim=True),
    "Flatten": lambda ins, a: _flatten(ins[0], a.get("axis", 1)),
    "Reshape": lambda ins, a: _reshape(ins[0], ins[1], a),
    "Transpose": lambda ins, a: ins[0].permute(*(a.get("perm") or list(reversed(range(ins[0].dim()))))),
    "Concat": lambda ins, a: torch.cat([t for t in ins if t is not None], dim=a["axis"]),
    "Squeeze": lambda ins, a: ins[0].squeeze(tuple(_axes(None, a, ins))) if _axes(None, a, ins) else ins[0].squeeze(),
    "Unsqueeze": lambda ins, a: _unsqueeze(ins[0], _axes(None, a, ins)),
    "BatchNormalization": _bn,
    "Softmax": lambda ins, a: torch.softmax(ins[0], dim=a.get("axis", -1)),
}


class TorchBlock(torch.nn.Module):
    """A block of ONNX nodes as a torch module.

    ``rounding`` maps ``(node name, input index)`` to the :class:`AdaRoundWeight` feeding it;
    ``fixed_weights`` maps the same key to a fixed (already quantized) float tensor;
    ``act_quant`` maps ``(node name, input index)`` to the activation qparams of that edge.
    """

    def __init__(self, nodes: list[onnx.NodeProto], consts: dict[str, np.ndarray], rounding: dict[tuple[str, int], AdaRoundWeight],
                 fixed_weights: dict[tuple[str, int], np.ndarray], act_quant: dict[tuple[str, int], QParams], outputs: list[str]) -> None:
        super().__init__()
        for n in nodes:
            if n.op_type not in OPS:
                raise Unsupported(f"op {n.op_type} ('{n.name}')")
        self.nodes = nodes
        self.attrs = [_attrs(n) for n in nodes]
        self.consts = {k: torch.from_numpy(np.array(v)) for k, v in consts.items() if any(k in n.input for n in nodes)}
        self.fixed = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in fixed_weights.items()}
        self._round_keys = {k: f"w{j}" for j, k in enumerate(rounding)}  # module names may not hold '.'
        self.rounding = torch.nn.ModuleDict({self._round_keys[k]: m for k, m in rounding.items()})
        self.act_quant = act_quant
        self.outputs = outputs

    def forward(self, inputs: dict[str, torch.Tensor], quantize_activations: bool = True) -> list[torch.Tensor]:
        values: dict[str, torch.Tensor] = dict(inputs)
        for node, a in zip(self.nodes, self.attrs):
            ins: list[torch.Tensor | None] = []
            for i, name in enumerate(node.input):
                if not name:
                    ins.append(None)
                    continue
                key = (node.name, i)
                if key in self._round_keys:
                    v = self.rounding[self._round_keys[key]]()
                elif key in self.fixed:
                    v = self.fixed[key]
                elif name in values:
                    v = values[name]
                elif name in self.consts:
                    v = self.consts[name]
                else:
                    raise Unsupported(f"input '{name}' of '{node.name}' is not available inside the block")
                q = self.act_quant.get(key)
                if q is not None and quantize_activations and v.is_floating_point():
                    v = fake_quant(v, q)
                ins.append(v)
            try:
                out = OPS[node.op_type](ins, a)
            except (KeyError, TypeError, RuntimeError) as exc:
                raise Unsupported(f"{node.op_type} '{node.name}': {type(exc).__name__}: {exc}") from exc
            values[node.output[0]] = out
        return [values[o] for o in self.outputs]
