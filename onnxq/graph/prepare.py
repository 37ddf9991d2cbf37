"""Prepare a float model for quantization: shapes and opset.

Shape inference never aborts the run: ONNX's strict inference is tried first, then the lenient
mode, and where both fail onnxq keeps going with what the model already declares (ONNX
Runtime's ``quant_pre_process`` fails outright on many real models). Tensor types that are still
unknown are filled in later by running the model (see :func:`onnxq.calib.statistics`).
"""

from __future__ import annotations

import logging

from collections.abc import Iterable

import numpy as np
import onnx
import onnx.inliner
from onnx import helper, numpy_helper, version_converter

from onnxq.errors import ModelError, first_line

log = logging.getLogger(__name__)

#: per-channel DequantizeLinear (``axis``) needs opset 13.
MIN_QDQ_OPSET = 13
#: int4 types and block-wise DequantizeLinear (``block_size``) need opset 21.
MIN_INT4_OPSET = 21
#: Q/DQ on float16 tensors (float16 scales) needs opset 19.
MIN_FP16_QDQ_OPSET = 19


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset for the default ONNX domain."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Return the model with inferred shapes and a word on how inference went.

    The status is ``"full"``, ``"partial"`` (lenient mode) or ``"none"`` (kept the declared shapes).
    """
    if model.ByteSize() > 2**31 - 1:
        log.info("model over 2 GB: skipping in-memory shape inference")
        return model, "none"
    # the file's own intermediate shapes first; then without them, which may be stale (a model edited after export
    # declared a tensor 128 wide that is 64: inference spread it and ONNX Runtime refused onnxq's copy of a model it runs)
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    attempts = ((model, True, "full"), (bare, True, "full"), (model, False, "partial"))
    for base, strict, status in attempts if len(model.graph.value_info) else (attempts[0], attempts[2]):
        try:
            inferred = onnx.shape_inference.infer_shapes(base, check_type=False, strict_mode=strict, data_prop=True)
            return inferred, status
        except Exception as exc:  # inference errors come in many types
            log.info("shape inference (strict=%s) failed: %s", strict, str(exc).splitlines()[0] if str(exc) else exc)
    return model, "none"


def has_float16(model: onnx.ModelProto) -> bool:
    """True if any input, output, initializer or typed intermediate of the main graph is float16."""
    return onnx.TensorProto.FLOAT16 in tensor_types(model).values()


#: operators a model another tool already quantized holds (ONNX Runtime's operator-oriented and dynamic forms, its
#: 4-bit MatMul)
QUANTIZED_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QGemm", "QLinearAdd", "QLinearMul",
    "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearAveragePool", "QLinearGlobalAveragePool",
    "QLinearReduceMean", "QLinearWhere", "QAttention", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "MatMulNBits", "QOrderedMatMul"})


def check_not_quantized(model: onnx.ModelProto) -> None:
    """Refuse a model another tool already quantized: onnxq quantizes float models.

    A model from ONNX Runtime's ``quantize_static`` (QDQ) was quantized again on top of its own Q/DQ pairs, every
    activation twice, and its ``--target trt`` output failed ``onnxq lint``; one from ``quantize_dynamic`` or in
    operator form (QLinearConv, ConvInteger) was written back unchanged with "the output is the float model". Weights
    the model holds as integers behind a DequantizeLinear (TFLite's int8 weights) are no such thing: their layers are
    quantized around them.
    """
    constants = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    found: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in QUANTIZED_OPS:
            found[n.op_type] = found.get(n.op_type, 0) + 1
        elif n.op_type == "QuantizeLinear" and n.input and n.input[0] not in constants:
            found["QuantizeLinear of an activation"] = found.get("QuantizeLinear of an activation", 0) + 1
    if found:
        what = ", ".join(f"{k} x{v}" for k, v in sorted(found.items(), key=lambda kv: -kv[1])[:3])
        raise ModelError(f"the model is already quantized ({what}): onnxq quantizes float models; give it the float model "
                         "this one was made from")


def inline_functions(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` with its model-local functions inlined, and how many functions it had.

    An exporter that writes modules as functions (torch's ``export_modules_as_functions``, onnxscript) hides their
    layers from the graph onnxq reads: a BERT exported so had its 14 encoder MatMuls left float with nothing said, and
    methods that run parts of the graph on their own (easyquant, gptq) stopped because ONNX Runtime no longer found
    the functions. Inlined, the layers are the graph's own; the float model the check compares with keeps its
    functions.
    """
    count = len(model.functions)
    if not count:
        return model, 0
    try:
        inlined = onnx.inliner.inline_local_functions(model, convert_version=True)
    except Exception as exc:  # noqa: BLE001 - the inliner's errors are many and all mean the same to the user
        raise ModelError(f"the model's {count} local functions could not be inlined ({first_line(exc)}): export it "
                         "without functions (torch.onnx.export without export_modules_as_functions), or inline them "
                         "with onnx.inliner.inline_local_functions") from None
    del inlined.functions[:]
    return inlined, count


#: the activations ONNX Runtime's FusedConv and FusedGemm carry, and how each is written back as its own node
_FUSED_ACTIVATIONS = {"Relu": (), "Sigmoid": (), "Tanh": (), "LeakyRelu": ("alpha",), "HardSigmoid": ("alpha", "beta"), "Clip": ()}


def unfuse_runtime_ops(model: onnx.ModelProto) -> list[str]:
    """Write ONNX Runtime's FusedConv and FusedGemm back as Conv / Gemm and their activation, in place; returns the nodes.

    A model saved by ONNX Runtime at ORT_ENABLE_EXTENDED holds them: onnxq quantizes Conv and Gemm, and 4 of a CNN's 5
    layers stayed float with nothing said. ONNX Runtime fuses them again when it loads the quantized model. A model saved
    at ORT_ENABLE_ALL is in its blocked NCHWc layout, which no other runtime reads: refused with what to do.
    """
    nchwc = [n.name or n.op_type for n in model.graph.node if n.domain == "com.microsoft.nchwc"]
    if nchwc:
        raise ModelError(f"the model was saved by ONNX Runtime at ORT_ENABLE_ALL (its NCHWc layout: {', '.join(nchwc[:3])}): "
                         "quantize the model before ONNX Runtime optimizes it, or save it at ORT_ENABLE_EXTENDED or lower")
    done, nodes = [], []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        act = attrs.get("activation", b"")
        act = act.decode() if isinstance(act, bytes) else str(act)
        if node.domain != "com.microsoft" or node.op_type not in ("FusedConv", "FusedGemm") or act not in _FUSED_ACTIVATIONS:
            nodes.append(node)
            continue
        base = node.op_type[len("Fused"):]
        keep = {k: v for k, v in attrs.items() if not k.startswith("activation")}
        pre = f"{node.output[0]}_pre_{act.lower()}"
        inputs = list(node.input[:3])
        nodes.append(helper.make_node(base, inputs, [pre], name=node.name, **keep))
        if base == "Conv" and len(node.input) > 3 and node.input[3]:  # FusedConv's Z: act(conv + Z)
            summed = f"{pre}_sum"
            nodes.append(helper.make_node("Add", [pre, node.input[3]], [summed], name=f"{node.name}/add"))
            pre = summed
        params = list(attrs.get("activation_params", [])) or [attrs[f"activation_{k}"] for k in ("alpha", "beta") if f"activation_{k}" in attrs]
        extra: dict = dict(zip(_FUSED_ACTIVATIONS[act], params))
        act_inputs = [pre]
        if act == "Clip":
            lo, hi = (params + [float("-inf"), float("inf")])[:2] if params else (float("-inf"), float("inf"))
            for bound, value in (("min", lo), ("max", hi)):
                name = f"{node.output[0]}_clip_{bound}"
                model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, np.float32), name))
                act_inputs.append(name)
        nodes.append(helper.make_node(act, act_inputs, [node.output[0]], name=f"{node.name}/{act.lower()}", **extra))
        done.append(node.name)
    if done:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return done


def check_float16_target(model: onnx.ModelProto, target: str, integer_kernels: bool, tensors: Iterable[str] | None = None) -> None:
    """Refuse Q/DQ on float16 tensors for a target that runs Q/DQ as ONNX Runtime's integer kernels.

    Q/DQ on float16 tensors (float16 scales, opset 19) is what TensorRT builds from; ONNX Runtime's
    QDQ fusions (QLinearConcat, QGemm, ...) take float32 models only and fail to load such a graph.
    ``tensors`` are the tensors that would get Q/DQ (None: every tensor of the model), so a float32
    graph that merely holds a float16 table behind a Cast is not refused.
    """
    if not integer_kernels:
        return
    types = tensor_types(model)
    if tensors is None:
        kinds = set(types.values())
        halves: list[str] = []
    else:
        inits = {t.name: t.data_type for t in model.graph.initializer}
        kinds = {types.get(t, inits.get(t)) for t in tensors}
        halves = [t for t in tensors if types.get(t, inits.get(t)) == onnx.TensorProto.FLOAT16]
    if halves and onnx.TensorProto.FLOAT in kinds:
        # a float32 model with a float16 island: name it, and the layers to keep float
        readers = sorted({n.name for n in model.graph.node if set(n.input) & set(halves)})
        raise ModelError(f"float16 tensors would be quantized for --target {target} ({', '.join(halves[:3])}, read by "
                         f"{', '.join(readers[:3]) or 'no node'}; ONNX Runtime's integer kernels take float32 models): "
                         f"{' '.join('--exclude ' + r for r in readers[:3])} keeps them float, or use --target trt")
    if onnx.TensorProto.FLOAT16 in kinds:
        raise ModelError(f"float16 models are not supported for --target {target} yet (ONNX Runtime's integer kernels take "
                         "float32 models): quantize the float32 model, or use --target trt")


def upgrade_opset(model: onnx.ModelProto, minimum: int) -> onnx.ModelProto:
    """Convert the model to at least opset ``minimum`` (no-op if already there); float16 models to
    at least :data:`MIN_FP16_QDQ_OPSET`, where QuantizeLinear/DequantizeLinear take float16, so
    their Q/DQ pairs keep the model's float16 type (ONNX Runtime runs them)."""
    if has_float16(model):
        minimum = max(minimum, MIN_FP16_QDQ_OPSET)
    current = default_opset(model)
    if current >= minimum:
        return model
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        # no standard operator at all (an XGBoost or LightGBM classifier: ai.onnx.ml only): nothing to convert, and the
        # version converter refuses a model without the default domain ("invalid version")
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.opset_import.append(helper.make_opsetid("", minimum))
        out.ir_version = max(out.ir_version, helper.find_min_ir_version_for(list(out.opset_import), ignore_unknown=True))
        return out
    try:
        converted = version_converter.convert_version(model, minimum)
    except Exception as exc:
        raise ModelError(f"cannot upgrade the model from opset {current} to {minimum}, which quantized output needs: {exc}") from None
    restore_non_tensor_types(converted, model)
    # the version converter leaves ir_version alone: an IR 3 file at opset 13 keeps IR 3's rule that
    # every initializer is a graph input, and the Q/DQ parameters added later then fail the checker
    needed = helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
    if converted.ir_version < needed:
        log.info("upgraded IR version %d -> %d with the opset", converted.ir_version, needed)
        converted.ir_version = needed
    log.info("upgraded opset %d -> %d", current, minimum)
    return converted


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move top-level ``Constant`` nodes holding a tensor into initializers (in place).

    Exporters (paddle2onnx, torch) often write weights as Constant nodes; as initializers they can
    be quantized, fed to single-node sessions and deduplicated like any weight. Sparse initializers are
    made dense initializers too (one was quantized at run time as an activation, counted as no weight,
    and written back float). Returns the count.
    """
    g = model.graph
    existing = {t.name for t in g.initializer}
    keep, moved = [], 0
    for node in g.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None and node.output[0] not in existing:
            t = onnx.TensorProto()
            t.CopyFrom(value.t)
            t.name = node.output[0]
            g.initializer.append(t)
            moved += 1
        else:
            keep.append(node)
    if moved:
        del g.node[:]
        g.node.extend(keep)
    for sparse in g.sparse_initializer:  # weights stored sparse: dense here, as every other weight, so they are quantized
        g.initializer.append(numpy_helper.from_array(_dense(sparse), sparse.values.name))
        moved += 1
    del g.sparse_initializer[:]
    return moved


def _dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """A sparse initializer's dense value: indices linear ([NNZ]) or coordinates ([NNZ, rank])."""
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dense = np.zeros(int(np.prod(sparse.dims, dtype=np.int64)), values.dtype)
    flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), tuple(sparse.dims))
    dense[flat] = values
    return dense.reshape(tuple(sparse.dims))


def initializers_as_constants(model: onnx.ModelProto) -> list[str]:
    """Stop listing initializers in ``graph.input`` (in place); returns the names unlisted.

    ``torch.onnx.export(..., keep_initializers_as_inputs=True)`` and IR < 4 exporters list every
    weight as a graph input too, which makes it an overridable default rather than a constant.
    onnxq quantizes weights as constants (a caller feeding a different weight to a quantized model
    would get the old integers anyway), so the listing goes before any rewrite; calibration feeds
    and the quantized model then ask only for the real inputs. IR < 4 requires the listing, so
    such models keep it (:func:`onnxq.graph.edit.cleanup` still drops the entry of an initializer
    it removes).
    """
    g = model.graph
    if model.ir_version and model.ir_version < 4:
        return []
    inits = {t.name for t in g.initializer}
    listed = [i.name for i in g.input if i.name in inits]
    if listed:
        keep = [i for i in g.input if i.name not in inits]
        del g.input[:]
        g.input.extend(keep)
    return listed


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type is known (inputs, outputs, value_info, initializers)."""
    types: dict[str, int] = {}
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    return types


def non_tensor_values(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """The values declared as something other than a tensor, with their types: a sequence, a map, an optional
    (scikit-learn's ZipMap output, a list of {class: probability} dicts per sample)."""
    g = model.graph
    return {vi.name: vi.type for vi in (*g.input, *g.output, *g.value_info) if vi.type.WhichOneof("value") not in (None, "tensor_type")}


def restore_non_tensor_types(model: onnx.ModelProto, like: onnx.ModelProto) -> None:
    """Give ``model``'s values ``like``'s sequence, map and optional types (in place): graphsurgeon writes them as
    tensors of undefined type, and ONNX's version converter turns a sequence of maps into a sequence of undefined
    tensors (a LightGBM classifier at opset 9); ONNX Runtime refused either ("Invalid tensor data type 0")."""
    kept = non_tensor_values(like)
    if kept:
        for v in (*model.graph.input, *model.graph.output, *model.graph.value_info):
            if v.name in kept:
                v.type.CopyFrom(kept[v.name])


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    """Shape of every tensor with a known rank: ints for static dims, names or None for dynamic."""
    shapes: dict[str, tuple[int | str | None, ...]] = {}
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            dims: list[int | str | None] = []
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    dims.append(d.dim_value)
                elif d.HasField("dim_param"):
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
            shapes[vi.name] = tuple(dims)
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes
