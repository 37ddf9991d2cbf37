"""``onnxq methods [NAME]``: list methods, or show one method's options."""

from __future__ import annotations

import click

from onnxq.cli.common import emit_json


@click.command("methods")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def command(name: str | None, as_json: bool) -> None:
    """List quantization methods, or show NAME's options."""
    from onnxq.host import get_host
    from onnxq.options import describe_options
    from onnxq.report import table

    host = get_host()
    if name == "auto":  # not a method but the search over them (onnxq/pipeline/auto.py); listed with them
        from onnxq.pipeline.auto import SUMMARY, AutoOptions

        opts = describe_options(AutoOptions)
        if as_json:
            emit_json({"name": "auto", "summary": SUMMARY, "capabilities": {}, "options": [o.__dict__ for o in opts]})
            return
        click.echo(f"auto: {SUMMARY}")
        click.echo("options (-o KEY VALUE; --min-cosine, --max-drop, --min-agreement and --time-budget set the first four):")
        click.echo(table([[o.name, o.type, str(o.default), o.help] for o in opts], ["option", "type", "default", "help"]))
        return
    if name is None:
        from onnxq.pipeline.auto import SUMMARY

        rows = sorted([[n, cls.summary] for n, cls in host.methods.items()] + [["auto", SUMMARY]])
        if as_json:
            emit_json([{"name": n, "summary": s} for n, s in rows])
            return
        click.echo(table(rows, ["method", "summary"]))
        for p in host.broken():
            click.echo(f"(plugin '{p.name}' failed to load: {p.error})")
        return
    cls = host.method(name)
    opts = describe_options(cls.Options)
    caps = capabilities(cls)
    if as_json:
        emit_json({"name": name, "summary": cls.summary, "capabilities": caps, "options": [o.__dict__ for o in opts]})
        return
    click.echo(f"{name}: {cls.summary}")
    doc = (cls.__doc__ or "").strip()
    if doc:
        click.echo(doc)
    shown = [k if v is True else f"{k}={v}" for k, v in caps.items() if v]
    if shown:
        click.echo("capabilities: " + ", ".join(shown))
    if not opts:
        click.echo("options: none")
        return
    click.echo("options (-o KEY VALUE):")
    click.echo(table([[o.name, o.type, repr(o.default) if isinstance(o.default, str) else str(o.default), o.help] for o in opts], ["option", "type", "default", "help"]))


def capabilities(cls: type) -> dict[str, object]:
    """The composition capabilities a method class declares (docs/plugins.md, "Composing methods")."""
    names = ("calibrates", "follows_calibrator", "calibrator_option", "replaces_default_calibrator", "needs_data", "approximates")
    return {n: getattr(cls, n) for n in names}
