"""Check an ONNX Q/DQ graph against TensorRT's explicit-quantization rules, without TensorRT.

Each rule is a small function registered in :data:`RULES` with an id, a severity and a one-line
summary, so the linter can list and document them. Severities:

* ``error``: TensorRT's ONNX parser or builder refuses the graph (or silently changes its meaning);
* ``warning``: the graph builds, but the placement blocks a fusion, runs slower than it should, or is
  not what onnxq emits for the ``trt`` profile.

Only the main graph is checked; subgraphs of ``If``/``Loop``/``Scan`` are not visited.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxq.graph.index import GraphIndex

__all__ = ["RULES", "Finding", "Rule", "check_trt_rules", "format_findings"]

SEVERITIES = ("error", "warning")


@dataclass(frozen=True)
class Finding:
    """One violation: which rule, how bad, where, and what to do about it."""

    rule: str
    severity: str
    node: str
    message: str


@dataclass(frozen=True)
class Rule:
    """A registered check: ``check`` yields ``(node_or_tensor_name, message)`` pairs."""

    id: str
    severity: str
    summary: str
    check: Callable[[_Graph], Iterable[tuple[str, str]]]


RULES: list[Rule] = []


def _rule(rule_id: str, severity: str, summary: str):
    assert severity in SEVERITIES and all(r.id != rule_id for r in RULES)

    def register(fn: Callable[[_Graph], Iterable[tuple[str, str]]]):
        RULES.append(Rule(rule_id, severity, summary, fn))
        return fn

    return register


def check_trt_rules(model: onnx.ModelProto, *, rules: Iterable[str] | None = None) -> list[Finding]:
    """Return every violation of TensorRT's Q/DQ rules in ``model``, errors and warnings alike.

    ``rules`` restricts the run to the given rule ids (all rules by default).
    """
    wanted = None if rules is None else set(rules)
    if wanted is not None and (unknown := wanted - {r.id for r in RULES}):
        raise ValueError(f"unknown TensorRT rule id(s): {', '.join(sorted(unknown))}")
    graph = _Graph(model)
    return [
        Finding(rule.id, rule.severity, node, message)
        for rule in RULES
        if wanted is None or rule.id in wanted
        for node, message in rule.check(graph)
    ]


def format_findings(findings: Iterable[Finding]) -> str:
    """One line per finding: ``severity rule node: message``."""
    return "\n".join(f"{f.severity} {f.rule} {f.node}: {f.message}" for f in findings)


# --------------------------------------------------------------------------------------------
# Graph view: producers, consumers, constants, element types and shapes
# --------------------------------------------------------------------------------------------

_QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# ops that only move or reshape data: a DequantizeLinear before them still counts as "quantized input"
_SHAPE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")
_FLOAT_SCALE_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
_TRT_QUANT_TYPES = (TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT4E2M1)
_NONDETERMINISTIC = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout")
_UNSIGNED_OR_WIDE = (
    TensorProto.UINT8, TensorProto.UINT4, TensorProto.UINT2, TensorProto.UINT16, TensorProto.INT16,
)


def _dtype_name(dtype: int | None) -> str:
    return "unknown" if dtype is None else helper.tensor_dtype_to_string(dtype).split(".")[-1]


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


@dataclass
class _Const:
    dtype: int
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]


@dataclass
class _QDQ:
    """A QuantizeLinear or DequantizeLinear node with its operands resolved."""

    node: onnx.NodeProto
    is_q: bool
    data: str
    scale: str
    zero_point: str | None
    axis: int
    block_size: int
    qtype: int | None  # the quantized element type (Q output / DQ input); None if unknown
    implicit_uint8: bool  # Q without zero point and output_dtype: ONNX says uint8, TensorRT reads int8
    kind: str | None  # "tensor", "channel", "block" or None when the scale shape is unknown

    @property
    def name(self) -> str:
        return _node_name(self.node)


class _Graph:
    """The linter's view: the shared :class:`GraphIndex` plus constant folding, Q/DQ descriptions and shapes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        index = GraphIndex(model)
        self.opset = index.opset
        self.nodes = index.node_list
        self.producer = index.producer
        self.consumers = index.consumers
        self.initializers = index.initializers
        self.types: dict[str, tuple[int, tuple | None]] = {}
        for vi in [*_inferred_value_info(model), *g.input, *g.output, *g.value_info]:
            tt = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and tt.elem_type:
                shape = None
                if tt.HasField("shape"):
                    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
                self.types[vi.name] = (tt.elem_type, shape)
        self._const_cache: dict[str, _Const | None] = {}
        self._computed: set[str] | None = None
        self.qdq: dict[str, _QDQ] = {}  # keyed by the node's first output
        # QuantizeLinear first: a DequantizeLinear takes its quantized type from the Q feeding it
        for op_type in ("QuantizeLinear", "DequantizeLinear"):
            for node in self.nodes:
                if node.op_type == op_type and node.domain in _QDQ_DOMAINS and node.output:
                    self.qdq[node.output[0]] = self._describe(node)

    # constants ---------------------------------------------------------------------------
    def const(self, name: str) -> _Const | None:
        """The build-time constant behind ``name`` (initializer, Constant, or Identity/Cast of one)."""
        if name not in self._const_cache:
            self._const_cache[name] = None  # guards against cycles in malformed graphs
            self._const_cache[name] = self._find_const(name)
        return self._const_cache[name]

    def _find_const(self, name: str) -> _Const | None:
        if name in self.initializers:
            t = self.initializers[name]
            return _Const(t.data_type, tuple(t.dims), lambda: numpy_helper.to_array(t))
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            return _constant_node_value(node)
        if node.op_type in ("Identity", "Cast") and node.input:
            base = self.const(node.input[0])
            if base is None or node.op_type == "Identity":
                return base
            to = helper.get_attribute_value(next(a for a in node.attribute if a.name == "to"))
            np_type = helper.tensor_dtype_to_np_dtype(to)
            return _Const(to, base.shape, lambda: base.load().astype(np_type))
        return None

    def constant_computed(self, name: str) -> bool:
        """True for a constant, or a tensor computed from constants alone by deterministic standard ops
        (e.g. ``Reshape(bias, shape)``): TensorRT folds it into a build-time constant."""
        if self._computed is None:
            # one pass in graph order (ONNX graphs are topologically sorted)
            self._computed = set()
            for node in self.nodes:
                if (node.domain in ("", "ai.onnx") and node.op_type not in _NONDETERMINISTIC and any(node.input)
                        and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
                        and all(not i or i in self._computed or self.const(i) is not None for i in node.input)):
                    self._computed.update(o for o in node.output if o)
        return name in self._computed or self.const(name) is not None

    def values(self, name: str | None) -> np.ndarray | None:
        c = self.const(name) if name else None
        if c is None:
            return None
        try:
            return np.asarray(c.load())
        except Exception:  # external data not loaded, exotic dtype: treat as unknown
            return None

    def weight_rooted(self, name: str) -> bool:
        """True for a constant, or a QuantizeLinear of a constant (the fake-quantized weight pattern)."""
        if self.const(name) is not None:
            return True
        q = self.qdq.get(name)
        return q is not None and q.is_q and self.const(q.data) is not None

    def dequantized(self, name: str) -> _QDQ | None:
        """The DequantizeLinear feeding ``name`` directly or through shape-only ops."""
        seen = set()
        while name and name not in seen:
            seen.add(name)
            q = self.qdq.get(name)
            if q is not None:
                return None if q.is_q else q
            node = self.producer.get(name)
            if node is None or node.op_type not in _SHAPE_OPS or not node.input:
                return None
            name = node.input[0]
        return None

    # types and shapes --------------------------------------------------------------------
    def dtype(self, name: str) -> int | None:
        c = self.const(name)
        if c is not None:
            return c.dtype
        q = self.qdq.get(name)
        if q is not None and q.is_q:
            return q.qtype
        return self.types.get(name, (None, None))[0]

    def shape(self, name: str) -> tuple | None:
        c = self.const(name)
        if c is not None:
            return c.shape
        return self.types.get(name, (None, None))[1]

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def _describe(self, node: onnx.NodeProto) -> _QDQ:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        is_q = node.op_type == "QuantizeLinear"
        data, scale = node.input[0], node.input[1]
        zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
        implicit = False
        if is_q:
            qtype = attrs.get("output_dtype") or (self.dtype(zp) if zp else None)
            if qtype is None and not zp:
                qtype, implicit = TensorProto.UINT8, True
        else:
            upstream = self.qdq.get(data)
            if upstream is not None and upstream.is_q:
                qtype, implicit = upstream.qtype, upstream.implicit_uint8
            else:
                qtype = self.dtype(data) or (self.dtype(zp) if zp else None)
        block_size = int(attrs.get("block_size", 0))
        scale_shape = self.shape(scale)
        if block_size > 0:
            kind = "block"
        elif scale_shape is None or None in scale_shape:
            kind = None
        elif int(np.prod(scale_shape, dtype=np.int64)) <= 1:
            kind = "tensor"
        else:
            kind = "channel" if len(scale_shape) == 1 else "block"
        return _QDQ(node, is_q, data, scale, zp, int(attrs.get("axis", 1)), block_size, qtype, implicit, kind)

    def normalized_axis(self, q: _QDQ) -> int | None:
        rank = self.rank(q.data)
        if rank is None:
            return q.axis if q.axis >= 0 else None
        return q.axis + rank if q.axis < 0 else q.axis


def _inferred_value_info(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    try:
        return list(onnx.shape_inference.infer_shapes(model).graph.value_info)
    except Exception:  # shape inference is a convenience here; the rules fall back to what is known
        return []


def _constant_node_value(node: onnx.NodeProto) -> _Const | None:
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.name == "value":
            return _Const(value.data_type, tuple(value.dims), lambda v=value: numpy_helper.to_array(v))
        if attr.name in ("value_float", "value_floats"):
            arr = np.asarray(value, dtype=np.float32)
            return _Const(TensorProto.FLOAT, arr.shape, lambda a=arr: a)
        if attr.name in ("value_int", "value_ints"):
            arr = np.asarray(value, dtype=np.int64)
            return _Const(TensorProto.INT64, arr.shape, lambda a=arr: a)
    return None


def _as_float(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Hard rules (TensorRT refuses the graph)
# --------------------------------------------------------------------------------------------

@_rule("zero-point", "error", "zero points must be build-time constants, all zero, of the quantized type")
def _zero_point(g: _Graph) -> Iterator[tuple[str, str]]:
    for q in g.qdq.values():
        if q.zero_point is None:
            continue
        if g.const(q.zero_point) is None:
            yield q.name, (f"zero point '{q.zero_point}' is computed at run time; TensorRT needs a constant "
                           "all-zero zero point (initializer or Constant)")
            continue
        zp = g.values(q.zero_point)
        if zp is not None and np.any(_as_float(zp) != 0):
            yield q.name, (f"zero point '{q.zero_point}' is not all zero (asymmetric quantization); "
                           "TensorRT is symmetric only: recompute the scale with a zero point of 0")
        zp_type = g.dtype(q.zero_point)
        if q.qtype is not None and zp_type is not None and zp_type != q.qtype:
            yield q.name, (f"zero point '{q.zero_point}' is {_dtype_name(zp_type)} but the quantized type is "
                           f"{_dtype_name(q.qtype)}; give the zero point the quantized type")


@_rule("uint8-inside", "error", "no UINT8/UINT4/UINT16/INT16 Q/DQ: TensorRT quantizes to signed types only")
def _uint8_inside(g: _Graph) -> Iterator[tuple[str, str]]:
    for q in g.qdq.values():
        if q.qtype in _UNSIGNED_OR_WIDE and not q.implicit_uint8:
            yield q.name, (f"{'quantizes to' if q.is_q else 'dequantizes'} {_dtype_name(q.qtype)}; TensorRT "
                           "accepts INT8/INT4/FP8/FP4 Q/DQ only: use signed int8 with a zero point of 0")


@_rule("int32-bias", "error", "no INT32 DequantizeLinear (quantized bias): keep biases in float")
def _int32_bias(g: _Graph) -> Iterator[tuple[str, str]]:
    for q in g.qdq.values():
        if not q.is_q and q.qtype == TensorProto.INT32:
            yield q.name, (f"dequantizes INT32 '{q.data}'; TensorRT has no INT32 DequantizeLinear: keep the bias "
                           "as a float initializer (ONNX Runtime: QuantizeBias=False)")


@_rule("quant-type", "error", "the quantized type must be INT8, INT4, FP8 E4M3FN or FP4 E2M1")
def _quant_type(g: _Graph) -> Iterator[tuple[str, str]]:
    skip = (*_TRT_QUANT_TYPES, *_UNSIGNED_OR_WIDE, TensorProto.INT32, None)
    for q in g.qdq.values():
        if q.qtype not in skip:
            yield q.name, f"quantized type {_dtype_name(q.qtype)} is not supported by TensorRT"


@_rule("scale-positive", "error", "every scale coefficient must be finite and strictly positive")
def _scale_positive(g: _Graph) -> Iterator[tuple[str, str]]:
    for q in g.qdq.values():
        scale = g.values(q.scale) if g.dtype(q.scale) in (*_FLOAT_SCALE_TYPES, TensorProto.DOUBLE) else None
        if scale is None:
            continue
        s = _as_float(scale)
        bad = ~np.isfinite(s) | (s <= 0)
        if bad.any():
            yield q.name, (f"scale '{q.scale}' has {int(bad.sum())} coefficient(s) that are zero, negative or not "
                           f"finite (e.g. {s[bad].flat[0]!r}); clamp scales to a small positive minimum")


@_rule("scale-dtype", "error", "scales must be FLOAT, FLOAT16 or BFLOAT16")
def _scale_dtype(g: _Graph) -> Iterator[tuple[str, str]]:
    for q in g.qdq.values():
        dtype = g.dtype(q.scale)
        if dtype is not None and dtype not in _FLOAT_SCALE_TYPES:
            yield q.name, f"scale '{q.scale}' is {_dtype_name(dtype)}; store it as FLOAT (or FLOAT16/BFLOAT16)"


@_rule("scale-shape", "error", "scale and zero point must have the same shape")
def _scale_shape(g: _Graph) -> Iterator[tuple[str, str]]:
    for q in g.qdq.values():
        if q.zero_point is None:
            continue
        s, z = g.shape(q.scale), g.shape(q.zero_point)
        if s is None or z is None or None in s or None in z or s == z:
            continue
        if int(np.prod(s, dtype=np.int64)) == int(np.prod(z, dtype=np.int64)) == 1:
            continue  # [] versus [1]: both are per-tensor
        yield q.name, f"scale shape {list(s)} differs from zero point shape {list(z)}; make them identical"


@_rule("q-scalar-input", "error", "the input of a Q/DQ must not be a scalar (rank 0)")
def _q_scalar_input(g: _Graph) -> Iterator[tuple[str, str]]:
    for q in g.qdq.values():
        if g.rank(q.data) == 0:
            yield q.name, f"input '{q.data}' is a scalar; reshape it to shape [1] before quantizing"


@_rule("per-channel-activation", "error", "per-channel scales only on constant (weight) inputs")
def _per_channel_activation(g: _Graph) -> Iterator[tuple[str, str]]:
    for q in g.qdq.values():
        if q.kind != "channel" or g.weight_rooted(q.data):
            continue
        upstream = g.qdq.get(q.data)
        if not q.is_q and upstream is not None and upstream.is_q and upstream.kind == "channel":
            continue  # reported once, on the QuantizeLinear
        yield q.name, (f"per-channel {'QuantizeLinear' if q.is_q else 'DequantizeLinear'} on activation "
                       f"'{q.data}'; TensorRT quantizes activations per tensor: use a scalar scale")


@_rule("int4-weight-only", "error", "INT4 is for constant weights only")
def _int4_weight_only(g: _Graph) -> Iterator[tuple[str, str]]:
    for q in g.qdq.values():
        if q.qtype != TensorProto.INT4 or g.weight_rooted(q.data):
            continue
        upstream = g.qdq.get(q.data)
        if not q.is_q and upstream is not None and upstream.is_q and upstream.qtype == TensorProto.INT4:
            continue  # reported once, on the QuantizeLinear
        yield q.name, f"INT4 on activation '{q.data}'; TensorRT supports INT4 for weights only: use INT8 here"


@_rule("int4-block-axis", "error", "block quantization must block the last or second-to-last axis")
def _int4_block_axis(g: _Graph) -> Iterator[tuple[str, str]]:
    for q in g.qdq.values():
        rank = g.rank(q.data)
        axis = g.normalized_axis(q)
        if q.kind != "block" or rank is None or axis is None or axis >= rank - 2:
            continue
        yield q.name, (f"blocks axis {axis} of a rank-{rank} input; TensorRT blocks only the last two axes: "
                       f"transpose the weight or block axis {rank - 1} or {rank - 2}")


@_rule("opset", "error", "per-channel Q/DQ needs opset >= 13; INT4 and block quantization need opset >= 21")
def _opset(g: _Graph) -> Iterator[tuple[str, str]]:
    if g.opset is None:
        return
    def int4_or_block(q: _QDQ) -> bool:
        return q.qtype in (TensorProto.INT4, TensorProto.UINT4) or q.kind == "block"

    def per_channel(q: _QDQ) -> bool:
        return q.kind == "channel" or any(a.name == "axis" for a in q.node.attribute)

    for minimum, what, uses in [(21, "INT4 or block quantization", int4_or_block),
                                (13, "per-channel quantization", per_channel)]:
        users = [q.name for q in g.qdq.values() if uses(q)]
        if users and g.opset < minimum:
            yield users[0], (f"{len(users)} Q/DQ node(s) use {what} (first: {users[0]}) but the model imports "
                             f"opset {g.opset}; TensorRT needs opset >= {minimum}: convert the model")


# --------------------------------------------------------------------------------------------
# Placement and range rules (the graph builds, but fusion or precision suffers)
# --------------------------------------------------------------------------------------------

@_rule("zero-point-missing", "warning", "give each QuantizeLinear an explicit int8 zero point")
def _zero_point_missing(g: _Graph) -> Iterator[tuple[str, str]]:
    for q in g.qdq.values():
        if q.is_q and q.implicit_uint8:
            yield q.name, ("has no zero point and no output_dtype, so ONNX runtimes quantize to UINT8 while "
                           "TensorRT reads INT8; add an INT8 zero point of 0")


def _expected_weight_axis(g: _Graph, consumer: onnx.NodeProto, index: int) -> int | None:
    if index != 1:
        return None
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if consumer.op_type == "MatMul":
        rank = g.rank(consumer.input[1])
        return None if rank is None or rank < 2 else rank - 1
    return None


@_rule("per-channel-axis", "warning", "per-channel axis must be the output-channel axis of the weight")
def _per_channel_axis(g: _Graph) -> Iterator[tuple[str, str]]:
    for q in g.qdq.values():
        if q.is_q or q.kind != "channel":
            continue
        axis = g.normalized_axis(q)
        for consumer, index in g.consumers.get(q.node.output[0], []):
            expected = _expected_weight_axis(g, consumer, index)
            if expected is not None and axis != expected:
                yield q.name, (f"per-channel axis {axis} but {consumer.op_type} '{_node_name(consumer)}' has its "
                               f"output channels on axis {expected}; quantize along axis {expected}")


def _per_axis_view(scale: np.ndarray, rank: int, axis: int) -> np.ndarray:
    if scale.size == 1:
        return scale.reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return scale.reshape(shape)


@_rule("weight-narrow-range", "warning", "int8 weights should stay within [-127, 127]")
def _weight_narrow_range(g: _Graph) -> Iterator[tuple[str, str]]:
    for q in g.qdq.values():
        if q.qtype != TensorProto.INT8 or g.const(q.data) is None or q.kind == "block":
            continue
        data = g.values(q.data)
        if data is None:
            continue
        if q.is_q:  # a float weight quantized in the graph: compute what it becomes
            scale, zp, axis = g.values(q.scale), g.values(q.zero_point), g.normalized_axis(q)
            if scale is None or axis is None or (q.zero_point and zp is None):
                continue
            s = _per_axis_view(_as_float(scale), data.ndim, axis)
            z = 0 if zp is None else _per_axis_view(_as_float(zp), data.ndim, axis)
            data = np.clip(np.rint(_as_float(data) / s) + z, -128, 127)
        hits = int(np.count_nonzero(data == -128))
        if hits:
            yield q.name, (f"weight '{q.data}' has {hits} value(s) at -128; use the narrow range [-127, 127] "
                           "for weights (qmin = -127) so positive and negative ranges match")


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    return [name for name in node.input[:2] if name]


@_rule("unquantized-weighted-input", "warning",
       "a Conv/ConvTranspose/Gemm/MatMul with one quantized input should have all its inputs quantized")
def _unquantized_weighted_input(g: _Graph) -> Iterator[tuple[str, str]]:
    for node in g.nodes:
        if node.op_type not in _WEIGHTED_OPS:
            continue
        dq_of = {name: g.dequantized(name) for name in _data_inputs(node)}
        dqs = [q for q in dq_of.values() if q is not None]
        if not dqs or all(_weight_only(g, q) for q in dqs):
            continue  # none quantized, or a weight-only layer (4-bit or block-wise weights, float activations: W4A16)
        for name, dq in dq_of.items():
            if dq:
                continue
            what = "weight" if g.const(name) is not None else "activation"
            yield _node_name(node), (f"{what} input '{name}' is float while another input is quantized, so "
                                     "TensorRT cannot run this layer in INT8; put a Q/DQ pair on it")


def _weight_only(g: _Graph, dq: _QDQ) -> bool:
    """``dq`` dequantizes a constant weight of 4 bits or in blocks: weight-only quantization, whose layer reads float
    activations by design (TensorRT runs it as a weight-only GEMM)."""
    four_bit = dq.qtype in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    return g.const(dq.data) is not None and (four_bit or dq.kind == "block" or dq.block_size > 0)


@_rule("contrib-op", "error", "no ONNX Runtime contrib ops (com.microsoft): TensorRT's ONNX parser has no importer for them")
def _contrib_op(g: _Graph) -> Iterator[tuple[str, str]]:
    # a model run through onnxruntime.transformers' optimizer (Attention, SkipLayerNormalization, BiasGelu, ...) passed
    # the lint and could not be built
    for node in g.nodes:
        if node.domain == "com.microsoft":
            yield _node_name(node), (f"{node.op_type} is an ONNX Runtime contrib op, which TensorRT cannot import; quantize "
                                     "the model as exported, before ONNX Runtime's transformer optimizer fuses it")


@_rule("residual-add", "warning", "quantize the residual input of an Add that follows a quantized weighted op")
def _residual_add(g: _Graph) -> Iterator[tuple[str, str]]:
    for node in g.nodes:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        for i in (0, 1):
            producer = g.producer.get(node.input[i])
            other = node.input[1 - i]
            if producer is None or producer.op_type not in _WEIGHTED_OPS:
                continue
            if not any(g.dequantized(name) for name in _data_inputs(producer)):
                continue
            if g.constant_computed(other) or g.dequantized(other):
                continue
            yield _node_name(node), (f"residual input '{other}' of an Add after {producer.op_type} "
                                     f"'{_node_name(producer)}' is float; add a Q/DQ pair on it so TensorRT "
                                     "can fuse the Add into the INT8 layer")
            break


@_rule("quantized-constant", "warning",
       "Q/DQ with an activation grid on a tensor computed from constants (a conv bias reshaped at run time) feeding no weight slot")
def _quantized_constant(g: _Graph) -> Iterator[tuple[str, str]]:
    for q in g.qdq.values():
        # initializers and weights (a QuantizeLinear of a constant read as a weight) are the weight pattern
        if not q.is_q or g.const(q.data) is not None or not g.constant_computed(q.data):
            continue
        readers = [(c, i) for dq in g.consumers.get(q.node.output[0], []) for c, i in g.consumers.get(dq[0].output[0], [])
                   if dq[0].op_type == "DequantizeLinear"]
        if not readers or any(c.op_type in _WEIGHTED_OPS and i == 1 for c, i in readers):  # a weight computed at run time
            continue
        producer = g.producer.get(q.data)
        what = f"{producer.op_type} '{_node_name(producer)}'" if producer is not None else "constants"
        users = ", ".join(sorted({f"{c.op_type} '{_node_name(c)}'" for c, _ in readers}))
        yield q.name, (f"'{q.data}' is computed from constants only ({what}; paddle2onnx writes every conv bias as "
                       f"Add(Conv, Reshape(bias))) but is quantized like an activation for {users}: TensorRT folds it into "
                       "an INT8 constant with one per-tensor scale, rounding every bias to that grid and clipping it where "
                       "the range was calibrated short; keep it float (onnxq's trt placement does) or "
                       "fold the Reshape into an initializer")


def _scale_key(g: _Graph, q: _QDQ) -> tuple:
    scale, zp = g.values(q.scale), g.values(q.zero_point)
    if scale is None:
        return ("tensor", q.scale, q.zero_point)
    return ("value", _as_float(scale).tobytes(), None if zp is None else _as_float(zp).tobytes())


@_rule("concat-scales", "warning", "inputs of a Concat should be dequantized with one shared scale")
def _concat_scales(g: _Graph) -> Iterator[tuple[str, str]]:
    for node in g.nodes:
        if node.op_type != "Concat":
            continue
        sources = [q for q in (g.dequantized(name) for name in node.input if name) if q is not None]
        keys = {_scale_key(g, q) for q in sources}
        if len(keys) > 1:
            names = ", ".join(f"'{q.scale}'" for q in sources)
            yield _node_name(node), (f"inputs are dequantized with {len(keys)} different scales ({names}); use one "
                                     "shared scale so TensorRT can drop the requantization around the Concat")
