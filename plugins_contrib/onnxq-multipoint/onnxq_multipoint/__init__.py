"""``multipoint``: multipoint quantization of weights under a byte budget (Liu, Ye, Zhou, Liu,
arXiv 2002.09049; plugins_contrib/onnxq-multipoint/README.md).

Every weight channel (output channel of a Conv, output column of a MatMul/Gemm) gets one low-bit
point, ``a_1 · q_1``; chosen channels get more, ``a_2 · q_2 + ...`` fitted greedily to the residual.
Which channels get the extra points is decided by their output-error reduction per added byte
until the budget (``-o budget 0.1``: +10 % of the weights' bytes at ``weight_bits``) is spent; the
error is the layer-output error under a diagonal approximation of the input's second moment
(per-input-channel mean and variance from the statistics pass: ``Σ var e² + (Σ μ e)²``), compared across layers relative to each
layer's output energy. The first point is ordinary per-channel (or, with ``--bits 4``, block-wise)
quantization and goes through onnxq's plan; the extra points are written after the QDQ rewrite as
``DequantizeLinear`` of the chosen channels' integers, placed back at their channels with
``Concat``/``Gather`` and added to the first point's ``DequantizeLinear``: standard ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.calib.statistics import Reducer, StatRequest, TensorStats
from onnxq.errors import OptionError
from onnxq.graph import edit
from onnxq.graph.edit import QDTYPE, Namer, numpy_dtype
from onnxq.hookspecs import hookimpl
from onnxq.method import QuantMethod, RunContext
from onnxq.options import option
from onnxq.qparams import QParams, int_range

from onnxq_multipoint.allocate import LayerPoints, allocate
from onnxq_multipoint.points import greedy_points, output_error

__version__ = "0.1.0"


@dataclass(frozen=True)
class ChannelMoments(Reducer):
    """Mean and variance per channel along ``axis`` (1: ``[N, C, ...]``; -1: ``[..., C]``).
    Result: float64 ``[2, C]`` (mean, variance)."""

    axis: int = -1
    kind: ClassVar[str] = "channel_moments"
    cacheable: ClassVar[bool] = True

    def start(self) -> Any:
        return None

    def update(self, acc: Any, values: np.ndarray, stats: TensorStats | None) -> Any:
        v = np.moveaxis(np.asarray(values, np.float64), self.axis, -1)
        v = v.reshape(-1, v.shape[-1])
        s1, s2, n = np.sum(v, axis=0), np.sum(v * v, axis=0), v.shape[0]
        return (s1, s2, n) if acc is None else (acc[0] + s1, acc[1] + s2, acc[2] + n)

    def finish(self, acc: Any) -> np.ndarray:
        if acc is None:
            return np.zeros((2, 0))
        n = max(acc[2], 1)
        mean = acc[0] / n
        return np.stack([mean, np.maximum(acc[1] / n - mean * mean, 0.0)])


@dataclass(frozen=True)
class MultipointOptions:
    """Options of multipoint quantization."""

    weight_bits: int | None = option(None, "bits of every point, 2-8 (default: the target's --bits); below 8 the integers live in int8 with a narrowed range, at --bits 4 in int4 blocks")
    budget: float = option(0.10, "extra weight bytes for the additional points, as a fraction of the weights' bytes at weight_bits (0: one point everywhere)")
    max_points: int = option(3, "most points one channel may get")
    first: Literal["grid", "max"] = option("grid", "first point: grid = the step minimising the channel's output error; max = plain max-abs rounding")
    grid: int = option(100, "step candidates of the 1-D search per point")

    def validate(self) -> None:
        if self.weight_bits is not None and not 2 <= self.weight_bits <= 8:
            raise ValueError("weight_bits must be between 2 and 8")
        if self.budget < 0 or self.max_points < 1 or self.grid < 2:
            raise ValueError("need budget >= 0, max_points >= 1 and grid >= 2")


@dataclass
class _Weight:
    """One weight initializer's points, in the channel-rows layout ``[channels, length]``."""

    initializer: str
    shape: tuple[int, ...]
    channel_axis: int
    block: int | None  #: block size along the rows (weight-only 4-bit), None: one step per row
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0))  #: [points-1, channels, blocks] of the extra points
    ints: np.ndarray = field(default_factory=lambda: np.zeros(0))  #: [points-1, channels, length]
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0))


class Multipoint(QuantMethod):
    """One low-bit point per weight channel, more for the channels that reduce the output error most per byte."""

    name = "multipoint"
    summary = "Multipoint quantization: weight channels as a sum of several low-bit points, extra points where they cut the output error most per byte (+10% bytes by default)"
    Options = MultipointOptions
    needs_data = True

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._weights: dict[str, _Weight] = {}

    # -- statistics ------------------------------------------------------------------------
    def _layer_input(self, ctx: RunContext, node_name: str, weight_index: int) -> tuple[str, int] | None:
        node = next((n for n in ctx.model.graph.node if n.name == node_name), None)
        if node is None or node.op_type not in ("Conv", "MatMul", "Gemm"):
            return None
        act = node.input[1 - weight_index] if node.op_type == "MatMul" else node.input[0]
        return act, (1 if node.op_type == "Conv" else -1)

    def declare_statistics(self, ctx: RunContext) -> list[StatRequest]:
        reqs = []
        for site in ctx.plan.weights.values():
            inp = self._layer_input(ctx, site.node, site.input_index)
            if inp is not None:
                reqs.append(StatRequest(inp[0], ChannelMoments(inp[1])))
        return reqs

    # -- the points --------------------------------------------------------------------------
    def refine(self, ctx: RunContext) -> None:
        o = self.options
        weight_only = bool(getattr(ctx.profile, "weight_only", False))
        bits = 4 if weight_only else (o.weight_bits or ctx.profile.bits)
        if weight_only and o.weight_bits not in (None, 4):
            raise OptionError("with --bits 4 every point is a 4-bit block; leave weight_bits unset")
        qrange = int_range(4, True, False) if weight_only else int_range(bits, True, ctx.profile.weight_narrow)
        layers: list[LayerPoints] = []
        base_bytes = 0.0
        nodes = {n.name: n for n in ctx.model.graph.node}
        seen: dict[str, list] = {}
        for site in ctx.plan.weights.values():
            seen.setdefault(site.initializer, []).append(site)
        for init, sites in seen.items():
            site = sites[0]
            w = np.asarray(ctx.weight(init), np.float32)
            if weight_only:
                if w.ndim != 2:
                    continue
                block_axis = site.axis or 0
                chan_axis, block = 1 - block_axis, ctx.profile.block_size
            else:
                if site.axis is None:
                    continue  # per-tensor weights: no channels to give points to
                chan_axis, block = site.axis, None
            rows = np.moveaxis(w, chan_axis, 0).reshape(w.shape[chan_axis], -1)
            var, mu = self._input_moments(ctx, nodes.get(site.node), site.input_index, w, rows.shape)
            first = greedy_points(rows, var, mu, bits, 1, block, o.grid, o.first, qrange)
            qp = _first_qparams(first.steps[0], chan_axis, block, bits, qrange, weight_only, w.ndim)
            for s in sites:  # multipoint owns the weights: the calibrator's default weight grid is replaced
                s.qparams = qp
            # the later points fit the residual of exactly what the QDQ rewrite will write
            approx = np.moveaxis(qp.fake_quantize(w), chan_axis, 0).reshape(rows.shape)
            extra = greedy_points(rows - approx, var, mu, bits, max(o.max_points - 1, 0), block, o.grid, "grid", qrange) if o.max_points > 1 else None
            errors = np.concatenate([[output_error(rows, var, mu)], [output_error(rows - approx, var, mu)],
                                     extra.errors[1:] if extra is not None else np.zeros((0, rows.shape[0]))])
            nb = 1 if block is None else -(-rows.shape[1] // block)
            point_bytes = rows.shape[1] * bits / 8 + 4 * nb
            base_bytes += rows.size * bits / 8 + 4 * nb * rows.shape[0]
            signal = float(np.sum(output_error(rows, var, mu)))
            self._weights[init] = _Weight(init, tuple(w.shape), chan_axis, block,
                                          extra.steps if extra is not None else np.zeros((0, rows.shape[0], nb)),
                                          extra.ints if extra is not None else np.zeros((0,) + rows.shape, np.int8))
            layers.append(LayerPoints(init, errors, point_bytes, signal))
        counts = allocate(layers, o.budget * base_bytes, o.max_points) if layers else {}
        extra_bytes = 0.0
        per_layer = {}
        for ly in layers:
            c = counts[ly.key]
            self._weights[ly.key].counts = c
            extra_bytes += float(np.sum(c - 1)) * ly.point_bytes
            before = float(np.sum(ly.errors[1]))
            after = float(np.sum(ly.errors[c, np.arange(len(c))]))
            if np.any(c > 1):
                per_layer[ly.key] = {"channels": int(len(c)), "with_2_points": int(np.sum(c == 2)), "with_3_or_more": int(np.sum(c >= 3)),
                                     "output_error_reduction": round(1 - after / before, 4) if before > 0 else 0.0}
        ctx.report[self.name] = {
            "weight_bits": bits,
            "weights": len(layers),
            "weight_bytes": int(base_bytes),
            "extra_bytes": int(extra_bytes),
            "extra_fraction": round(extra_bytes / base_bytes, 4) if base_bytes else 0.0,
            "layers_with_extra_points": per_layer,
        }

    def _input_moments(self, ctx: RunContext, node: onnx.NodeProto | None, widx: int, w: np.ndarray,
                       rows_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Variance and mean of the input each element of a channel row multiplies (1 and 0 when unknown)."""
        unknown = np.ones(rows_shape), np.zeros(rows_shape)
        inp = self._layer_input(ctx, node.name, widx) if node is not None else None
        if inp is None:
            return unknown
        mom = ctx.stats.get(StatRequest(inp[0], ChannelMoments(inp[1])))
        if mom is None or not np.size(mom):
            return unknown
        mean, var = np.asarray(mom[0], np.float64), np.asarray(mom[1], np.float64)
        if node.op_type == "Conv":  # rows: [M, C/g * kh * kw]; row m reads the channels of its group
            m, cpg = w.shape[0], w.shape[1]
            groups = max(len(mean) // cpg, 1)
            first = (np.arange(m) // max(m // groups, 1)) * cpg
            cols = first[:, None] + np.arange(cpg)[None, :]  # [M, cpg] input channel of each row element
            taps = int(np.prod(w.shape[2:])) if w.ndim > 2 else 1
            return np.repeat(var[cols], taps, axis=1), np.repeat(mean[cols], taps, axis=1)
        if mean.shape[0] == rows_shape[1]:  # MatMul/Gemm: a row is one output channel over K inputs
            return np.broadcast_to(var, rows_shape), np.broadcast_to(mean, rows_shape)
        return unknown

    # -- the extra points in ONNX -------------------------------------------------------------
    def qdq_rewrite(self, ctx: RunContext, model: onnx.ModelProto) -> onnx.ModelProto | None:
        todo = {k: w for k, w in self._weights.items() if w.counts.size and np.any(w.counts > 1)}
        if not todo:
            return None
        g = model.graph
        fresh = Namer.of(model).fresh
        sites = {}
        for site in ctx.plan.weights.values():
            sites.setdefault(site.initializer, []).append((site.node, site.input_index))
        nodes = {n.name: n for n in g.node}
        new_nodes, new_inits = [], []
        weight_only = bool(getattr(ctx.profile, "weight_only", False))
        for init, wp in todo.items():
            first_reader = nodes[sites[init][0][0]]
            dq1 = first_reader.input[sites[init][0][1]]
            total = dq1
            for level in range(1, int(wp.counts.max())):
                chosen = np.flatnonzero(wp.counts > level)
                ints = wp.ints[level - 1][chosen]
                steps = wp.steps[level - 1][chosen]
                base = fresh(f"{init}_point{level + 1}")
                out_shape = list(wp.shape)
                out_shape[wp.channel_axis] = len(chosen)
                q = np.moveaxis(ints.reshape([len(chosen)] + [s for i, s in enumerate(wp.shape) if i != wp.channel_axis]), 0, wp.channel_axis)
                if weight_only:
                    scale = np.moveaxis(steps.astype(np.float32), 0, wp.channel_axis)  # [blocks, chosen] for W[K, N]
                    qt = numpy_helper.from_array(q.astype(numpy_dtype(QDTYPE["int4"])), f"{base}_quantized")
                    zp = helper.make_tensor(f"{base}_zero_point", QDTYPE["int4"], list(scale.shape), [0] * scale.size)
                    attrs = {"axis": 1 - wp.channel_axis, "block_size": int(wp.block)}
                else:
                    scale = steps[:, 0].astype(np.float32)
                    qt = numpy_helper.from_array(q.astype(np.int8), f"{base}_quantized")
                    zp = numpy_helper.from_array(np.zeros(len(chosen), np.int8), f"{base}_zero_point")
                    attrs = {"axis": wp.channel_axis}
                zeros_shape = list(wp.shape)
                zeros_shape[wp.channel_axis] = 1
                slot = np.full(wp.shape[wp.channel_axis], len(chosen), np.int64)
                slot[chosen] = np.arange(len(chosen))
                new_inits += [qt, numpy_helper.from_array(scale, f"{base}_scale"), zp,
                              numpy_helper.from_array(np.zeros(zeros_shape, np.float32), f"{base}_zeros"),
                              numpy_helper.from_array(slot, f"{base}_slot")]
                deq, padded, placed, summed = (fresh(f"{base}_{s}") for s in ("dequantized", "padded", "placed", "sum"))
                new_nodes += [helper.make_node("DequantizeLinear", [qt.name, f"{base}_scale", zp.name], [deq], name=fresh(f"{base}/DequantizeLinear"), **attrs),
                              helper.make_node("Concat", [deq, f"{base}_zeros"], [padded], name=fresh(f"{base}/Concat"), axis=wp.channel_axis),
                              helper.make_node("Gather", [padded, f"{base}_slot"], [placed], name=fresh(f"{base}/Gather"), axis=wp.channel_axis),
                              helper.make_node("Add", [total, placed], [summed], name=fresh(f"{base}/Add"))]
                total = summed
            for node_name, idx in sites[init]:
                nodes[node_name].input[idx] = total
        g.initializer.extend(new_inits)
        edit.insert_after_producers(g, new_nodes)
        return edit.cleanup(model)


def _first_qparams(steps: np.ndarray, chan_axis: int, block: int | None, bits: int, qrange: tuple[int, int], weight_only: bool, ndim: int) -> QParams:
    """The first point as onnxq qparams: per channel in int8 (a narrowed range below 8 bits), or int4 blocks."""
    qmin, qmax = qrange
    if weight_only:
        scale = np.moveaxis(steps.astype(np.float32), 0, chan_axis)  # [blocks, channels] for W[K, N]
        return QParams(scale, np.zeros(scale.shape, np.int8), "int4", qmin, qmax, 1 - chan_axis, block)
    scale = steps[:, 0].astype(np.float32)
    return QParams(scale, np.zeros(scale.shape, np.int8), "int8", qmin, qmax, chan_axis)


@hookimpl
def register_methods(register) -> None:
    register(Multipoint)
