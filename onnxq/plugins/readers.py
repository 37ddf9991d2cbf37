"""Plugin module that registers the built-in data readers."""

from __future__ import annotations

from onnxq.calib.readers import BUILTIN_READERS
from onnxq.hookspecs import hookimpl


@hookimpl
def register_data_readers(register) -> None:
    for reader in BUILTIN_READERS:
        register(reader)
