"""The peer quantizers the suite compares onnxq with: one script each, run in the peer's own virtual environment.

``envs.py`` (run by the benchmark) makes the environments; ``npz_feeds.py`` and the
``*_quantize.py`` scripts run inside them and import nothing from onnxq.
"""
