"""The repository's labelled classifier fixtures, loaded the same way by every benchmark script.

``examples/digits`` (calibration ``.npz`` files in ``calib/``, held-out batches in ``eval/``) and the
models under ``tests/fixtures/zoo/<name>/`` (``model.onnx``, ``calib.npz``, ``eval.npz`` with a
``label`` array) are small trained CNNs with held-out labels; they live in the source checkout,
not in the installed package, so these helpers need the repository (``root``, by default the
checkout this onnxq was imported from).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxq.errors import DataError
from onnxq.runtime.ort import make_session

#: the checkout onnxq was imported from (an editable install; checked when a fixture is loaded)
CHECKOUT = Path(__file__).resolve().parents[2]

#: the classifier fixtures every benchmark of the CNN methods runs on
CNN_FIXTURES = ("digits", "mnist_norm_resnet", "imagenet_norm_cnn", "repvgg_norm", "mobilenetv3_hswish")


@dataclass(frozen=True)
class ClassifierFixture:
    """A labelled classifier fixture: the FP32 model, its calibration data as a ``--data`` spec, and
    the held-out evaluation inputs (by input name) with their labels."""

    name: str
    model: Path
    calib: str
    feeds: dict[str, np.ndarray]
    labels: np.ndarray


def classifier_fixture(name: str, root: str | Path | None = None) -> ClassifierFixture:
    """Load the fixture ``name``: ``digits`` (examples/digits) or a directory of tests/fixtures/zoo.

    ``root``: the repository checkout (default: the one onnxq was imported from). A missing fixture
    raises :class:`onnxq.errors.DataError` naming the path looked at."""
    base = Path(root) if root is not None else CHECKOUT
    if name == "digits":
        d = base / "examples" / "digits"
        batches = sorted((d / "eval").glob("*.npz"))
        if not (d / "model.onnx").is_file() or not batches:
            raise DataError(f"fixture 'digits' not found under {d} (needs the onnxq source checkout)")
        ev = [np.load(p) for p in batches]
        feeds = {"input": np.concatenate([e["input"] for e in ev])}
        return ClassifierFixture(name, d / "model.onnx", str(d / "calib"), feeds, np.concatenate([e["label"] for e in ev]))
    d = base / "tests" / "fixtures" / "zoo" / name
    if not (d / "model.onnx").is_file() or not (d / "eval.npz").is_file():
        raise DataError(f"fixture '{name}' not found under {d} (needs the onnxq source checkout: tests/fixtures/zoo)")
    ev = np.load(d / "eval.npz")
    # the evaluation file also holds the labels: feed only what the model takes
    names = [i.name for i in make_session(str(d / "model.onnx"), "all", threads=1).get_inputs()]
    return ClassifierFixture(name, d / "model.onnx", str(d / "calib.npz"), {k: ev[k] for k in names}, ev["label"])


def output_scores(model: str | Path | object, fixture: ClassifierFixture, reference: np.ndarray) -> tuple[float, float, float]:
    """Top-1 on ``fixture``'s labels, mean per-sample cosine and SQNR (dB) of ``model``'s first output
    against ``reference`` (the FP32 model's first output on the same feeds)."""
    out = make_session(model if not isinstance(model, (str, Path)) else str(model), "all", threads=1).run(None, fixture.feeds)[0]
    a, b = out.reshape(len(out), -1).astype(np.float64), reference.reshape(len(reference), -1).astype(np.float64)
    cos = float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))
    sqnr = float(10 * np.log10(np.sum(b**2) / max(np.sum((a - b) ** 2), 1e-30)))
    return float(np.mean(out.argmax(-1) == fixture.labels)), cos, sqnr
