"""The ``onnxq`` command line (click), a thin layer over the Python API."""
