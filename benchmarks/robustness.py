"""Robustness table: every method over every zoo fixture (and, with --suite, the suite models) on both targets.

For each (method, model, target) it quantizes with :func:`onnxq.optimize`, scores the result the
way the zoo scores its fixtures (``tests/fixtures/zoo/zoo.py``: top-1 on the eval labels, box F1
on the detectors' ground truth) or the suite's way (``benchmarks/scoring.py``), and prints one
Markdown row: the metric, FP32's, the drop, whether the drop is within the fixture's margin and
whether the run's fidelity check warned (``result.report.fidelity.warned``; ``n/a`` while the
check does not exist). A row that is outside the margin and did not warn is ``SILENT``: a bug.

    python benchmarks/robustness.py                       # the zoo (~10 minutes on 2 busy cores)
    python benchmarks/robustness.py --fixture picodet_head --recipe minmax --target trt
    python benchmarks/robustness.py --suite ppocr-rec --suite ppocr-det --suite minilm   # + suite models (slow)
    python benchmarks/robustness.py --no-zoo --suite minilm --json minilm.json           # one suite model, every built-in method
    python benchmarks/robustness.py --json out.json       # also write the rows as JSON
    python benchmarks/robustness.py --merge a.json b.json # one table of pieces run apart (re-judged by today's thresholds)

On the suite models every built-in recipe of the zoo runs (``--contrib`` adds the contributed
ones): the script does not guess which apply, a method that refuses a model is a row saying so
(``refused``). The JSON rows carry the check's per-output figures (``outputs``), so that a
threshold change can be judged on them without quantizing again.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "zoo"))
sys.path.insert(0, str(HERE))

import zoo  # noqa: E402

TARGETS = ("ort", "trt")
#: the headline metric of each suite model (benchmarks/configs.METRIC_COLUMNS) and its margin
SUITE_METRIC = {"ppocr-rec": ("char_accuracy", 0.01), "ppocr-det": ("box_f1_truth", 0.02), "minilm": ("recall_at_1", 0.01), "digits": ("top1_accuracy", 0.01)}
#: a recipe's options on a suite model where its defaults name the wrong task (DetPTQ's default task reads a
#: scores/boxes head; PP-OCR det is a segmentation map, as in benchmarks/detptq_ppocr.py)
SUITE_OPTIONS = {("detptq", "ppocr-det"): ({"task": "segmentation-map"},)}


def installed_methods() -> set[str]:
    from onnxq.host import get_host

    return set(get_host().methods) | {"auto"}  # the search is the host's, not a method plugin


def fidelity_of(result) -> tuple[str, str]:
    """(warned, detail) of the run's fidelity check: 'yes'/'no', or 'n/a' when the report has none."""
    fid = getattr(result.report, "fidelity", None)
    if fid is None:
        return "n/a", ""
    outs = getattr(fid, "outputs", None) or []
    detail = f"min cosine {min(o.cosine for o in outs):.4f}" if outs else ""
    return ("yes" if fid.warned else "no"), detail


def fidelity_figures(result) -> list[dict]:
    """The check's per-output figures (for the JSON rows: thresholds can be re-judged on them)."""
    from dataclasses import asdict

    fid = getattr(result.report, "fidelity", None)
    return [asdict(o) for o in getattr(fid, "outputs", None) or []]


def quantize(model, recipe: zoo.Recipe, options, data, target: str):
    from onnxq import optimize

    return optimize(str(model), method=list(recipe.methods), options=options, data=data, target=target, bits=recipe.bits,
                    show_progress=False)


def verdict(within: bool | None, warned: str) -> str:
    if within is None:
        return "refused" if warned == "refused" else "error"
    if within:
        return "ok" if warned != "yes" else "ok (warned)"
    return "warned" if warned == "yes" else ("SILENT" if warned == "no" else "bad (no check)")


def zoo_rows(fixtures, recipes, targets, methods: set[str]):
    for name in fixtures:
        fx = zoo.FIXTURES[name]
        ev = zoo.Evaluator(fx)
        for r in recipes:
            if not r.applies(fx) or not set(r.methods) <= methods:
                continue
            for target in targets:
                t = time.perf_counter()
                row = {"method": r.id, "model": name, "target": target, "metric": fx.metric, "fp32": ev.fp32}
                try:
                    res = quantize(fx.model, r, r.options_for(fx), str(fx.calib), target)
                    value = ev.score(res.model)
                    row.update(value=value, drop=ev.fp32 - value, within=ev.within_margin(value), margin=fx.margin)
                    row["warned"], row["fidelity"] = fidelity_of(res)
                    row["outputs"] = fidelity_figures(res)
                except Exception as exc:  # a method that fails on a fixture is a row, not the end of the table
                    row.update(value=None, drop=None, within=None, margin=fx.margin, warned="-", fidelity=f"{type(exc).__name__}: {exc}"[:120])
                    logging.debug("%s", traceback.format_exc())
                row["seconds"] = round(time.perf_counter() - t, 1)
                row["verdict"] = verdict(row["within"], row["warned"])
                yield row


def suite_rows(models, recipes, targets, methods: set[str], threads: int):
    from configs import SIZES
    from scoring import Evaluator
    from tasks import ModelUnavailable, prepare_task

    from onnxq import optimize
    from onnxq.errors import OnnxqError

    work = Path(tempfile.mkdtemp(prefix="onnxq-robustness-"))
    for name in models:
        try:
            task = prepare_task(name, work, SIZES["quick"], cjk=False, as_shipped=False)
        except ModelUnavailable as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
            continue
        scorer = Evaluator(task, threads)
        key, margin = SUITE_METRIC[name]
        fp32 = scorer.evaluate(task.model)[key]
        for r in recipes:
            if not set(r.methods) <= methods:
                continue
            for target in targets:
                t = time.perf_counter()
                row = {"method": r.id, "model": name, "target": target, "metric": key, "fp32": fp32}
                try:
                    out = work / f"{name}-{r.id}-{target}.onnx"
                    options = SUITE_OPTIONS.get((r.id, name), r.options)
                    res = optimize(str(task.model), str(out), method=list(r.methods), options=None if options is None else [dict(o) for o in options],
                                   data=str(task.calib),
                                   target=target, bits=r.bits, show_progress=False)
                    scores = scorer.evaluate(out)
                    value = scores[key]
                    row["scores"] = {k: v for k, v in scores.items() if isinstance(v, (int, float))}  # agreement with FP32 too
                    row.update(value=value, drop=fp32 - value, within=value >= fp32 - margin, margin=margin)
                    row["warned"], row["fidelity"] = fidelity_of(res)
                    row["outputs"] = fidelity_figures(res)
                except OnnxqError as exc:  # the method refuses the model (no convolution, no detector head, ...): a row saying so
                    msg = f"{exc}".splitlines()[0][:160]
                    bug = "this is a bug" in msg  # a host check caught the method (not a refusal): an error row
                    row.update(value=None, drop=None, within=None, margin=margin, warned="-" if bug else "refused", fidelity=msg)
                except Exception as exc:
                    row.update(value=None, drop=None, within=None, margin=margin, warned="-", fidelity=f"{type(exc).__name__}: {exc}"[:160])
                    logging.debug("%s", traceback.format_exc())
                row["seconds"] = round(time.perf_counter() - t, 1)
                row["verdict"] = verdict(row["within"], row["warned"])
                yield row
                if row["warned"] == "refused":
                    break  # a refusal does not depend on the target


def fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def rejudge(row: dict) -> dict:
    """``row`` with ``warned``/``verdict`` recomputed from its recorded per-output figures by the current check's thresholds.

    The check's decision is a function of those figures alone (``onnxq.evaluate.fidelity.collapsed``),
    so pieces measured before a threshold change are judged as the check judges them now.
    """
    from onnxq.evaluate.fidelity import OutputFidelity, collapsed

    if not row.get("outputs"):
        return row
    warned = "yes" if any(collapsed(OutputFidelity(**o)) for o in row["outputs"]) else "no"
    return {**row, "warned_when_measured": row["warned"], "warned": warned, "verdict": verdict(row["within"], warned)}


def fidelity_figure(row: dict) -> str:
    """The row's headline fidelity figure: the lowest neighbour agreement of an embedding output, else the lowest mean cosine."""
    outs = row.get("outputs") or []
    ranks = [o["neighbour_agreement"] for o in outs if o.get("neighbour_agreement") is not None]
    if ranks:
        return f"nb {min(ranks):.3f}"
    return f"cos {min(o['cosine'] for o in outs):.3f}" if outs else ""


def merged_table(rows: list[dict]) -> str:
    """One Markdown table, method x suite model, ``ort / trt`` cells: metric, fidelity figure, W (warned) / S (SILENT)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        cell.setdefault((r["method"], r["model"]), {})[r["target"]] = r
    head = [f"`{m}` {next(r['metric'] for r in rows if r['model'] == m)} ort / trt (FP32 {next(r['fp32'] for r in rows if r['model'] == m):.4f})"
            for m in models]
    lines = ["| method | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(models)]
    mark = {"warned": " **W**", "SILENT": " **S**", "ok (warned)": " (w)"}
    for meth in methods:
        cells = []
        for m in models:
            got = cell.get((meth, m), {})
            if not got:
                cells.append("not run")
            elif any(r["verdict"] == "refused" for r in got.values()):
                cells.append("refused: " + next(r["fidelity"] for r in got.values()).replace("|", "/")[:90])
            else:
                cells.append(" / ".join(
                    (f"{fmt(r['value'])} ({fidelity_figure(r)}){mark.get(r['verdict'], '')}" if r["value"] is not None
                     else "error (host check)" if "this is a bug" in r["fidelity"] else f"error ({r['fidelity'][:60]})") if r else "not run"
                    for r in (got.get("ort"), got.get("trt"))))
        lines.append(f"| `{meth}` | " + " | ".join(cells) + " |")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in sorted({r["verdict"] for r in rows})}
    return "\n".join(lines) + f"\n\n{len(rows)} runs: " + ", ".join(f"{k} {v}" for k, v in counts.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", action="append", choices=sorted(zoo.FIXTURES), help="zoo fixtures (default: all)")
    ap.add_argument("--recipe", action="append", choices=[r.id for r in zoo.RECIPES], help="methods as the zoo runs them (default: all installed)")
    ap.add_argument("--target", action="append", choices=TARGETS, help="targets (default: ort and trt)")
    ap.add_argument("--suite", action="append", choices=sorted(SUITE_METRIC), default=[], help="also run this suite model (slow; downloads are the suite's own)")
    ap.add_argument("--no-zoo", action="store_true", help="only the --suite models")
    ap.add_argument("--contrib", action="store_true", help="on the suite models, also the contributed methods' recipes (lapq, brecq)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="print one table of the rows of these --json files (suite pieces run apart), re-judged by the current thresholds")
    args = ap.parse_args()
    if args.merge:
        latest = {(r["method"], r["model"], r["target"]): r for f in args.merge for r in json.loads(f.read_text())}  # a later file's row wins
        rows = [rejudge(r) for r in latest.values()]
        changed = sum(r.get("warned_when_measured", r["warned"]) != r["warned"] for r in rows)
        print(merged_table(rows))
        print(f"{changed} rows judged differently than when measured (thresholds changed since)")
        return
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("onnxq").setLevel(logging.ERROR)

    methods = installed_methods()
    recipes = [r for r in zoo.RECIPES if args.recipe is None or r.id in args.recipe]
    targets = args.target or list(TARGETS)
    rows = []
    print("| method | model | target | metric | FP32 | quantized | drop | margin | fidelity warned | verdict | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    gens = [] if args.no_zoo else [zoo_rows(args.fixture or list(zoo.FIXTURES), recipes, targets, methods)]
    if args.suite:
        suite_recipes = [r for r in recipes if args.contrib or args.recipe is not None or not r.contrib]
        gens.append(suite_rows(args.suite, suite_recipes, targets, methods, args.threads))
    for gen in gens:
        for row in gen:
            rows.append(row)
            err = f" ({row['fidelity']})" if row["value"] is None else ""
            if args.json:  # written as the rows come, so that a run cut short keeps what it measured
                args.json.write_text(json.dumps(rows, indent=1))
            print(f"| {row['method']} | {row['model']} | {row['target']} | {row['metric']} | {fmt(row['fp32'])} | {fmt(row['value'])}{err} | "
                  f"{fmt(row['drop'], '+.4f')} | {row['margin']} | {row['warned']} | {row['verdict']} | {row['seconds']} |", flush=True)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in sorted({r["verdict"] for r in rows})}
    print(f"\n{len(rows)} runs: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
