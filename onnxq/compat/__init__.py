"""Drop-in entry points with other tools' signatures, backed by onnxq.

:mod:`onnxq.compat.ort` mirrors ``onnxruntime.quantization.quantize_static`` and its types, so that
moving a script from ONNX Runtime's quantizer to onnxq is a change of one import
(docs/migrating-from-ort.md).
"""
