"""SmoothQuant-style per-input-channel smoothing of MatMul activations, as an exact float rewrite.

Transformers carry a few activation channels that are 10-20x larger than the rest (in
all-MiniLM-L6-v2, channel 99 of every LayerNorm output and one channel of each FFN GELU output),
so a per-tensor activation step is set by one channel and every other channel gets a handful of
levels. For ``Y = X @ W`` with a constant ``W`` (``[K, N]``) the rewrite

    X' = X / s,   W' = diag(s) @ W,   X' @ W' = X @ W   (per input channel k, s_k > 0)

moves the outlier magnitude from the activation into the weight rows, which are quantized per
*output* channel and have headroom. ``s_k = max|X_k|^α / max|W_k|^(1-α)`` (SmoothQuant, Xiao et
al. 2023; the ``smoothquant`` method uses α = 0.8 by default, measured best on all-MiniLM-L6-v2:
docs/methods.md), with ``max|W_k|`` over every MatMul that reads ``X``.

``X / s`` costs no runtime op: it is folded into the op that produces ``X``:

* ``LayerNormalization`` over the last axis with constant scale/bias: ``γ' = γ / s``, ``β' = β / s``;
* ``Mul`` by a constant that broadcasts along the last axis (the ``* 0.5`` that ends an exported
  GELU): the constant becomes ``c / s``;
* the other normalizations whose constants follow the normalizing (``RMSNormalization``, ONNX
  Runtime's ``SkipLayerNormalization`` and simplified forms): their scale and shift, as above.

A GELU fused into one op (ONNX Runtime's ``BiasGelu``/``FastGelu``, opset 20's ``Gelu``) has no
constant to fold into: ``Mul(X, 1/s)`` is inserted after it (kind ``insert``). On all-MiniLM-L6-v2
run through ONNX Runtime's transformer optimizer that Mul before each FFN's second MatMul took the
sentence-embedding cosine of ``smoothquant + minmax`` from 0.9962 (normalizations alone) to 0.9984,
for six elementwise ops (docs/methods.md).

When ``X`` also feeds something other than such MatMuls (the residual ``Add`` reading a post-LN
transformer's LayerNorm output), the producer is duplicated: the original keeps feeding the
other consumers, the scaled copy feeds the MatMuls. A duplicated LayerNormalization is one extra
cheap op per block (``shared="mul"`` inserts ``Mul(X, 1/s)`` instead; measured slower on
all-MiniLM-L6-v2, docs/methods.md). The host checks that the rewritten model's outputs match
(<= 1e-5).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.graph import edit
from onnxq.graph.edit import Namer
from onnxq.graph.model_io import new_initializer, tensor_array
from onnxq.graph.index import GraphIndex, node_attr

__all__ = ["SmoothSite", "find_smooth_sites", "smoothing_scales", "apply_smoothing", "channel_absmax_model", "channel_range_model"]


@dataclass
class SmoothSite:
    """One activation tensor whose channels can be rescaled into its MatMul consumers' weights."""

    tensor: str
    producer: str  # node name
    kind: str  # "layernorm" | "mul"
    matmuls: list[str]  # MatMul node names reading ``tensor`` as input 0 with a constant 2-D weight
    weights: list[str]  # their weight initializers
    channels: int
    #: other consumers (or a graph output): the producer is duplicated for the MatMuls
    shared: bool = False
    reason: str = ""
    scale: np.ndarray | None = field(default=None, repr=False)


#: normalizations over the last axis whose per-channel constants (these input slots: the scale, then the shift
#: where there is one) are applied after the normalization, so ``X / s`` folds into them exactly. The skip forms of
#: ONNX Runtime's transformer optimizer (com.microsoft) add their ``bias`` input *before* normalizing (slot 4 of
#: SkipLayerNormalization, slot 3 of SkipSimplifiedLayerNormalization): it is not scaled. Their other outputs (mean,
#: inverse deviation, the residual sum) do not depend on the scaled constants.
NORM_CONSTANT_SLOTS: dict[tuple[str, str], tuple[int, ...]] = {
    ("", "LayerNormalization"): (1, 2),
    ("", "RMSNormalization"): (1,),
    ("com.microsoft", "SkipLayerNormalization"): (2, 3),
    ("com.microsoft", "SimplifiedLayerNormalization"): (1,),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): (2,),
}


def norm_slots(node: onnx.NodeProto) -> tuple[int, ...] | None:
    """The constant slots of a normalization :data:`NORM_CONSTANT_SLOTS` knows, or None for any other op."""
    return NORM_CONSTANT_SLOTS.get(("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type))


def _last_axis_vector(value: np.ndarray | None, channels: int) -> bool:
    """A constant that broadcasts along the last axis only (scalar, [C], [1, .., C])."""
    if value is None or value.dtype.kind != "f":
        return False
    if value.size == 1:
        return True
    return value.shape[-1] == channels and value.size == channels


def find_smooth_sites(model: onnx.ModelProto, include: Iterable[str] = ("LayerNormalization", "Mul"), exclude: Iterable[str] = (),
                      quantized: Iterable[str] | None = None, insert: Iterable[str] = ()) -> tuple[list[SmoothSite], list[tuple[str, str]]]:
    """Activations feeding constant-weight MatMuls whose producer can absorb a per-channel scale.

    ``include`` lists producer op types to fold into; ``exclude`` holds MatMul node-name globs left
    alone; ``quantized`` (node names) restricts the MatMuls to those the plan quantizes; ``insert``
    lists producer op types that cannot absorb the scale but get an inserted ``Mul(x, 1/s)`` (kind
    ``insert``). Returns the sites and ``(tensor, reason)`` for candidates that were not usable.
    """
    idx = GraphIndex(model)
    include, exclude, insert = tuple(include), tuple(exclude), tuple(insert)
    allowed = set(quantized) if quantized is not None else None
    sites: list[SmoothSite] = []
    rejected: list[tuple[str, str]] = []
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        x = node.input[0]
        if x in seen or idx.is_constant(x):
            continue
        seen.add(x)
        readers = [(c, i) for c, i in idx.consumers.get(x, [])]
        mms: list[onnx.NodeProto] = []
        for c, i in readers:
            if c.op_type != "MatMul" or i != 0 or any(fnmatch.fnmatchcase(c.name, p) for p in exclude):
                continue
            if allowed is not None and c.name not in allowed:
                continue
            w = idx.constant_value(c.input[1])
            if w is None or w.dtype.kind != "f" or w.ndim != 2 or c.input[1] not in idx.initializers:
                continue
            mms.append(c)
        if not mms:
            continue
        k = int(idx.constant_value(mms[0].input[1]).shape[0])  # type: ignore[union-attr]
        prod = idx.producer.get(x)
        if prod is None:
            rejected.append((x, "a graph input: no producer to fold the scale into"))
            continue
        slots = norm_slots(prod)
        # "LayerNormalization" in ``include`` stands for every normalization whose constants come after it
        if (prod.op_type if slots is None else "LayerNormalization") not in include:
            if prod.op_type in insert:
                sites.append(SmoothSite(x, prod.name, "insert", [m.name for m in mms], [m.input[1] for m in mms], k, True,
                                        f"{prod.op_type} output read by {len(mms)} MatMul(s): Mul(x, 1/s) inserted"))
                continue
            rejected.append((x, f"produced by {prod.op_type}, which cannot absorb a per-channel scale"))
            continue
        if slots is not None:
            axis = node_attr(prod, "axis", -1)
            consts = [idx.constant_value(prod.input[i]) if len(prod.input) > i and prod.input[i] else None for i in slots]
            scale = consts[0]
            bias = consts[1] if len(consts) > 1 else None
            shift_given = len(slots) > 1 and len(prod.input) > slots[1] and bool(prod.input[slots[1]])
            bad = (axis not in (-1, None) or scale is None or scale.shape != (k,) or (shift_given and (bias is None or bias.shape != (k,)))
                   or prod.output[0] != x or (prod.op_type == "LayerNormalization" and len(prod.output) > 1))
            if bad:
                rejected.append((x, f"{prod.op_type} not over the last axis with constant [C] scale/bias"))
                continue
            kind = "layernorm"
        else:  # Mul by a constant along the last axis
            consts = [i for i, n in enumerate(prod.input) if idx.is_constant(n)]
            if len(consts) != 1 or not _last_axis_vector(idx.constant_value(prod.input[consts[0]]), k):
                rejected.append((x, "Mul without one constant operand that broadcasts along the channels"))
                continue
            kind = "mul"
        shared = len(mms) != len(readers) or x in idx.graph_outputs
        sites.append(SmoothSite(x, prod.name, kind, [m.name for m in mms], [m.input[1] for m in mms], k, shared,
                                f"{kind} output read by {len(mms)} MatMul(s)" + (" and other consumers (producer duplicated)" if shared else "")))
    return sites, rejected


def _reduction_copy(model: onnx.ModelProto, channel_axis: int) -> tuple[onnx.ModelProto, Callable[[str], str], Callable[[str, str, int, str, int], None]]:
    """A copy of ``model`` to add per-channel reductions to, its name allocator, and
    ``reduce(op, x, axis, out, keepdims)`` writing a Reduce* node in the model's opset's form
    (axes as an input from opset 18, an attribute before)."""
    if channel_axis not in (-1, 1):
        raise ValueError("channel_axis must be -1 or 1")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    fresh = Namer.of(m).fresh
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 13)

    def reduce(op: str, x: str, axis: int, out: str, keep: int) -> None:
        if opset >= 18:
            ax = fresh(f"{out}__axes")
            g.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), ax))
            g.node.append(helper.make_node(op, [x, ax], [out], keepdims=keep))
        else:
            g.node.append(helper.make_node(op, [x], [out], axes=[axis], keepdims=keep))

    return m, fresh, reduce


def channel_absmax_model(model: onnx.ModelProto, tensors: list[str], channel_axis: int = -1) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose extra outputs are ``max |x|`` per channel of each tensor, as float32.

    ``channel_axis`` is -1 (MatMul activations, ``[..., C]``) or 1 (conv activations,
    ``[N, C, ...]``). The reduction happens inside the graph, so only a ``[C]`` vector per tensor
    leaves ONNX Runtime whatever the activation size.
    """
    m, fresh, reduce = _reduction_copy(model, channel_axis)
    g = m.graph
    outs = []

    def reduce_max(x: str, axis: int, out: str) -> None:
        reduce("ReduceMax", x, axis, out, 0)

    for t in tensors:
        a, flat, red, r = (fresh(f"{t}__{s}") for s in ("abs", "flat", "chmax_raw", "chmax"))
        g.node.append(helper.make_node("Abs", [t], [a]))
        if channel_axis == -1:
            g.node.append(helper.make_node("Flatten", [a], [flat], axis=-1))  # [..., C] -> [prod(lead), C]
            reduce_max(flat, 0, red)
        else:
            lead = fresh(f"{t}__rmax0")
            reduce_max(a, 0, lead)  # [N, C, ...] -> [C, ...]
            g.node.append(helper.make_node("Flatten", [lead], [flat], axis=1))  # [C, prod(rest)]
            reduce_max(flat, 1, red)
        g.node.append(helper.make_node("Cast", [red], [r], to=onnx.TensorProto.FLOAT))  # float16 models too
        g.output.append(helper.make_tensor_value_info(r, onnx.TensorProto.FLOAT, None))
        outs.append(r)
    return m, outs


def channel_range_model(model: onnx.ModelProto, tensors: list[str], channel_axis: int = -1) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose extra outputs are the per-channel ``max`` and ``min`` of each tensor,
    stacked as one float32 ``[2, C]`` output (row 0 the maxima, row 1 the minima).

    ``channel_axis`` is -1 (``[..., C]``) or 1 (``[N, C, ...]``); reduced inside the graph, as
    :func:`channel_absmax_model`, so only ``2·C`` values per tensor leave ONNX Runtime.
    """
    m, fresh, reduce = _reduction_copy(model, channel_axis)
    g = m.graph
    outs = []

    for t in tensors:
        flat, hi, lo, both, r = (fresh(f"{t}__{s}") for s in ("rflat", "chmax", "chmin", "chrange_raw", "chrange"))
        if channel_axis == -1:
            g.node.append(helper.make_node("Flatten", [t], [flat], axis=-1))  # [..., C] -> [prod(lead), C]
            reduce("ReduceMax", flat, 0, hi, 1)  # [1, C]
            reduce("ReduceMin", flat, 0, lo, 1)
            g.node.append(helper.make_node("Concat", [hi, lo], [both], axis=0))  # [2, C]
        else:
            lead_hi, lead_lo, flat_lo, cols = (fresh(f"{t}__{s}") for s in ("rmax0", "rmin0", "rflat_min", "chrange_cols"))
            reduce("ReduceMax", t, 0, lead_hi, 0)  # [N, C, ...] -> [C, ...]
            reduce("ReduceMin", t, 0, lead_lo, 0)
            g.node.append(helper.make_node("Flatten", [lead_hi], [flat], axis=1))  # [C, prod(rest)]
            g.node.append(helper.make_node("Flatten", [lead_lo], [flat_lo], axis=1))
            reduce("ReduceMax", flat, 1, hi, 1)  # [C, 1]
            reduce("ReduceMin", flat_lo, 1, lo, 1)
            g.node.append(helper.make_node("Concat", [hi, lo], [cols], axis=1))  # [C, 2]
            g.node.append(helper.make_node("Transpose", [cols], [both], perm=[1, 0]))
        g.node.append(helper.make_node("Cast", [both], [r], to=onnx.TensorProto.FLOAT))  # float16 models too
        g.output.append(helper.make_tensor_value_info(r, onnx.TensorProto.FLOAT, None))
        outs.append(r)
    return m, outs


def smoothing_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float, floor: float = 1e-5) -> np.ndarray:
    """``s_k = max|X_k|^α / max|W_k|^(1-α)``, normalised so the scales' geometric mean is 1 and
    clipped to ``[floor, 1/floor]``; channels that never fire keep ``s = 1``."""
    a = np.maximum(np.asarray(act_absmax, np.float64), 0.0)
    w = np.maximum(np.asarray(weight_absmax, np.float64), 0.0)
    ok = (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    if ok.any():
        s[ok] /= np.exp(np.mean(np.log(s[ok])))  # keep the overall magnitude where it was
    return np.clip(s, floor, 1.0 / floor).astype(np.float32)


def apply_smoothing(model: onnx.ModelProto, sites: list[SmoothSite], scales: Mapping[str, np.ndarray], shared: str = "duplicate") -> onnx.ModelProto:
    """Rewrite ``model`` with ``X / s`` folded into each site's producer and ``diag(s) @ W`` in its MatMuls.

    ``shared`` says what happens when ``X`` has other consumers too: ``duplicate`` the producer
    (the copy carries ``1/s``), or insert an explicit ``Mul(X, 1/s)`` for the MatMuls (``mul``:
    one elementwise op, but the producer stays fusable with what precedes it, e.g. ONNX Runtime's
    Add + LayerNormalization -> SkipLayerNormalization)."""
    if shared not in ("duplicate", "mul"):
        raise ValueError(f"shared must be 'duplicate' or 'mul', not {shared!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    nodes = {n.name: n for n in g.node}
    fresh_node = fresh_tensor = Namer.of(out).fresh
    inserts: dict[str, onnx.NodeProto] = {}  # producer name -> duplicate to insert after it

    def new_init(value: np.ndarray, like: str) -> str:
        name = fresh_tensor(f"{like}_smooth")
        g.initializer.append(new_initializer(model, value, name))  # spilled to disk on a model over 2 GB
        inits[name] = g.initializer[-1]
        return name

    for site in sites:
        s = np.asarray(scales[site.tensor], np.float32)
        prod = nodes[site.producer]
        target = prod
        if site.kind == "insert" or (site.shared and shared == "mul"):
            dtype = tensor_array(inits[nodes[site.matmuls[0]].input[1]]).dtype  # the model's float type
            inv = new_init((1.0 / s).astype(dtype), f"{site.tensor}_inv_smooth")
            mul = helper.make_node("Mul", [site.tensor, inv], [fresh_tensor(f"{site.tensor}_smooth")], name=fresh_node(f"{prod.name}_smooth"))
            inserts[prod.name] = mul
            for mm_name in site.matmuls:
                mm = nodes[mm_name]
                w = tensor_array(inits[mm.input[1]])
                mm.input[1] = new_init((w * s[:, None]).astype(w.dtype), mm.input[1])
                mm.input[0] = mul.output[0]
            continue
        if site.shared:
            target = onnx.NodeProto()
            target.CopyFrom(prod)
            target.name = fresh_node(f"{prod.name}_smooth")
            del target.output[:]
            target.output.append(fresh_tensor(f"{site.tensor}_smooth"))
            inserts[prod.name] = target
        x_new = target.output[0]
        if site.kind == "layernorm":
            for slot in norm_slots(target) or ():
                if len(target.input) > slot and target.input[slot]:
                    v = tensor_array(inits[target.input[slot]])
                    target.input[slot] = new_init((v.astype(np.float32) / s).astype(v.dtype), target.input[slot])
        else:
            slot = next(i for i, n in enumerate(target.input) if n in inits)
            v = tensor_array(inits[target.input[slot]])
            base = (v.reshape(-1) if v.size > 1 else v.reshape(())).astype(np.float32)
            target.input[slot] = new_init((base / s).astype(v.dtype), target.input[slot])
        for mm_name in site.matmuls:
            mm = nodes[mm_name]
            w_name = mm.input[1]
            w = tensor_array(inits[w_name])
            mm.input[1] = new_init((w * s[:, None]).astype(w.dtype), w_name)
            mm.input[0] = x_new
    if inserts:
        order: list[onnx.NodeProto] = []
        for n in g.node:
            order.append(n)
            if n.name in inserts:
                order.append(inserts[n.name])
        del g.node[:]
        g.node.extend(order)
    return edit.cleanup(out, sort=False)  # the float weights the scaled copies replaced go
