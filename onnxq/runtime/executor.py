"""Where independent pieces of work run: in this process (default) or as Ray tasks.

Two kinds of onnxq work split into independent pieces: the statistics pass, by calibration batches
(``onnxq.calib.sharded``: each shard's min/max and histogram counts merge exactly), and per-layer
work such as GPTQ's per-MatMul quantization. Both hand their pieces to the *current executor*
through one interface, :meth:`Executor.map`, which returns the results in order:

* :class:`SerialExecutor` (the default) runs them here, one after the other, as onnxq always did;
  ``SerialExecutor(shards=N)`` still runs here but splits sharded work into ``N`` pieces (what a
  cluster would get, with no cluster: the exact-merge path can be checked anywhere);
* :class:`RayExecutor` (``--executor ray[:ADDRESS]``, extra ``onnxq[ray]``) submits them as Ray
  tasks. Each large numpy argument is put into Ray's object store once per :meth:`map` call (an
  array passed to several tasks, such as a Hessian shared by the Q, K and V projections, travels
  once) and workers read it there without copying; results are copied out of the store, so that
  nothing the driver keeps pins an object there. A task whose worker dies is retried
  (``max_retries``); the pieces are pure functions of their arguments, so a retry gives the same
  result.

The current executor is process-wide (:func:`current`, :func:`using`): the command line sets it for
one run, library users wrap ``optimize`` in ``with using(RayExecutor()):``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from onnxq.errors import OptionError, first_line

T = TypeVar("T")

__all__ = ["Executor", "RayExecutor", "SerialExecutor", "current", "from_spec", "using"]

#: arrays at least this large go to Ray's object store once per map instead of with every task
SHARE_MIN_BYTES = 1 << 16


class Executor(Protocol):
    """Runs independent calls of one function; results come back in argument order."""

    #: how many pieces sharded work (the statistics pass) should be split into; 1: do not split
    shards: int

    def map(self, fn: Callable[..., T], calls: Sequence[tuple[Any, ...]]) -> list[T]:
        """``[fn(*args) for args in calls]``, possibly in parallel elsewhere."""
        ...

    def share(self, value: Any) -> Any:
        """A handle on ``value`` to pass (as a whole argument) to several calls without copying it per call."""
        ...


class SerialExecutor:
    """Runs every call in this process, in order (the default). ``shards`` > 1 splits sharded work anyway."""

    def __init__(self, shards: int = 1) -> None:
        if shards < 1:
            raise OptionError("an executor needs at least one shard")
        self.shards = shards

    def map(self, fn: Callable[..., T], calls: Sequence[tuple[Any, ...]]) -> list[T]:
        return [fn(*args) for args in calls]

    def share(self, value: Any) -> Any:
        return value

    def __repr__(self) -> str:
        return f"SerialExecutor(shards={self.shards})"


class RayExecutor:
    """Runs calls as Ray tasks on a local or remote cluster.

    ``address``: None starts (or joins, from inside a cluster job) a local Ray instance; ``"auto"``
    or ``"ray://host:10001"`` joins a running cluster (``ray.init(address=...)``). ``shards``
    defaults to the cluster's CPU count. ``max_retries``: how often a task whose worker process died
    is run again. Ray itself is imported here only: without it the error names the extra.
    """

    def __init__(self, address: str | None = None, *, shards: int | None = None, max_retries: int = 3,
                 init_options: dict[str, Any] | None = None) -> None:
        ray = _import_ray()
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, **(init_options or {}))
            except Exception as exc:  # no cluster at that address, a version mismatch...: the user's setting
                first = first_line(exc)
                raise OptionError(f"cannot start or join Ray{f' at {address}' if address else ''}: {first}") from None
        self._ray = ray
        self.address = address
        self.max_retries = max_retries
        self.shards = shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote: dict[Callable[..., Any], Any] = {}

    def _task(self, fn: Callable[..., Any]):
        task = self._remote.get(fn)
        if task is None:
            task = self._remote[fn] = self._ray.remote(max_retries=self.max_retries, retry_exceptions=False)(fn)
        return task

    def map(self, fn: Callable[..., T], calls: Sequence[tuple[Any, ...]]) -> list[T]:
        task = self._task(fn)
        refs: dict[int, Any] = {}  # id(array) -> its object ref, so a shared array is put once

        def share(value: Any) -> Any:
            if isinstance(value, np.ndarray) and value.nbytes >= SHARE_MIN_BYTES:
                ref = refs.get(id(value))
                if ref is None:
                    ref = refs[id(value)] = self._ray.put(np.ascontiguousarray(value))
                return ref
            return value

        # top-level object refs are resolved by Ray before the task runs (zero-copy for arrays)
        futures = [task.remote(*[share(a) for a in args]) for args in calls]
        # a result's arrays come back as read-only views of its object in the store, and any one of
        # them kept (GPTQ keeps each layer's block scales) pins the whole object (its integers and
        # dequantized weight too): on the 2.2 GB model the store grew past 4 GB. Copied out one at a
        # time, results are the driver's own and the store frees each object when its ref goes.
        return [copy.deepcopy(self._ray.get(future)) for future in futures]

    def share(self, value: Any) -> Any:
        """Put ``value`` into the object store once; pass the result (top level) to several :meth:`map` calls."""
        return self._ray.put(value)

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, shards={self.shards})"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise OptionError("--executor ray needs Ray: pip install 'onnxq[ray]'") from None
    return ray


def from_spec(spec: str) -> Executor:
    """The executor a ``--executor`` value names: ``local`` (default), ``local:N`` (N shards, in this
    process), ``ray`` (a local Ray instance) or ``ray:ADDRESS`` (a running cluster: ``auto``,
    ``ray://head:10001``, ``host:6379``)."""
    kind, _, arg = spec.strip().partition(":")
    if kind == "local":
        try:
            return SerialExecutor(int(arg) if arg else 1)
        except ValueError:
            raise OptionError(f"--executor local:N needs a number of shards, not '{arg}'") from None
    if kind == "ray":
        return RayExecutor(arg or None)
    raise OptionError(f"unknown executor '{spec}' (use local, local:N, ray or ray:ADDRESS)")


_current: Executor = SerialExecutor()


def current() -> Executor:
    """The executor onnxq's parallel steps use now (a :class:`SerialExecutor` unless set)."""
    return _current


@contextlib.contextmanager
def using(executor: Executor) -> Iterator[Executor]:
    """Make ``executor`` the current one inside the ``with`` block (restored after, also on errors)."""
    global _current
    before, _current = _current, executor
    try:
        yield executor
    finally:
        _current = before


def split(items: Iterable[T], shards: int) -> list[list[T]]:
    """``items`` dealt round-robin into at most ``shards`` non-empty lists (order kept inside each)."""
    out: list[list[T]] = [[] for _ in range(max(1, shards))]
    for i, item in enumerate(items):
        out[i % len(out)].append(item)
    return [part for part in out if part]
