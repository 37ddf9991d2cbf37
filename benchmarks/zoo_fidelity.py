"""Fidelity of every built-in zoo recipe and of ``-p auto`` on the fixture zoo: the mean cosine of each
fixture's first output to FP32 on its ``eval.npz``, beside the fixture's own metric (top-1, box F1).

robustness.py judges each run against a margin of the task metric; this compares the recipes with one
another at the precision the search itself works at (auto ranks candidates by cosine to FP32), to see
whether auto reaches the best hand-picked recipe of each fixture::

    python benchmarks/zoo_fidelity.py                          # every fixture, every built-in recipe and auto
    python benchmarks/zoo_fidelity.py --fixture repvgg_norm --auto-runs 2 --auto-opt time_budget 3
    python benchmarks/zoo_fidelity.py --recipe easyquant --cli   # auto and easyquant, each as an `onnxq optimize` command
    python benchmarks/zoo_fidelity.py --stability 3              # auto on 3 disjoint thirds of each calib.npz
    python benchmarks/zoo_fidelity.py --stability 3 --fresh      # ... on 3 fresh sets of calib.npz's kind and size

Timing (``wall_s``): a throwaway ``minmax`` run comes first, so every timed run is warm (the first
quantization in a process pays its one-time costs); ``--cli`` times each run as the command a user
types instead, the process's start and the fidelity check included, and scores the model it wrote.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "zoo"))

import numpy as np  # noqa: E402
import zoo  # noqa: E402

from onnxq import optimize  # noqa: E402
from onnxq.host import get_host  # noqa: E402


def _row(fx: zoo.Fixture, ev: zoo.Evaluator, recipe: str, model: Any, wall: float, exact: bool = False) -> dict[str, Any]:
    """One printed row; ``exact`` adds the cosine to 7 places (``cosine7``), for ranges compared with 6-place spreads."""
    outs = ev.run(model)
    cos = zoo.mean_cosine(outs[0], ev.fp32_outputs[0])
    row = {"fixture": fx.name, "recipe": recipe, fx.metric: round(ev.score_outputs(outs), 4), "cosine": round(cos, 5),
           "wall_s": round(wall, 2)}
    if exact:
        row["cosine7"] = round(cos, 7)
    return row


def _cli(fx: zoo.Fixture, recipe: zoo.Recipe | None, target: str, auto_opts: dict[str, str]) -> tuple[Any, float]:
    """``onnxq optimize`` on the fixture as its own process: the model it wrote and its seconds."""
    import onnx

    methods = ("auto",) if recipe is None else recipe.methods
    opts = [{k: str(v) for k, v in auto_opts.items()}] if recipe is None else (recipe.options_for(fx) or [])
    cmd = [sys.executable, "-m", "onnxq", "optimize", str(fx.model), "-p", "+".join(methods), "--data", str(fx.calib),
           "--target", target, "--bits", str(8 if recipe is None else recipe.bits)]
    for method, o in zip(methods, opts):
        for k, v in o.items():
            cmd += ["-o", k if len(methods) == 1 else f"{method}.{k}", str(v)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.onnx"
        t = time.perf_counter()
        subprocess.run([*cmd, "--output", str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return onnx.load(str(out)), time.perf_counter() - t


#: the first seed of the fresh calibration sets (the builds use seeds below 100)
FRESH_SEED = 1000


def _build(fx: zoo.Fixture) -> Any:
    """The fixture's build.py as a module (torch; its data functions, not its training)."""
    spec = importlib.util.spec_from_file_location(f"zoo_build_{fx.name}", fx.folder / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def calibration_set(fx: zoo.Fixture, k: int | None) -> dict[str, Any]:
    """The fixture's calibration samples made as its build.py makes them (``k`` None: equal to calib.npz), or fresh set
    ``k`` of the same kind and size: disjoint subsets of the training digits, or the generator drawn with another seed."""
    import _common as c  # noqa: PLC0415 - torch, only for --fresh
    import torch  # noqa: PLC0415

    b = _build(fx)

    def subset(n_total: int, n: int = 128) -> Any:
        if k is None:
            return torch.from_numpy(c.calib_subset(n_total, n))
        order = np.random.default_rng(FRESH_SEED).permutation(n_total)
        return torch.from_numpy(np.sort(order[k * n:(k + 1) * n]))

    seed = None if k is None else FRESH_SEED + k
    if fx.name == "mnist_norm_resnet":
        x = c.digits_split(28)[0]
        return {"input": c.mnist_normalize(x[subset(len(x))]).numpy()}
    if fx.name == "repvgg_norm":
        x = c.digits_split(16)[0]
        return {"input": c.mnist_normalize(b.noisy(x[subset(len(x))], 3 if k is None else seed)).numpy()}
    if fx.name in ("imagenet_norm_cnn", "mobilenetv3_hswish"):
        x = c.colour_shapes(b.N_TRAIN, 1)[0][:128] if k is None else c.colour_shapes(128, seed)[0]
        return {"input": c.imagenet_normalize(x)}
    if fx.name == "gru_seq":
        return {"input": b.sequences(b.N_TRAIN, 1)[0][:128] if k is None else b.sequences(128, seed)[0]}
    if fx.name == "attention_padded":
        ids, mask, _ = b.tokens(b.N_TRAIN, 1) if k is None else b.tokens(128, seed)
        return {"input_ids": ids[:128], "attention_mask": mask[:128]}
    if fx.name in ("picodet_head", "multi_output_det"):
        img = c.shapes_module().make_images(b.N_CALIB, seed=(23 if fx.name == "picodet_head" else 33) if k is None else seed)[0]
        return {"input": c.imagenet_normalize(img.astype(np.float32) / 255)}
    raise SystemExit(f"--fresh: no calibration generator for {fx.name}")


def stability(fx: zoo.Fixture, ev: zoo.Evaluator, sets: int, target: str, opts: dict[str, str], fresh: bool = False,
              same_recipe: bool = False) -> None:
    """Auto on ``sets`` disjoint calibration sets: interleaved parts of the fixture's calibration samples, or (``fresh``)
    fresh sets of their kind and size; each run's cosine on eval.npz and the spread it reported, then whether the
    cosines' range is within each reported spread (and its 95 % bound)."""
    calib = zoo.load_npz(fx.calib)
    n = len(next(iter(calib.values())))
    if fresh:
        again = calibration_set(fx, None)  # the generator must be the build's: it remakes calib.npz exactly
        if again.keys() != calib.keys() or not all(np.array_equal(again[name], calib[name]) for name in calib):
            raise SystemExit(f"--fresh: {fx.name}'s generator does not remake its calib.npz")
    rows: list[dict[str, Any]] = []
    sets_data: list[list[dict[str, Any]]] = []
    for k in range(sets):
        part = calibration_set(fx, k) if fresh else {name: v[k::sets] for name, v in calib.items()}
        m = len(next(iter(part.values())))
        batches = [{name: v[i:i + 16] for name, v in part.items()} for i in range(0, m, 16)]
        sets_data.append(batches)
        run = optimize(str(fx.model), method="auto", options=opts or None, data=batches, target=target, show_progress=False)
        a = run.report.auto
        chosen = next(c for c in a.candidates if c.name == a.chosen)
        row = _row(fx, ev, "auto", run.model, 0.0, exact=True)
        row.update(set=f"fresh {k + 1} of {sets} ({m} samples)" if fresh else f"{k + 1} of {sets} ({m} of {n} samples)",
                   chosen=a.chosen, spread=chosen.spread, spread_bound=chosen.spread_bound, methods=list(chosen.methods),
                   float_layers=list(a.float_layers) + [f.node for f in a.faster_float if f.kept_float])
        del row["wall_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    # compared at the spreads' precision: cosines rounded to 5 places made a range of 0.000004 read 0.00001
    cos = [r["cosine7"] for r in rows]
    rng = round(max(cos) - min(cos), 6)
    print(json.dumps({"fixture": fx.name, "range": rng,
                      "within_spread": [r["spread"] is not None and rng <= r["spread"] for r in rows],
                      "within_bound": [r["spread_bound"] is not None and rng <= r["spread_bound"] for r in rows]}), flush=True)
    if not same_recipe:
        return
    # the test is on the chosen recipe's fidelity, and the sets may choose different recipes: each chosen recipe,
    # with the layers its run left float, rebuilt on every set
    for r in {row["chosen"]: row for row in rows}.values():
        got = []
        for batches in sets_data:
            res = optimize(str(fx.model), method=r["methods"], data=batches, target=target, show_progress=False,
                           exclude=r["float_layers"] or None, check=False)
            got.append(_row(fx, ev, r["chosen"], res.model, 0.0, exact=True)["cosine7"])
        by = round(max(got) - min(got), 6)
        print(json.dumps({"fixture": fx.name, "same recipe": r["chosen"], "per_set": got, "varies_by": by, "spread": r["spread"],
                          "spread_bound": r["spread_bound"], "within": r["spread"] is not None and by <= r["spread"],
                          "within_bound": r["spread_bound"] is not None and by <= r["spread_bound"]}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", action="append", choices=list(zoo.FIXTURES), help="default: all")
    ap.add_argument("--target", default="ort", choices=["ort", "trt"])
    ap.add_argument("--auto-runs", type=int, default=1, help="auto's choice can move with the time budget: run it this many times")
    ap.add_argument("--auto-opt", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="an option of -p auto")
    ap.add_argument("--no-hand", action="store_true", help="auto only")
    ap.add_argument("--recipe", action="append", help="only these built-in recipes beside auto (default: all that apply)")
    ap.add_argument("--cli", action="store_true", help="time each run as an `onnxq optimize` command")
    ap.add_argument("--stability", type=int, default=0, metavar="N", help="auto only, on N disjoint parts of each calib.npz")
    ap.add_argument("--same-recipe", action="store_true", help="--stability: also each chosen recipe rebuilt on every set")
    ap.add_argument("--fresh", action="store_true", help="--stability on N fresh calibration sets of calib.npz's kind and size "
                                                           "(each fixture's build.py generator; needs torch and scikit-learn)")
    args = ap.parse_args(argv)
    methods = set(get_host().methods)
    opts = dict(args.auto_opt)  # strings, as on the command line (-o KEY VALUE)
    for name in args.fixture or list(zoo.FIXTURES):
        fx = zoo.FIXTURES[name]
        ev = zoo.Evaluator(fx)
        if args.stability:
            stability(fx, ev, args.stability, args.target, opts, args.fresh, args.same_recipe)
            continue
        recipes = [] if args.no_hand else [r for r in zoo.RECIPES if r.id != "auto" and not r.contrib and r.applies(fx)
                                           and set(r.methods) <= methods and r.id != "trt-entropy-exact"
                                           and (not args.recipe or r.id in args.recipe)]
        if not args.cli and name == (args.fixture or list(zoo.FIXTURES))[0]:
            optimize(str(fx.model), method="minmax", data=str(fx.calib), show_progress=False, check=False)  # warm-up
        for r in recipes:
            t = time.perf_counter()
            if args.cli:
                model, wall = _cli(fx, r, args.target, {})
            else:
                model = optimize(str(fx.model), method=list(r.methods), options=r.options_for(fx), data=str(fx.calib),
                                 target=args.target, bits=r.bits, show_progress=False).model
                wall = time.perf_counter() - t
            print(json.dumps(_row(fx, ev, r.id, model, wall)), flush=True)
        for _ in range(args.auto_runs):
            t = time.perf_counter()
            if args.cli:
                model, wall = _cli(fx, None, args.target, opts)
                row = _row(fx, ev, "auto", model, wall)
            else:
                run = optimize(str(fx.model), method="auto", options=opts or None, data=str(fx.calib), target=args.target,
                               show_progress=False)
                row = _row(fx, ev, "auto", run.model, time.perf_counter() - t)
                row["chosen"] = run.report.auto.chosen
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
