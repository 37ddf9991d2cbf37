"""Task losses: how much a quantized model's outputs differ from the FP32 model's, in task terms.

Search methods (``detptq``) score candidate quantization parameters by a task loss computed on
the model's *outputs* — label-free: the FP32 model's own outputs on the calibration data are the
targets (pseudo-labels). A task loss is a :class:`TaskLoss` subclass registered through the
``register_task_losses`` hook, exactly like methods::

    from onnxq.hookspecs import hookimpl
    from onnxq.tasks import TaskLoss

    class MaxAbs(TaskLoss):
        name = "max-abs"
        summary = "largest absolute output difference"

        def loss(self, outputs, targets):
            return max(float(abs(outputs[n] - targets[n]).max()) for n in self.outputs)

    @hookimpl
    def register_task_losses(register):
        register(MaxAbs)

The user picks the task and names the graph outputs it reads (``-o task detection -o outputs
heatmap,boxes``); task options travel as one string (``-o task_options "score_threshold=0.2"``).
A task declares the *roles* of its outputs (``roles = ("scores", "boxes")``); :meth:`TaskLoss.bind`
maps output names onto them and rejects a name that is not a graph output with an
:class:`~onnxq.errors.OptionError` listing the valid ones.

Why a package of its own (``onnxq.tasks``) rather than a module under ``onnxq.calib``: task losses
are a plugin registry on par with methods and readers, and the built-ins carry evaluation helpers
(detection decoding, box F1) that benchmarks and tests use without any calibration machinery.
This module imports only numpy and onnxq's option/error modules, so the host can import it cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from onnxq.errors import OptionError
from onnxq.options import NoOptions, parse_options


class TaskLoss:
    """Base class of task losses. Override :meth:`loss` (and :meth:`prepare` to precompute targets).

    ``outputs`` are the graph outputs the task reads, in the order of :attr:`roles`; they are
    set by :meth:`bind`. Losses are >= 0 and 0 when the outputs equal the FP32 outputs.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: what each named output is, in order (e.g. ("scores", "boxes")); empty: any number of outputs
    roles: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()
        self.outputs: list[str] = []

    def bind(self, graph_outputs: Sequence[str], names: Sequence[str] = ()) -> list[str]:
        """Choose the outputs this task reads: ``names`` (validated) or, if empty, the graph's outputs."""
        graph_outputs = list(graph_outputs)
        names = [n for n in names if n]
        for n in names:
            if n not in graph_outputs:
                raise OptionError(f"task '{self.name}': '{n}' is not an output of the model (outputs: {', '.join(graph_outputs)})")
        if not names:
            names = graph_outputs if not self.roles or len(graph_outputs) == len(self.roles) else []
            if not names:
                # with fewer outputs than roles there is nothing to name: the model is of another task
                fix = (f"name them with -o outputs {','.join(self.roles)}" if len(graph_outputs) > len(self.roles) else
                       "if the model is not of this task, choose its own with -o task (e.g. classification)")
                raise OptionError(
                    f"task '{self.name}' reads {len(self.roles)} output(s) ({', '.join(self.roles)}) but the model has "
                    f"{len(graph_outputs)} ({', '.join(graph_outputs)}); {fix}"
                )
        if self.roles and len(names) != len(self.roles):
            raise OptionError(f"task '{self.name}' reads {len(self.roles)} output(s) ({', '.join(self.roles)}), got {len(names)}: {', '.join(names)}")
        self.outputs = list(names)
        return self.outputs

    def role(self, outputs: Mapping[str, np.ndarray], role: str) -> np.ndarray:
        """The array playing ``role`` among ``outputs`` (after :meth:`bind`)."""
        return np.asarray(outputs[self.outputs[self.roles.index(role)]])

    def prepare(self, reference: Mapping[str, np.ndarray]) -> Any:
        """Targets derived once from the FP32 outputs (pseudo-labels); by default the outputs themselves."""
        return {n: np.asarray(reference[n]) for n in self.outputs}

    def loss(self, outputs: Mapping[str, np.ndarray], targets: Any) -> float:
        """The task loss of ``outputs`` (the quantized model's) against ``targets`` from :meth:`prepare`."""
        raise NotImplementedError

    def terms(self, outputs: Mapping[str, np.ndarray], targets: Any) -> dict[str, float]:
        """The loss split into named terms, for reports (default: just the total)."""
        return {"loss": float(self.loss(outputs, targets))}


def make_task(cls: type[TaskLoss], options: str | Mapping[str, Any] | None, graph_outputs: Sequence[str], names: Sequence[str] = ()) -> TaskLoss:
    """Instantiate a task loss with validated options (``"k=v,k2=v2"`` or a mapping) and bind its outputs."""
    opts = parse_task_options(options) if isinstance(options, str) or options is None else dict(options)
    task = cls(parse_options(cls.Options, opts, f"task '{cls.name}'"))
    task.bind(graph_outputs, names)
    return task


def parse_task_options(text: str | None) -> dict[str, str]:
    """``"a=1,b=x"`` (or ``;``-separated, for values that hold commas) -> {"a": "1", "b": "x"}."""
    out: dict[str, str] = {}
    if not text:
        return out
    sep = ";" if ";" in text else ","
    for part in text.split(sep):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise OptionError(f"task options must be key=value pairs separated by ',' or ';', got '{part}'")
        out[key.strip()] = value.strip()
    return out


# -- small numeric helpers shared by the built-in tasks ------------------------------------------
EPS = 1e-6


def bernoulli_kl(target: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """Element-wise KL(Bern(target) || Bern(prob)) = BCE(prob, target) − H(target); 0 where equal."""
    t = np.clip(np.asarray(target, np.float64), EPS, 1 - EPS)
    p = np.clip(np.asarray(prob, np.float64), EPS, 1 - EPS)
    return np.maximum(t * np.log(t / p) + (1 - t) * np.log((1 - t) / (1 - p)), 0.0)


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * x))
