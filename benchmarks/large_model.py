#!/usr/bin/env python
"""A decoder-only transformer over 2 GB (external data), and the measurements of issue 18 on it.

    python benchmarks/large_model.py build .bench/large            # model.onnx + model.onnx.data (2.2 GB), token data
    python benchmarks/large_model.py bench .bench/large            # onnxq INT8 / INT4 and ORT's quantizers, measured
    python benchmarks/large_model.py bench .bench/large --only onnxq-int8
    python benchmarks/large_model.py bench-executors .bench/large     # --executor local vs ray (needs onnxq[ray])

Nothing is committed or downloaded: the weights are random, drawn from a seed, and written one
tensor at a time straight into the data file (the builder never holds the model in memory).

The model (defaults): 18 pre-LayerNorm blocks of width 1536 (12 heads, causal attention, a GELU
MLP of 4096), a 50257-token embedding and an untied LM head, sequence length 64: 551 M parameters,
2.20 GB of float32, over protobuf's 2 GiB limit. The weights are well conditioned (``N(0, 1/fan_in)``)
and carry the activation outliers real LLMs have: a few fixed channels of the residual stream (the
embedding's and every LayerNorm's γ) are 20-40x larger than the rest, so per-tensor activation ranges
are set by a handful of channels. Calibration tokens follow a Zipf law over the vocabulary; the
held-out tokens are drawn with another seed.

``bench`` runs each quantization as a child process (benchmarks/_measure.py: wall time and peak RSS
of that process alone) and then compares the logits of each output with FP32's on the held-out
tokens (mean cosine over sequences). Rows: onnxq INT8 (static, default calibrator), onnxq INT4
minmax and gptq (``--bits 4``), ONNX Runtime's ``quantize_static`` (QDQ, U8S8, MinMax) and its
``MatMulNBitsQuantizer`` (4 bits, block 32).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import run_measured  # noqa: E402

SEQ = 64
#: a run whose process group holds more than this many times the model's float32 bytes is stopped
#: (the machine is shared): its row then says it needed more than that
RSS_CAP = 3
#: plus what Python, numpy and ONNX Runtime take before any model (a few hundred MB per process)
BASE_RSS = 2 << 30
#: channels of the residual stream that carry the outliers (as in OPT/LLaMA: the same few everywhere)
OUTLIER_CHANNELS = (7, 211, 402, 1001, 1337, 1500)


def _align(fh, boundary: int = 4096) -> int:
    pad = (-fh.tell()) % boundary
    fh.write(b"\0" * pad)
    return fh.tell()


class _Writer:
    """Writes each weight into the data file as it is drawn and returns its external TensorProto."""

    def __init__(self, fh, location: str) -> None:
        self.fh, self.location, self.params = fh, location, 0

    def __call__(self, name: str, value: np.ndarray) -> onnx.TensorProto:
        value = np.ascontiguousarray(value, np.float32)
        self.params += value.size
        if value.nbytes < 1024:
            return numpy_helper.from_array(value, name)
        offset = _align(self.fh)
        self.fh.write(value.tobytes())
        t = onnx.TensorProto()
        t.name, t.data_type = name, TensorProto.FLOAT
        t.dims.extend(value.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(value.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t


def build(folder: Path, layers: int = 18, width: int = 1536, ffn: int = 4096, vocab: int = 50257, heads: int = 12,
          seed: int = 0, calib_sequences: int = 32, heldout_sequences: int = 8, batch: int = 4) -> Path:
    """Write ``folder/model.onnx`` (+ ``model.onnx.data``), ``folder/calib/feed_*.npz`` and ``folder/heldout.npz``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    d, dh = width, width // heads
    outliers = [c % d for c in OUTLIER_CHANNELS]
    path = folder / "model.onnx"
    location = "model.onnx.data"
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def gamma() -> np.ndarray:
        g = 1.0 + normal((d,), 0.05)
        g[outliers] *= rng.uniform(20, 40, len(outliers)).astype(np.float32)
        return g

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def layernorm(x: str, prefix: str) -> str:
        g = write(f"{prefix}.weight", gamma())
        b = write(f"{prefix}.bias", normal((d,), 0.02))
        inits.extend([g, b])
        return node("LayerNormalization", [x, g.name, b.name], f"{prefix}/ln", axis=-1, epsilon=1e-5)

    def linear(x: str, name: str, k: int, n: int) -> str:
        w = write(f"{name}.weight", normal((k, n), 1.0 / np.sqrt(k)))
        inits.append(w)
        return node("MatMul", [x, w.name], f"{name}/MatMul")

    shape_heads = const("shape_heads", np.array([0, SEQ, heads, dh], np.int64))
    shape_model = const("shape_model", np.array([0, SEQ, d], np.int64))
    mask = const("causal_mask", np.triu(np.full((SEQ, SEQ), -1e4, np.float32), 1))
    scale = const("attn_scale", np.array(1.0 / np.sqrt(dh), np.float32))
    with open(folder / location, "wb") as fh:
        write = _Writer(fh, location)
        emb = normal((vocab, d), 1.0)
        emb[:, outliers] *= 8.0
        inits.append(write("embed.weight", emb))
        del emb
        h = node("Gather", ["embed.weight", "input_ids"], "embed/Gather")
        for i in range(layers):
            p = f"layers.{i}"
            x = layernorm(h, f"{p}.ln1")
            q, k, v = (linear(x, f"{p}.attn.{n}", d, d) for n in ("q", "k", "v"))
            q, k, v = (node("Transpose", [node("Reshape", [t, shape_heads], f"{t}/heads")], f"{t}/T", perm=[0, 2, 1, 3])
                       for t in (q, k, v))
            kt = node("Transpose", [k], f"{p}.attn/kT", perm=[0, 1, 3, 2])
            s = node("Mul", [node("MatMul", [q, kt], f"{p}.attn/QK"), scale], f"{p}.attn/scaled")
            a = node("Softmax", [node("Add", [s, mask], f"{p}.attn/masked")], f"{p}.attn/softmax", axis=-1)
            ctx = node("MatMul", [a, v], f"{p}.attn/AV")
            ctx = node("Reshape", [node("Transpose", [ctx], f"{p}.attn/ctxT", perm=[0, 2, 1, 3]), shape_model], f"{p}.attn/ctx")
            h = node("Add", [h, linear(ctx, f"{p}.attn.o", d, d)], f"{p}/res1")
            x = layernorm(h, f"{p}.ln2")
            up = node("Gelu", [linear(x, f"{p}.mlp.up", d, ffn)], f"{p}.mlp/gelu")
            h = node("Add", [h, linear(up, f"{p}.mlp.down", ffn, d)], f"{p}/res2")
        logits = linear(layernorm(h, "final_ln"), "lm_head", d, vocab)
        params = write.params
    nodes[-1].output[0] = "logits"
    graph = helper.make_graph(nodes, "main_graph", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", SEQ])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", SEQ, vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="onnxq-benchmarks")
    model.ir_version = 10
    onnx.save_model(model, str(path))  # weights already in the data file: the .onnx is the graph only
    onnx.checker.check_model(str(path))

    # Zipf-distributed token ids (rank r has probability ~ 1/r), a fixed random rank-to-id map
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    prob = (1.0 / ranks) / (1.0 / ranks).sum()
    ids_of_rank = np.random.default_rng(seed + 1).permutation(vocab)
    calib = folder / "calib"
    calib.mkdir(exist_ok=True)
    tok = np.random.default_rng(seed + 2)
    for b in range(calib_sequences // batch):
        np.savez(calib / f"feed_{b:04d}.npz", input_ids=ids_of_rank[tok.choice(vocab, (batch, SEQ), p=prob)].astype(np.int64))
    held = np.random.default_rng(seed + 3)
    np.savez(folder / "heldout.npz", input_ids=ids_of_rank[held.choice(vocab, (heldout_sequences, SEQ), p=prob)].astype(np.int64))
    print(json.dumps({"model": str(path), "params": params, "fp32_bytes": params * 4,
                      "data_file_bytes": (folder / location).stat().st_size}))
    return path


# --------------------------------------------------------------------------------- measurement

#: the configurations ``bench`` measures: name -> argv after ``python``
def _configs(folder: Path, out: Path) -> dict[str, list[str]]:
    model, calib = folder / "model.onnx", folder / "calib"
    onnxq = [sys.executable, "-m", "onnxq", "optimize", str(model), "--data", str(calib), "--force", "--quiet",
             "--no-cache", "--no-check", "--batch-size", "4"]
    here = Path(__file__).resolve()
    return {
        "onnxq-int8": [*onnxq, "--output", str(out / "onnxq-int8.onnx")],
        "onnxq-int4-minmax": [*onnxq, "--bits", "4", "-p", "minmax", "--output", str(out / "onnxq-int4-minmax.onnx")],
        "onnxq-int4-gptq": [*onnxq, "--bits", "4", "-p", "gptq", "-o", "samples", "32", "--output", str(out / "onnxq-int4-gptq.onnx")],
        # without the clip search (6 grids per block): about half the time on this machine
        "onnxq-int4-gptq-noclip": [*onnxq, "--bits", "4", "-p", "gptq", "-o", "samples", "32", "-o", "clip", "false",
                                   "--output", str(out / "onnxq-int4-gptq-noclip.onnx")],
        # the float rewrites on a model over 2 GB: SmoothQuant before the default calibrator, 4-bit embedding table
        "onnxq-int8-smoothquant": [*onnxq, "-p", "smoothquant", "-p", "trt-entropy", "--output", str(out / "onnxq-int8-smoothquant.onnx")],
        "onnxq-int4-minmax-emb4bit": [*onnxq, "--bits", "4", "-p", "minmax", "-p", "emb4bit", "--output", str(out / "onnxq-int4-minmax-emb4bit.onnx")],
        "ort-quantize_static": [sys.executable, str(here), "_ort_static", str(model), str(out / "ort-static.onnx"), str(calib)],
        "ort-quantize_static-external": [sys.executable, str(here), "_ort_static", str(model), str(out / "ort-static-ext.onnx"), str(calib), "--external"],
        "ort-MatMulNBits": [sys.executable, str(here), "_ort_nbits", str(model), str(out / "ort-nbits.onnx")],
    }


def _outputs(name: str, out: Path) -> Path:
    if name.startswith("onnxq-"):
        return out / f"{name}.onnx"
    return out / {"onnxq-int8": "onnxq-int8.onnx", "onnxq-int4-minmax": "onnxq-int4-minmax.onnx", "onnxq-int4-gptq": "onnxq-int4-gptq.onnx", "onnxq-int4-gptq-noclip": "onnxq-int4-gptq-noclip.onnx",
                  "ort-quantize_static": "ort-static.onnx", "ort-quantize_static-external": "ort-static-ext.onnx",
                  "ort-MatMulNBits": "ort-nbits.onnx"}[name]


def _ort_static(model: str, output: str, calib: str, external: bool) -> None:
    """ONNX Runtime's quantize_static as benchmarks/ort_quantize.py runs it (QDQ, per-channel, U8S8, MinMax)."""
    from onnxruntime import quantization as oq

    class Reader(oq.CalibrationDataReader):
        def __init__(self) -> None:
            self.files = iter(sorted(Path(calib).glob("*.npz")))

        def get_next(self):
            f = next(self.files, None)
            return None if f is None else dict(np.load(f))

    oq.quantize_static(model, output, Reader(), quant_format=oq.QuantFormat.QDQ, per_channel=True,
                       activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8,
                       calibrate_method=oq.CalibrationMethod.MinMax, use_external_data_format=external,
                       extra_options={"ActivationSymmetric": False})


def _ort_nbits(model: str, output: str) -> None:
    """ONNX Runtime's MatMulNBitsQuantizer (4 bits, block 32, symmetric: its defaults)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(model), block_size=32, is_symmetric=True)
    q.process()
    q.model.save_model_to_file(output, use_external_data_format=True)


def _cosines(reference: Path, candidate: Path, heldout: Path) -> float:
    """Mean cosine over held-out sequences of the candidate's logits with the reference's (one sequence at a time)."""
    import onnxruntime as ort

    ids = np.load(heldout)["input_ids"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(str(reference), so, providers=["CPUExecutionProvider"])
    want = [ref.run(None, {"input_ids": ids[i:i + 1]})[0].ravel() for i in range(len(ids))]
    del ref
    cand = ort.InferenceSession(str(candidate), so, providers=["CPUExecutionProvider"])
    cos = []
    for i, w in enumerate(want):
        y = cand.run(None, {"input_ids": ids[i:i + 1]})[0].ravel()
        cos.append(float(np.dot(y, w) / (np.linalg.norm(y) * np.linalg.norm(w))))
    return float(np.mean(cos))


def bench(folder: Path, only: list[str] | None, timeout: float) -> list[dict]:
    out = folder / "out"
    out.mkdir(exist_ok=True)
    data = folder / "model.onnx.data"
    fp32 = data.stat().st_size
    rows = []
    for name, argv in _configs(folder, out).items():
        if only and name not in only:
            continue
        m = run_measured(argv, timeout=timeout, rss_limit_bytes=RSS_CAP * fp32 + BASE_RSS)
        row = {"config": name, "status": m.status, "wall_s": round(m.wall_s, 1), "peak_rss_mb": round(m.peak_rss_mb),
               "rss_over_fp32": round(m.peak_rss_mb * 2**20 / fp32, 2), "load_average": [round(v, 1) for v in os.getloadavg()]}
        target = _outputs(name, out)
        if m.ok and target.exists():
            try:
                row["cosine"] = round(_cosines(folder / "model.onnx", target, folder / "heldout.npz"), 5)
            except Exception as exc:  # an output ORT cannot run is a result too
                row["cosine"] = f"does not run: {str(exc).splitlines()[0][:120]}"
            row["output_mb"] = round(sum(f.stat().st_size for f in out.glob(target.name + "*")) / 2**20)
        else:
            row["error"] = (f"needed more than {RSS_CAP}x the float32 bytes + 2 GiB (stopped at "
                            f"{m.extra['rss_cap_exceeded_mb']:.0f} MiB)") if m.rss_capped else m.error_line(160)
        for f in out.glob(target.name + "*"):  # the outputs are as large as the model: keep the disk free
            f.unlink()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def bench_executors(folder: Path, timeout: float, only: list[str] | None = None, cosine: bool = False) -> list[dict]:
    """The statistics pass (INT8) and GPTQ (INT4) with ``--executor local`` and ``--executor ray`` (a local
    Ray instance with this machine's CPUs): onnxq's own stage timings from ``--json``, wall time and
    peak RSS of the driver and of the whole process group (Ray's workers included)."""
    out = folder / "out"
    out.mkdir(exist_ok=True)
    model, calib = folder / "model.onnx", folder / "calib"
    base = [sys.executable, "-m", "onnxq", "optimize", str(model), "--data", str(calib), "--force", "--quiet", "--no-cache",
            "--no-check", "--batch-size", "4", "--json"]
    runs = {
        "int8-local": [*base, "--executor", "local", "--output", str(out / "x-int8-local.onnx")],
        "int8-ray": [*base, "--executor", "ray", "--output", str(out / "x-int8-ray.onnx")],
        "gptq-local": [*base, "--bits", "4", "-p", "gptq", "-o", "samples", "32", "--executor", "local", "--output", str(out / "x-gptq-local.onnx")],
        "gptq-ray": [*base, "--bits", "4", "-p", "gptq", "-o", "samples", "32", "--executor", "ray", "--output", str(out / "x-gptq-ray.onnx")],
        # without the clip search: about half the time (the large model's rows in benchmarks/README.md)
        "gptq-noclip-local": [*base, "--bits", "4", "-p", "gptq", "-o", "samples", "32", "-o", "clip", "false", "--executor", "local",
                              "--output", str(out / "x-gptq-noclip-local.onnx")],
        "gptq-noclip-ray": [*base, "--bits", "4", "-p", "gptq", "-o", "samples", "32", "-o", "clip", "false", "--executor", "ray",
                            "--output", str(out / "x-gptq-noclip-ray.onnx")],
        # every H from the float model: all MatMuls in one parallel round instead of one round per input
        "gptq-float-local": [*base, "--bits", "4", "-p", "gptq", "-o", "samples", "32", "-o", "inputs", "float", "--executor", "local",
                             "--output", str(out / "x-gptq-float-local.onnx")],
        "gptq-float-ray": [*base, "--bits", "4", "-p", "gptq", "-o", "samples", "32", "-o", "inputs", "float", "--executor", "ray",
                           "--output", str(out / "x-gptq-float-ray.onnx")],
    }
    rows = []
    for name, argv in runs.items():
        if only and name not in only:
            continue
        fp32 = (folder / "model.onnx.data").stat().st_size
        m = run_measured(argv, timeout=timeout, rss_limit_bytes=(RSS_CAP + 1) * fp32 + BASE_RSS)  # the workers hold the model too
        row = {"run": name, "status": m.status, "wall_s": round(m.wall_s, 1), "peak_rss_mb": round(m.peak_rss_mb),
               "group_peak_rss_mb": round(m.extra.get("group_peak_rss_mb", 0))}
        fp32 = (folder / "model.onnx.data").stat().st_size
        row["rss_over_fp32"] = round(m.peak_rss_mb * 2**20 / fp32, 2)
        if m.ok:
            report = json.loads(m.stdout)["report"]
            row.update(calibration_s=report["calibration_seconds"], refine_s=report["refine_seconds"], total_s=report["total_seconds"])
            if cosine:
                row["cosine"] = round(_cosines(model, out / f"x-{name}.onnx", folder / "heldout.npz"), 5)
            row["load_average"] = [round(v, 1) for v in os.getloadavg()]  # the last 1, 5, 15 minutes, read at the end
        else:
            row["error"] = (f"stopped at {m.extra['rss_cap_exceeded_mb']:.0f} MiB" if m.rss_capped else m.error_line(160))
        for f in out.glob(f"x-{name}.onnx*"):
            f.unlink()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("folder", type=Path)
    b.add_argument("--layers", type=int, default=18)
    b.add_argument("--width", type=int, default=1536)
    b.add_argument("--ffn", type=int, default=4096)
    b.add_argument("--vocab", type=int, default=50257)
    b.add_argument("--heads", type=int, default=12)
    m = sub.add_parser("bench")
    m.add_argument("folder", type=Path)
    m.add_argument("--only", action="append")
    m.add_argument("--timeout", type=float, default=1800)
    e = sub.add_parser("bench-executors")
    e.add_argument("folder", type=Path)
    e.add_argument("--only", action="append")
    e.add_argument("--timeout", type=float, default=1800)
    e.add_argument("--cosine", action="store_true", help="also the logits cosine of each output with FP32 on the held-out tokens")
    s = sub.add_parser("_ort_static")
    s.add_argument("model"), s.add_argument("output"), s.add_argument("calib"), s.add_argument("--external", action="store_true")
    n = sub.add_parser("_ort_nbits")
    n.add_argument("model"), n.add_argument("output")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        build(a.folder, a.layers, a.width, a.ffn, a.vocab, a.heads)
    elif a.cmd == "bench":
        bench(a.folder, a.only, a.timeout)
    elif a.cmd == "bench-executors":
        bench_executors(a.folder, a.timeout, a.only, a.cosine)
    elif a.cmd == "_ort_static":
        _ort_static(a.model, a.output, a.calib, a.external)
    else:
        _ort_nbits(a.model, a.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
