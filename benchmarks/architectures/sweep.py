"""Run built-in recipes on the models of ``build_torchvision.py`` / ``build_transformers.py`` and print one row each.

    python benchmarks/architectures/sweep.py resnet18 minmax mse easyquant equalize+mse minmax+bias-correction trt auto
    python benchmarks/architectures/sweep.py distilbert minmax smoothquant+minmax minmax+bias-correction gptq4 "auto --time-budget 60"

Each recipe runs as the ``onnxq optimize`` command a user types, on ``.bench/arch/NAME.calib.npz``
with ``--eval-data NAME.eval.npz``; the row gives the exit code, seconds, each output's cosine to
FP32 (mean / worst sample) and top-1 or per-position agreement where the check reports one, whether
the fidelity check warned, how many layers were left float, and for ``trt`` (``-p minmax --target
trt``) the findings of ``onnxq lint``. Every written model is also loaded by ``onnx.checker`` (full
check) and run by ONNX Runtime on the evaluation data, its output shapes compared with FP32's.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
ARCH = ROOT / ".bench" / "arch"
SHORT = {"trt": "-p minmax --target trt", "gptq4": "-p gptq --bits 4", "int7": "-p minmax --bits 7"}


def recipe_args(recipe: str) -> list[str]:
    """``equalize+mse`` -> ``-p equalize -p mse``; extra CLI words after a space pass through."""
    if recipe in SHORT:
        return shlex.split(SHORT[recipe])
    head, *rest = recipe.split(" ", 1)
    return [a for m in head.split("+") for a in ("-p", m)] + (shlex.split(rest[0]) if rest else [])


def valid(path: Path, name: str) -> str:
    """'' when the written model passes the full checker and runs on the evaluation data with FP32's output shapes."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        feeds = dict(np.load(ARCH / f"{name}.eval.npz"))
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
        ref = ort.InferenceSession(str(ARCH / f"{name}.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
        if [g.shape for g in got] != [r.shape for r in ref] or any(not np.all(np.isfinite(g)) for g in got):
            return " INVALID(shapes or non-finite outputs)"
        return ""
    except Exception as exc:  # a finding: report it in the row
        return f" INVALID({type(exc).__name__}: {str(exc)[:120]})"


def run(name: str, recipe: str) -> str:
    out = ARCH / "out"
    out.mkdir(exist_ok=True)
    q = out / f"{name}.{recipe.split(' ')[0]}.onnx"
    cmd = [sys.executable, "-m", "onnxq", "optimize", str(ARCH / f"{name}.onnx"), *recipe_args(recipe), "--data",
           str(ARCH / f"{name}.calib.npz"), "--eval-data", str(ARCH / f"{name}.eval.npz"), "--output", str(q), "--force",
           "--json", "--quiet"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    row = f"{name:22s} {recipe:26s} rc={p.returncode} {time.perf_counter() - t0:6.1f}s"
    if p.returncode not in (0, 3):
        return row + " " + ((p.stderr.strip().splitlines() or ["?"])[-1])[:200]
    r = json.loads(p.stdout)["report"]
    fid = r.get("fidelity") or {}
    for o in fid.get("outputs") or []:
        row += f" {o['name'][:18]}: {o['cosine']:.5f}/{o['cosine_worst']:.3f}"
        for key, label in (("top1_agreement", "top1"), ("position_agreement", "per-position")):
            if o.get(key) is not None:
                row += f" {label} {o[key]:.3f}"
    row += f" warned={fid.get('warned')} float={len(r.get('left_in_float') or [])}"
    if (r.get("auto") or {}).get("chosen"):
        row += f" chose {r['auto']['chosen']}"
    row += valid(q, name)
    if recipe == "trt":
        lint = subprocess.run([sys.executable, "-m", "onnxq", "lint", str(q)], capture_output=True, text=True)
        row += f" lint: {(lint.stdout.strip().splitlines() or ['?'])[-1].split(': ', 1)[-1][:100]}"
    return row


if __name__ == "__main__":
    model, *recipes = sys.argv[1:]
    for rc in recipes or ["minmax", "mse", "easyquant", "equalize+mse", "minmax+bias-correction", "trt"]:
        print(run(model, rc), flush=True)
