"""onnxq's method contract, run on ``lapq`` (no labels in the contract data: the KL-to-FP32 loss)."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxq_lapq", reason="onnxq-lapq is not installed (pip install -e plugins_contrib/onnxq-lapq)")
pytest.importorskip("scipy", reason="lapq needs scipy")

from onnxq.testing.contract import MethodContract  # noqa: E402


class TestLapqContract(MethodContract):
    method = "lapq"
    options = {"p_points": 4, "max_evals": 150}
