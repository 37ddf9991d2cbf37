"""ASVD vs plain SVD on all-MiniLM-L6-v2's weight MatMuls, alone and with INT8 factors.

    python benchmarks/minilm/export_minilm.py            # once: .bench/minilm/model.onnx
    nice -n 5 python plugins_contrib/onnxq-asvd/benchmark.py [--ratios 0.8 0.6] [--calib 128] [--sentences 256]
        [--pairs 430] [--no-int8-baseline] [--json out.json]

Calibration: ``benchmarks/minilm/text_data.py:calibration`` (``--calib`` sentences, disjoint from the
evaluated ones; one statistics pass shared by the float rows); evaluation: the ``--sentences`` of ``text_data.evaluation`` (embedding cosine vs
FP32, mean and min) and the first ``--pairs`` retrieval pairs of ``benchmarks/minilm/retrieval.py`` (recall@1 of
each query's own passage). Rows per ratio of the MatMul parameters kept: plain SVD (α = 0) and
ASVD (α = 0.5) as float models (``onnxq_asvd.compress``), and ``onnxq optimize -p asvd -p minmax``
(INT8 factors, ``--target ort``). Columns: file size (MB = 10^6 bytes), median latency of one batch
of 16 sentences of 128 tokens at 1 intra-op thread (ORT_ENABLE_ALL; noisy on a shared machine) and the number
of MatMuls ONNX Runtime runs on integer kernels (MatMulInteger / QLinearMatMul /
MatMulIntegerToFloat after its optimizations).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "benchmarks" / "minilm")]

import retrieval  # noqa: E402
import text_data  # noqa: E402
from embeddings import DEFAULT_MODEL, cosines, embed  # noqa: E402

import onnxq  # noqa: E402
from onnxq.runtime.ort import latency_ms as ort_latency_ms, optimized_op_counts  # noqa: E402
from onnxq_asvd import AsvdOptions, compress, input_moments  # noqa: E402

INTEGER_MATMULS = ("MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")


def retrieval_feeds(n: int) -> tuple[list[dict[str, np.ndarray]], int]:
    ps = retrieval.pairs()[:n]
    texts = [q for q, _ in ps] + [p for _, p in ps]
    return text_data.batches(texts, 32), len(ps)


def recall(model, feeds, n: int) -> float:
    e = embed(model, feeds, 1)
    return retrieval.recall_at_1(e[:n], e[n:])[0]


def latency_ms(model, feed, runs: int = 10) -> float:
    """Median ms of one run (one thread, full optimizations) on the model's own inputs of ``feed``."""
    names = {i.name for i in model.graph.input}
    return ort_latency_ms(model, {k: v for k, v in feed.items() if k in names}, threads=1, repeats=runs, warmup=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences")
    ap.add_argument("--sentences", type=int, default=256, help="evaluated sentences")
    ap.add_argument("--pairs", type=int, default=430, help="retrieval pairs (430: all)")
    ap.add_argument("--no-int8-baseline", action="store_true")
    args = ap.parse_args()
    model = onnx.load(str(args.model))
    calib, evaluation = text_data.calibration(args.calib), text_data.evaluation(args.sentences)
    rfeeds, npairs = retrieval_feeds(args.pairs)
    moments = input_moments(model, calib)
    lat_feed = text_data.fixed_batch(text_data.sentences(16), 128)
    ref = embed(model, evaluation, 1)
    rows = []

    def row(name: str, m: onnx.ModelProto, **extra) -> None:
        cos = cosines(embed(m, evaluation, 1), ref)
        ints = sum(optimized_op_counts(m, "all")[op] for op in INTEGER_MATMULS) if "int8" in name else 0
        r = {"row": name, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "recall_at_1": recall(m, rfeeds, npairs),
             "size_mb": m.ByteSize() / 1e6, "latency_ms": latency_ms(m, lat_feed), "integer_matmuls": ints, **extra}
        rows.append(r)
        print(json.dumps(r), flush=True)

    row("fp32", model)
    for ratio in args.ratios:  # the float rows first, then the INT8 ones
        for alpha, label in ((0.0, "svd"), (0.5, "asvd")):
            t = time.perf_counter()
            m, summary = compress(model, None, AsvdOptions(alpha=alpha, ratio=ratio), moments=moments)
            row(f"{label} ratio {ratio}", m, params_ratio=summary["ratio"], seconds=time.perf_counter() - t,
                dense_layers=sum(v["rank"] is None for v in summary["layers"].values()))
    for ratio in args.ratios:
        t = time.perf_counter()
        res = onnxq.optimize(model, method=["asvd", "minmax"], options={"ratio": ratio}, data=calib, target="ort", show_progress=False)
        row(f"asvd ratio {ratio} + int8 (minmax)", res.model, seconds=time.perf_counter() - t)
    if not args.no_int8_baseline:
        res = onnxq.optimize(model, method="minmax", data=calib, target="ort", show_progress=False)
        row("int8 (minmax), no factorisation", res.model)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
