"""SPARQ's accuracy on the CNN fixtures: 8-bit, plain 4-bit activations, bSPARQ and vSPARQ windows.

    python plugins_contrib/onnxq-sparq/benchmark.py [--calibrator mse] [--fixtures digits,mnist_norm_resnet,...]

Rows per fixture (ort target, weights int8 per channel, the calibrator's 8-bit activation ranges):
FP32; INT8; A4 uniform over the 8-bit range (``-o placements 1``); A4 uniform with its own
MSE-optimal clip (onnxq-lapq's L2 init, ``-p lapq -o act_bits 4 -o maxiter 0``, when installed);
bSPARQ 4-bit windows with 5, 3 and 2 placements; vSPARQ 4-bit/5. Top-1 on the fixture's held-out
labels, output cosine to FP32 (mean), SQNR in dB. Needs the repository checkout (tests/fixtures).
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
    ap.add_argument("--calibrator", default="mse")
    ap.add_argument("--fixtures", default=",".join(CNN_FIXTURES))
    ap.add_argument("--bits", default="4", help="window bits to compare, e.g. 4,3 (3-bit windows: 6 placements)")
    args = ap.parse_args(argv)
    try:
        import onnxq_lapq  # noqa: F401

        have_lapq = True
    except ImportError:
        have_lapq = False
    rows = [("INT8", [args.calibrator], {})]
    for b in (int(x) for x in args.bits.split(",")):
        full = 8 - b + 1  # every placement
        rows.append((f"A{b} uniform, 8-bit range", [args.calibrator, "sparq"], {"bits": b, "placements": 1}))
        if have_lapq:
            rows.append((f"A{b} uniform, MSE clip (lapq L2 init)", ["lapq"], {"act_bits": b, "maxiter": 0, "p_points": 1, "p_min": 2.0, "p_max": 2.0}))
        rows += [(f"bSPARQ {b}-bit/{k}", [args.calibrator, "sparq"], {"bits": b, "placements": k}) for k in ((5, 3, 2) if b == 4 else (full,))]
        rows.append((f"vSPARQ {b}-bit/{full}", [args.calibrator, "sparq"], {"bits": b, "placements": full, "variant": "vsparq"}))
    print(f"| fixture | config | top-1 | cosine | SQNR dB | trimmed activations |")
    print("| --- | --- | --- | --- | --- | --- |")
    for fx in args.fixtures.split(","):
        fixture = classifier_fixture(fx)
        model, calib, feeds, labels = fixture.model, fixture.calib, fixture.feeds, fixture.labels
        ref = make_session(str(model), "all", threads=1).run(None, feeds)[0]
        acc = float(np.mean(ref.argmax(-1) == labels))
        print(f"| {fx} | FP32 | {acc:.2%} | 1 | inf | |")
        for name, methods, opts in rows:
            try:
                res = onnxq.optimize(model, method=methods, data=calib, target="ort", options=opts, show_progress=False, check=False)
            except onnxq.OnnxqError as exc:
                print(f"| {fx} | {name} | - | - | - | {exc} |")
                continue
            top1, cos, sqnr = output_scores(res.model, fixture, ref)
            sp = res.report.methods.get("sparq", {})
            trimmed = f"{sp['trimmed_activations']} (8-bit: {len(sp['left_8bit'])})" if sp else ""
            print(f"| {fx} | {name} | {top1:.2%} | {cos:.4f} | {sqnr:.1f} | {trimmed} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
