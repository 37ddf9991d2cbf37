#!/usr/bin/env python
"""``-p auto`` against the best hand-picked recipe of each suite model, and its stability over disjoint calibration sets.

    python benchmarks/auto_bench.py compare ppocr-rec            # hand-picked equalize+mse vs -p auto (defaults), same data
    python benchmarks/auto_bench.py compare minilm --auto-opt min_cosine 0.9995   # mixed precision vs "by error alone"
    python benchmarks/auto_bench.py stability ppocr-rec --subsets 3               # auto on 3 disjoint calibration sets
    python benchmarks/auto_bench.py stability ppocr-rec --subsets 3 --hand        # ... and the hand-picked recipe on each of them
    python benchmarks/auto_bench.py stability ppocr-rec --subsets 3 --same-recipe # ... and each chosen recipe rebuilt on every set
    python benchmarks/auto_bench.py stability digits --digits-sets train --hand     # 3 fresh 256-sample sets from the example's training split
    python benchmarks/auto_bench.py compare ppocr-det --profile out/det.prof      # ... with the auto run under cProfile
    python benchmarks/auto_bench.py compare digits --cli                          # ... each run as its own `onnxq optimize` command

Models: ``ppocr-rec`` (needs ``python benchmarks/bench.py --models ppocr-rec`` to have written .bench/), ``minilm``
(needs benchmarks/minilm/export_minilm.py), ``digits`` (the bundled example), ``mobilenet`` (tests/fixtures/mobilenet_digits).
Prints one line per run: the model's task metric against FP32 on its evaluation data, the wall time of the
quantization (this process, model load included), what auto chose and its reported spread; ``--json FILE``
writes every figure and auto's whole report.

Timing: the first quantization in a process pays one-time costs (imports, the plugin host, ONNX Runtime's first
session: 0.45 s of the bundled example's 0.6-s hand-picked run), so a throwaway ``minmax`` run on one batch comes
first and both timed runs are warm (``--cold``: without it, as before 2026-12-07). ``--cli`` times each run as the
command a user types instead (``onnxq optimize MODEL -p RECIPE --data DIR``, the process's start included; the
calibration batches written to a temporary folder of .npz files first), and scores the model it wrote.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "minilm"))

import onnxq  # noqa: E402
from onnxq.runtime.ort import make_session  # noqa: E402

#: the best hand-picked recipe of each model (benchmarks/README.md's tables)
HAND_PICKED = {"ppocr-rec": ["equalize", "mse"], "ppocr-det": ["minmax"], "minilm": ["smoothquant", "minmax"], "digits": ["percentile"], "mobilenet": ["equalize", "minmax"]}


class Task:
    """A suite model: its FP32 file, calibration feeds (optionally a disjoint set k of n) and its fidelity metric."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        if name == "ppocr-rec":
            self.fp32 = str(workdir / "models" / "ppocr-rec" / "fp32.onnx")
            self.eval = self._npz(workdir / "data" / "ppocr-rec" / "eval")
        elif name == "ppocr-det":
            self.fp32 = str(workdir / "models" / "ppocr-det" / "fp32.onnx")
            self.eval = self._npz(workdir / "data" / "ppocr-det" / "eval")
        elif name == "minilm":
            import retrieval
            import text_data

            self.fp32 = str(workdir / "minilm" / "model.onnx")
            texts = [q for q, _ in retrieval.pairs()] + [p for _, p in retrieval.pairs()]
            self.eval = text_data.batches(texts, 32)
        elif name == "digits":
            self.fp32 = str(HERE.parent / "examples" / "digits" / "model.onnx")
            self.eval = [{"input": np.load(f)["input"]} for f in sorted(glob.glob(str(HERE.parent / "examples/digits/eval/*.npz")))]
        elif name == "mobilenet":
            fx = HERE.parent / "tests" / "fixtures" / "mobilenet_digits"
            self.fp32 = str(fx / "model.onnx")
            x = np.load(fx / "eval.npz")
            self.eval = [{k: x[k][i:i + 64] for k in x.files if k not in ("label", "labels")} for i in range(0, len(x[x.files[0]]), 64)]
        else:
            raise SystemExit(f"unknown model {name}")

    #: digits' disjoint calibration sets: ``thirds`` of the bundled 256 samples, or ``train``: 256 fresh samples each
    #: from the example's training split (1,297 samples; needs scikit-learn and torch, as examples/digits/train.py)
    digits_sets = "thirds"

    @staticmethod
    def _digits_train_set(k: int, n: int = 256) -> np.ndarray:
        """Disjoint set ``k`` of ``n`` samples of the digits example's training split, preprocessed as its model expects."""
        sys.path.insert(0, str(HERE.parent / "examples" / "digits"))
        import train  # noqa: PLC0415 - torch and scikit-learn, only for this option

        x_tr = train.load_split()[0]
        order = np.random.default_rng(1000).permutation(len(x_tr))
        if (k + 1) * n > len(x_tr):
            raise SystemExit(f"the digits training split has {len(x_tr)} samples: at most {len(x_tr) // n} sets of {n}")
        return x_tr[np.sort(order[k * n:(k + 1) * n])].astype(np.float32)

    @staticmethod
    def _npz(folder: Path) -> list[dict[str, np.ndarray]]:
        return [dict(np.load(f)) for f in sorted(glob.glob(str(folder / "*.npz")))]

    def calibration(self, subset: int | None = None, subsets: int = 3) -> list[dict[str, np.ndarray]]:
        """The suite's calibration data, or disjoint set ``subset`` of ``subsets`` (fresh data, same kind, same size)."""
        if self.name == "ppocr-rec":
            if subset is None:
                return self._npz(self.workdir / "data" / "ppocr-rec" / "calib")
            import ocr_data

            images, _ = ocr_data.render_lines(128, seed=100 + subset, cjk=False)
            return list(ocr_data.rec_feeds(images, batch_size=8, name="x"))
        if self.name == "ppocr-det":
            if subset is None:
                return self._npz(self.workdir / "data" / "ppocr-det" / "calib")
            import ocr_data

            pages, _ = ocr_data.render_pages(16, seed=100 + subset)
            return list(ocr_data.det_feeds(pages, batch_size=1, name="x"))
        if self.name == "minilm":
            import retrieval
            import text_data

            if subset is None:
                return text_data.batches(retrieval.calibration_sentences(256), 16)
            pool = retrieval.calibration_sentences(256 * subsets)
            return text_data.batches(pool[subset::subsets], 16)
        if self.name == "digits" and subset is not None and self.digits_sets == "train":
            x = self._digits_train_set(subset)
            return [{"input": x[i:i + 16]} for i in range(0, len(x), 16)]
        if self.name == "digits":
            files = sorted(glob.glob(str(HERE.parent / "examples/digits/calib/*.npz")))
            x = np.concatenate([np.load(f)["input"] for f in files])
        else:
            x = np.load(HERE.parent / "tests/fixtures/mobilenet_digits/calib.npz")
            x = x[x.files[0]]
        if subset is not None:
            x = x[subset::subsets]
        name = make_session(self.fp32).get_inputs()[0].name
        return [{name: x[i:i + 16]} for i in range(0, len(x), 16)]

    def sample_cosines(self, model: Any, got: list[np.ndarray] | None = None) -> np.ndarray:
        """The first output's per-sample cosine against FP32 on the evaluation data (``got``: its outputs, when run already)."""
        got = self.outputs(model) if got is None else got
        a, b = _rows(self.reference()), _rows(got)
        return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    def fidelity(self, model: Any, got: list[np.ndarray] | None = None) -> dict[str, float]:
        """The task metric against FP32 on the evaluation data (``got``: the model's outputs, when run already)."""
        ref, got = self.reference(), self.outputs(model) if got is None else got
        c = self.sample_cosines(model, got)
        cos = {"cosine_mean": round(float(c.mean()), 5), "cosine_min": round(float(c.min()), 4)}  # the first output, per sample
        if self.name == "ppocr-rec":
            import ocr_data

            dec = lambda ys: [s for y in ys for s in ocr_data.decode_rec(y)]  # noqa: E731
            return {"char_agreement": round(ocr_data.char_agreement(dec(got), dec(ref)), 4), **cos}
        if self.name == "ppocr-det":
            import ocr_data

            boxes = lambda ys: [b for y in ys for b in ocr_data.decode_det(np.asarray(y, np.float32))]  # noqa: E731
            mae = float(np.mean([ocr_data.prob_map_error(np.asarray(q, np.float32), np.asarray(r, np.float32)) for q, r in zip(got, ref)]))
            return {"box_f1": round(ocr_data.box_f1(boxes(got), boxes(ref), 0.5), 4), "prob_mae": round(mae, 5), **cos}
        if self.name == "minilm":
            return cos
        return {"top1_agreement": round(float(np.mean(_rows(ref).argmax(1) == _rows(got).argmax(1))), 4), **cos}

    def reference(self) -> list[np.ndarray]:
        """FP32's outputs on the evaluation data, computed once per process."""
        if not hasattr(self, "_ref_outputs"):
            self._ref_outputs = self.outputs(self.fp32)
        return self._ref_outputs

    def outputs(self, model: Any, feeds: list[dict[str, np.ndarray]] | None = None) -> list[np.ndarray]:
        """The model's first output on each evaluation batch (or on each of ``feeds``, e.g. perturbed evaluation batches)."""
        sess = make_session(model, "all")
        names = {i.name for i in sess.get_inputs()}
        return [sess.run(None, {k: v for k, v in f.items() if k in names})[0] for f in (self.eval if feeds is None else feeds)]


def same_recipe(task: Task, runs: list[dict[str, Any]], subsets: int) -> list[dict[str, Any]]:
    """Each run's chosen recipe, with its float layers, rebuilt on every calibration set and evaluated: the issue's
    stability test is on *the chosen recipe's* fidelity, and the runs may choose different recipes on different sets."""
    out = []
    for r in runs:
        if not r.get("methods"):
            continue
        cos = []
        for k in range(subsets):
            res = onnxq.optimize(task.fp32, method=r["methods"], data=task.calibration(k, subsets), show_progress=False,
                                 cache_dir=None, exclude=r["float_layers"] or ())
            cos.append(task.fidelity(res.model))
        c = [f["cosine_mean"] for f in cos]
        out.append({"run": f"same recipe: {r['recipe']} ({r['run']})", "recipe": r["recipe"], "per_set": cos,
                    "varies_by": round(max(c) - min(c), 5), "reported_spread": r["spread"], "spread_bound": r.get("spread_bound"),
                    "within": r["spread"] is not None and max(c) - min(c) < r["spread"],
                    "within_bound": r.get("spread_bound") is not None and max(c) - min(c) < r["spread_bound"]})
        print(json.dumps(out[-1]), flush=True)
    return out


def _rows(outputs: list[np.ndarray]) -> np.ndarray:
    """The batches' first outputs as one float64 row per sample."""
    return np.concatenate([y.reshape(len(y), -1) for y in outputs]).astype(np.float64)


def cli_run(task: Task, method: str, calib: list[dict[str, np.ndarray]], extra: list[str]) -> tuple[Any, float]:
    """``onnxq optimize`` on ``task``'s model as its own process: the model it wrote and the command's wall seconds."""
    import subprocess
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "calib"
        data.mkdir()
        for i, batch in enumerate(calib):
            np.savez(data / f"{i:05d}.npz", **batch)
        out = Path(tmp) / "out.onnx"
        cmd = [sys.executable, "-m", "onnxq", "optimize", task.fp32, "-p", method, "--data", str(data), "--output", str(out), *extra]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = round(time.perf_counter() - t, 2)
        return onnx.load(str(out)), wall


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall seconds, to 0.01 s (the fixtures' hand-picked runs take 0.4 s: tenths made their ratio coarse)."""
    t = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t, 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("compare", "stability"))
    ap.add_argument("model", choices=tuple(HAND_PICKED))
    ap.add_argument("--auto-opt", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="an option of -p auto")
    ap.add_argument("--subsets", type=int, default=3)
    ap.add_argument("--digits-sets", choices=["thirds", "train"], default="thirds",
                    help="stability on digits: thirds of the bundled 256 calibration samples, or 256 fresh samples each from "
                         "the example's training split (as the other models get fresh sets of their calibration set's size)")
    ap.add_argument("--no-hand", action="store_true", help="compare: skip the hand-picked run")
    ap.add_argument("--hand", action="store_true", help="stability: also the hand-picked recipe on each calibration set")
    ap.add_argument("--same-recipe", action="store_true",
                    help="stability: rebuild each run's chosen recipe (and float layers) on every calibration set: how that recipe's "
                         "own fidelity varies, against the spread auto reported for it")
    ap.add_argument("--no-fold", action="store_true", help="compare: also the hand-picked recipe with fold=False")
    ap.add_argument("--hand-recipe", default=None, metavar="M+M",
                    help="compare/stability: this recipe as the hand-picked row instead of HAND_PICKED's (e.g. equalize+mse on ppocr-det, "
                         "the best by fidelity there; HAND_PICKED keeps the cheapest recipe of equal box F1)")
    ap.add_argument("--cold", action="store_true", help="no warm-up run first: the first timed run pays the process's one-time costs")
    ap.add_argument("--cli", action="store_true", help="compare: time each run as an `onnxq optimize` command (process start included)")
    ap.add_argument("--workdir", type=Path, default=HERE.parent / ".bench")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--profile", type=Path, default=None,
                    help="compare: cProfile the auto run into this file and print its 40 costliest calls by cumulative time")
    a = ap.parse_args(argv)
    task = Task(a.model, a.workdir)
    task.digits_sets = a.digits_sets
    hand = a.hand_recipe.split("+") if a.hand_recipe else HAND_PICKED[a.model]
    opts = dict(a.auto_opt)
    rows: list[dict[str, Any]] = []

    def done(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)

    def hand_row(label: str, calib: list[dict[str, np.ndarray]], fold: bool = True) -> None:
        if a.cli:
            model, wall = cli_run(task, "+".join(hand), calib, ["--no-cache"] + ([] if fold else ["--no-fold"]))
            done({"run": label + " (cli)", "recipe": "+".join(hand), "wall_s": wall, **task.fidelity(model)})
            return
        res, wall = timed(lambda: onnxq.optimize(task.fp32, method=hand, data=calib, show_progress=False, cache_dir=None, fold=fold))
        done({"run": label, "recipe": "+".join(hand), "wall_s": wall, **task.fidelity(res.model)})

    def auto_row(label: str, calib: list[dict[str, np.ndarray]]) -> None:
        if a.cli:
            extra = [x for k, v in opts.items() for x in ("-o", k, v)] + ["--cache-dir", str(a.workdir / "cache")]
            model, wall = cli_run(task, "auto", calib, extra)
            done({"run": label + " (cli)", "recipe": "auto", "wall_s": wall, **task.fidelity(model)})
            return
        run = lambda: onnxq.optimize(task.fp32, method="auto", options=opts, data=calib, show_progress=True,  # noqa: E731
                                     cache_dir=a.workdir / "cache")
        if a.profile is not None and a.mode == "compare":
            import cProfile
            import pstats

            prof = cProfile.Profile()
            res, wall = timed(lambda: prof.runcall(run))
            prof.dump_stats(a.profile)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        else:
            res, wall = timed(run)
        auto = res.report.auto
        chosen = next(c for c in auto.candidates if c.name == auto.chosen) if any(c.name == auto.chosen for c in auto.candidates) else None
        row = {"run": label, "recipe": auto.chosen, "wall_s": wall, **task.fidelity(res.model), "met": auto.met,
               "score": chosen.score if chosen else None, "spread": chosen.spread if chosen else None,
               "spread_bound": chosen.spread_bound if chosen else None,
               "resample_scores": chosen.resample_scores if chosen else [], "float_layers": auto.float_layers,
               "latency_ms": chosen.latency_ms if chosen else None, "budget_s": auto.time_budget_s, "report": res.report.to_dict(),
               "methods": list(chosen.methods) if chosen else None}
        if auto.by_error_alone is not None:
            b = auto.by_error_alone
            row["by_error_alone"] = {"float_layers": b.float_layers, "score": b.score, "latency_ms": b.latency_ms}
        done(row)

    if not a.cold and not a.cli:
        onnxq.optimize(task.fp32, method="minmax", data=task.calibration()[:1], show_progress=False, cache_dir=None)
    if a.mode == "compare":
        if not a.no_hand:
            hand_row("hand-picked", task.calibration())
        if a.no_fold:
            hand_row("hand-picked --no-fold", task.calibration(), fold=False)
        auto_row("auto " + " ".join(f"{k}={v}" for k, v in opts.items()), task.calibration())
    else:
        for k in range(a.subsets):
            calib = task.calibration(k, a.subsets)
            if a.hand:  # one calibration set is one draw: the hand-picked recipe's figure moves with the set too
                hand_row(f"hand-picked, calibration set {k + 1} of {a.subsets}", calib)
            auto_row(f"auto, calibration set {k + 1} of {a.subsets}", calib)
        if a.same_recipe:
            rows += same_recipe(task, [r for r in rows if r["run"].startswith("auto")], a.subsets)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
