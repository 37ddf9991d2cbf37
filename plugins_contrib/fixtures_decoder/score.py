"""Scoring of the decoder fixture: next-token top-1 accuracy on the copy half, and logits cosine vs FP32.

numpy and ONNX Runtime only (no torch), importable from a test or a benchmark by path::

    import importlib.util
    spec = importlib.util.spec_from_file_location("decoder_score", ".../fixtures_decoder/score.py")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
MODEL = HERE / "model.onnx"
CALIB = HERE / "calib.npz"
EVAL = HERE / "eval.npz"


def load_model() -> onnx.ModelProto:
    """The FP32 fixture model."""
    return onnx.load(str(MODEL))


def calibration(n: int | None = None) -> list[dict[str, np.ndarray]]:
    """The calibration sequences as feed dicts of 16 sequences (the first ``n`` sequences if given)."""
    ids = np.load(CALIB)["input_ids"][:n]
    return [{"input_ids": ids[i:i + 16]} for i in range(0, len(ids), 16)]


def logits(model: onnx.ModelProto | str | Path, ids: np.ndarray | None = None) -> np.ndarray:
    """The model's logits ``[sequences, 32, 64]`` on ``ids`` (default: the evaluation sequences)."""
    if ids is None:
        ids = np.load(EVAL)["input_ids"]
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input_ids": ids[i:i + 64]})[0] for i in range(0, len(ids), 64)])


def score(model: onnx.ModelProto | str | Path, reference: np.ndarray | None = None) -> dict[str, float]:
    """``top1``: next-token accuracy where the next token is determined (the copied half);
    ``cosine``: mean cosine of each position's logits with the FP32 model's (``reference``, computed if None)."""
    data = np.load(EVAL)
    label = data["label"]
    got = logits(model, data["input_ids"])
    ref = logits(load_model(), data["input_ids"]) if reference is None else reference
    scored = label >= 0
    a, b = got.reshape(-1, got.shape[-1]).astype(np.float64), ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {"top1": float((got.argmax(-1)[scored] == label[scored]).mean()), "cosine": float(cos.mean())}
