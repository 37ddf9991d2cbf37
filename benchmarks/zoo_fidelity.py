"""Fidelity of every built-in zoo recipe and of ``-p auto`` on the fixture zoo: the mean cosine of each
fixture's first output to FP32 on its ``eval.npz``, beside the fixture's own metric (top-1, box F1).

robustness.py judges each run against a margin of the task metric; this compares the recipes with one
another at the precision the search itself works at (auto ranks candidates by cosine to FP32), to see
whether auto reaches the best hand-picked recipe of each fixture::

    python benchmarks/zoo_fidelity.py                          # every fixture, every built-in recipe and auto
    python benchmarks/zoo_fidelity.py --fixture repvgg_norm --auto-runs 2 --auto-opt time_budget 3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "zoo"))

import zoo  # noqa: E402

from onnxq import optimize  # noqa: E402
from onnxq.host import get_host  # noqa: E402


def _row(fx: zoo.Fixture, ev: zoo.Evaluator, recipe: str, run: Any, wall: float) -> dict[str, Any]:
    outs = ev.run(run.model)
    return {"fixture": fx.name, "recipe": recipe, fx.metric: round(ev.score_outputs(outs), 4),
            "cosine": round(zoo.mean_cosine(outs[0], ev.fp32_outputs[0]), 5), "wall_s": round(wall, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", action="append", choices=list(zoo.FIXTURES), help="default: all")
    ap.add_argument("--target", default="ort", choices=["ort", "trt"])
    ap.add_argument("--auto-runs", type=int, default=1, help="auto's choice can move with the time budget: run it this many times")
    ap.add_argument("--auto-opt", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="an option of -p auto")
    ap.add_argument("--no-hand", action="store_true", help="auto only")
    args = ap.parse_args(argv)
    methods = set(get_host().methods)
    opts = dict(args.auto_opt)  # strings, as on the command line (-o KEY VALUE)
    for name in args.fixture or list(zoo.FIXTURES):
        fx = zoo.FIXTURES[name]
        ev = zoo.Evaluator(fx)
        recipes = [] if args.no_hand else [r for r in zoo.RECIPES if r.id != "auto" and not r.contrib and r.applies(fx)
                                           and set(r.methods) <= methods and r.id != "trt-entropy-exact"]
        for r in recipes:
            t = time.perf_counter()
            run = optimize(str(fx.model), method=list(r.methods), options=r.options_for(fx), data=str(fx.calib),
                           target=args.target, bits=r.bits, show_progress=False)
            print(json.dumps(_row(fx, ev, r.id, run, time.perf_counter() - t)), flush=True)
        for _ in range(args.auto_runs):
            t = time.perf_counter()
            run = optimize(str(fx.model), method="auto", options=opts or None, data=str(fx.calib), target=args.target,
                           show_progress=False)
            row = _row(fx, ev, "auto", run, time.perf_counter() - t)
            row["chosen"] = run.report.auto.chosen
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
