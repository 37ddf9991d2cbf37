"""The zoo fixtures the onnxq-pdquant tests use (tests/fixtures/zoo in the repository)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ZOO = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "zoo"


def load_fixture(name: str, calib: int = 64) -> dict:
    """Model path, ``calib`` calibration feeds (no labels) and the labelled evaluation split of a zoo fixture."""
    d = ZOO / name
    if not (d / "model.onnx").exists():
        pytest.skip(f"zoo fixture {name} not found at {d}")
    cal = np.load(d / "calib.npz")["input"][:calib]
    ev = np.load(d / "eval.npz")
    return {"model": d / "model.onnx", "calib": [{"input": cal}], "x": ev["input"], "y": ev["label"]}


def top1(model, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float(np.mean(sess.run(None, {"input": x})[0].argmax(1) == y))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread, as the method itself uses by default (the CI machine is shared)."""
    try:
        import torch
    except ImportError:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
