"""MiniLM sentence embeddings through ONNX Runtime (onnxq's runtime layer), their per-sentence cosine, and the MiniLM scripts' shared argument check."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

from onnxq.runtime.ort import make_session

#: what export_minilm.py writes (git-ignored)
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / ".bench" / "minilm" / "model.onnx"
MIN_SENTENCES = 200  # below this, the mean / min cosine of a MiniLM benchmark says little


def arguments_ok(model: Path, sentences: int) -> bool:
    """Whether a MiniLM benchmark can run on ``model`` with ``sentences`` sentences; says why not on stderr."""
    error = None
    if not model.exists():
        error = f"{model} is missing: run benchmarks/minilm/export_minilm.py first"
    elif sentences < MIN_SENTENCES:
        error = f"use at least {MIN_SENTENCES} sentences"
    if error:
        print(error, file=sys.stderr)
    return error is None


def embed(model: onnx.ModelProto | str, feeds: list[dict[str, np.ndarray]], threads: int, output: str = "sentence_embedding") -> np.ndarray:
    """``output`` of ``model`` over ``feeds``, concatenated on the batch axis (ORT_ENABLE_ALL, ``threads`` intra-op threads)."""
    sess = make_session(model, "all", threads=threads)
    names = {i.name for i in sess.get_inputs()}
    return np.concatenate([sess.run([output], {k: v for k, v in f.items() if k in names})[0] for f in feeds])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
