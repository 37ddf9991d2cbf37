#!/usr/bin/env python
"""``-p auto``'s mixed precision against "keep the most sensitive layers by error alone", on one suite model.

    python benchmarks/auto_mixed.py minilm --auto-opt min_cosine 0.9995 --auto-opt rewrites smoothquant \\
        --auto-opt calibrators minmax --auto-opt resamples 0 --auto-opt easyquant false --auto-opt time_budget 900

Runs ``-p auto`` once (``benchmarks/auto_bench.py``'s models and data), then takes from its report the set of float
layers it chose and the by-error-alone comparison (``auto.by_error_alone``: the layers of largest single-layer gain,
one at a time, until the target is met on its bound), and builds both sets again the same way: the chosen recipe
with those layers excluded (``onnxq.optimize(..., exclude=...)``), calibrated on every calibration sample. Prints one
JSON line per set: float layers, their float cost on auto's latency table (ms, the sum of ``float_cost_ms``), the
held-out score and its bound from the report, the task metric on the model's evaluation data (MiniLM: sentence
cosine on the 860 retrieval texts) and the whole model's latency (batch 1, one thread; noisy on a loaded machine).
``--json FILE`` keeps the rows and auto's whole report. MiniLM's evaluation texts are also split into the 430
one-sentence queries and their 430 passages; ``--heldout-texts 128`` gives auto 128 of the retrieval texts as its
held-out data (``eval_data``) and evaluates on the other 732, to see whether a target met on held-out data of the
evaluation's kind carries over where one met on calibration sentences does not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import onnxq  # noqa: E402
from auto_bench import Task, timed  # noqa: E402
from onnxq.runtime.ort import latency_ms  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=("minilm", "ppocr-rec", "ppocr-det", "digits", "mobilenet"))
    ap.add_argument("--auto-opt", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="an option of -p auto")
    ap.add_argument("--workdir", type=Path, default=HERE.parent / ".bench")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--heldout-texts", type=int, default=0, metavar="N",
                    help="minilm: score auto's candidates on N of the retrieval texts (every 860/N-th, given as eval_data) "
                         "instead of calibration sentences split off, and evaluate on the other texts")
    a = ap.parse_args(argv)
    task = Task(a.model, a.workdir)
    calib = task.calibration()
    heldout = None
    if a.heldout_texts:
        if a.model != "minilm":
            raise SystemExit("--heldout-texts is for minilm")
        import retrieval
        import text_data

        texts = [q for q, _ in retrieval.pairs()] + [p for _, p in retrieval.pairs()]
        step = len(texts) // a.heldout_texts
        held = set(range(0, step * a.heldout_texts, step))
        heldout = text_data.batches([x for i, x in enumerate(texts) if i in held], 16)
        task.eval = text_data.batches([x for i, x in enumerate(texts) if i not in held], 32)  # the rest: queries first, as before
        task.split_at = sum(1 for i in range(len(texts) // 2) if i not in held)
    res, wall = timed(lambda: onnxq.optimize(task.fp32, method="auto", options=dict(a.auto_opt), data=calib, eval_data=heldout,
                                             show_progress=True, cache_dir=a.workdir / "cache"))
    auto = res.report.auto
    cost = {r.node: max(r.float_cost_ms or 0.0, 0.0) for r in auto.sensitivity}
    by_name = {c.name: c for c in auto.candidates}
    chosen = by_name.get(auto.chosen)
    sample = {k: v[:1] for k, v in task.eval[0].items()}
    rows: list[dict[str, Any]] = []

    def parts(model: Any) -> dict[str, float]:
        """MiniLM: the evaluation texts are 430 one-sentence queries, then their 430 passages (several sentences each,
        longer than any calibration sentence): the cosine of each half, and its standard error."""
        if a.model != "minilm":
            return {}
        c = task.sample_cosines(model)
        half = getattr(task, "split_at", len(c) // 2)
        sem = lambda x: float(np.std(x, ddof=1) / np.sqrt(len(x)))  # noqa: E731
        return {"eval_queries": round(float(c[:half].mean()), 6), "eval_passages": round(float(c[half:].mean()), 6),
                "eval_se": round(sem(c), 6)}

    def row(label: str, cand: Any, model: Any) -> dict[str, Any]:
        layers = list(cand.float_layers) if cand is not None else []
        r = {"set": label, "float_layers": len(layers), "float_cost_ms": round(sum(cost.get(n, 0.0) for n in layers), 3),
             "met": bool(cand.meets_target) if cand is not None else None,
             "heldout": cand.score if cand is not None else None, "heldout_bound": cand.score_bound if cand is not None else None,
             **{f"eval_{k}": v for k, v in task.fidelity(model).items()},
             **parts(model),
             "model_ms": round(latency_ms(model, sample, 1, 20, 3), 2), "layers": layers}
        print(json.dumps(r), flush=True)
        return r

    print(json.dumps({"auto": auto.chosen, "met": auto.met, "wall_s": wall, "budget_s": auto.time_budget_s, "reason": auto.reason}), flush=True)
    rows.append(row("auto, as returned", chosen, res.model))
    recipe = chosen.methods if chosen is not None else []
    sets = [("auto's set, rebuilt on all calibration samples", chosen)]
    if auto.by_error_alone is not None:
        sets.append(("by error alone, rebuilt on all calibration samples", auto.by_error_alone))
    for label, cand in sets:
        if cand is None:
            continue
        built = onnxq.optimize(task.fp32, method=recipe, data=calib, exclude=cand.float_layers, show_progress=False, check=False)
        rows.append(row(label, cand, built.model))
    full = onnxq.optimize(task.fp32, method=recipe, data=calib, show_progress=False, check=False)
    rows.append(row("full integer, same recipe", None, full.model))
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "wall_s": wall, "report": res.report.to_dict()}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
