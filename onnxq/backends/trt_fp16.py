"""FP16 fallback "the strongly typed way": rewrite a (QDQ) model's float32 parts to float16 in the graph.

TensorRT 11 builds every network strongly typed: there is no ``BuilderFlag.FP16`` any more, so the
precision of the layers left outside Q/DQ is whatever type the ONNX graph gives them. To run them
in FP16 the graph itself must carry float16 tensors. :func:`convert_to_fp16` does that:

* every float32 tensor computed by an op of :data:`FP16_OPS` becomes float16 (initializers are
  converted, ``Constant``/``ConstantOfShape`` values too, ``Cast(to=FLOAT)`` becomes
  ``Cast(to=FLOAT16)``);
* Q/DQ scales become float16, so each QuantizeLinear's scale matches its input type and each
  DequantizeLinear produces float16 (TensorRT's strongly typed rule; ONNX opset >= 19, to which the
  model is upgraded when it holds Q/DQ);
* the model's inputs and outputs keep their types: a Cast after each float32 input, one before
  each float32 output;
* ops outside :data:`FP16_OPS` (and any named in ``fp32_ops``) stay in float32 inside Casts, and
  a few inputs that ONNX requires in float32 (``Resize`` scales/roi, ``Upsample`` scales) stay so.

Limits (documented in docs/tensorrt.md): control flow (If/Loop/Scan) is refused; every tensor's
type must be known after ONNX shape inference; float16 has a range of +-65504 (larger constants
are clipped, with a count in the result) and scales below 6.1e-5 lose precision as subnormals
(the largest relative change of any scale is reported).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxq.errors import ModelError
from onnxq.graph import edit
from onnxq.graph.edit import Namer
from onnxq.graph.prepare import default_opset, tensor_types

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16

#: ops whose float inputs and outputs may be float16 (the common CNN set, plus layout and Q/DQ ops)
FP16_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Max", "Min", "Sum", "Mean",
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus", "Mish", "Erf", "Clip",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization", "Softmax", "Dropout",
    "Concat", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split", "Gather", "Pad", "Expand", "Tile",
    "Resize", "Upsample", "DepthToSpace", "SpaceToDepth", "Identity", "Where", "Shape", "Size",
    "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual",
    "QuantizeLinear", "DequantizeLinear", "Constant", "ConstantOfShape", "Cast",
})
#: (op, input index) that ONNX requires in float32 even when the op computes in float16
FP32_SLOTS = frozenset({("Resize", 1), ("Resize", 2), ("Upsample", 1)})
#: DequantizeLinear/QuantizeLinear accept float16 scales from opset 19
MIN_FP16_QDQ_OPSET = 19
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass
class Fp16Conversion:
    """The converted model and what the conversion had to compromise on."""

    model: onnx.ModelProto
    #: nodes kept in float32 (op not in FP16_OPS, or named in ``fp32_ops``)
    float32_nodes: list[str] = field(default_factory=list)
    #: Q/DQ scales converted, and the largest relative change float16 rounding caused in any of them
    scales_converted: int = 0
    max_scale_relative_change: float = 0.0
    #: float constants with values beyond +-65504, clipped
    clipped_constants: list[str] = field(default_factory=list)
    casts_inserted: int = 0


def _has_subgraphs(model: onnx.ModelProto) -> str | None:
    for n in model.graph.node:
        if edit.subgraphs(n):
            return n.name or n.op_type
    return None


def _types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # keep what the model declares
        inferred = model
    return tensor_types(inferred)


def _to_half(arr: np.ndarray, name: str, clipped: list[str]) -> np.ndarray:
    a = np.asarray(arr, np.float32)
    if a.size and np.nanmax(np.abs(a)) > _FP16_MAX:
        clipped.append(name)
        a = np.clip(a, -_FP16_MAX, _FP16_MAX)
    return a.astype(np.float16)


def convert_to_fp16(model: onnx.ModelProto, fp32_ops: frozenset[str] | set[str] = frozenset()) -> Fp16Conversion:
    """Return a copy of ``model`` whose float32 computation runs in float16 (inputs/outputs keep float32).

    ``fp32_ops`` names op types to keep in float32 besides those outside :data:`FP16_OPS`.
    Raises :class:`ModelError` for control flow and for tensors whose type is unknown.
    """
    where = _has_subgraphs(model)
    if where is not None:
        raise ModelError(f"the fp16 rewrite does not handle control flow (node '{where}' has a subgraph); build without --fp16")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node) and default_opset(m) < MIN_FP16_QDQ_OPSET:
        from onnxq.graph.prepare import upgrade_opset

        m = upgrade_opset(m, MIN_FP16_QDQ_OPSET)
    types = _types(m)
    g = m.graph
    result = Fp16Conversion(m)
    inits = {t.name: t for t in g.initializer}
    fresh = Namer.of(m).fresh

    def is_half_node(n: onnx.NodeProto) -> bool:
        return n.domain in ("", "ai.onnx") and n.op_type in FP16_OPS and n.op_type not in fp32_ops

    # actual element type of every float tensor after the rewrite
    actual: dict[str, int] = {i.name: types.get(i.name, 0) for i in g.input if i.name not in inits}
    for n in g.node:
        half = is_half_node(n)
        if not half:
            result.float32_nodes.append(n.name or n.op_type)
        for o in n.output:
            if not o:
                continue
            t = types.get(o)
            if t is None:
                raise ModelError(f"the fp16 rewrite needs the type of every tensor; ONNX shape inference left '{o}' (output of {n.op_type} '{n.name}') unknown")
            actual[o] = HALF if (half and t == FLOAT) else t
        if half:
            _retype_attributes(n, result)

    # graph outputs computed in float16 get a float32 Cast; the producer writes a renamed tensor
    output_casts: list[onnx.NodeProto] = []
    for out in g.output:
        if types.get(out.name) == FLOAT and actual.get(out.name) == HALF:
            inner = fresh(f"{out.name}__fp16")
            for n in g.node:
                for i, o in enumerate(n.output):
                    if o == out.name:
                        n.output[i] = inner
                for i, x in enumerate(n.input):
                    if x == out.name:
                        n.input[i] = inner
            actual[inner], types[inner] = HALF, FLOAT
            output_casts.append(helper.make_node("Cast", [inner], [out.name], to=FLOAT, name=fresh(f"{out.name}/CastToFloat")))

    half_inits: dict[str, str] = {}
    casts: dict[tuple[str, int], str] = {}
    scale_names = {n.input[1] for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 1}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    for n in g.node:
        half = is_half_node(n)
        for idx, name in enumerate(n.input):
            if not name or types.get(name) != FLOAT:
                continue
            want = HALF if half and (n.op_type, idx) not in FP32_SLOTS else FLOAT
            if name in inits:
                if want == HALF:
                    if name not in half_inits:
                        arr = numpy_helper.to_array(inits[name])
                        half_arr = _to_half(arr, name, result.clipped_constants)
                        if name in scale_names:
                            half_arr = np.where((half_arr == 0) & (arr > 0), np.float16(np.finfo(np.float16).smallest_subnormal), half_arr)
                            rel = np.abs(half_arr.astype(np.float64) - arr) / np.maximum(np.abs(arr), 1e-30)
                            result.scales_converted += 1
                            result.max_scale_relative_change = max(result.max_scale_relative_change, float(rel.max()) if rel.size else 0.0)
                        new_name = fresh(f"{name}__fp16")
                        new_inits.append(numpy_helper.from_array(half_arr, new_name))
                        half_inits[name] = new_name
                    n.input[idx] = half_inits[name]
                continue
            have = actual.get(name)
            if have is None:
                raise ModelError(f"the fp16 rewrite needs the type of every tensor; '{name}' is unknown")
            if have != want:
                key = (name, want)
                if key not in casts:
                    casts[key] = fresh(f"{name}__{'fp16' if want == HALF else 'fp32'}")
                    new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=want, name=fresh(f"{name}/CastTo{'Half' if want == HALF else 'Float'}")))
                    result.casts_inserted += 1
                n.input[idx] = casts[key]
        new_nodes.append(n)
    new_nodes.extend(output_casts)
    result.casts_inserted += len(output_casts)

    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    m = edit.cleanup(m, sort=False)  # the float32 originals of converted initializers go
    g = m.graph
    del g.value_info[:]  # stale float32 types; inference fills them again
    try:
        inferred = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=False)
        g.value_info.extend(inferred.graph.value_info)
    except Exception:
        pass
    result.model = m
    return result


def _retype_attributes(n: onnx.NodeProto, result: Fp16Conversion) -> None:
    """float32 attributes that decide an output type become float16 (Cast, Constant, ConstantOfShape)."""
    if n.op_type == "Cast":
        for a in n.attribute:
            if a.name == "to" and a.i == FLOAT:
                a.i = HALF
    elif n.op_type in ("Constant", "ConstantOfShape"):
        if n.op_type == "ConstantOfShape" and not any(a.name == "value" for a in n.attribute):
            # the default value is a float32 zero
            n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
        for a in list(n.attribute):
            if a.name == "value" and a.t.data_type == FLOAT:
                arr = _to_half(numpy_helper.to_array(a.t), n.name or n.op_type, result.clipped_constants)
                a.t.CopyFrom(numpy_helper.from_array(arr, a.t.name))
            elif a.name == "value_float":
                value = np.float16(np.clip(a.f, -_FP16_MAX, _FP16_MAX))
                n.attribute.remove(a)
                n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.array(value, np.float16))))
            elif a.name == "value_floats":
                arr = _to_half(np.array(a.floats, np.float32), n.name or n.op_type, result.clipped_constants)
                n.attribute.remove(a)
                n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(arr)))
