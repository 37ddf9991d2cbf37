"""Target profiles: the constraints a backend publishes and methods read.

A profile says which integer types, symmetry and placement the deployed runtime needs. Methods
and the placement pass read the profile instead of branching on backend names.

Profiles are registered like everything else a plugin provides: the ``register_targets`` hook
fills the host's registry (``Host.targets``), and ``onnxq optimize --target`` offers its names.
The built-in ``ort``, ``trt`` and ``ort-s8`` are registered that way too (by
``onnxq.backends.builtin``), and are also kept here in :data:`BUILTIN_PROFILES` so that
:func:`get_profile` works for library code that has no host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np

from onnxq import qparams as qp
from onnxq.errors import OptionError

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

#: ops whose output is its input rearranged or subsampled: input and output share one scale so
#: runtimes can drop the Q/DQ pair around them (ORT "drop QDQ", TensorRT Q/DQ propagation).
SCALE_PRESERVING_OPS = frozenset(
    {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Resize", "Split", "DepthToSpace", "SpaceToDepth"}
)


@dataclass(frozen=True)
class TargetProfile:
    """Quantization constraints of one deployment target."""

    name: str
    bits: int = 8
    #: activation storage: signed symmetric (zero point 0) or unsigned asymmetric
    activation_signed: bool = True
    weight_narrow: bool = True
    weight_per_channel: bool = True
    #: quantize the outputs of quantized ops too (ORT needs Q after Conv to run QLinearConv)
    quantize_outputs: bool = False
    #: ops besides the weighted ones whose float activation inputs/outputs are quantized
    extra_ops: frozenset[str] = field(default_factory=frozenset)
    #: quantize the non-conv input of a residual Add (TensorRT Conv+Add fusion)
    residual_add: bool = False
    #: all quantized inputs of a Concat share one scale
    share_concat_scales: bool = False
    #: quantize MatMuls whose two inputs are both activations (attention's Q·Kᵀ and softmax·V)
    activation_matmul: bool = True
    #: int32 bias DequantizeLinear (ORT only; TensorRT rejects it)
    int32_bias: bool = False
    #: rewrite Gemms that produce graph outputs as MatMul(+Add) so ORT keeps them integer with float outputs
    gemm_outputs_as_matmul: bool = False
    #: block size of 4-bit weight-only quantization (``bits == 4``)
    block_size: int = 32
    #: write 4-bit MatMuls as com.microsoft.MatMulNBits (ORT) instead of DQ -> MatMul (portable, TensorRT)
    int4_matmulnbits: bool = False
    #: the runtime quantizes the float weights of a Conv/ConvTranspose/Gemm that reads a per-tensor DequantizeLinear
    #: (ONNX Runtime >= 1.21, its WeightBiasQuantization optimizer: int8 per tensor), so a layer left float gets an input
    #: DequantizeLinear that optimizer does not match (:func:`onnxq.graph.qdq.keep_float_layers_float`)
    guard_float_layers: bool = False
    #: write the Q/DQ pairs ONNX Runtime's QDQ propagation would add across Reshape/Transpose/... itself: at opset >= 21
    #: its int8-to-uint8 pass leaves those pairs inconsistent and the session fails to load
    #: (:func:`onnxq.graph.qdq.propagate_across_moves`)
    explicit_propagation: bool = False
    description: str = ""

    def validate_bits(self) -> None:
        if self.bits not in (8, 7, 4):
            raise OptionError(f"--bits {self.bits} is not supported (8 or 7: weights and activations; 4: weight-only MatMul/Gemm)")
        if self.weight_only and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise OptionError(f"block size {self.block_size} must be a power of two >= 16 (ONNX Runtime's 4-bit MatMul kernel needs it)")

    @property
    def weight_only(self) -> bool:
        """4-bit mode: block-wise int4 weights of MatMul/Gemm, activations stay float."""
        return self.bits == 4

    def weight_block_qparams(self, weight: np.ndarray, axis: int) -> qp.QParams:
        """Block-wise 4-bit qparams along the reduction axis ``axis``.

        TensorRT accepts only symmetric int4; ONNX Runtime's MatMulNBits also takes uint4 with
        zero points, which fits skewed blocks better.
        """
        return qp.blockwise(weight, axis, self.block_size, 4, signed=self.activation_signed)

    @property
    def activation_levels(self) -> int:
        """Quantization levels on one side of zero for a symmetric grid (128 at INT8, 64 at INT7)."""
        return 2 ** (self.bits - 1)

    def activation_qparams(self, lo: float | np.ndarray, hi: float | np.ndarray, axis: int | None = None) -> qp.QParams:
        """QParams for an activation whose (clipped) real range is ``[lo, hi]``.

        With 1-D ``lo``/``hi`` and ``axis``: one grid per entry along ``axis``, each the one the scalar
        call gives (a search scores all its candidate ranges in one array operation).
        """
        if self.activation_signed:
            t = np.maximum(np.abs(np.asarray(lo, np.float64)), np.abs(np.asarray(hi, np.float64)))
            # TensorRT and ONNX int8 Q saturate to [-128, 127]; INT7 narrows to [-63, 63] by Clip
            return qp.symmetric(t, self.bits, narrow=self.bits < 8, axis=axis)
        return qp.asymmetric(lo, hi, self.bits, axis)

    def weight_qparams(self, absmax: np.ndarray, axis: int | None) -> qp.QParams:
        """Symmetric per-channel (or per-tensor) weight qparams from max-abs values."""
        if not self.weight_per_channel or axis is None:
            return qp.symmetric(float(np.max(absmax)), self.bits, self.weight_narrow, None)
        return qp.symmetric(absmax, self.bits, self.weight_narrow, axis)

    def with_bits(self, bits: int) -> "TargetProfile":
        return replace(self, bits=bits)


TRT = TargetProfile(
    name="trt",
    activation_signed=True,
    quantize_outputs=False,
    residual_add=True,
    share_concat_scales=True,
    # TensorRT's fused int8 multi-head attention needs Q/DQ on both inputs of Q·Kᵀ and softmax·V
    # (ModelOpt quantizes these BMMs for int8 when the sequence is <= 512)
    activation_matmul=True,
    description="TensorRT explicit quantization: int8 symmetric, Q/DQ on inputs of Conv/Gemm/MatMul (attention BMMs included) and residual Add, one scale per Concat",
)

ORT_EXTRA_OPS = frozenset({"Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "MaxPool", "Sigmoid", "LeakyRelu"})

ORT_U8 = TargetProfile(
    name="ort",
    activation_signed=False,
    quantize_outputs=True,
    extra_ops=ORT_EXTRA_OPS,
    gemm_outputs_as_matmul=True,
    int4_matmulnbits=True,
    guard_float_layers=True,
    # the bias as ONNX Runtime's kernels add it: versions before 1.32 fuse only an int32 bias (onnxq.graph.qdq.int32_biases)
    int32_bias=True,
    # attention's activation x activation MatMuls stay float: on all-MiniLM-L6-v2 quantizing them
    # bought no speed and cost accuracy (docs/methods.md, "Transformers")
    activation_matmul=False,
    description="ONNX Runtime CPU: uint8 asymmetric activations, int8 per-channel weights (U8S8), integer kernels for Conv/MatMul/Gemm/Add/Concat/pooling; attention's activation x activation MatMuls stay float",
)

ORT_S8 = replace(ORT_U8, name="ort-s8", activation_signed=True, explicit_propagation=True, description="ONNX Runtime CPU with int8 symmetric activations (S8S8)")

#: the profiles onnxq ships, by name (also registered through ``register_targets``)
BUILTIN_PROFILES: Mapping[str, TargetProfile] = MappingProxyType({p.name: p for p in (ORT_U8, TRT, ORT_S8)})


def get_profile(name: str, bits: int = 8, block_size: int | None = None, profiles: Mapping[str, TargetProfile] | None = None) -> TargetProfile:
    """Look up a target profile by name and set its bit width (and 4-bit block size).

    ``profiles`` is a registry such as ``Host.targets``; names it lacks fall back to
    :data:`BUILTIN_PROFILES`, so ``get_profile("ort")`` works without a host.
    """
    profile = (profiles or {}).get(name) or BUILTIN_PROFILES.get(name)
    if profile is None:
        known = list(profiles or {}) + [n for n in BUILTIN_PROFILES if n not in (profiles or {})]
        raise OptionError(f"unknown target '{name}' (targets: {', '.join(known)})")
    profile = profile.with_bits(bits)
    if block_size is not None:
        profile = replace(profile, block_size=block_size)
    profile.validate_bits()
    return profile
