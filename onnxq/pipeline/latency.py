"""Per-layer latency on ONNX Runtime CPU: what leaving one weighted layer in float costs.

``-p auto`` chooses which layers to move to float by measured latency, not by FLOPs. Each
weighted layer (Conv/ConvTranspose/Gemm/MatMul with a constant weight) is cut out of the model
with its real input shape (one sample) and timed twice, as one-node models:

* float: the node as it is;
* integer: the node with the target's Q/DQ form around it (activation and weight
  quantize-dequantize, and a Q/DQ pair on its output, as the next quantized layer would put
  there), which ONNX Runtime fuses into its integer kernel (QLinearConv, QLinearMatMul,
  MatMulIntegerToFloat).

``float_ms - int_ms`` is the cost of leaving that layer float; it can be negative for small
layers, where the quantize/dequantize steps cost more than the integer kernel saves. Results are
cached per machine (CPU model, ONNX Runtime version, thread count) in a JSON file under the cache
folder, keyed by the layer's op, attributes and shapes, so a second run on the same machine
measures nothing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.graph.edit import onnx_dtype, with_outputs
from onnxq.graph.placement import weight_axis
from onnxq.graph.plan import Layer
from onnxq.graph.prepare import tensor_types
from onnxq.graph.qdq import QuantizeActivation, QuantizeWeight, apply_commands
from onnxq.graph.targets import TargetProfile
from onnxq.qparams import per_channel_absmax
from onnxq.runtime import ort as ort_backend

#: the targets whose runtime this table measures (ONNX Runtime's CPU execution provider); for other targets its figures
#: rank layers against each other but say nothing of which form the target runs faster
MEASURED_TARGETS = ("ort", "ort-s8")


@dataclass
class LayerLatency:
    """One layer's measured latency, float and integer, in milliseconds (batch of one sample, one thread)."""

    node: str
    op_type: str
    float_ms: float
    int_ms: float

    @property
    def float_cost_ms(self) -> float:
        """What leaving the layer float adds to the model's latency (negative: float is faster)."""
        return self.float_ms - self.int_ms


def machine_key(threads: int = 1) -> str:
    """A short identifier of this machine for the latency cache: CPU model, core count, ONNX Runtime version, threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import onnxruntime

    text = f"{cpu}|{os.cpu_count()}|ort {onnxruntime.__version__}|threads {threads}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _layer_key(node: onnx.NodeProto, shapes: Sequence[Sequence[int]], profile: TargetProfile) -> str:
    attrs = sorted((a.name, helper.get_attribute_value(a)) for a in node.attribute)
    text = repr((node.op_type, [list(s) for s in shapes], [(k, v.decode() if isinstance(v, bytes) else v) for k, v in attrs],
                 profile.activation_signed))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def model_key(model: onnx.ModelProto, float_layers: Sequence[str], target: str, feeds: Mapping[str, np.ndarray]) -> str:
    """The cache key of a whole model's latency (:meth:`LatencyTable.model_times`): what it depends on, the graph's nodes
    and weight shapes, the layers left float, the target's Q/DQ form and the input shapes (not the scales, which
    calibration sets)."""
    nodes = [(n.op_type, list(n.input), list(n.output), [str(a).replace("\n", " ") for a in n.attribute]) for n in model.graph.node]
    weights = sorted((t.name, tuple(t.dims)) for t in model.graph.initializer)
    text = repr((target, sorted(float_layers), nodes, weights, sorted((k, np.shape(v)) for k, v in feeds.items())))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class LatencyTable:
    """Per-layer float and integer latency, measured once per machine and layer shape (JSON cache)."""

    def __init__(self, cache_dir: str | os.PathLike[str] | None, threads: int = 1, repeats: int = 15) -> None:
        self.threads = threads
        self.repeats = repeats
        self.machine = machine_key(threads)
        self.path = Path(cache_dir) / "latency" / f"{self.machine}.json" if cache_dir is not None else None
        self.entries: dict[str, dict[str, float]] = self._read()
        self.measured = 0

    def _read(self) -> dict[str, dict[str, float]]:
        """The table on disk ({} when there is none, or a damaged one: it is measured again)."""
        if self.path is None or not self.path.exists():
            return {}
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def model_times(self, key: str) -> tuple[float, float] | None:
        """Two whole-model times stored under ``key`` (:meth:`set_model_times`), or None."""
        e = self.entries.get(f"model:{key}")
        return (e["integer_ms"], e["faster_float_ms"]) if e else None

    def set_model_times(self, key: str, integer_ms: float, faster_float_ms: float) -> None:
        """Keep a whole model's time full integer and with its faster-float layers float (``-p auto``'s check) with the
        layers' own: a property of this machine and the graph, as they are."""
        self.entries[f"model:{key}"] = {"integer_ms": round(integer_ms, 5), "faster_float_ms": round(faster_float_ms, 5)}
        self.measured += 1

    def save(self) -> None:
        """Write the table atomically, merged with what other processes saved since it was read (no-op without a cache
        folder). Where both measured the same entry, the one saved first is kept: two runs side by side (a benchmark
        beside a test run) had each written its own table over the other's, and the next run measured again and could
        leave other layers float."""
        if self.path is None or not self.measured:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.entries = {**self.entries, **self._read()}
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.path)

    def measure(self, model: onnx.ModelProto, layers: Sequence[Layer], sample: Mapping[str, np.ndarray],
                profile: TargetProfile) -> dict[str, LayerLatency]:
        """The latency of each of ``layers`` of ``model`` (a float model), on the shapes of one sample ``sample``."""
        nodes = {n.name: n for n in model.graph.node}
        inits = {t.name: t for t in model.graph.initializer}
        layers = [lay for lay in layers if lay.node in nodes and lay.weight is not None and lay.weight in inits]
        values = _layer_inputs(model, layers, nodes, sample)
        out: dict[str, LayerLatency] = {}
        for lay in layers:
            node = nodes[lay.node]
            act = [i for i in node.input if i and i not in inits]
            if len(act) != 1 or act[0] not in values:
                continue
            x = values[act[0]]
            key = _layer_key(node, [x.shape, numpy_helper.to_array(inits[lay.weight]).shape], profile)
            if key not in self.entries:
                f_model, q_model = layer_models(node, act[0], x, inits, profile)
                feeds = {act[0]: x}
                self.entries[key] = {"float_ms": round(ort_backend.latency_ms(f_model, feeds, self.threads, self.repeats, 3), 5),
                                     "int_ms": round(ort_backend.latency_ms(q_model, feeds, self.threads, self.repeats, 3), 5),
                                     "op_type": node.op_type}
                self.measured += 1
            e = self.entries[key]
            out[lay.node] = LayerLatency(lay.node, node.op_type, e["float_ms"], e["int_ms"])
        return out


def _layer_inputs(model: onnx.ModelProto, layers: Sequence[Layer], nodes: Mapping[str, onnx.NodeProto],
                  sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The activation input of every layer on one sample (the float model run once with them exposed)."""
    inits = {t.name for t in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    wanted = sorted({i for lay in layers for i in nodes[lay.node].input if i and i not in inits})
    types = tensor_types(model)
    exposed = with_outputs(model, [(t, types.get(t, onnx.TensorProto.FLOAT)) for t in wanted if t not in graph_inputs])
    sess = ort_backend.make_session(exposed, "disable", arena=False)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, ort_backend.run(sess, dict(sample))))
    got.update({k: np.asarray(v) for k, v in sample.items() if k in wanted})
    return {k: v for k, v in got.items() if k in wanted and np.asarray(v).dtype.kind == "f"}


def layer_models(node: onnx.NodeProto, act: str, x: np.ndarray, inits: Mapping[str, onnx.TensorProto],
                 profile: TargetProfile) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """One-node float and Q/DQ models of ``node`` whose activation input ``act`` takes ``x``."""
    out_name = node.output[0]
    tail = helper.make_node("Identity", [out_name], ["layer_out"], name="layer_tail")
    consts = [inits[i] for i in node.input if i in inits]
    graph = helper.make_graph([node, tail], "layer", [helper.make_tensor_value_info(act, onnx_dtype(x.dtype), list(x.shape))],
                              [helper.make_tensor_value_info("layer_out", onnx.TensorProto.FLOAT, None)], consts)
    f_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    f_model.ir_version = 8
    sess = ort_backend.make_session(f_model, "disable", arena=False)
    y = ort_backend.run(sess, {act: x})[0]
    w_index = 1 if node.input[1] in inits else 0
    w = numpy_helper.to_array(inits[node.input[w_index]])
    axis = weight_axis(node, w_index, w.ndim)
    absmax = per_channel_absmax(w, axis) if axis is not None else np.array(np.abs(w).max())
    x_index = list(node.input).index(act)
    commands = [
        QuantizeActivation(act, profile.activation_qparams(min(float(x.min()), 0.0), max(float(x.max()), 1e-6)), ((node.name, x_index),)),
        QuantizeWeight(node.input[w_index], profile.weight_qparams(absmax, axis), ((node.name, w_index),)),
        QuantizeActivation(out_name, profile.activation_qparams(min(float(y.min()), 0.0), max(float(y.max()), 1e-6)), (("layer_tail", 0),)),
    ]
    return f_model, apply_commands(f_model, commands)
