"""onnxq's method contract, run on ``brecq`` (8-bit weights, short reconstruction)."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxq_brecq", reason="onnxq-brecq is not installed (pip install -e plugins_contrib/onnxq-brecq)")
pytest.importorskip("torch", reason="brecq learns the rounding with PyTorch (pip install 'onnxq-brecq[torch]')")

from onnxq.testing.contract import MethodContract  # noqa: E402


class TestBrecqContract(MethodContract):
    method = "brecq"
    options = {"iters": 20, "samples": 16}
