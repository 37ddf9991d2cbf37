"""onnxq's method contract, run on ``pdquant`` (8-bit grids, a short reconstruction)."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxq_pdquant", reason="onnxq-pdquant is not installed (pip install -e plugins_contrib/onnxq-pdquant)")
pytest.importorskip("torch", reason="pdquant learns with PyTorch (pip install 'onnxq-pdquant[torch]')")

from onnxq.testing.contract import MethodContract  # noqa: E402


class TestPDQuantContract(MethodContract):
    method = "pdquant"
    options = {"iters": 10, "dc_iters": 5, "samples": 16}
