"""Fixture paths of the onnxq-brecq tests (the model and data are made by fixture/train_fixture.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).resolve().parent / "fixture"


@pytest.fixture(scope="session")
def brecq_fixture() -> dict:
    """The narrow residual MLP on digits: model path, calibration feeds (no labels) and the held-out split."""
    cal = np.load(FIXTURE / "calib" / "calib.npz")
    ev = np.load(FIXTURE / "eval.npz")
    return {
        "model": FIXTURE / "model.onnx",
        "calib_dir": FIXTURE / "calib",
        "calib": [{"input": cal["input"][i : i + 64]} for i in range(0, len(cal["input"]), 64)],
        "x": ev["input"],
        "y": ev["label"],
    }
