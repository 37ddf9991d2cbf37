"""Every hook a plugin can implement (pluggy project name ``onnxq``).

A plugin is a module (or object) with functions marked ``@onnxq.hookspecs.hookimpl``, exposed
through an entry point in the ``onnxq`` group::

    [project.entry-points.onnxq]
    my_method = "my_package.plugin"

Registration hooks receive a ``register`` callback; call it once per class you provide (once per
profile for ``register_targets``). The host calls every hook through pluggy, one plugin at a time,
so ``@hookimpl(specname="register_methods")`` on a function of another name works, and a plugin
whose hook raises is recorded as broken with nothing it registered kept. docs/plugins.md has a
section per hook, checked against these signatures by tests/test_docs.py. Method
steps (float rewrites, statistics, qparams, refinement, QDQ commands) are methods of
:class:`onnxq.method.QuantMethod`, because the user picks which method drives a run; the hooks
below are for things that extend onnxq as a whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from onnxq.calib.readers import DataReader
    from onnxq.graph.targets import TargetProfile
    from onnxq.method import QuantMethod
    from onnxq.runtime.runner import Backend
    from onnxq.tasks import TaskLoss

PROJECT = "onnxq"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_methods(register: Callable[[type[QuantMethod]], None]) -> None:
    """Register quantization methods: call ``register(MyMethod)`` for each QuantMethod subclass."""


@hookspec
def register_data_readers(register: Callable[[type[DataReader]], None]) -> None:
    """Register data readers: call ``register(MyReader)`` for each DataReader subclass."""


@hookspec
def register_task_losses(register: Callable[[type[TaskLoss]], None]) -> None:
    """Register task losses: call ``register(MyLoss)`` for each :class:`onnxq.tasks.TaskLoss` subclass.

    Search methods that score candidates by the model's outputs (``detptq``) look the user's
    ``-o task NAME`` up among these (built-ins: detection, segmentation-map, classification, mse).
    """


@hookspec
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Register backends: call ``register(MyBackend)`` for each :class:`onnxq.runtime.runner.Backend` subclass.

    ``onnxq compare --backend NAME`` evaluates models on the backend's runners (built-ins: ``ort``,
    ``trt``).
    """


@hookspec
def register_targets(register: Callable[[TargetProfile], None]) -> None:
    """Register target profiles: call ``register(profile)`` for each :class:`onnxq.graph.targets.TargetProfile`.

    ``onnxq optimize --target NAME`` quantizes for the profile (built-ins: ``ort``, ``trt``, ``ort-s8``).
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add click commands to the ``onnxq`` command group."""


@hookspec
def report_sections(report: dict[str, Any]) -> dict[str, Any] | None:
    """Return extra sections (a dict) to merge into a finished run's report, or None."""
