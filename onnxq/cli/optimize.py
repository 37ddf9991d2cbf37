"""``onnxq optimize``: quantize a model, optionally evaluate it and gate on its quality."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import click

from onnxq.cli.choices import RegistryChoice
from onnxq.cli.common import data_options, default_cache_dir, emit_json, parse_key_values
from onnxq.errors import OnnxqError, OptionError, QualityGateError


@click.command("optimize")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-p", "--method", "methods", multiple=True, default=("trt-entropy",), show_default=True, help="Method; repeat to compose (e.g. -p cfws -p easyquant), or join with + as -p auto names its candidates (-p equalize+mse).")
@click.option("-o", "--option", "opts", multiple=True, type=(str, str), metavar="KEY VALUE", help="Method option (see `onnxq methods NAME`); METHOD.KEY targets one method (required when several selected methods have KEY).")
@click.option("--data", default=None, help="Calibration data: folder/file of .npz/.npy, image folder, module:function, or random.")
@data_options
@click.option("--target", type=RegistryChoice("targets"), default="ort", show_default=True, help="Deployment target profile (a registered target).")
@click.option("--bits", type=click.Choice(["8", "7", "4"]), default="8", show_default=True, help="8 or 7: weights and activations (7 = INT7 in an int8 container); 4: block-wise int4 weight-only MatMul/Gemm.")
@click.option("--block-size", type=int, default=None, help="Block size of --bits 4 (power of two >= 16; default 32).")
@click.option("--output", "output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Output model (default: MODEL's folder, <stem>.<target>-int<bits>.onnx).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Keep nodes in float: node-name glob or op type. Repeatable.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Statistics cache folder (default ~/.cache/onnxq/stats).")
@click.option("--no-cache", is_flag=True, help="Do not read or write the statistics cache.")
@click.option("--no-fold", is_flag=True, help="Keep BatchNorm and constant Mul/Add after Conv/ConvTranspose/Gemm/MatMul unfolded, and weights computed from constants at run time (Transpose/Cast/... of initializers) as nodes (both folded by default).")
@click.option("--eval-data", default=None, help="Labelled or unlabelled evaluation data: prints FP32 vs quantized metrics.")
@click.option("--max-drop", type=float, default=None, help="Quality gate: max accuracy drop in points (top-1 disagreement % without labels). Exit 3 if missed.")
@click.option("--min-cosine", type=float, default=None, help="Quality gate: min cosine of the first output vs FP32. Exit 3 if missed. With -p auto: the target, on each sample's worst output (-o score_outputs).")
@click.option("--min-agreement", type=float, default=None, help="-p auto's target: min arg-max agreement of the first output with FP32 (0..1; per position for sequences, per character read for a CTC reader).")
@click.option("--time-budget", type=float, default=None, help="-p auto: seconds the search may take (default: 4x what one recipe costs, at least 10 s with a target; a model whose first recipe takes under 0.3 s runs its whole portfolio first).")
@click.option("--no-check", is_flag=True, help="Skip the fidelity check (quantized vs FP32 on --eval-data, or in-sample on a few calibration batches).")
@click.option("--strict", is_flag=True, help="Exit 3 when the fidelity check warns or cannot run, and non-zero when the evaluation fails (the written model is kept).")
@click.option("--baseline", type=click.Choice(["none", "ort"]), default="none", show_default=True, help="Also run ONNX Runtime's quantize_static and show it beside onnxq.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--report", "report_html", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a self-contained HTML report (charts of per-layer error, histograms, weight ranges; needs onnxq[report]).")
@click.option("--diagnostics", is_flag=True, help="Collect the HTML report's chart data into the report (implied by --report; for --json and `onnxq report`).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--executor", default="local", show_default=True, metavar="local|ray[:ADDRESS]",
              help="Where the statistics pass (split by batches) and per-layer GPTQ run: this process, or Ray tasks on a local "
                   "or running cluster (ray:auto, ray:ray://HEAD:10001; needs onnxq[ray]). Results are identical.")
def command(model: Path, methods: tuple[str, ...], opts: tuple[tuple[str, str], ...], data: str | None, data_opt: tuple[str, ...], reader: str | None,
            batch_size: int, max_samples: int | None, target: str, bits: str, block_size: int | None, output: Path | None, force: bool, exclude: tuple[str, ...],
            cache_dir: Path | None, no_cache: bool, no_fold: bool, eval_data: str | None, max_drop: float | None, min_cosine: float | None,
            min_agreement: float | None, time_budget: float | None, no_check: bool,
            strict: bool, baseline: str, as_json: bool, report_html: Path | None, diagnostics: bool, quiet: bool, executor: str) -> None:
    """Quantize MODEL to QDQ form with METHOD, calibrated on --data."""
    from onnxq.host import get_host
    from onnxq.pipeline import Fidelity, optimize
    from onnxq.pipeline.data import calibration_options
    from onnxq.pipeline.stages import log_fidelity
    from onnxq.graph.model_io import ensure_output_path, save_model_atomic

    if data is None and bits != "4":
        raise OptionError("--data is required (use --data random for a smoke run)")
    # "equalize+mse" is how -p auto names a recipe in its report: the same chain as -p equalize -p mse
    methods = tuple(m for given in methods for m in given.split("+") if m)
    auto = "auto" in methods
    if auto and len(methods) > 1:
        raise OptionError("-p auto chooses the methods itself; give it alone")
    if not auto and (min_agreement is not None or time_budget is not None):
        raise OptionError("--min-agreement and --time-budget apply to -p auto")
    if (max_drop is not None or min_cosine is not None) and eval_data is None and not auto:
        raise OptionError("--max-drop/--min-cosine need --eval-data (or -p auto, which holds out calibration samples)")
    for flag, threshold in (("--max-drop", max_drop), ("--min-cosine", min_cosine), ("--min-agreement", min_agreement), ("--time-budget", time_budget)):
        if threshold is not None and not math.isfinite(threshold):  # every comparison with NaN is False: the gate would always pass
            raise OptionError(f"{flag} must be a finite number, not {threshold}")
    options: dict[str, str] = {}
    for k, v in opts:
        options[k] = v
    if auto:  # the gate's thresholds are auto's target
        options.update({k: str(v) for k, v in (("min_cosine", min_cosine), ("max_drop", max_drop), ("min_agreement", min_agreement),
                                               ("time_budget", time_budget)) if v is not None})
    out = output or model.with_name(f"{model.stem}.{target}-int{bits}.onnx")
    ensure_output_path(out, [model], force)
    if report_html is not None:  # checked before any work, like the model's output
        from onnxq.report_html import require_matplotlib

        if report_html.resolve() == out.resolve():
            raise OptionError(f"--report '{report_html}' is the output model; choose another path")
        ensure_output_path(report_html, [model], force)
        require_matplotlib()
    if eval_data is not None:  # a bad evaluation spec is a user error before any work, not a failed evaluation after it
        from onnxq.cli.evaluation import check_evaluation_data

        check_evaluation_data(model, eval_data, parse_key_values(data_opt, "--data-opt"), reader, batch_size)
    gated = (max_drop is not None or min_cosine is not None) and eval_data is not None
    # saved by the run itself, before any evaluation, so that a failing evaluation never loses it; a gated run
    # writes only a model that passed its gate (an existing output is kept otherwise)
    from onnxq.runtime.executor import from_spec, using

    with using(from_spec(executor)):  # before any work: a missing Ray is a one-line error naming the extra
        result = optimize(
            model, None if gated else out, method=list(methods), options=options, data=data, data_options=calibration_options(
                data, parse_key_values(data_opt, "--data-opt"), get_host(), reader, eval_data),
            reader=reader, target=target, bits=int(bits), block_size=block_size, batch_size=batch_size, max_samples=max_samples, exclude=exclude,
            cache_dir=None if no_cache else (cache_dir or default_cache_dir()), force=force, show_progress=not quiet and not as_json,
            fold=not no_fold, check=not no_check and eval_data is None,  # with --eval-data the evaluation below is the check
            eval_data=eval_data if auto else None,  # -p auto scores its candidates on it
            diagnostics=diagnostics or report_html is not None,
        )
    report = result.report
    doc: dict = {}
    text = []
    gate_error: str | None = None
    eval_error: BaseException | None = None
    if eval_data is not None or baseline == "ort":
        from onnxq.cli.evaluation import evaluate_run

        try:
            checking = not no_check and eval_data is not None
            evals, table_text, gate_error, fidelity = evaluate_run(model, result.model, eval_data or data, data_opt, reader, batch_size, max_drop,
                                                                   min_cosine, baseline, data, max_samples, target, bits,
                                                                   check_methods=report.method if checking else None)
            doc["evaluation"] = evals
            text.append(table_text)
            if fidelity is not None:
                report.fidelity = fidelity
                log_fidelity(fidelity)
        except OptionError:
            raise  # a gate the model cannot be judged by (--max-drop without a class output): the user's error, exit 1
        except Exception as exc:  # the quantization succeeded: keep it, say what failed
            eval_error = exc
            doc["evaluation_error"] = _one_line(exc)
            if not no_check and eval_data is not None:
                report.fidelity = Fidelity("evaluation", False, 0, [], False, [], [], None, f"the evaluation failed: {_one_line(exc)}", 0.0)
    fid = report.fidelity
    if gated and gate_error is None and fid is not None and fid.warned:
        gate_error = "quality gate failed: " + fid.warnings[0]  # a gate turns the fidelity warning into a failure
    if gated and gate_error is None:
        # passed, or could not be evaluated: then the model is written (never lost) and the run still fails below
        save_model_atomic(result.model, out, force=force, inputs=[model])
        report.output = str(out)
    doc = {"report": report.to_dict(), **doc}  # the report schema: `onnxq schema report`
    doc["quality_gate"] = ("failed" if gate_error or eval_error else "passed") if gated else None
    if report_html is not None:  # also when the gate failed: the report is what a reviewer opens
        from onnxq.report_html import write_html

        write_html(doc, report_html, force=force)
    if as_json:
        emit_json(doc)
    else:
        from onnxq.report import run_summary

        click.echo(run_summary(report))
        for t in text:
            click.echo(t)
        if report_html is not None:
            click.echo(f"wrote report {report_html}")
    if eval_error is not None:
        kept = f"; the quantized model was kept at {report.output}" if report.output else ""
        if strict or gated:
            if isinstance(eval_error, OnnxqError) or not strict:
                raise QualityGateError(f"the evaluation failed: {_one_line(eval_error)}{kept}") from None
            raise eval_error  # a bug under --strict: its traceback
        logging.getLogger("onnxq").warning("the evaluation failed: %s%s", _one_line(eval_error), kept)
    if gate_error is not None:
        raise QualityGateError(gate_error + "; the quantized model was not written")
    if strict and fid is not None and fid.failed():
        from onnxq.pipeline import fidelity_failure

        raise QualityGateError(fidelity_failure(fid, report.output))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(exc, OnnxqError) and first else f"{type(exc).__name__}: {first}".rstrip(": ")
