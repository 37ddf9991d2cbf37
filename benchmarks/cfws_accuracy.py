"""Top-1 of the RepVGG fixture under each calibrator / method, INT8 and INT7, targets trt and ort.

The table behind the CFWS section of docs/methods.md::

    python benchmarks/cfws_accuracy.py            # ~2 minutes on 2 cores (EasyQuant rows dominate)

500 held-out digits (``tests/fixtures/repvgg_digits/eval.npz``), the 128 calibration samples of
``calib.npz``; models run in ONNX Runtime (CPU, full optimizations). The ``trt`` columns are the
fake-quantized Q/DQ graphs TensorRT would build from, run in ONNX Runtime, not TensorRT engines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from onnxq.runtime.ort import make_session
from onnxq.pipeline import optimize

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "repvgg_digits"

ROWS = [
    ("minmax", "minmax", None),
    ("trt-entropy", "trt-entropy", None),
    ("trt-entropy -o kl cfws (improved KL, provisional)", "trt-entropy", {"kl": "cfws"}),
    ("easyquant", "easyquant", None),
    ("cfws (default: kl=trt)", "cfws", None),
    ("cfws -o kl cfws (improved KL on split outputs)", "cfws", {"kl": "cfws"}),
    ("cfws -o calibrator minmax", "cfws", {"calibrator": "minmax"}),
    ("cfws + easyquant", ["cfws", "easyquant"], None),
]


def main() -> None:
    ev = np.load(FIXTURE / "eval.npz")
    x, y = ev["input"], ev["label"]
    cal = np.load(FIXTURE / "calib.npz")["input"]
    data = [{"input": cal[i : i + 32]} for i in range(0, len(cal), 32)]
    model = onnx.load(str(FIXTURE / "model.onnx"))

    def top1(m: onnx.ModelProto) -> float:
        return 100.0 * float((make_session(m, "all").run(None, {"input": x})[0].argmax(1) == y).mean())

    cols = [(t, b) for t in ("trt", "ort") for b in (8, 7)]
    print("| method | " + " | ".join(f"{t} INT{b}" for t, b in cols) + " |")
    print("|---|" + "---|" * len(cols))
    fp = top1(model)
    print("| FP32 | " + " | ".join(f"{fp:.1f}" for _ in cols) + " |")
    for label, method, options in ROWS:
        cells = []
        for target, bits in cols:
            r = optimize(model, method=method, options=options, data=data, target=target, bits=bits, show_progress=False)
            cells.append(f"{top1(r.model):.1f}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
