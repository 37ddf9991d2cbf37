"""``plugin-template``: clip every activation at a configurable fraction of its max-abs.

A deliberately small, working method to copy: onnxq's ``minmax`` calibrator with one change (the
clip threshold is ``fraction × max|x|`` instead of ``max|x|``). Weights keep the host's default
(per-channel max-abs). Everything a method needs is here: a typed options dataclass whose fields
have help texts, a :class:`~onnxq.method.RangeMethod` subclass with a name and a summary, and
the ``register_methods`` hook that the ``onnxq`` entry point in ``pyproject.toml`` exposes.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxq.calib.statistics import TensorStats
from onnxq.hookspecs import hookimpl
from onnxq.method import RangeMethod, RunContext
from onnxq.options import option

__version__ = "0.1.0"


@dataclass(frozen=True)
class PluginTemplateOptions:
    """Options are typed dataclass fields; ``-o fraction 0.8`` on the command line sets one."""

    fraction: float = option(0.9, "fraction of each activation's max-abs kept by the clip (1.0 = minmax)")

    def validate(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError("fraction must be in (0, 1]")


class PluginTemplate(RangeMethod):
    """Clip each activation at ``fraction × max|x|`` over the calibration data."""

    name = "plugin-template"
    summary = "template plugin: clip activations at a fraction of max-abs (copy plugins_contrib/_template to start a plugin)"
    Options = PluginTemplateOptions
    needs_histogram = False  # min/max statistics are enough

    def threshold(self, stats: TensorStats, ctx: RunContext) -> float:
        return self.options.fraction * stats.amax


@hookimpl
def register_methods(register) -> None:
    register(PluginTemplate)
