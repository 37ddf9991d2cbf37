"""The README's table: Lp(2) init, BRECQ and PD-Quant (with both ablations) on one zoo fixture.

    python plugins_contrib/onnxq-pdquant/benchmark.py mobilenetv3_hswish 4 4 [--iters 200] [--dc-iters 50] [--only pdquant]

Prints one line per column: name, top-1 on the fixture's evaluation split, wall seconds (noisy on a
shared machine). Every run uses all the fixture's calibration images and target ``ort``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxq

ZOO = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "zoo"


def top1(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float(np.mean(sess.run(None, {"input": x})[0].argmax(1) == y))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fixture")
    ap.add_argument("wbits", type=int)
    ap.add_argument("abits", type=int)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--dc-iters", type=int, default=50)
    ap.add_argument("--only", nargs="*", default=None, help="column names to run (default: all)")
    a = ap.parse_args()
    d = ZOO / a.fixture
    cal, ev = np.load(d / "calib.npz"), np.load(d / "eval.npz")
    data = [{"input": cal["input"][i : i + 64]} for i in range(0, len(cal["input"]), 64)]
    bits = {"weight_bits": a.wbits, "act_bits": a.abits}
    lp = {**bits, "maxiter": 0, "p_points": 1, "p_min": 2, "p_max": 2}
    pd = {**bits, "iters": a.iters, "dc_iters": a.dc_iters}
    columns = {
        "lp-init": ("lapq", lp),
        "brecq": (["lapq", "brecq"], [lp, {"weight_bits": a.wbits, "keep_first_last": False, "iters": a.iters}]),
        "pdquant": ("pdquant", pd),
        "pdquant-no-pd": ("pdquant", {**pd, "pd_loss": False}),
        "pdquant-no-dc": ("pdquant", {**pd, "dc": False}),
    }
    for name, (method, options) in columns.items():
        if a.only and name not in a.only:
            continue
        t0 = time.perf_counter()
        r = onnxq.optimize(d / "model.onnx", method=method, options=options, data=data, target="ort", show_progress=False, check=False)
        print(f"{a.fixture} W{a.wbits}A{a.abits} {name}: top-1 {top1(r.model, ev['input'], ev['label']):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
