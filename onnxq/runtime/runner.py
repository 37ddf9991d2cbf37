"""The runner protocol: one model on one runtime, and the backends that make runners.

A :class:`Runner` has Polygraphy's lifecycle: ``activate()`` loads the model (a session, an
engine), ``infer(feeds)`` runs one batch, ``deactivate()`` frees it; ``with runner:`` does the
first and the last. Besides outputs it answers the two questions a comparison asks of a deployed
model: its size and its latency.

A :class:`Backend` is what a plugin registers (``register_backends``): a name, a one-line summary,
the target profiles whose models it runs, and :meth:`Backend.runner`. The classes live at the
bottom of onnxq so that the plugin host can check registrations without importing any backend.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx

from onnxq.errors import OnnxqError

#: what a runner is given: an in-memory model or the path of a model file
ModelLike = onnx.ModelProto | str | os.PathLike[str]


class Runner(ABC):
    """One model on one runtime. Subclasses implement the ``*_impl`` methods and the properties."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_active = False

    # -- lifecycle -------------------------------------------------------------------------
    def activate(self) -> None:
        """Load the model so that :meth:`infer` can run (idempotent errors: activating twice is a bug)."""
        if self.is_active:
            raise OnnxqError(f"runner '{self.name}' is already active")
        self.activate_impl()
        self.is_active = True

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; outputs by name, float outputs as float32 or wider."""
        if not self.is_active:
            raise OnnxqError(f"runner '{self.name}' must be activated before infer()")
        return self.infer_impl(feeds)

    def deactivate(self) -> None:
        """Free what :meth:`activate` loaded; a runner that is not active is left alone."""
        if self.is_active:
            self.is_active = False
            self.deactivate_impl()

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    @abstractmethod
    def activate_impl(self) -> None:
        """Load the model (build a session, deserialize an engine)."""

    @abstractmethod
    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch on the loaded model."""

    def deactivate_impl(self) -> None:
        """Release the loaded model (default: nothing to release)."""

    # -- what a comparison reads -----------------------------------------------------------
    @property
    @abstractmethod
    def output_names(self) -> list[str]:
        """Output names in the runtime's order (valid once active)."""

    @property
    @abstractmethod
    def size_bytes(self) -> int | None:
        """Size of the deployed artefact (model file and external data, engine), None if unknown."""

    @abstractmethod
    def latency_ms(self, feeds: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Median time of one inference on ``feeds`` per timed configuration, e.g. ``{"1t": 0.42}`` or ``{"gpu": 0.05}``."""

    def kernel_report(self) -> dict[str, Any] | None:
        """How many compute ops run on integer kernels, where the runtime can tell (None otherwise)."""
        return None

    def details(self) -> dict[str, Any]:
        """Extra facts for the report row (build time, engine bytes, ...); empty by default."""
        return {}


class Backend(ABC):
    """A runtime onnxq can evaluate models on, registered through the ``register_backends`` hook.

    ``threads`` are the intra-op thread counts CPU latency is timed with; a backend that times on
    a device ignores them. Subclasses may take more keyword settings.
    """

    #: the name ``onnxq compare --backend NAME`` selects
    name: ClassVar[str] = ""
    #: one line for listings
    summary: ClassVar[str] = ""
    #: names of the target profiles whose models this backend runs (``onnxq optimize --target``)
    targets: ClassVar[tuple[str, ...]] = ()

    def __init__(self, threads: Sequence[int] = (1,)) -> None:
        self.threads = tuple(threads)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run on this machine (a missing library, no GPU), or None."""
        return None

    @abstractmethod
    def runner(self, model: ModelLike, name: str, reference: bool = False) -> Runner:
        """A runner for ``model``, shown as ``name``; ``reference`` marks the FP32 model every row is measured against."""
