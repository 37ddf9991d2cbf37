"""PB-LLM on all-MiniLM-L6-v2's weight MatMuls vs all-binary and 2-bit round-to-nearest (weights only).

    python benchmarks/minilm/export_minilm.py            # once: .bench/minilm/model.onnx
    nice -n 5 python plugins_contrib/onnxq-pbllm/benchmark.py [--calib 128] [--sentences 256] [--pairs 430] [--pipeline] [--json out.json]

Every row quantizes the 36 weight MatMuls of the encoder and keeps activations (and the
embedding tables) in float, so the rows differ only in how the MatMul weights are stored.
Calibration: ``benchmarks/minilm/text_data.py:calibration`` (``--calib`` sentences, disjoint from the
evaluated ones); evaluation: the first ``--sentences`` sentences of ``text_data.evaluation`` (embedding cosine vs
FP32, mean and min) and the first ``--pairs`` retrieval pairs of ``benchmarks/minilm/retrieval.py`` (recall@1).
Rows: PB-LLM (``onnxq_pbllm.partial_binarize`` on every weight, from one ``XᵀX`` pass over the
calibration data, the dequantized weights written into the float model: the same numbers as
the two-DQ ONNX form, which the tests check) at 10% salient (Hessian salience, GPTQ
compensation), at 1/7 salient (2.0 payload bits per weight, equal to 2-bit), all-binary (salient 0)
and the ablations (magnitude salience, no compensation); 2-bit and 3-bit round-to-nearest per output
channel (asymmetric min-max), written into the float weights; with ``--pipeline`` the default row
again through ``onnxq.optimize(method="pbllm")``.
``bits`` = payload bits per weight (8 per salient weight, 1 per binarized one; a mask costs one
more bit per weight as a bitmap, or about 0.1 x 16 = 1.6 as 16-bit indices at 10%).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "benchmarks" / "minilm")]

import retrieval  # noqa: E402
import text_data  # noqa: E402
from embeddings import DEFAULT_MODEL, cosines, embed  # noqa: E402

import onnxq  # noqa: E402
from onnxq.graph.edit import with_initializers  # noqa: E402
from onnxq.calib.readers import Batch  # noqa: E402
from onnxq.calib.statistics import StatRequest, collect  # noqa: E402
from onnxq_pbllm import InputGram, partial_binarize, rtn  # noqa: E402


def weight_matmuls(model: onnx.ModelProto) -> dict[str, tuple[str, np.ndarray]]:
    """weight name -> (input tensor, weight) of every MatMul with a 2-D constant weight."""
    inits = {t.name: t for t in model.graph.initializer}
    return {n.input[1]: (n.input[0], numpy_helper.to_array(inits[n.input[1]])) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences")
    ap.add_argument("--sentences", type=int, default=256, help="evaluated sentences")
    ap.add_argument("--pairs", type=int, default=430, help="retrieval pairs (430: all)")
    ap.add_argument("--pipeline", action="store_true", help="add the default row run through onnxq optimize -p pbllm")
    args = ap.parse_args()
    model = onnx.load(str(args.model))
    calib, evaluation = text_data.calibration(args.calib), text_data.evaluation(args.sentences)
    ps = retrieval.pairs()[: args.pairs]
    rfeeds = text_data.batches([q for q, _ in ps] + [p for _, p in ps], 32)
    ref = embed(model, evaluation, 1)
    rows = []

    def row(name: str, m: onnx.ModelProto, bits: float, **extra) -> None:
        cos = cosines(embed(m, evaluation, 1), ref)
        e = embed(m, rfeeds, 1)
        r = {"row": name, "bits": bits, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
             "recall_at_1": retrieval.recall_at_1(e[: len(ps)], e[len(ps):])[0], **extra}
        rows.append(r)
        print(json.dumps(r), flush=True)

    row("fp32", model, 32.0)
    weights = weight_matmuls(model)
    row("round-to-nearest 2-bit (per channel)", with_initializers(model, {k: rtn(w, 2) for k, (_, w) in weights.items()}), 2.0)
    reqs = {x: StatRequest(x, InputGram()) for x, _ in weights.values()}
    stats = collect(model, list(reqs.values()), lambda: iter(Batch(f) for f in calib), show_progress=False)
    for name, (frac, salience, comp) in (("pbllm 10% (hessian, gptq)", (0.1, "hessian", True)),
                                         ("all-binary (gptq)", (0.0, "hessian", True)),
                                         ("pbllm 1/7 = 14.3% (hessian, gptq)", (1 / 7, "hessian", True)),
                                         ("pbllm 10% (magnitude, gptq)", (0.1, "magnitude", True)),
                                         ("pbllm 10% (hessian, no compensation)", (0.1, "hessian", False)),
                                         ("all-binary (no compensation)", (0.0, "hessian", False))):
        t = time.perf_counter()
        pbs = {k: partial_binarize(w, stats[reqs[x]], frac, salience, comp) for k, (x, w) in weights.items()}
        salient = sum(int(p.mask.sum()) for p in pbs.values()) / sum(p.mask.size for p in pbs.values())
        row(name, with_initializers(model, {k: p.dequantized() for k, p in pbs.items()}), 8 * salient + (1 - salient),
            salient_fraction=salient, seconds=time.perf_counter() - t)
    row("round-to-nearest 3-bit (per channel)", with_initializers(model, {k: rtn(w, 3) for k, (_, w) in weights.items()}), 3.0)
    if args.pipeline:  # the same default row through onnxq optimize -p pbllm (the ONNX form with two DQs)
        res = onnxq.optimize(model, method="pbllm", data=calib, target="ort", show_progress=False)
        row("onnxq optimize -p pbllm (10%, hessian, gptq)", res.model, res.report.methods["pbllm"]["bits_per_weight"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
