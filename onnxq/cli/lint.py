"""``onnxq lint``: check a QDQ model against a target's rules before anyone builds an engine."""

from __future__ import annotations

from pathlib import Path

import click

from onnxq.cli.common import emit_json


@click.command("lint")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", type=click.Choice(["trt"]), default="trt", show_default=True, help="Rule set.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def command(model: Path, target: str, as_json: bool) -> None:
    """Check MODEL against TensorRT's explicit-quantization (Q/DQ) rules; exit 1 on errors."""
    from onnxq.errors import OnnxqError
    from onnxq.graph.model_io import load_model
    from onnxq.graph.trt_rules import check_trt_rules, format_findings

    findings = check_trt_rules(load_model(model))
    errors = [f for f in findings if f.severity == "error"]
    if as_json:
        emit_json([f.__dict__ for f in findings])
    elif findings:
        click.echo(format_findings(findings))
    else:
        click.echo(f"{model}: no TensorRT Q/DQ rule findings")
    if errors:
        raise OnnxqError(f"{len(errors)} TensorRT rule error(s) in {model}")
