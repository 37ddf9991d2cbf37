"""The quantization plan: which tensors get quantized, how, and why.

Placement builds a :class:`QuantPlan` from the graph and the target profile; methods fill in
ranges and qparams; the QDQ transformer turns the finished plan into rewrite commands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from onnxq.graph.targets import TargetProfile
from onnxq.qparams import QParams

if TYPE_CHECKING:
    import onnx


@dataclass
class ActivationSite:
    """A float activation tensor that gets one Q/DQ pair (shared by the listed consumers)."""

    tensor: str
    consumers: list[tuple[str, int]]
    reason: str
    #: calibrated real range (after clipping); set by the calibrating method
    range: tuple[float, float] | None = None
    qparams: QParams | None = None


@dataclass
class WeightSite:
    """A constant weight replaced by integers + DequantizeLinear."""

    initializer: str
    node: str
    input_index: int
    axis: int | None
    qparams: QParams | None = None
    #: other layers that read the same weight on the same axis (a module called twice), ``(node, input index)``: they
    #: read the same DequantizeLinear
    shared_with: list[tuple[str, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Layer:
    """A weighted op (Conv/ConvTranspose/Gemm/MatMul) with its tensors, for reports and searches."""

    node: str
    op_type: str
    inputs: tuple[str, ...]  # activation inputs (quantized sites)
    weight: str | None
    output: str
    #: tensor compared by layer-wise objectives: the output after a sole following Relu/Clip
    objective: str


@dataclass
class QuantPlan:
    """Everything the QDQ rewrite needs, plus what was left in float and why."""

    profile: TargetProfile
    activations: dict[str, ActivationSite] = field(default_factory=dict)
    weights: dict[str, WeightSite] = field(default_factory=dict)
    share_groups: list[list[str]] = field(default_factory=list)
    layers: list[Layer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add_activation(self, tensor: str, consumers: list[tuple[str, int]], reason: str) -> None:
        site = self.activations.get(tensor)
        if site is None:
            self.activations[tensor] = ActivationSite(tensor, list(consumers), reason)
        else:
            for c in consumers:
                if c not in site.consumers:
                    site.consumers.append(c)

    def missing_qparams(self) -> list[str]:
        """Names of sites that still have no qparams."""
        out = [t for t, s in self.activations.items() if s.qparams is None]
        out += [w for w, s in self.weights.items() if s.qparams is None]
        return out


@dataclass(frozen=True)
class MatMulWeight:
    """A ``MatMul`` whose second input is a 2-D constant weight that no other node reads."""

    node: str  #: the MatMul node
    input: str  #: its activation input
    weight: str  #: the weight initializer


def sole_matmul_weights(model: "onnx.ModelProto", plan: QuantPlan) -> list[MatMulWeight]:
    """The plan's MatMul weight sites (so ``--exclude`` and the target's placement apply) whose
    weight is a 2-D initializer read by that MatMul alone: the ones a method may replace by another
    subgraph (low-rank factors, a sum of dequantized parts) without touching other readers."""
    from collections import Counter

    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    reads = Counter(i for n in model.graph.node for i in n.input)
    out = []
    for site in plan.weights.values():
        n, t = nodes.get(site.node), inits.get(site.initializer)
        if n is None or t is None or n.op_type != "MatMul" or site.input_index != 1:
            continue
        if len(t.dims) == 2 and reads[site.initializer] == 1:
            out.append(MatMulWeight(n.name, n.input[0], site.initializer))
    return out
