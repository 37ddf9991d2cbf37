"""The built-in backends and target profiles, registered through the same hooks a third-party plugin uses."""

from __future__ import annotations

from collections.abc import Callable

from onnxq.backends.ort import OrtBackend
from onnxq.backends.tensorrt import TensorRTBackend
from onnxq.graph.targets import BUILTIN_PROFILES, TargetProfile
from onnxq.hookspecs import hookimpl
from onnxq.runtime.runner import Backend


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(OrtBackend)
    register(TensorRTBackend)


@hookimpl
def register_targets(register: Callable[[TargetProfile], None]) -> None:
    for profile in BUILTIN_PROFILES.values():
        register(profile)
