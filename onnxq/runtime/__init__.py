"""The runtime layer: ONNX Runtime sessions, the shared arena, providers, latency timing.

The bottom of onnxq: it imports nothing from onnxq but errors.
"""
