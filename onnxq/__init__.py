"""onnxq: post-training quantization of ONNX models with pluggable methods.

The public Python API is :func:`optimize` (quantize a model) and :func:`compare`
(evaluate FP32 against quantized models). Method authors subclass
:class:`onnxq.method.QuantMethod` and register it through the ``onnxq`` entry-point group.
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxq.errors import OnnxqError

__all__ = ["OnnxqError", "__version__", "optimize", "compare"]


def __getattr__(name: str):  # lazy: keep `import onnxq` and `onnxq --help` cheap
    if name == "optimize":
        from onnxq.pipeline import optimize

        return optimize
    if name == "compare":
        from onnxq.cli.evaluation import compare

        return compare
    raise AttributeError(name)
