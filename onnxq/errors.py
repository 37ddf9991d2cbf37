"""User-facing error types.

Everything a user can cause (bad model, bad data, bad option, unknown method) raises an
:class:`OnnxqError` subclass. The CLI prints these as one line and exits with code 1; any other
exception is a bug: one line naming it, exit code 4 (its traceback with ``--debug``).
"""

from __future__ import annotations


class OnnxqError(Exception):
    """Base class of errors caused by the user's input, not by a bug in onnxq."""

    exit_code: int = 1


class ModelError(OnnxqError):
    """The model file is missing, malformed, unsafe or not something onnxq can quantize."""


class DataError(OnnxqError):
    """Calibration or evaluation data is missing, malformed or does not match the model."""


class OptionError(OnnxqError):
    """A method, reader or backend option is unknown or has an invalid value."""


class PluginError(OnnxqError):
    """A plugin failed to load, or something a plugin provides was asked for and is broken."""


class UnknownNameError(OnnxqError):
    """A method, backend or data reader name that no loaded plugin provides."""


class OutputError(OnnxqError):
    """The output path is unusable (it is the input, it exists without ``--force``, ...)."""


class QualityGateError(OnnxqError):
    """The quantized model missed a quality gate (``--max-drop``, ``--min-cosine``)."""

    exit_code = 3


class PlanConflictError(OnnxqError):
    """Two rewrite commands ask for incompatible quantization of the same tensor."""


class InternalError(RuntimeError):
    """onnxq, or a method plugin, built a model that is broken: a bug, never the user's doing.

    Not an :class:`OnnxqError`: the CLI reports it as an internal error with exit code 4, so a
    deployment script does not read a tool fault as bad input.
    """


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none: what a one-line error says of it."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
