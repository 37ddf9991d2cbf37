"""``onnxq plugins``: every plugin the host loaded, with what it provides or why it failed."""

from __future__ import annotations

import click

from onnxq.cli.common import emit_json


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def command(as_json: bool) -> None:
    """List loaded plugins (built-in and third-party) and broken ones."""
    from onnxq.host import get_host
    from onnxq.report import table

    host = get_host()
    if as_json:
        emit_json([p.__dict__ for p in host.plugins])
        return
    rows = [[p.name, f"{p.distribution} {p.version}".strip(), "ok" if p.ok else "BROKEN", ", ".join(p.provides) if p.ok else p.error] for p in host.plugins]
    click.echo(table(rows, ["plugin", "package", "status", "provides / error"]))
