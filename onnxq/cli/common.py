"""Options and helpers shared by several commands."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from onnxq.errors import OptionError


def parse_key_values(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    """``key=value`` strings into a dict (for --data-opt)."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise OptionError(f"{what} '{p}' is not key=value")
        out[key.strip()] = value.strip()
    return out


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnxq" / "stats"


def data_options(f: Callable) -> Callable:
    """--data, --data-opt, --reader, --batch-size, --max-samples."""
    f = click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Use at most N calibration samples.")(f)
    f = click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Samples per ONNX Runtime run (results do not depend on it).")(f)
    f = click.option("--reader", default=None, help="Data reader to use (default: guessed from --data).")(f)
    f = click.option("--data-opt", "data_opt", multiple=True, metavar="KEY=VALUE", help="Option of the data reader (e.g. size=224x224, mean=0.485,0.456,0.406).")(f)
    return f


def emit_json(doc: Any) -> None:
    """Print ``doc`` as strict JSON: non-finite numbers (e.g. the SQNR of identical outputs) become null."""
    click.echo(json.dumps(_finite(doc), indent=2, default=_json_default, allow_nan=False))


def _finite(o: Any) -> Any:
    """``o`` with every NaN/Inf float replaced by None (JSON has no Infinity or NaN)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return _finite(float(o))
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    if isinstance(o, Path):
        return str(o)
    return str(o)
