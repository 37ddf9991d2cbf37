"""``onnxq env``: versions and capabilities, for bug reports."""

from __future__ import annotations

import platform
from importlib import metadata

import click

from onnxq.cli.common import emit_json


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


@click.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def command(as_json: bool) -> None:
    """Show onnxq's environment: Python, packages, ONNX Runtime providers, TensorRT, CPU."""
    import os

    info: dict[str, object] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    for dist in ("onnxq", "onnx", "onnxruntime", "onnx-graphsurgeon", "numpy", "pluggy", "click", "tensorrt"):
        info[dist] = _version(dist)
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception as exc:  # pragma: no cover
        info["onnxruntime_providers"] = f"error: {exc}"
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # pragma: no cover
        pass
    if as_json:
        emit_json(info)
        return
    width = max(len(k) for k in info)
    for k, v in info.items():
        click.echo(f"{k.ljust(width)}  {v}")
