#!/usr/bin/env python
"""What limits ``-p auto`` on PP-OCR rec: the calibration lines and the candidates, measured one by one.

    python benchmarks/auto_rec_study.py hand equalize+mse --no-fold --pool    # a hand-picked recipe on auto's 96-line pool
    python benchmarks/auto_rec_study.py hand equalize+mse --no-fold           # ... on all 128 calibration lines
    python benchmarks/auto_rec_study.py portfolio --no-fold                   # every candidate auto builds (no resampling)
    python benchmarks/auto_rec_study.py swap equalize+mse --no-fold           # the pool's model with one tensor's qparams from the 128-line model
    python benchmarks/auto_rec_study.py exclude mse --layers p2o.Conv.0-18     # a hand-picked recipe with layers left float
    python benchmarks/auto_rec_study.py polish equalize+mse --no-fold         # activation scales tuned on the network output (overfits)
    python benchmarks/auto_rec_study.py scan equalize+mse --no-fold --pool --tensor depthwise_conv2d_0.tmp_0   # one tensor's scale x 0.94..1.06
    python benchmarks/auto_rec_study.py hand mse+pad-correction --pool        # ... with pad-correction (docs/methods.md, Pad correction)
    python benchmarks/auto_rec_study.py floor                                 # FP32 against itself: pixel noise, a one-column shift

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
from onnx import numpy_helper  # noqa: F401  (onnx.numpy_helper below)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import onnxq  # noqa: E402
from auto_bench import Task  # noqa: E402
from onnxq.runtime.ort import make_session  # noqa: E402


def agreement(task: Task, model: Any, got: list[np.ndarray] | None = None) -> dict[str, float]:
    """Character agreement and mean per-line cosine of ``model`` against FP32 on the evaluation lines (:meth:`Task.fidelity`;
    ``got``: its outputs, when run already)."""
    fid = task.fidelity(model, got)
    return {k: fid[k] for k in ("char_agreement", "cosine_mean")}


def spaces(task: Task, got: list[np.ndarray]) -> dict[str, float]:
    """How much of the disagreement with FP32 is spaces, from a model's evaluation outputs ``got``: character agreement with
    spaces removed, and the lines that differ with and without them."""
    import ocr_data

    dec = lambda ys: [t for y in ys for t in ocr_data.decode_rec(y)]  # noqa: E731
    got, ref = dec(got), dec(task.reference())
    bare = lambda xs: [x.replace(" ", "") for x in xs]  # noqa: E731
    return {"char_agreement_without_spaces": round(ocr_data.char_agreement(got, ref, ignore_spaces=True), 4),
            "lines_differing": sum(g != r for g, r in zip(got, ref)),
            "lines_differing_without_spaces": sum(g != r for g, r in zip(bare(got), bare(ref)))}


def scan(task: Task, recipe: list[str], fold: bool, data: list[dict[str, np.ndarray]], tensor: str, factors: np.ndarray) -> None:
    """The model of ``recipe`` on ``data`` with one activation tensor's scale multiplied by each of ``factors``."""
    base = onnxq.optimize(task.fp32, method=recipe, data=data, show_progress=False, fold=fold, check=False).model
    names = _qparam_inits(base).get(tensor)
    if not names:
        raise SystemExit(f"{tensor} is not a quantized activation of this model")
    inits = {i.name: i for i in base.graph.initializer}
    s0 = float(onnx.numpy_helper.to_array(inits[names[0]]).ravel()[0])
    for f in factors:
        m = onnx.ModelProto()
        m.CopyFrom(base)
        dst = {i.name: i for i in m.graph.initializer}
        for k in (names[0], names[2]):  # the QuantizeLinear's and the DequantizeLinear's scale
            dst[k].CopyFrom(onnx.numpy_helper.from_array(np.full(onnx.numpy_helper.to_array(dst[k]).shape, s0 * f, np.float32), k))
        print(json.dumps({"tensor": tensor, "scale_factor": round(float(f), 4), **agreement(task, m)}), flush=True)


def pool(calib: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The calibration lines without every 4th (``-p auto``'s held-out split when no evaluation data is given)."""
    x = np.concatenate([f["x"] for f in calib])
    x = x[np.arange(len(x)) % 4 != 3]
    return [{"x": x[i:i + 8]} for i in range(0, len(x), 8)]


def _qparam_inits(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Activation tensor -> the scale and zero-point initializers of its QuantizeLinear and DequantizeLinear, in graph order."""
    consts = {i.name for i in model.graph.initializer}
    out: dict[str, list[str]] = {}
    q_of: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in consts:
            out.setdefault(n.input[0], []).extend(n.input[1:])
            q_of[n.output[0]] = n.input[0]
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in q_of:
            out[q_of[n.input[0]]].extend(n.input[1:])
    return out


def swap(task: Task, recipe: list[str], fold: bool) -> None:
    """How much of the gap between the pool's model and the 128-line model one activation tensor's qparams explain."""
    calib = task.calibration()
    full = onnxq.optimize(task.fp32, method=recipe, data=calib, show_progress=False, fold=fold, check=False).model
    part = onnxq.optimize(task.fp32, method=recipe, data=pool(calib), show_progress=False, fold=fold, check=False).model
    qa, qp = _qparam_inits(full), _qparam_inits(part)
    src = {i.name: i for i in full.graph.initializer}
    tensors = [t for t in qp if t in qa]
    print(json.dumps({"model": "all lines", **agreement(task, full)}), json.dumps({"model": "pool", **agreement(task, part)}), flush=True)

    def with_full(sel: list[str]) -> dict[str, float]:
        m = onnx.ModelProto()
        m.CopyFrom(part)
        dst = {i.name: i for i in m.graph.initializer}
        for t in sel:
            for a, b in zip(qa[t], qp[t]):
                dst[b].CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(src[a]), b))
        return agreement(task, m)

    n = len(tensors)
    for lo, hi in [(0, n // 4), (n // 4, n // 2), (n // 2, 3 * n // 4), (3 * n // 4, n), (0, n)]:
        print(json.dumps({"tensors": f"{lo}..{hi - 1} of {n}", **with_full(tensors[lo:hi])}), flush=True)
    for t in tensors[: n // 4]:
        scale = lambda m, q: float(onnx.numpy_helper.to_array({i.name: i for i in m.graph.initializer}[q[t][0]]).ravel()[0])  # noqa: E731
        print(json.dumps({"tensor": t, "scale_all": scale(full, qa), "scale_pool": scale(part, qp), **with_full([t])}), flush=True)


def floor(task: Task) -> None:
    """FP32 against itself on perturbed evaluation lines: uniform noise of a quarter and half a pixel step (2/255 after
    the normalization) on the content, the zero padding kept exact, and the content shifted right by one column.
    How much of the character agreement is the model's own reading of spaces, not quantization."""
    step = 2 / 255
    x_all = [f["x"] for f in task.eval]

    def report(label: str, xs: list[np.ndarray]) -> None:
        got = task.outputs(task.fp32, [{**f, "x": x} for f, x in zip(task.eval, xs)])
        print(json.dumps({"fp32_perturbed": label, **agreement(task, None, got), **spaces(task, got)}), flush=True)

    for frac in (0.25, 0.5):
        for seed in (0, 1):
            rng = np.random.default_rng(seed)
            report(f"uniform noise +-{frac} pixel step, seed {seed}",
                   [np.where(x == 0, x, x + rng.uniform(-frac * step, frac * step, x.shape).astype(np.float32)) for x in x_all])
    shifted = []
    for x in x_all:
        y = np.zeros_like(x)
        y[..., 1:] = x[..., :-1]
        shifted.append(y)
    report("content shifted right by one column", shifted)


def _layers(spec: str) -> list[str]:
    """``p2o.Conv.0-18`` -> p2o.Conv.0 .. p2o.Conv.18; names separated by commas otherwise."""
    out: list[str] = []
    for part in spec.split(","):
        head, _, rng = part.rpartition(".")
        if "-" in rng:
            lo, hi = map(int, rng.split("-"))
            out += [f"{head}.{i}" for i in range(lo, hi + 1)]
        else:
            out.append(part)
    return out


def polish(task: Task, recipe: list[str], fold: bool, lines: int, top: int) -> None:
    """Tune the most sensitive activation scales on the network output over the first ``lines`` calibration lines
    (factors 0.85..1.15 of the calibrated scale, one tensor at a time), then score on the evaluation lines."""
    calib = task.calibration()
    model = onnxq.optimize(task.fp32, method=recipe, data=calib, show_progress=False, fold=fold, check=False).model
    print(json.dumps({"model": "calibrated", **agreement(task, model)}), flush=True)
    tune = calib[: max(1, lines // 8)]
    fp = make_session(task.fp32, "all", threads=1)
    tune_ref = [fp.run(None, f)[0] for f in tune]
    inits = {i.name: i for i in model.graph.initializer}
    sites = _qparam_inits(model)
    base = {t: float(onnx.numpy_helper.to_array(inits[v[0]]).ravel()[0]) for t, v in sites.items()}

    def set_scale(t: str, value: float) -> None:
        for name in set(sites[t]):
            arr = onnx.numpy_helper.to_array(inits[name])
            if arr.dtype.kind == "f":  # the scales; the zero points stay
                inits[name].CopyFrom(onnx.numpy_helper.from_array(np.full_like(arr, value), name))

    def tuned() -> float:
        sess = make_session(model, "all", threads=1)
        a = np.concatenate([r.reshape(len(r), -1) for r in tune_ref]).astype(np.float64)
        b = np.concatenate([sess.run(None, f)[0].reshape(len(r), -1) for f, r in zip(tune, tune_ref)]).astype(np.float64)
        return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

    start = tuned()
    gain = {}
    for t in sites:
        best = start
        for f in (0.93, 1.07):
            set_scale(t, base[t] * f)
            best = max(best, tuned())
        set_scale(t, base[t])
        gain[t] = best - start
    now = start
    for t in sorted(gain, key=gain.get, reverse=True)[:top]:
        pick = 1.0
        for f in np.arange(0.85, 1.1501, 0.025):
            set_scale(t, base[t] * f)
            v = tuned()
            if v > now + 1e-6:
                pick, now = float(f), v
        set_scale(t, base[t] * pick)
    print(json.dumps({"model": f"polished ({top} scales on {len(tune) * 8} lines)", "tune_cosine_before": round(start, 5),
                      "tune_cosine_after": round(now, 5), **agreement(task, model)}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("hand", "portfolio", "swap", "exclude", "polish", "scan", "floor"))
    ap.add_argument("recipe", nargs="?", default="equalize+mse", help="hand: methods joined by +")
    ap.add_argument("--no-fold", action="store_true")
    ap.add_argument("--pool", action="store_true", help="hand, scan: calibrate on auto's 96-line pool instead of all 128 lines")
    ap.add_argument("--layers", default="", help="exclude: layers left float (p2o.Conv.0-18 or names joined by commas)")
    ap.add_argument("--lines", type=int, default=48, help="polish: calibration lines the scales are tuned on")
    ap.add_argument("--top", type=int, default=10, help="polish: the most sensitive scales tuned")
    ap.add_argument("--tensor", default="depthwise_conv2d_0.tmp_0", help="scan: the activation whose scale is scanned")
    ap.add_argument("--factors", default="0.94:1.06:13", help="scan: lo:hi:steps of the scale factor")
    ap.add_argument("--workdir", type=Path, default=HERE.parent / ".bench")
    a = ap.parse_args(argv)
    task = Task("ppocr-rec", a.workdir)
    calib = task.calibration()
    fold = not a.no_fold
    if a.mode == "swap":
        swap(task, a.recipe.split("+"), fold)
        return 0
    if a.mode == "polish":
        polish(task, a.recipe.split("+"), fold, a.lines, a.top)
        return 0
    if a.mode == "scan":
        lo, hi, n = a.factors.split(":")
        scan(task, a.recipe.split("+"), fold, pool(calib) if a.pool else calib, a.tensor, np.linspace(float(lo), float(hi), int(n)))
        return 0
    if a.mode == "floor":
        floor(task)
        return 0
    if a.mode == "exclude":
        res = onnxq.optimize(task.fp32, method=a.recipe.split("+"), data=calib, show_progress=False, fold=fold, check=False,
                             exclude=_layers(a.layers))
        got = task.outputs(res.model)
        print(json.dumps({"recipe": a.recipe, "fold": fold, "float": a.layers, **agreement(task, res.model, got), **spaces(task, got)}),
              flush=True)
        return 0
    if a.mode == "hand":
        data = pool(calib) if a.pool else calib
        t = time.perf_counter()
        res = onnxq.optimize(task.fp32, method=a.recipe.split("+"), data=data, show_progress=False, fold=fold, check=False)
        wall = round(time.perf_counter() - t, 1)
        got = task.outputs(res.model)
        print(json.dumps({"recipe": a.recipe, "fold": fold, "calibration": "pool" if a.pool else "all",
                          "wall_s": wall, **agreement(task, res.model, got), **spaces(task, got)}), flush=True)
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
                              **agreement(task, model)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
