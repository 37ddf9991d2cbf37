"""Fixture paths of the onnxq-lapq tests (the model and data are made by fixture/train_fixture.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).resolve().parent / "fixture"


@pytest.fixture(scope="session")
def lapq_fixture() -> dict:
    """The narrow residual MLP on digits: labelled calibration batches and the held-out split."""
    cal = np.load(FIXTURE / "calib" / "calib.npz")
    ev = np.load(FIXTURE / "eval.npz")
    n = len(cal["input"])
    return {
        "model": FIXTURE / "model.onnx",
        "calib_dir": FIXTURE / "calib",
        "calib": [{"input": cal["input"][i : i + 64], "label": cal["label"][i : i + 64]} for i in range(0, n, 64)],
        "calib_unlabelled": [{"input": cal["input"][i : i + 64]} for i in range(0, n, 64)],
        "x": ev["input"],
        "y": ev["label"],
    }
