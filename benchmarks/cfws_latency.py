"""What the CFWS split costs at run time: ONNX Runtime CPU latency of split vs unsplit INT8 vs FP32.

CFWS replaces every re-parameterized 3x3 conv by a 3x3 conv plus a 1x1 conv and an Add (+1/9 of
the MACs, one more kernel launch and, for ONNX Runtime, a QLinearAdd). This script quantizes the
RepVGG fixture (``tests/fixtures/repvgg_digits``) for ``--target ort`` twice — ``cfws`` (split) and
``trt-entropy`` (unsplit; the same activation calibrator cfws uses by default) — and measures the
median latency of one run with ``onnxq.runtime.ort.latency_ms`` (full optimizations) at 1 and 2
intra-op threads, batch 1 and 32::

    python benchmarks/cfws_latency.py [--repeats 200] [--threads 1 2] [--batches 1 32]

Prints one table; the ratios are split / unsplit INT8 and split / FP32. Numbers depend on the
machine and on what else runs on it: compare within one run only.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import onnx

from onnxq.runtime.ort import integer_kernel_report, latency_ms
from onnxq.pipeline import optimize

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "repvgg_digits"


def build_models(target: str = "ort", bits: int = 8) -> dict[str, onnx.ModelProto]:
    x = np.load(FIXTURE / "calib.npz")["input"]
    data = [{"input": x[i : i + 32]} for i in range(0, len(x), 32)]
    fp32 = onnx.load(str(FIXTURE / "model.onnx"))
    common = dict(data=data, target=target, bits=bits, show_progress=False)
    return {
        "FP32": fp32,
        "INT8 unsplit (trt-entropy)": optimize(fp32, method="trt-entropy", **common).model,
        "INT8 split (cfws)": optimize(fp32, method="cfws", **common).model,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200, help="timed runs per cell (median reported)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = ap.parse_args(argv)

    models = build_models()
    for name, m in models.items():
        if name != "FP32":
            r = integer_kernel_report(m)
            print(f"{name}: integer ops {r['integer_ops']}, float compute ops {r['float_compute_ops'] or 'none'}")
    x = np.load(FIXTURE / "eval.npz")["input"]
    names = list(models)
    header = f"| threads | batch | {' | '.join(f'{n} (ms)' for n in names)} | split / unsplit | split / FP32 |"
    print(f"\nONNX Runtime CPU latency, median of {args.repeats} runs ({platform.processor() or platform.machine()})\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for threads in args.threads:
        for batch in args.batches:
            feeds = {"input": np.ascontiguousarray(x[:batch])}
            ms = {n: latency_ms(models[n], feeds, threads=threads, repeats=args.repeats, warmup=max(5, args.repeats // 10)) for n in names}
            split, unsplit, fp32 = ms[names[2]], ms[names[1]], ms[names[0]]
            cells = " | ".join(f"{ms[n]:.3f}" for n in names)
            print(f"| {threads} | {batch} | {cells} | {split / unsplit:.2f} | {split / fp32:.2f} |", flush=True)


if __name__ == "__main__":
    main()
