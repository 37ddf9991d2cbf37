"""A searched recipe's refit under ``-p auto``'s own judgement, and on the model's evaluation data.

Builds RECIPE on auto's calibration pool (the held-out quarter split off as auto does), then auto's refit of it on
every sample, and prints the refit's note (what it was judged on and whether it was kept) and both models' fidelity
on the suite's evaluation data, so that the refit's judgement can be checked against data neither model saw::

    python benchmarks/auto_refit.py ppocr-rec                    # mse+easyquant, PP-OCR rec's default-step recipe
    python benchmarks/auto_refit.py digits --recipe percentile+easyquant

No faster-float placement and no portfolio: only the one recipe and its refit (a time budget that covers it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import auto_bench  # noqa: E402
from onnxq.host import get_host  # noqa: E402
from onnxq.options import parse_options  # noqa: E402
from onnxq.pipeline import auto as auto_mod  # noqa: E402
from onnxq.pipeline.stages import Settings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=list(auto_bench.HAND_PICKED))
    ap.add_argument("--recipe", default="mse+easyquant", help="a recipe without a float rewrite, as -p auto names it")
    ap.add_argument("--workdir", type=Path, default=HERE.parent / ".bench")
    a = ap.parse_args(argv)
    task = auto_bench.Task(a.model, a.workdir)
    opts = parse_options(auto_mod.AutoOptions, {"time_budget": 100_000}, "auto")
    settings = Settings(model=task.fp32, method="auto", data=task.calibration(), show_progress=False)
    s = auto_mod.Search(settings, get_host(), opts)
    s.prepare()
    cand = s.candidate(s.form(None), tuple(a.recipe.split("+")), "easyquant")
    pooled = s.built[cand.name].model
    builds, build = [], s.build
    s.build = lambda *args, **kw: builds.append(build(*args, **kw)) or builds[-1]  # the refit's model, kept or not
    auto_mod.refit(s, cand)
    print(json.dumps({"model": a.model, "recipe": a.recipe, "notes": s.report.notes, "kept": s.built[cand.name].model is not pooled}))
    for label, model in [("pool", pooled), ("refit", builds[0].model if builds else None)]:
        if model is not None:
            print(json.dumps({"model": a.model, "build": label, **task.fidelity(model)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
