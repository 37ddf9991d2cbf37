#!/usr/bin/env python
"""One onnxq configuration on a PP-OCR model: character agreement (rec) or box F1 (det) with FP32.

For quick ablations between full suite runs. Needs the model and data that
``python benchmarks/bench.py --models ppocr-rec`` (or ``ppocr-det``) writes under ``.bench/``.

    python benchmarks/ocr_config.py easyquant -o metric mse -o act_init mse
    python benchmarks/ocr_config.py equalize mse --bits 8
    python benchmarks/ocr_config.py easyquant -o samples 32 -o coarse_points 5 -o refine_steps 5
    python benchmarks/ocr_config.py mse --exclude 'p2o.Conv.1'

Prints the metric, the quantization wall time and this process's peak RSS.
"""

from __future__ import annotations

import argparse
import glob
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ocr_data  # noqa: E402

import onnxq  # noqa: E402
from onnxq.runtime.ort import make_session  # noqa: E402


def outputs(model, folder: Path) -> list[np.ndarray]:
    sess = make_session(model, "all")
    name = sess.get_inputs()[0].name
    return [sess.run(None, {name: np.load(f)[name]})[0] for f in sorted(glob.glob(str(folder / "*.npz")))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("methods", nargs="+", help="onnxq methods, composed in order")
    ap.add_argument("-o", dest="opts", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="method option (METHOD.KEY targets one)")
    ap.add_argument("--model", default="ppocr-rec", choices=("ppocr-rec", "ppocr-det"))
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--target", default="ort")
    ap.add_argument("--exclude", action="append", default=[])
    ap.add_argument("--no-fold", action="store_true", help="keep BatchNorm/affine ops unfolded (onnxq's --no-fold)")
    ap.add_argument("--workdir", type=Path, default=HERE.parent / ".bench")
    a = ap.parse_args(argv)
    fp32 = a.workdir / "models" / a.model / "fp32.onnx"
    data = a.workdir / "data" / a.model
    if not fp32.exists():
        print(f"{fp32} is missing: run python benchmarks/bench.py --models {a.model} first", file=sys.stderr)
        return 2
    t = time.perf_counter()
    res = onnxq.optimize(fp32, method=a.methods, options=dict(a.opts), data=str(data / "calib"), bits=a.bits, target=a.target, fold=not a.no_fold,
                         exclude=a.exclude, show_progress=False)
    wall = time.perf_counter() - t
    ref, got = outputs(str(fp32), data / "eval"), outputs(res.model, data / "eval")
    if a.model == "ppocr-rec":
        dec = lambda ys: [s for y in ys for s in ocr_data.decode_rec(y)]  # noqa: E731
        metric = f"char agreement {ocr_data.char_agreement(dec(got), dec(ref)):.4f}"
    else:
        boxes = lambda ys: [b for y in ys for b in ocr_data.decode_det(y)]  # noqa: E731
        metric = f"box F1 vs FP32 {ocr_data.box_f1(boxes(got), boxes(ref), 0.5):.4f}"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"{a.model} {'+'.join(a.methods)} {dict(a.opts)} bits={a.bits} target={a.target} exclude={a.exclude}{' no-fold' if a.no_fold else ''}: "
          f"{metric}, quantize {wall:.1f} s, peak RSS {rss} MB (incl. evaluation)")
    for name, section in res.report.methods.items():  # a search's own verdict (easyquant: start kept or search)
        if isinstance(section, dict) and section.get("outcome"):
            print(f"  {name} outcome: {section['outcome']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
