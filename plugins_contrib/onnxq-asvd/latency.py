"""Latency of all-MiniLM-L6-v2 with ASVD factors: FP32, float factors, INT8 factors, interleaved.

    nice -n 5 python plugins_contrib/onnxq-asvd/latency.py [--ratio 0.8] [--calib 64] [--rounds 15]

One batch of 16 sentences padded to 128 tokens, 1 intra-op thread, ORT_ENABLE_ALL; the models run in
turn, one run each per round, and each model's median over the rounds is printed (interleaving
spreads the load of a shared machine over every model alike), with the file sizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "benchmarks" / "minilm")]

import text_data  # noqa: E402
from embeddings import DEFAULT_MODEL  # noqa: E402

import onnxq  # noqa: E402
from onnxq.runtime.ort import make_session  # noqa: E402
from onnxq_asvd import AsvdOptions, compress  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    model = onnx.load(str(args.model))
    calib = text_data.calibration(args.calib)
    models = {"fp32": model, f"asvd {args.ratio} float": compress(model, calib, AsvdOptions(ratio=args.ratio))[0],
              "int8 (minmax)": onnxq.optimize(model, method="minmax", data=calib, show_progress=False).model,
              f"asvd {args.ratio} + int8 (minmax)": onnxq.optimize(model, method=["asvd", "minmax"], options={"ratio": args.ratio},
                                                                  data=calib, show_progress=False).model}
    feed = text_data.fixed_batch(text_data.sentences(16), 128)
    sessions = {}
    for name, m in models.items():
        s = make_session(m, "all", threads=1)
        names = {i.name for i in s.get_inputs()}
        sessions[name] = (s, {k: v for k, v in feed.items() if k in names})
        s.run(None, sessions[name][1])
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, (s, f) in sessions.items():
            t = time.perf_counter()
            s.run(None, f)
            times[name].append((time.perf_counter() - t) * 1e3)
    for name, m in models.items():
        print(json.dumps({"model": name, "median_ms": statistics.median(times[name]), "size_mb": m.ByteSize() / 1e6}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
