"""The fidelity check's figures on recommended and on deliberately broken configurations.

Prints, per run, the check's per-output figures (in-sample on the calibration data, and on the
evaluation data) and whether it warned; the thresholds in onnxq/evaluate/fidelity.py were chosen
from this table (docs/methods.md, "Fidelity check"). Usage (CPU, a few minutes):

    python benchmarks/fidelity_thresholds.py [--minilm] [--only LABEL]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import onnxq

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures"

#: (label, model, calibration data, evaluation data, methods, options, target, bits, recommended)
RUNS = [
    ("digits", "examples/digits/model.onnx", "examples/digits/calib", "examples/digits/eval", ["easyquant"], {}, "ort", 8, True),
    ("digits", "examples/digits/model.onnx", "examples/digits/calib", "examples/digits/eval", ["minmax"], {}, "ort", 8, True),
    ("digits", "examples/digits/model.onnx", "examples/digits/calib", "examples/digits/eval", ["minmax"], {}, "trt", 8, True),
    ("mobilenet_digits", FIX / "mobilenet_digits/model.onnx", FIX / "mobilenet_digits/calib.npz", FIX / "mobilenet_digits/eval.npz", ["minmax"], {}, "ort", 8, True),
    ("mobilenet_digits", FIX / "mobilenet_digits/model.onnx", FIX / "mobilenet_digits/calib.npz", FIX / "mobilenet_digits/eval.npz", ["trt-entropy"], {}, "trt", 8, True),
    ("repvgg_digits", FIX / "repvgg_digits/model.onnx", FIX / "repvgg_digits/calib.npz", FIX / "repvgg_digits/eval.npz", ["minmax"], {}, "ort", 8, True),
    ("repvgg_digits", FIX / "repvgg_digits/model.onnx", FIX / "repvgg_digits/calib.npz", FIX / "repvgg_digits/eval.npz", ["cfws"], {}, "trt", 8, True),
    ("shapes_detector", FIX / "shapes_detector/model.onnx", FIX / "shapes_detector/calib.npz", None, ["minmax"], {}, "ort", 8, True),
    ("shapes_detector", FIX / "shapes_detector/model.onnx", FIX / "shapes_detector/calib.npz", None, ["trt-entropy"], {}, "trt", 8, True),
    ("normalized resnet", "tests/calib/normalized/resnet.onnx", "tests/calib/normalized/calib.npz", "tests/calib/normalized/eval.npz", ["minmax"], {}, "trt", 8, True),
    ("normalized resnet", "tests/calib/normalized/resnet.onnx", "tests/calib/normalized/calib.npz", "tests/calib/normalized/eval.npz", ["mse"], {}, "ort", 8, True),
    # TensorRT's exact entropy calibrator collapses on mean/std-normalized inputs (issue 15: 37% top-1 of 99.5%)
    ("normalized resnet", "tests/calib/normalized/resnet.onnx", "tests/calib/normalized/calib.npz", "tests/calib/normalized/eval.npz", ["trt-entropy-exact"], {}, "trt", 8, False),
    ("normalized repvgg", "tests/calib/normalized/repvgg.onnx", "tests/calib/normalized/calib.npz", "tests/calib/normalized/eval.npz", ["trt-entropy-exact"], {}, "trt", 8, False),
    # known weak: INT7 minmax on trt (README of the fixture: -16 points)
    ("mobilenet_digits", FIX / "mobilenet_digits/model.onnx", FIX / "mobilenet_digits/calib.npz", FIX / "mobilenet_digits/eval.npz", ["minmax"], {}, "trt", 7, False),
    # broken on purpose: clip everything at the 1st percentile
    ("digits", "examples/digits/model.onnx", "examples/digits/calib", "examples/digits/eval", ["percentile"], {"percentile": 51}, "ort", 8, False),
    ("mobilenet_digits", FIX / "mobilenet_digits/model.onnx", FIX / "mobilenet_digits/calib.npz", FIX / "mobilenet_digits/eval.npz", ["percentile"], {"percentile": 51}, "trt", 8, False),
    ("shapes_detector", FIX / "shapes_detector/model.onnx", FIX / "shapes_detector/calib.npz", None, ["percentile"], {"percentile": 51}, "ort", 8, False),
    # an embedding output ([N, 32] pooled attention encoding): judged by its neighbour agreement too
    *(("attention embedding", FIX / "attention_embedding/model.onnx", FIX / "zoo/attention_padded/calib.npz", FIX / "zoo/attention_padded/eval.npz",
       m, {}, t, 8, True) for m, t in ((["minmax"], "ort"), (["minmax"], "trt"), (["mse"], "trt"), (["trt-entropy"], "trt"),
                                       (["smoothquant", "minmax"], "ort"))),
    # clipped at the 99th / 90th percentile: the mean cosine stays >= 0.98, the nearest samples change
    *(("attention embedding", FIX / "attention_embedding/model.onnx", FIX / "zoo/attention_padded/calib.npz", FIX / "zoo/attention_padded/eval.npz",
       ["percentile"], {"percentile": q}, "ort", 8, False) for q in (99, 90)),
]
#: MiniLM (--minilm): the recommended recipe, and calibrators alone whose sentence embeddings lose retrieval agreement
MINILM_RUNS = [(["smoothquant", "minmax"], "ort", True), (["smoothquant", "minmax"], "trt", True), (["minmax"], "ort", False),
               (["trt-entropy"], "trt", False)]


def row(label, model, calib, ev, methods, options, target, bits, recommended) -> list[str]:
    out = []
    for where, eval_data in (("in-sample", None),) + ((("eval", str(REPO / ev)),) if ev else ()):
        r = onnxq.optimize(str(REPO / model), method=methods, options=options, data=str(REPO / calib), target=target, bits=bits,
                           cache_dir=None, show_progress=False, eval_data=eval_data)
        f = r.report.fidelity
        figs = "; ".join(f"{o.name}: cos {o.cosine:.4f} worst {o.cosine_worst:.4f} p1 {o.cosine_p1:.4f} sqnr {o.sqnr_db:.1f}"
                         + (f" top1 {o.top1_agreement:.3f}" if o.top1_agreement is not None else "")
                         + (f" neighbours {o.neighbour_agreement:.4f}" if o.neighbour_agreement is not None else "") for o in f.outputs)
        out.append(f"| {label} | {'+'.join(methods)}{' ' + str(options) if options else ''} | {target} int{bits} | {'yes' if recommended else 'no'} | "
                   f"{where} ({f.samples}) | {figs} | {'WARN' if f.warned else ('error: ' + f.error if f.error else 'ok')} | {f.seconds:.2f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minilm", action="store_true", help="also MiniLM (needs .bench/minilm/model.onnx; ~6 minutes)")
    ap.add_argument("--only", help="only the runs whose model label contains this")
    args = ap.parse_args(argv)
    logging.getLogger("onnxq").setLevel(logging.ERROR)
    runs = [r for r in RUNS if args.only is None or args.only in r[0]]
    if args.minilm:
        data = "benchmarks/minilm/text_data.py:calibration"
        runs += [("MiniLM", ".bench/minilm/model.onnx", data, "benchmarks/minilm/text_data.py:evaluation", m, {}, t, 8, rec) for m, t, rec in MINILM_RUNS]
    print("| model | method | target | recommended | data (samples) | per output | check | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        for line in row(*r):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
