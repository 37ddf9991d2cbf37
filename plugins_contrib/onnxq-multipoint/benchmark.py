"""Multipoint at W4 per channel (A8) on the CNN fixtures: plain W4, one grid-searched point, +10 % and +25 % bytes.

    python plugins_contrib/onnxq-multipoint/benchmark.py [--fixtures digits,mnist_norm_resnet,...]

ort target, activations by ``mse`` at 8 bits, weights per output channel. Rows: W8; W4 max-abs
rounding (``-o budget 0 -o first max``: ordinary per-channel W4); W4 with the grid-searched step
(``-o budget 0``); multipoint with +10 % and +25 % weight bytes. Top-1 on the held-out labels,
output cosine (mean) and SQNR against FP32, and the weights' bytes at 4 bits (the integers are
stored in int8 containers in the file; the byte figures count 4 bits per integer plus the steps).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import onnxq
from onnxq.runtime.ort import make_session

ROOT = Path(__file__).resolve().parents[2]


def _load(fixture: str):
    if fixture == "digits":
        d = ROOT / "examples" / "digits"
        ev = [np.load(p) for p in sorted((d / "eval").glob("*.npz"))]
        return d / "model.onnx", str(d / "calib"), {"input": np.concatenate([e["input"] for e in ev])}, np.concatenate([e["label"] for e in ev])
    d = ROOT / "tests" / "fixtures" / "zoo" / fixture
    ev = np.load(d / "eval.npz")
    names = [i.name for i in make_session(str(d / "model.onnx"), "all").get_inputs()]
    return d / "model.onnx", str(d / "calib.npz"), {k: ev[k] for k in names}, ev["label"]


def scores(model, feeds, labels, ref) -> tuple[float, float, float]:
    """Top-1, mean per-sample cosine and SQNR (dB) of ``model``'s first output against ``ref``."""
    out = make_session(model, "all").run(None, feeds)[0]
    a, b = out.reshape(len(out), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    cos = float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))
    sqnr = float(10 * np.log10(np.sum(b**2) / max(np.sum((a - b) ** 2), 1e-30)))
    return float(np.mean(out.argmax(-1) == labels)), cos, sqnr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixtures", default="digits,mnist_norm_resnet,imagenet_norm_cnn,repvgg_norm,mobilenetv3_hswish")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--minilm", metavar="MODEL", help="instead: --bits 4 weight-only rows on all-MiniLM-L6-v2 (benchmarks/minilm/export_minilm.py makes it)")
    args = ap.parse_args(argv)
    if args.minilm:
        return minilm(args.minilm)
    b = args.bits
    rows = [("W8", {"weight_bits": 8, "budget": 0.0, "first": "max"}),
            (f"W{b} max-abs (plain)", {"weight_bits": b, "budget": 0.0, "first": "max"}),
            (f"W{b} grid step", {"weight_bits": b, "budget": 0.0}),
            (f"W{b} multipoint +10%", {"weight_bits": b, "budget": 0.10}),
            (f"W{b} multipoint +25%", {"weight_bits": b, "budget": 0.25})]
    print("| fixture | config | top-1 | cosine | SQNR dB | weight KB | extra |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for fx in args.fixtures.split(","):
        model, calib, feeds, labels = _load(fx)
        ref = make_session(str(model), "all").run(None, feeds)[0]
        print(f"| {fx} | FP32 | {np.mean(ref.argmax(-1) == labels):.2%} | 1 | inf | | |")
        for name, opts in rows:
            res = onnxq.optimize(model, method=["mse", "multipoint"], data=calib, target="ort", options=opts, show_progress=False, check=False)
            rep = res.report.methods["multipoint"]
            top1, cos, sqnr = scores(res.model, feeds, labels, ref)
            kb = (rep["weight_bytes"] + rep["extra_bytes"]) / 1024
            print(f"| {fx} | {name} | {top1:.2%} | {cos:.4f} | {sqnr:.1f} | {kb:.1f} | {rep['extra_fraction']:+.1%} |")
        sys.stdout.flush()
    return 0


def minilm(model: str) -> int:
    """``--bits 4`` weight-only MatMuls of MiniLM: round to nearest, gptq, multipoint; block 32 and 16.

    Embedding cosine with FP32 on the evaluation sentences (the fidelity check's mean, worst and
    1st percentile) and the file size, so that rows at equal bytes can be compared."""
    cal, ev = "benchmarks/minilm/text_data.py:calibration", "benchmarks/minilm/text_data.py:evaluation"
    rows = [("minmax (round to nearest)", "minmax", 32, {}),
            ("gptq", "gptq", 32, {}),
            ("multipoint +10%", "multipoint", 32, {"budget": 0.10}),
            ("multipoint +20%", "multipoint", 32, {"budget": 0.20}),
            ("minmax, block 16 (+20% bytes)", "minmax", 16, {}),
            ("gptq, block 16 (+20% bytes)", "gptq", 16, {})]
    print("| config | cosine | worst | 1st pct | file MB | extra weight bytes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, method, block, opts in rows:
        res = onnxq.optimize(model, method=method, bits=4, block_size=block, data=cal, eval_data=ev, options=opts, show_progress=False)
        out = res.report.fidelity.outputs[0]
        extra = res.report.methods.get("multipoint", {}).get("extra_fraction")
        size = len(res.model.SerializeToString()) / 2**20
        print(f"| {name} | {out.cosine:.4f} | {out.cosine_worst:.4f} | {out.cosine_p1:.4f} | {size:.2f} | {'' if extra is None else f'{extra:+.1%}'} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
