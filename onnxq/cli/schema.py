"""``onnxq schema report``: print the JSON Schema of the report that ``optimize --json`` writes."""

from __future__ import annotations

import click

from onnxq.cli.common import emit_json


@click.command("schema")
@click.argument("name", type=click.Choice(["report"]))
def command(name: str) -> None:
    """Print the JSON Schema of NAME (report: the "report" object of `onnxq optimize --json`)."""
    from onnxq.report import report_schema

    emit_json(report_schema())
