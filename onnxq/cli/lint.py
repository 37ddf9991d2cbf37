"""``onnxq lint``: check a QDQ model against a target's rules before anyone builds an engine."""

from __future__ import annotations

from pathlib import Path

import click

from onnxq.cli.choices import RegistryChoice
from onnxq.cli.common import emit_json

#: targets that have a Q/DQ rule set
RULE_SETS = ("trt",)


@click.command("lint")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", type=RegistryChoice("targets"), default="trt", show_default=True, help="Target whose Q/DQ rules to check (rule sets: trt).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def command(model: Path, target: str, as_json: bool) -> None:
    """Check MODEL against TensorRT's explicit-quantization (Q/DQ) rules; exit 1 on errors."""
    from onnxq.errors import OnnxqError, OptionError
    from onnxq.graph.model_io import load_model
    from onnxq.graph.trt_rules import check_trt_rules, format_findings

    if target not in RULE_SETS:
        raise OptionError(f"target '{target}' has no Q/DQ rule set to lint against (rule sets: {', '.join(RULE_SETS)})")
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
