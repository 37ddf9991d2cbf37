"""Backends: build and run quantized models (ONNX Runtime, TensorRT) and compare them."""
