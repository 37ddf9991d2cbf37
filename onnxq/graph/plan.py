"""The quantization plan: which tensors get quantized, how, and why.

Placement builds a :class:`QuantPlan` from the graph and the target profile; methods fill in
ranges and qparams; the QDQ transformer turns the finished plan into rewrite commands.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxq.graph.targets import TargetProfile
from onnxq.qparams import QParams


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
