"""DetPTQ on PP-OCRv4's text detector (DBNet, from rapidocr-onnxruntime) on rendered pages.

Quantizes ``ch_PP-OCRv4_det_infer.onnx`` at INT8 and at the emulated W4A4 setting and prints,
for each method, box F1 (IoU >= 0.5) against the FP32 model's boxes and against the rendered
ground truth, the mean absolute error of the probability map against FP32, and the time::

    python benchmarks/detptq_ppocr.py                 # 8 calibration pages, 16 eval pages, 640x640
    python benchmarks/detptq_ppocr.py --json out.json --granularity layer

Rows (every model runs in ONNX Runtime on the CPU):

* ``ORT quantize_static`` — ONNX Runtime's own static quantizer (QDQ, per-channel int8 weights,
  uint8 activations, MinMax calibration; its own placement: every supported op). INT8 only: it
  has no 4-bit activation setting.
* ``onnxq trt-entropy`` — TensorRT's entropy calibrator. At W4A4 it is ``-p detptq -o p_values kl``:
  the same entropy threshold computed for the 4-bit grid, max-abs 4-bit weights, no search.
* ``onnxq fixed L2`` — ``-p detptq -o p_values 2``: the L2-optimal clip of every tensor, no search.
* ``onnxq detptq`` — the task-loss-guided per-tensor choice of p (task ``segmentation-map`` on
  the probability map ``sigmoid_0.tmp_0``).

onnxq rows use ``--target`` (default ``trt``: Q/DQ on the inputs of Conv/ConvTranspose and of
residual Adds — the usual placement of W4A4 papers). W4A4 is emulated: int8 weights restricted
to [−7, 7], int8 activations clipped to the 4-bit grid, first and output layers at 8 bits; ONNX
Runtime runs it on INT8 kernels. The search is the expensive part (about 800 tail runs on
``--search-pages`` pages); statistics are computed once and cached in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ocr_data as od  # noqa: E402

OUTPUT = "sigmoid_0.tmp_0"


def run_model(model, feeds: np.ndarray, name: str, batch: int = 4) -> np.ndarray:
    from onnxq.runtime.ort import make_session

    sess = make_session(model, "all")
    return np.concatenate([sess.run(None, {name: feeds[i : i + batch]})[0] for i in range(0, len(feeds), batch)])


def evaluate(model, feeds, name, fp_map, fp_boxes, gt_boxes) -> dict:
    pm = run_model(model, feeds, name)
    boxes = od.decode_det(pm)
    return {"f1_vs_fp32": od.box_f1(boxes, fp_boxes), "f1_vs_gt": od.box_f1(boxes, gt_boxes), "map_error": od.prob_map_error(pm, fp_map)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=8, help="calibration pages")
    ap.add_argument("--eval", type=int, default=16, help="evaluation pages")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--search-pages", type=int, default=4, help="calibration pages the detptq search computes its task loss on")
    ap.add_argument("--memory-mb", type=float, default=384.0,
                    help="detptq memory_mb: what the search may hold (384 keeps 4 pages at 640x640 in runs of 2; the method's default keeps 2)")
    ap.add_argument("--target", default="trt", choices=["trt", "ort", "ort-s8"])
    ap.add_argument("--granularity", default="tensor", choices=["tensor", "layer"])
    ap.add_argument("--settings", default="int8,w4a4", help="comma-separated: int8, w4a4, w4a8")
    ap.add_argument("--latin-only", action="store_true", help="no Chinese text on the pages")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--model", help="the det model (default: the one bundled with rapidocr-onnxruntime)")
    ap.add_argument("--save-pages", metavar="NPZ", help="write the rendered pages and ground truth here and exit")
    ap.add_argument("--pages", metavar="NPZ", help="use pages written by --save-pages instead of rendering (machines without fonts)")
    args = ap.parse_args(argv)

    from onnxq.backends.ort_quantizer import quantize_with_ort
    from onnxq.calib.readers import Batch
    from onnxq.pipeline import optimize

    cjk = False if args.latin_only else None
    model_path = Path(args.model) if args.model else od.model_path("det")
    name = od.input_name(model_path)
    t0 = time.time()
    if args.pages:
        with np.load(args.pages) as z:
            cal_pages, ev_pages = list(z["calib"]), list(z["eval"])
            gt_boxes = [z["gt_boxes"][z["gt_page"] == i] for i in range(len(ev_pages))]
    else:
        cal_pages, _ = od.render_pages(args.calib, seed=100, size=args.size, cjk=cjk)
        ev_pages, gt_boxes = od.render_pages(args.eval, seed=200, size=args.size, cjk=cjk)
    if args.save_pages:
        np.savez(args.save_pages, calib=np.stack(cal_pages), eval=np.stack(ev_pages), gt_boxes=np.concatenate(gt_boxes),
                 gt_page=np.concatenate([np.full(len(b), i) for i, b in enumerate(gt_boxes)]))
        return
    cal = od.preprocess_det(cal_pages, name)[name]
    ev = od.preprocess_det(ev_pages, name)[name]
    fp_map = run_model(str(model_path), ev, name)
    fp_boxes = od.decode_det(fp_map)
    print(f"{args.calib} calibration / {args.eval} eval pages {args.size}x{args.size} ({time.time() - t0:.1f} s); "
          f"FP32: {sum(len(b) for b in fp_boxes)} boxes, box F1 vs ground truth {od.box_f1(fp_boxes, gt_boxes):.4f}", flush=True)

    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="detptq-ppocr-"))
    data = tmp / "calib"
    data.mkdir()
    for i in range(0, len(cal), 4):
        np.savez(data / f"part_{i // 4:03d}.npz", **{name: cal[i : i + 4]})
    cache = tmp / "stats"

    def record(setting: str, method: str, model, seconds: float, search=None, extra=None) -> None:
        r = {"setting": setting, "method": method, **evaluate(model, ev, name, fp_map, fp_boxes, gt_boxes), "seconds": round(seconds, 1)}
        if search is not None:
            r["search_seconds"] = search
        if extra:
            r.update(extra)
        rows.append(r)
        print(f"  {setting:5s} {method:24s} F1 vs FP32 {r['f1_vs_fp32']:.4f}  F1 vs GT {r['f1_vs_gt']:.4f}  map error {r['map_error']:.5f}  "
              f"{seconds:7.1f} s" + (f" (search {search:.1f} s)" if search is not None else ""), flush=True)

    def onnxq(setting: str, label: str, method: str, options: dict) -> None:
        t = time.time()
        res = optimize(str(model_path), method=method, options=options, data=str(data), target=args.target, batch_size=4,
                       cache_dir=cache, show_progress=False)
        rep = res.report.methods.get("detptq", {})
        extra = {"chosen_p_counts": rep.get("chosen_p_counts"), "task_loss": rep.get("task_loss_final", {}).get("loss")} if rep else None
        if rep and len(rep.get("p_values", [])) > 1:
            extra["layers"] = rep["layers"]
        record(setting, label, res.model, time.time() - t, rep.get("search_seconds") if rep and len(rep.get("p_values", [])) > 1 else None, extra)

    base = {"task": "segmentation-map", "outputs": OUTPUT, "samples": args.search_pages, "granularity": args.granularity, "memory_mb": args.memory_mb}
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if "int8" in settings:
        t = time.time()

        def batches():
            for i in range(0, len(cal), 4):
                yield Batch({name: cal[i : i + 4]})

        out = quantize_with_ort(model_path, tmp / "ort_int8.onnx", batches)
        record("INT8", "ORT quantize_static", str(out), time.time() - t)
        onnxq("INT8", "onnxq trt-entropy", "trt-entropy", {})
        onnxq("INT8", "onnxq fixed L2", "detptq", {**base, "p_values": "2"})
        onnxq("INT8", "onnxq detptq", "detptq", base)
    for setting in ("w4a4", "w4a8"):
        if setting not in settings:
            continue
        low = {**base, "weight_bits": 4, "act_bits": 4 if setting == "w4a4" else 8}
        onnxq(setting.upper(), "onnxq trt-entropy (4-bit)" if setting == "w4a4" else "onnxq trt-entropy", "detptq", {**low, "p_values": "kl"})
        onnxq(setting.upper(), "onnxq fixed L2", "detptq", {**low, "p_values": "2"})
        onnxq(setting.upper(), "onnxq detptq", "detptq", low)

    print()
    print("| setting | method | box F1 vs FP32 | box F1 vs GT | prob-map error | time (s) | search (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| FP32 | onnxruntime | 1.0000 | {od.box_f1(fp_boxes, gt_boxes):.4f} | 0 | | |")
    for r in rows:
        print(f"| {r['setting']} | {r['method']} | {r['f1_vs_fp32']:.4f} | {r['f1_vs_gt']:.4f} | {r['map_error']:.5f} | {r['seconds']:.1f} | "
              f"{r.get('search_seconds', '') if r.get('search_seconds') is None else round(r['search_seconds'], 1)} |")
    for r in rows:
        if r.get("chosen_p_counts") and r.get("search_seconds") is not None:
            print(f"{r['setting']} detptq chosen p counts: {r['chosen_p_counts']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
