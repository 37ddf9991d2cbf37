"""``onnxq compare``: FP32 against quantized models (and ORT's quantizer) on the same data."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import click

from onnxq.cli.choices import RegistryChoice
from onnxq.cli.common import data_options, emit_json, parse_key_values


@click.command("compare")
@click.argument("fp32_model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("quantized", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, help="Evaluation data (labels give accuracy).")
@data_options
@click.option("--calib-data", default=None, help="Calibration data for --baseline ort and the --backend trt calibrator row (default: --data).")
@click.option("--baseline", type=click.Choice(["none", "ort"]), default="none", show_default=True, help="Add ONNX Runtime's quantize_static output, calibrated on --calib-data.")
@click.option("--backend", type=RegistryChoice("backends"), default="ort", show_default=True,
              help="Runtime to evaluate on: a registered backend (trt needs a GPU and TensorRT; `onnxq plugins` lists them all).")
@click.option("--trt-calibrator", type=click.Choice(["entropy", "minmax", "none"]), default="entropy", show_default=True,
              help="--backend trt: add TensorRT's own implicit calibrator on --calib-data (TensorRT 10.x; on 11+ onnxq's trt-entropy stands in).")
@click.option("--fp16", is_flag=True, help="--backend trt: run the layers outside Q/DQ in FP16 (strongly typed: the graph is rewritten to float16).")
@click.option("--workspace-mb", type=click.IntRange(min=1), default=2048, show_default=True, help="--backend trt: builder workspace limit in MiB.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None, help="--backend trt: TensorRT timing cache file (read, then updated).")
@click.option("--save-trt-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="--backend trt on TensorRT 10.x: write TensorRT's calibration cache here (re-import it with -p trt-cache).")
@click.option("--threads", default="1", show_default=True, help="Comma-separated intra-op thread counts for latency.")
@click.option("--layers", is_flag=True, help="Also print per-layer SQNR of each quantized model vs FP32.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--report", "report_html", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a self-contained HTML report (the table and per-layer SQNR/cosine charts; needs onnxq[report]).")
@click.option("--force", is_flag=True, help="Replace an existing --report file.")
def command(fp32_model: Path, quantized: tuple[Path, ...], data: str, data_opt: tuple[str, ...], reader: str | None, batch_size: int,
            max_samples: int | None, calib_data: str | None, baseline: str, backend: str, trt_calibrator: str, fp16: bool, workspace_mb: int,
            timing_cache: Path | None, save_trt_cache: Path | None, threads: str, layers: bool, as_json: bool, report_html: Path | None,
            force: bool) -> None:
    """Evaluate FP32_MODEL and each QUANTIZED model side by side."""
    from onnxq.cli.evaluation import data_source, evaluation_data
    from onnxq.errors import OnnxqError, OptionError
    from onnxq.evaluate.compare import evaluate, layer_errors
    from onnxq.graph import model_io
    from onnxq.host import get_host
    from onnxq.report import evaluation_table, table

    if report_html is not None:  # checked before any work
        from onnxq.report_html import require_matplotlib

        model_io.ensure_output_path(report_html, [fp32_model, *quantized], force)
        require_matplotlib()
    host = get_host()
    runtime = host.backend(backend)
    if backend == "trt":
        from onnxq.backends.tensorrt import check_trt_cli

        check_trt_cli(save_trt_cache)  # one line naming what is missing: tensorrt, a CUDA binding, a GPU
    elif (reason := runtime.unavailable_reason()) is not None:
        raise OnnxqError(f"--backend {backend}: {reason}")
    try:
        thread_counts = tuple(int(t) for t in threads.split(","))
    except ValueError:
        raise OptionError(f"--threads '{threads}' is not a comma-separated list of integers") from None
    ref = model_io.load_model(fp32_model)
    candidates: dict[str, object] = {}
    for q in quantized:
        model_io.load_model(q)
        candidates[q.name] = q
    opts = parse_key_values(data_opt, "--data-opt")
    inputs, source, latency_feeds = evaluation_data(ref, data, opts, reader, batch_size, max_samples)
    with tempfile.TemporaryDirectory(prefix="onnxq-compare-") as tmp:
        extra = {}
        if baseline == "ort":
            from onnxq.backends.ort_quantizer import quantize_with_ort

            cal = data_source(calib_data or data, inputs, opts, reader, batch_size, max_samples)
            t0 = time.perf_counter()
            # TensorRT accepts only int8 symmetric activations inside the graph
            trt_kw = {"symmetric_activations": True, "activation_type": "int8"} if backend == "trt" else {}
            candidates["ort quantize_static"] = quantize_with_ort(fp32_model, Path(tmp) / "ort.onnx", cal, **trt_kw)
            extra["ort quantize_static"] = {"calibration_seconds": round(time.perf_counter() - t0, 3)}
        trt_doc: dict = {}
        if backend == "trt":
            from onnxq.cli.evaluation import trt_entropy_model
            from onnxq.evaluate.tensorrt import compare_on_trt

            cal_src = data_source(calib_data or data, inputs, opts, reader, batch_size, max_samples)
            evals, trt_doc = compare_on_trt(fp32_model, candidates, source, latency_feeds, cal_src,  # type: ignore[arg-type]
                                            trt_calibrator, fp16, workspace_mb, timing_cache, save_trt_cache, optional=("ort quantize_static",),
                                            stand_in=trt_entropy_model)
        else:
            evals = evaluate(model_io.for_runtime(ref, fp32_model), candidates, source, latency_feeds=latency_feeds,  # type: ignore[arg-type]
                             backend=runtime(threads=thread_counts))
        per_layer = {}
        if layers or report_html is not None:  # the report charts them
            for name, path in candidates.items():
                qm = model_io.load_model(path)  # type: ignore[arg-type]
                tensors = [n.output[0] for n in ref.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
                per_layer[name] = layer_errors(ref, qm, tensors, source)
    for e in evals:
        e.extra.update(extra.get(e.name, {}))
    doc = {"evaluations": [dataclasses.asdict(e) for e in evals], "layers": per_layer, **({"tensorrt": trt_doc} if trt_doc else {})}
    if report_html is not None:
        from onnxq.report_html import write_html

        write_html(doc, report_html, force=force, title=f"onnxq comparison: {fp32_model.name}")
    if as_json:
        emit_json(doc)
        return
    click.echo(evaluation_table(evals))
    for note in trt_doc.get("notes", []):
        click.echo(f"note: {note}")
    for name, rows in (per_layer if layers else {}).items():
        click.echo(f"\nper-layer error of {name} (layer output vs FP32):")
        click.echo(table([[t, f"{v['sqnr_db']:.1f}", f"{v['cosine']:.5f}"] for t, v in rows.items()], ["tensor", "sqnr-dB", "cosine"]))
    if report_html is not None:
        click.echo(f"wrote report {report_html}")

