"""4-bit weight-only MatMul in the form ONNX Runtime runs on its 4-bit kernel.

onnxq's 4-bit plan is written as block-wise int4/uint4 ``DequantizeLinear`` (opset 21) feeding
``MatMul``: portable, and what TensorRT accepts. ONNX Runtime 1.32 fuses that pattern into
``com.microsoft.MatMulNBits`` only in some graph contexts: a MatMul followed by Add + Relu is
first turned into a FusedGemm, and a MatMul whose output feeds a Relu directly is left as float,
so for the ``ort`` target onnxq writes ``MatMulNBits`` itself (the same op ORT's own
MatMulNBitsQuantizer emits) and the 4-bit kernel is used in every context.

Block-wise 8-bit weights (``int8``/``uint8`` ``DequantizeLinear`` with ``block_size``, written by
``gptq``'s mixed precision for its most sensitive MatMuls) become ``MatMulNBits`` with ``bits=8``
(one byte per value and per zero point; ONNX Runtime's default zero point is 128).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.graph import edit
from onnxq.graph.edit import Namer
from onnxq.graph.model_io import tensor_array

MS_DOMAIN = "com.microsoft"


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pack uint4 values (last axis, even length) two per byte, first value in the low nibble."""
    v = values.astype(np.uint8)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def _int4_value(t: onnx.TensorProto) -> np.ndarray:
    return tensor_array(t).astype(np.int32)


_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8}
_SIGNED = (onnx.TensorProto.INT4, onnx.TensorProto.INT8)


def dq_matmul_to_matmulnbits(model: onnx.ModelProto, accuracy_level: int = 0) -> tuple[onnx.ModelProto, list[str]]:
    """Replace every block-wise 4-bit (or 8-bit) ``DequantizeLinear(axis=0) -> MatMul`` weight by ``MatMulNBits``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    fresh = Namer.of(out).fresh
    replaced: list[str] = []
    drop: set[int] = set()
    new_inits: list[onnx.TensorProto] = []
    for node in g.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or consumers.get(dq.output[0], 0) != 1:
            continue
        attrs = {a.name: a.i for a in dq.attribute}
        q = inits.get(dq.input[0])
        if q is None or q.data_type not in _BITS or attrs.get("axis") != 0 or not attrs.get("block_size"):
            continue
        bs = attrs["block_size"]
        if bs < 16 or bs & (bs - 1):
            continue  # MatMulNBits takes power-of-two blocks of 16 or more: a model's own block of 8 stays DQ -> MatMul
        bits = _BITS[q.data_type]
        mid = 1 << (bits - 1)  # MatMulNBits' default zero point: 8 (4 bits) or 128 (8 bits)
        ints = _int4_value(q)  # [K, N]
        if ints.ndim != 2:
            continue
        k, n = ints.shape
        nblocks = -(-k // bs)
        scale = tensor_array(inits[dq.input[1]])  # [nblocks, N], the model's float type: MatMulNBits' scales are its input's
        zp = _int4_value(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale, np.int32)
        signed = q.data_type in _SIGNED
        # MatMulNBits stores unsigned values; its default zero point is 2^(bits-1)
        u = ints + mid if signed else ints
        pad = nblocks * bs - k
        if pad:
            u = np.concatenate([u, np.full((pad, n), mid if signed else 0, np.int32)])
        u = u.T.reshape(n, nblocks, bs)
        blob = _pack_nibbles(u) if bits == 4 else u.astype(np.uint8)  # [N, nblocks, bs·bits/8]
        base = node.name or node.output[0]
        b_name, s_name = fresh(f"{base}_nbits_B"), fresh(f"{base}_nbits_scales")
        new_inits += [numpy_helper.from_array(blob, b_name), numpy_helper.from_array(np.ascontiguousarray(scale.T).reshape(-1), s_name)]
        inputs = [node.input[0], b_name, s_name]
        if not signed:
            zpu = zp.T  # [N, nblocks]
            if bits == 4 and nblocks % 2:
                zpu = np.concatenate([zpu, np.zeros((n, 1), np.int32)], axis=1)
            z_name = fresh(f"{base}_nbits_zero_points")
            packed = _pack_nibbles(zpu) if bits == 4 else zpu.astype(np.uint8)
            new_inits.append(numpy_helper.from_array(packed.reshape(-1), z_name))
            inputs.append(z_name)
        new = helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name, domain=MS_DOMAIN,
                               K=k, N=n, bits=bits, block_size=bs, accuracy_level=accuracy_level)
        node.CopyFrom(new)
        drop.add(id(dq))
        replaced.append(node.name)
    if replaced:
        keep = [n for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(keep)
        g.initializer.extend(new_inits)
        if not any(o.domain == MS_DOMAIN for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        out = edit.cleanup(out, sort=False)  # the int4 weights and their scales go with the DequantizeLinears
    return out, replaced
