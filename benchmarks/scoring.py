"""Task metrics of one model on its evaluation feeds, against the truth and against FP32.

Sessions, runs and the integer-kernel count come from onnxq's runtime layer
(``onnxq.runtime.ort``), top-1 from its metrics (``onnxq.evaluate.metrics``); what is the
suite's own is the task scoring: CTC decoding and character agreement (PP-OCR rec), DB boxes
and box F1 (PP-OCR det), retrieval recall (MiniLM).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tasks import HERE, Task, latency_feed, load_feed_files

from onnxq.evaluate.metrics import top1
from onnxq.runtime.ort import integer_kernel_report, make_session, run


def integer_kernels(path: Path) -> dict:
    """How many compute ops ORT runs on integer kernels (onnxq's own diagnostic)."""
    try:
        r = integer_kernel_report(str(path))
        n_int, n_float = sum(r["integer_ops"].values()), sum(r["float_compute_ops"].values())
        return {"integer": n_int, "float": n_float, "fraction": r["integer_fraction"], "detail": r}
    except Exception as exc:  # diagnostics only
        return {"error": str(exc)}


class Evaluator:
    """Runs a model on the task's evaluation feeds and scores it against truth and FP32.

    The first model evaluated is the FP32 reference the others are compared with.
    """

    def __init__(self, task: Task, threads: int) -> None:
        self.task = task
        self.threads = threads
        self.feeds = load_feed_files(task.eval)
        self.ref: Any = None
        self.latency_feed = latency_feed(task, self.feeds)

    def _outputs(self, path: Path) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        sess = make_session(path, "all", threads=self.threads)
        names = {i.name for i in sess.get_inputs()}
        for f in self.feeds:
            yield f, run(sess, {k: v for k, v in f.items() if k in names})[0]

    def evaluate(self, path: Path) -> dict:
        t = time.perf_counter()
        fn: Callable[[Path], dict] = {"digits": self._digits, "ppocr-rec": self._rec, "ppocr-det": self._det, "minilm": self._minilm}[self.task.name]
        out = fn(path)
        out["eval_seconds"] = round(time.perf_counter() - t, 2)
        return out

    def _digits(self, path: Path) -> dict:
        preds, labels = [], []
        for f, y in self._outputs(path):
            preds.append(top1(y))
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
        if str(HERE / "minilm") not in sys.path:
            sys.path.insert(0, str(HERE / "minilm"))
        import retrieval
        from embeddings import cosines

        embs = np.concatenate([np.asarray(y, np.float64) for _, y in self._outputs(path)])
        roles = np.concatenate([f["role"] for f in self.feeds])
        index = np.concatenate([f["index"] for f in self.feeds])
        q, p = retrieval.split_embeddings(embs, roles, index)
        recall, top = retrieval.recall_at_1(q, p)
        if self.ref is None:
            self.ref = (embs, recall, top)
        ref, ref_recall, ref_top = self.ref
        cos = cosines(embs, ref)
        return {"recall_at_1": recall, "recall_delta_fp32": recall - ref_recall, "cosine_mean_fp32": float(cos.mean()),
                "cosine_min_fp32": float(cos.min()), "top1_agreement_fp32": float(np.mean(top == ref_top)),
                "queries": int(len(q)), "samples": int(len(embs))}
