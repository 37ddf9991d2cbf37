#!/usr/bin/env python
"""What limits ``-p auto`` on PP-OCR rec: the calibration lines and the candidates, measured one by one.

    python benchmarks/auto_rec_study.py hand equalize+mse --no-fold --pool    # a hand-picked recipe on auto's 96-line pool
    python benchmarks/auto_rec_study.py hand equalize+mse --no-fold           # ... on all 128 calibration lines
    python benchmarks/auto_rec_study.py portfolio --no-fold                   # every candidate auto builds (no resampling)

Needs ``python benchmarks/bench.py --models ppocr-rec`` to have written .bench/. Prints one JSON line per model:
character agreement and per-line cosine against FP32 on the suite's 256 evaluation lines (FP32's outputs
computed once), and for the portfolio each candidate's held-out figures as auto scored them. The pool is what
``-p auto`` calibrates its candidates on: the calibration lines without every 4th, which it holds out for scoring.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ocr_data  # noqa: E402
import onnxq  # noqa: E402
from auto_bench import Task  # noqa: E402
from onnxq.runtime.ort import make_session  # noqa: E402


def agreement(task: Task, model: Any, ref: list[np.ndarray]) -> dict[str, float]:
    """Character agreement and mean per-line cosine of ``model`` against FP32 on the evaluation lines."""
    sess = make_session(model, "all", threads=1)
    got = [sess.run(None, f)[0] for f in task.eval]
    dec = lambda ys: [s for y in ys for s in ocr_data.decode_rec(y)]  # noqa: E731
    a = np.concatenate([y.reshape(len(y), -1) for y in ref]).astype(np.float64)
    b = np.concatenate([y.reshape(len(y), -1) for y in got]).astype(np.float64)
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"char_agreement": round(ocr_data.char_agreement(dec(got), dec(ref)), 4), "cosine_mean": round(float(cos.mean()), 5)}


def pool(calib: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The calibration lines without every 4th (``-p auto``'s held-out split when no evaluation data is given)."""
    x = np.concatenate([f["x"] for f in calib])
    x = x[np.arange(len(x)) % 4 != 3]
    return [{"x": x[i:i + 8]} for i in range(0, len(x), 8)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("hand", "portfolio"))
    ap.add_argument("recipe", nargs="?", default="equalize+mse", help="hand: methods joined by +")
    ap.add_argument("--no-fold", action="store_true")
    ap.add_argument("--pool", action="store_true", help="hand: calibrate on auto's 96-line pool instead of all 128 lines")
    ap.add_argument("--workdir", type=Path, default=HERE.parent / ".bench")
    a = ap.parse_args(argv)
    task = Task("ppocr-rec", a.workdir)
    ref = task.reference()
    calib = task.calibration()
    fold = not a.no_fold
    if a.mode == "hand":
        data = pool(calib) if a.pool else calib
        t = time.perf_counter()
        res = onnxq.optimize(task.fp32, method=a.recipe.split("+"), data=data, show_progress=False, fold=fold, check=False)
        print(json.dumps({"recipe": a.recipe, "fold": fold, "calibration": "pool" if a.pool else "all",
                          "wall_s": round(time.perf_counter() - t, 1), **agreement(task, res.model, ref)}), flush=True)
        return 0
    from onnxq.host import get_host
    from onnxq.options import parse_options
    from onnxq.pipeline import auto
    from onnxq.pipeline.stages import Settings

    opts = {"time_budget": 1e9, "easyquant": False, "resamples": 0}
    settings = Settings(task.fp32, None, "auto", opts, calib, None, None, "ort", 8, None, 16, None, (), None, False, True, fold)
    s = auto.Search(settings, get_host(), parse_options(auto.AutoOptions, opts, "auto"))
    s.prepare()
    auto.portfolio(s)
    for c in s.report.candidates:
        if c.name in s.built:
            model: onnx.ModelProto = s.built[c.name].model
            print(json.dumps({"candidate": c.name, "fold": fold, "heldout_cosine": c.score, "heldout_worst": c.cosine_worst,
                              **agreement(task, model, ref)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
