"""``onnxq report``: the HTML report of a saved ``onnxq optimize --json`` (or ``onnxq compare --json``) result."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("report")
@click.argument("run_json", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The HTML file to write.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--title", default=None, help="Page title (default: from the model's name).")
def command(run_json: Path, output: Path, force: bool, title: str | None) -> None:
    """Render RUN_JSON (the document `onnxq optimize --json` or `onnxq compare --json` printed) as one self-contained HTML file.

    The per-layer, histogram and weight charts need a run with --report or --diagnostics.
    """
    from onnxq.errors import OnnxqError
    from onnxq.graph.model_io import ensure_output_path
    from onnxq.report_html import require_matplotlib, write_html

    ensure_output_path(output, [run_json], force)
    require_matplotlib()  # before reading anything: the one thing a fresh install may lack
    try:
        text = run_json.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OnnxqError(f"'{run_json}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxqError(f"cannot read '{run_json}': {getattr(exc, 'strerror', None) or exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OnnxqError(f"'{run_json}' is not JSON ({exc.msg} at line {exc.lineno}): save the output of `onnxq optimize --json`") from None
    try:
        path = write_html(doc, output, force=force, title=title)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # a hand-edited or foreign document, not a bug of ours
        raise OnnxqError(f"'{run_json}' is not a well-formed onnxq report document ({type(exc).__name__}: {exc}); "
                         "compare it with `onnxq schema report`") from None
    click.echo(f"wrote {path}")
