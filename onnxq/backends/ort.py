"""ONNX Runtime as a backend: a CPU session per model behind the :class:`~onnxq.runtime.runner.Runner` protocol.

Sessions, latency timing and the integer-kernel check are the runtime layer's
(:mod:`onnxq.runtime.ort`); this module only puts them behind the protocol that
``onnxq compare`` and ``optimize --eval-data`` drive.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from onnxq.graph import model_io
from onnxq.runtime import ort as ort_session
from onnxq.runtime.runner import Backend, ModelLike, Runner


class OrtRunner(Runner):
    """One model in a CPU ``InferenceSession`` with full graph optimizations.

    Latency is the median of ``latency_repeats`` runs of a fresh session per intra-op thread count
    in ``threads`` (labels ``"1t"``, ``"4t"``, ...).
    """

    def __init__(self, model: ModelLike, name: str, threads: Sequence[int] = (1,), latency_repeats: int = 30) -> None:
        super().__init__(name)
        self.model = model
        self.threads = tuple(threads)
        self.latency_repeats = latency_repeats
        self._session: Any = None
        self._names: list[str] = []

    def activate_impl(self) -> None:
        self._session = ort_session.make_session(self.model, "all")
        self._names = ort_session.tensor_outputs(self._session)

    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: np.asarray(r) for n, r in zip(self._names, ort_session.run(self._session, dict(feeds), self._names))}

    def deactivate_impl(self) -> None:
        self._session = None

    @property
    def output_names(self) -> list[str]:
        return list(self._names)

    @property
    def size_bytes(self) -> int | None:
        if isinstance(self.model, onnx.ModelProto):
            return self.model.ByteSize()
        return model_io.model_size_bytes(os.fspath(self.model))

    def latency_ms(self, feeds: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {f"{t}t": ort_session.latency_ms(self.model, dict(feeds), threads=t, repeats=self.latency_repeats) for t in self.threads}

    def kernel_report(self) -> dict[str, Any] | None:
        return ort_session.integer_kernel_report(self.model)


class OrtBackend(Backend):
    """ONNX Runtime's CPU execution provider."""

    name = "ort"
    summary = "ONNX Runtime, CPU execution provider (latency per intra-op thread count)"
    targets = ("ort", "ort-s8")

    def __init__(self, threads: Sequence[int] = (1,), latency_repeats: int = 30) -> None:
        super().__init__(threads)
        self.latency_repeats = latency_repeats

    def runner(self, model: ModelLike, name: str, reference: bool = False) -> OrtRunner:
        return OrtRunner(model, name, self.threads, self.latency_repeats)
