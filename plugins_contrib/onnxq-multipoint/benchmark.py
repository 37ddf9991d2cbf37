"""Multipoint at W4 per channel (A8) on the CNN fixtures: plain W4, one grid-searched point, +10 % and +25 % bytes.

    python plugins_contrib/onnxq-multipoint/benchmark.py [--fixtures digits,mnist_norm_resnet,...]

ort target, activations by ``mse`` at 8 bits, weights per output channel. Rows: W8; W4 max-abs
rounding (``-o budget 0 -o first max``: ordinary per-channel W4); W4 with the grid-searched step
(``-o budget 0``); multipoint with +10 % and +25 % weight bytes. Top-1 on the held-out labels,
output cosine (mean) and SQNR against FP32, and the weights' bytes at 4 bits (the integers are
stored in int8 containers in the file; the byte figures count 4 bits per integer plus the steps).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import onnxq
from onnxq.runtime.ort import make_session
from onnxq.testing.fixtures import CNN_FIXTURES, classifier_fixture, output_scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixtures", default=",".join(CNN_FIXTURES))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--minilm", metavar="MODEL", help="instead: --bits 4 weight-only rows on all-MiniLM-L6-v2 (benchmarks/minilm/export_minilm.py makes it)")
    args = ap.parse_args(argv)
    if args.minilm:
        return minilm(args.minilm)
    b = args.bits
    rows = [("W8", {"weight_bits": 8, "budget": 0.0, "first": "max"}),
            (f"W{b} max-abs (plain)", {"weight_bits": b, "budget": 0.0, "first": "max"}),
            (f"W{b} grid step", {"weight_bits": b, "budget": 0.0}),
            (f"W{b} multipoint +10%", {"weight_bits": b, "budget": 0.10}),
            (f"W{b} multipoint +25%", {"weight_bits": b, "budget": 0.25})]
    print("| fixture | config | top-1 | cosine | SQNR dB | weight KB | extra |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for fx in args.fixtures.split(","):
        fixture = classifier_fixture(fx)
        model, calib, feeds, labels = fixture.model, fixture.calib, fixture.feeds, fixture.labels
        ref = make_session(str(model), "all", threads=1).run(None, feeds)[0]
        print(f"| {fx} | FP32 | {np.mean(ref.argmax(-1) == labels):.2%} | 1 | inf | | |")
        for name, opts in rows:
            res = onnxq.optimize(model, method=["mse", "multipoint"], data=calib, target="ort", options=opts, show_progress=False, check=False)
            rep = res.report.methods["multipoint"]
            top1, cos, sqnr = output_scores(res.model, fixture, ref)
            kb = (rep["weight_bytes"] + rep["extra_bytes"]) / 1024
            print(f"| {fx} | {name} | {top1:.2%} | {cos:.4f} | {sqnr:.1f} | {kb:.1f} | {rep['extra_fraction']:+.1%} |")
        sys.stdout.flush()
    return 0


def minilm(model: str) -> int:
    """``--bits 4`` weight-only MatMuls of MiniLM: round to nearest, gptq, multipoint; block 32 and 16.

    Embedding cosine with FP32 on the evaluation sentences (the fidelity check's mean, worst and
    1st percentile) and the file size, so that rows at equal bytes can be compared."""
    cal, ev = "benchmarks/minilm/text_data.py:calibration", "benchmarks/minilm/text_data.py:evaluation"
    rows = [("minmax (round to nearest)", "minmax", 32, {}),
            ("gptq", "gptq", 32, {}),
            ("multipoint +10%", "multipoint", 32, {"budget": 0.10}),
            ("multipoint +20%", "multipoint", 32, {"budget": 0.20}),
            ("minmax, block 16 (+20% bytes)", "minmax", 16, {}),
            ("gptq, block 16 (+20% bytes)", "gptq", 16, {})]
    print("| config | cosine | worst | 1st pct | file MB | extra weight bytes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, method, block, opts in rows:
        res = onnxq.optimize(model, method=method, bits=4, block_size=block, data=cal, eval_data=ev, options=opts, show_progress=False)
        out = res.report.fidelity.outputs[0]
        extra = res.report.methods.get("multipoint", {}).get("extra_fraction")
        size = len(res.model.SerializeToString()) / 2**20
        print(f"| {name} | {out.cosine:.4f} | {out.cosine_worst:.4f} | {out.cosine_p1:.4f} | {size:.2f} | {'' if extra is None else f'{extra:+.1%}'} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
