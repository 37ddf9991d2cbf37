"""RPTQ vs smoothquant + minmax on all-MiniLM-L6-v2 at 4-, 6- and 8-bit per-tensor activations, INT8 weights.

    python benchmarks/minilm/export_minilm.py            # once: .bench/minilm/model.onnx
    nice -n 5 python plugins_contrib/onnxq-rptq/benchmark.py [--bits 4 6 8] [--clusters 4 8] [--calib 128]
        [--sentences 256] [--pairs 430] [--latency] [--json out.json]

Every row is ``onnxq.optimize(..., target="ort")``: per-channel INT8 weights, uint8 asymmetric
activations with min-max ranges, narrowed to ``--bits`` activation bits below 8 (a Clip before each
QuantizeLinear keeps the grid at 16 or 64 levels in 8-bit storage: emulated A4/A6). Rows per width:
``minmax`` (per-tensor), ``smoothquant + minmax`` (per-tensor, the baseline of issue 21), ``rptq k``
(``-p rptq -p minmax -o clusters k``: one scale per cluster of every MatMul input) and
``smoothquant + rptq k``. The narrowing of the baselines is rptq's ``act_bits`` with ``clusters 1``
(no split, no reordering: only the grid is narrowed), so every row narrows in the same code.

Scoring is the MiniLM scoring of ``plugins_contrib/onnxq-asvd/benchmark.py``, through the public
helpers of ``benchmarks/minilm``: calibration ``text_data.calibration`` (``--calib`` sentences, disjoint
from the evaluated ones), embedding cosine vs FP32 (mean and min) on the ``--sentences`` of
``text_data.evaluation`` (``embeddings.embed``/``cosines``) and recall@1 of each query's own passage on
the first ``--pairs`` pairs of ``retrieval.pairs`` (``retrieval.recall_at_1``), with ``top1_agreement``: the
share of queries whose top-1 passage is the FP32 model's (a fidelity measure: recall@1 can rise or fall
by a few pairs by chance). ``integer_matmuls``: MatMuls ONNX Runtime runs on integer kernels after its
optimizations, of ``matmuls`` in the graph. ``--latency`` adds the median latency of one batch of 16
sentences of 128 tokens at 1 intra-op thread (noisy on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "benchmarks" / "minilm")]

import retrieval  # noqa: E402
import text_data  # noqa: E402
from embeddings import DEFAULT_MODEL, cosines, embed  # noqa: E402

import onnxq  # noqa: E402
from onnxq.runtime.ort import latency_ms as ort_latency_ms, optimized_op_counts  # noqa: E402

INTEGER_MATMULS = ("MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")


def latency_ms(model: onnx.ModelProto, feed, runs: int = 10) -> float:
    """Median ms of one run (one thread, full optimizations) on the model's own inputs of ``feed``."""
    names = {i.name for i in model.graph.input}
    return ort_latency_ms(model, {k: v for k, v in feed.items() if k in names}, threads=1, repeats=runs, warmup=1)


def configs(bits: int, clusters: list[int]) -> list[tuple[str, list[str], dict]]:
    narrow = {"act_bits": bits, "clusters": 1}
    rows = [("minmax", ["rptq", "minmax"], narrow), ("smoothquant + minmax", ["smoothquant", "rptq", "minmax"], narrow)]
    for k in clusters:
        rows.append((f"rptq {k}", ["rptq", "minmax"], {"act_bits": bits, "clusters": k}))
        rows.append((f"smoothquant + rptq {k}", ["smoothquant", "rptq", "minmax"], {"act_bits": bits, "clusters": k}))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 6, 8])
    ap.add_argument("--clusters", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences")
    ap.add_argument("--sentences", type=int, default=256, help="evaluated sentences")
    ap.add_argument("--pairs", type=int, default=430, help="retrieval pairs (430: all)")
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="row names to run (default: all)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model = onnx.load(str(args.model))
    calib, evaluation = text_data.calibration(args.calib), text_data.evaluation(args.sentences)
    ps = retrieval.pairs()[: args.pairs]
    rfeeds = text_data.batches([q for q, _ in ps] + [p for _, p in ps], 32)
    lat_feed = text_data.fixed_batch(text_data.sentences(16), 128) if args.latency else None
    ref = embed(model, evaluation, 1)
    e = embed(model, rfeeds, 1)
    ref_top = retrieval.recall_at_1(e[: len(ps)], e[len(ps):])[1]
    rows = []

    def row(name: str, bits: int | None, m: onnx.ModelProto, **extra) -> None:
        cos = cosines(embed(m, evaluation, 1), ref)
        e = embed(m, rfeeds, 1)
        recall, top = retrieval.recall_at_1(e[: len(ps)], e[len(ps):])
        r = {"row": name, "act_bits": bits, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
             "recall_at_1": recall, "top1_agreement": float((top == ref_top).mean()), **extra}
        if bits is not None:  # the split MatMuls on ONNX Runtime's integer kernels (after its optimizations)
            r["integer_matmuls"] = sum(optimized_op_counts(m, "all")[op] for op in INTEGER_MATMULS)
            r["matmuls"] = sum(n.op_type == "MatMul" for n in m.graph.node)
        if args.latency:
            r["latency_ms"] = latency_ms(m, lat_feed)
        rows.append(r)
        print(json.dumps(r), flush=True)

    row("fp32", None, model)
    for bits in args.bits:
        for name, methods, options in configs(bits, args.clusters):
            if args.only is not None and name not in args.only:
                continue
            t = time.perf_counter()
            res = onnxq.optimize(model, method=methods, options=options, data=calib, target="ort", show_progress=False)
            row(name, bits, res.model, seconds=round(time.perf_counter() - t, 1))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
