"""Entry point of the ``onnxq`` command: the click group, logging and error handling.

Exit codes: 0 ok, 1 user error (one line; ``onnxq --debug ...`` prints the traceback before it, same codes), 2 usage error,
3 quality gate failed, 4 internal error (a bug), 130 interrupted by SIGINT (Ctrl-C), 143 terminated
by SIGTERM (``timeout``, CI cancellation): 128 + the signal number, as shells report it. An
interrupted run prints one line, removes its temporary files and writes no output.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback


def _startup_signal(signum: int, frame: object) -> None:
    """Until :func:`main` takes over: nothing to clean up yet, so one line and the exit code, no traceback."""
    os.write(2, f"onnxq: interrupted by {signal.Signals(signum).name}\n".encode())
    os._exit(128 + signum)


# first thing, before the imports, when this is the `onnxq` command or `python -m onnxq` (not when a test or a program imports it)
_argv0 = os.path.normpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
if os.path.basename(_argv0) in ("onnxq", "onnxq.exe") or _argv0.endswith(os.path.join("onnxq", "__main__.py")):
    for _sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(_sig) is not signal.SIG_IGN:
            signal.signal(_sig, _startup_signal)

import logging  # noqa: E402
import warnings  # noqa: E402

import click  # noqa: E402

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
    warnings.showwarning = _warning_line  # Python warnings (numpy overflow, Pillow's bomb check): onnxq's one-line warnings


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: object = None,
                  line: str | None = None) -> None:
    """One ``onnxq: warning:`` line for a Python warning (no source line echoed, no raw format)."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    logging.getLogger("onnxq").warning("%s (%s from %s:%d)", text, category.__name__, os.path.basename(filename), lineno)


def _register_commands() -> None:
    from onnxq.cli import check, compare, env, export_cache, lint, methods, optimize, plugins, report_cmd, schema

    for mod in (optimize, compare, check, methods, plugins, env, lint, export_cache, schema, report_cmd):
        cli.add_command(mod.command)


_register_commands()


def _plugin_commands() -> None:
    """Let plugins add commands; a failing plugin never breaks the CLI."""
    try:
        from onnxq.host import get_host

        get_host().register_commands(cli)
    except Exception as exc:  # pragma: no cover - defensive
        logging.getLogger("onnxq").warning("a plugin failed to add commands: %s", exc)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by SIGINT or SIGTERM: unwinds the run (temporary files are removed on the way)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _SignalHandlers:
    """SIGINT and SIGTERM raise :class:`Interrupted` once; a second one is ignored while the run cleans up,
    a third ends the process at once (still with 128 + the signal number)."""

    def __init__(self) -> None:
        self.received = 0
        self.saved: dict[int, object] = {}

    def __enter__(self) -> _SignalHandlers:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                if signal.getsignal(sig) is signal.SIG_IGN:  # ignored by whoever started us (nohup, a background job): keep it so
                    continue
                self.saved[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not the main thread (in-process callers): leave signals alone
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self.saved.items():
            signal.signal(sig, old)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: object) -> None:
        self.received += 1
        if self.received == 1:
            raise Interrupted(signum)
        if self.received >= 3:
            os._exit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI, mapping user errors to one line and exit code 1 (3 for quality gates, 130/143 for SIGINT/SIGTERM)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    with _SignalHandlers():
        _run(argv, debug)


def _quiet_onnxruntime() -> None:
    """ONNX Runtime's process-wide logger to errors only, as onnxq's sessions already are: its kernels warn through it
    once per session (a tf2onnx Resize's deprecated 'tf_half_pixel_for_nn': 6 coloured lines in a minmax run, 46 in
    -p auto), which says nothing to the user of the command. The library leaves the process's logger alone."""
    from onnxq.runtime.ort import set_default_log_severity

    set_default_log_severity(3)


def _run(argv: list[str] | None, debug: bool) -> None:
    try:
        _quiet_onnxruntime()  # inside the try, as what follows: Ctrl-C while it imports is one line, not a traceback
        _plugin_commands()
        rv = _invoke(argv)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except click.exceptions.Abort:
        click.echo("onnxq: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except OnnxqError as exc:
        if debug:  # the traceback, then the same line and exit code: --debug must not turn a bug's 4 into Python's 1
            traceback.print_exc()
        click.echo(f"onnxq: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        if signum == signal.SIGINT and sys.stderr.isatty():
            click.echo(err=True)  # end the terminal's "^C" line
        click.echo(f"onnxq: interrupted by {signal.Signals(signum).name}", err=True)
        sys.exit(128 + signum)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run as `onnxq --debug COMMAND ...` for the traceback)"
        click.echo(f"onnxq: internal error: {type(exc).__name__}: {exc}{hint}; please report it", err=True)
        sys.exit(4)
    sys.exit(0)


def _invoke(argv: list[str] | None) -> object:
    """``cli.main(standalone_mode=False)`` without its KeyboardInterrupt handling.

    click turns an interrupt into ``Abort`` after printing an empty line; here an interrupt reaches
    :func:`_run` as itself, so it can report the signal in one line with its exit code.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    completion = getattr(cli, "_main_shell_completion", None)
    if completion is not None:  # `_ONNXQ_COMPLETE=bash_source onnxq` keeps working
        completion({}, "onnxq", None)
    try:
        with cli.make_context("onnxq", args) as ctx:
            return cli.invoke(ctx)
    except click.exceptions.Exit as exc:  # --help, --version, ctx.exit()
        return exc.exit_code
