"""Entry point of the ``onnxq`` command: the click group, logging and error handling.

Exit codes: 0 ok, 1 user error (one line; ``--debug`` for the traceback), 2 usage error,
3 quality gate failed.
"""

from __future__ import annotations

import logging
import sys

import click

from onnxq import __version__
from onnxq.errors import OnnxqError


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"onnxq: {record.levelname.lower()}: {record.getMessage()}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxq")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.option("-v", "--verbose", is_flag=True, help="Informational logging on stderr.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """onnxq: post-training quantization of ONNX models (INT8/INT7) with pluggable methods."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    root = logging.getLogger("onnxq")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    root.propagate = False


def _register_commands() -> None:
    from onnxq.cli import compare, env, export_cache, lint, methods, optimize, plugins, schema

    for mod in (optimize, compare, methods, plugins, env, lint, export_cache, schema):
        cli.add_command(mod.command)


_register_commands()


def _plugin_commands() -> None:
    """Let plugins add commands; a failing plugin never breaks the CLI."""
    try:
        from onnxq.host import get_host

        get_host().register_commands(cli)
    except Exception as exc:  # pragma: no cover - defensive
        logging.getLogger("onnxq").warning("a plugin failed to add commands: %s", exc)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI, mapping user errors to one line and exit code 1 (3 for quality gates)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    _plugin_commands()
    try:
        rv = cli.main(args=argv, prog_name="onnxq", standalone_mode=False)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except click.exceptions.Abort:
        click.echo("onnxq: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except OnnxqError as exc:
        if debug:
            raise
        click.echo(f"onnxq: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("onnxq: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        click.echo(f"onnxq: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback; please report it)", err=True)
        sys.exit(4)
    sys.exit(0)
