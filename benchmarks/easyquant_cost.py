#!/usr/bin/env python
"""EasyQuant's defaults against the plain calibrators: quality, wall time and peak RSS (issue 15).

For each model it runs, each in its own child process through the CLI (``python -m onnxq optimize
... --no-cache --quiet``, wall time and peak RSS measured by ``_measure.run_measured``):

* ``minmax`` INT8 — the plain calibration the search's cost is compared with (same data, batch
  size and run settings);
* ``mse`` INT8 — the plain calibrator the search's quality is compared with;
* ``easyquant`` INT8 and INT7 (``--bits 7``) with the defaults, plus any ``--config``.

It prints one Markdown row per model: the metric of each run, the INT7 - INT8 drop, the wall
ratio easyquant / minmax and each run's peak RSS. Metrics: top-1 on the labelled fixtures (the
zoo's own scoring, ``tests/fixtures/zoo/zoo.py``), character agreement with FP32 on PP-OCR rec,
box F1 against FP32's boxes on PP-OCR det, mean output cosine with FP32 on MiniLM.

    python benchmarks/easyquant_cost.py                      # zoo + digits fixtures (~10 min, 2 cores)
    python benchmarks/easyquant_cost.py --models ppocr-rec,ppocr-det,minilm   # suite (data from bench.py)
    python benchmarks/easyquant_cost.py --models mnist_norm_resnet --config "easyquant|preset=paper|8"

The suite models need the data ``python benchmarks/bench.py --models ppocr-rec,ppocr-det,minilm``
writes under ``.bench/`` (PP-OCR det is fed 32 calibration pages in batches of 8 when that many
are there: ``--batch-size 8``). Timings on a shared machine are noisy; peak RSS is not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "zoo"))
sys.path.insert(0, str(HERE))

import zoo  # noqa: E402
from _measure import run_measured  # noqa: E402

FIXTURES = list(zoo.FIXTURES) + ["mobilenet_digits", "repvgg_digits", "digits"]
SUITE = ("ppocr-rec", "ppocr-det", "minilm")
#: run settings per model: (--batch-size or None)
BATCH = {"ppocr-det": 8}


@dataclass(frozen=True)
class Run:
    """One quantization: methods joined by '+', options, bits."""

    methods: str
    options: tuple[tuple[str, str], ...] = ()
    bits: int = 8

    @classmethod
    def parse(cls, spec: str) -> Run:
        """``methods|k=v,k=v|bits``."""
        parts = (spec.split("|") + ["", ""])[:3]
        opts = tuple(tuple(kv.split("=", 1)) for kv in parts[1].split(",") if kv)
        return cls(parts[0], opts, int(parts[2] or 8))  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        o = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.methods}{' ' + o if o else ''} INT{self.bits}"


BASE = [Run("minmax"), Run("mse"), Run("easyquant"), Run("easyquant", bits=7)]


class Model:
    """A model, its calibration data and its scoring."""

    def __init__(self, name: str, work: Path) -> None:
        self.name = name
        if name in zoo.FIXTURES:
            fx = zoo.FIXTURES[name]
            self.path, self.calib = fx.model, fx.calib
            ev = zoo.Evaluator(fx)
            self.score, self.metric = ev.score, fx.metric
        elif name in ("mobilenet_digits", "repvgg_digits", "digits"):
            folder = ROOT / ("examples/digits" if name == "digits" else f"tests/fixtures/{name}")
            self.path = folder / "model.onnx"
            if name == "digits":
                self.calib = folder / "calib"
                files = [zoo.load_npz(f) for f in sorted((folder / "eval").glob("*.npz"))]
                data = {k: np.concatenate([f[k] for f in files]) for k in files[0]}
            else:
                self.calib = folder / "calib.npz"
                data = zoo.load_npz(folder / "eval.npz")
            feeds, labels = {"input": data["input"]}, data["label"]
            self.score = lambda m: float((_run(m, [feeds])[0].argmax(-1) == labels).mean())
            self.metric = "top1"
        else:
            self.path = work / "models" / name / "fp32.onnx" if name != "minilm" else work / "minilm" / "model.onnx"
            self.calib = work / "data" / name / "calib"
            eval_dir = work / "data" / name / "eval"
            if not self.path.exists() or not self.calib.is_dir():
                raise SystemExit(f"{name}: run python benchmarks/bench.py --models {name} first (needs {self.path} and {self.calib})")
            feeds = [zoo.load_npz(f) for f in sorted(eval_dir.glob("*.npz"))]
            names = zoo.input_names(self.path)
            feeds = [{k: f[k] for k in names} for f in feeds]
            ref = _run(self.path, feeds)
            if name == "ppocr-rec":
                import ocr_data

                dec = lambda ys: [s for y in ys for s in ocr_data.decode_rec(y)]  # noqa: E731
                ref_text = dec(ref)
                self.score, self.metric = (lambda m: ocr_data.char_agreement(dec(_run(m, feeds)), ref_text)), "char agreement vs FP32"
            elif name == "ppocr-det":
                import ocr_data

                boxes = lambda ys: [b for y in ys for b in ocr_data.decode_det(y)]  # noqa: E731
                ref_boxes = boxes(ref)
                self.score, self.metric = (lambda m: ocr_data.box_f1(boxes(_run(m, feeds)), ref_boxes, 0.5)), "box F1 vs FP32"
            else:
                self.score = lambda m: float(np.mean([zoo.mean_cosine(a, b) for a, b in zip(_run(m, feeds), ref)]))
                self.metric = "cosine vs FP32"
        self.fp32 = self.score(self.path) if self.metric == "top1" or self.name in zoo.FIXTURES else 1.0


def _run(model, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    from onnxq.runtime.ort import make_session

    sess = make_session(model, "all")
    return [sess.run(None, f)[0] for f in feeds]


def quantize(m: Model, run: Run, out: Path, timeout: float) -> dict:
    argv = [sys.executable, "-m", "onnxq", "optimize", str(m.path), "--data", str(m.calib)]
    for method in run.methods.split("+"):
        argv += ["-p", method]
    for k, v in run.options:
        argv += ["-o", k, v]
    argv += ["--bits", str(run.bits), "--output", str(out), "--force", "--no-cache", "--quiet"]
    if m.name in BATCH:
        argv += ["--batch-size", str(BATCH[m.name])]
    meas = run_measured(argv, timeout=timeout, env=dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1"))
    row = {"run": run.label, "status": meas.status, "wall_s": round(meas.wall_s, 2), "cpu_s": round(meas.user_s + meas.sys_s, 2),
           "peak_rss_mb": round(meas.peak_rss_mb)}
    if meas.ok and out.exists():
        row["metric"] = m.score(out)
    else:
        row["error"] = (meas.stderr.strip().splitlines() or ["?"])[-1][:200]
    print(f"  {m.name} {run.label}: {row.get('metric', row['status'])} wall {row['wall_s']} s, CPU {row['cpu_s']} s, peak RSS {row['peak_rss_mb']} MB",
          file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(FIXTURES), help=f"comma-separated: {', '.join(FIXTURES + list(SUITE))}")
    ap.add_argument("--config", action="append", default=[], help="extra run 'methods|k=v,...|bits' (repeatable)")
    ap.add_argument("--only", action="store_true", help="run only the --config runs (and minmax for the wall ratio)")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    runs = ([Run("minmax")] if a.only else list(BASE)) + [Run.parse(c) for c in a.config]
    rows = []
    print("| model | metric | FP32 | " + " | ".join(r.label for r in runs) + " | eq INT7 - INT8 | eq wall (CPU) / minmax | peak RSS (MB) |")
    print("|" + " --- |" * (len(runs) + 6))
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            m = Model(name, a.workdir)
            res = [quantize(m, r, Path(tmp) / f"{name}.{i}.onnx", a.timeout) for i, r in enumerate(runs)]
            rows.append({"model": name, "metric": m.metric, "fp32": m.fp32, "runs": res})
            cell = lambda r: f"{r['metric']:.4f} ({r['wall_s']:.1f} s)" if "metric" in r else r["status"]  # noqa: E731
            by = {r["run"]: r for r in res}
            e8, e7, mm = by.get("easyquant INT8", {}), by.get("easyquant INT7", {}), by["minmax INT8"]
            drop = f"{e7['metric'] - e8['metric']:+.4f}" if "metric" in e7 and "metric" in e8 else "–"
            ratio = f"{e8['wall_s'] / mm['wall_s']:.1f}x ({e8['cpu_s'] / mm['cpu_s']:.1f}x)" if "metric" in e8 and "metric" in mm else "–"
            rss = " / ".join(str(r["peak_rss_mb"]) for r in res)
            print(f"| {name} | {m.metric} | {m.fp32:.4f} | " + " | ".join(cell(r) for r in res) + f" | {drop} | {ratio} | {rss} |", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
