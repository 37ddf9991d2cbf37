"""The evaluator search methods get from the host (design.md §1 "refine").

* :class:`GraphRunner` executes a model node by node on a fixed set of calibration samples, with
  the plan's *current* fake quantization applied where the deployed graph will have Q/DQ. It
  computes each node at most once per pass and frees tensors once their consumers have run, so a
  layer-by-layer search in topological order costs about one forward pass per pass, and memory
  stays at one activation working set (not one per layer).
* :class:`LayerRunner` runs one weighted layer (Conv/ConvTranspose/Gemm/MatMul plus a following
  Relu/Clip/LeakyRelu) many times: weight and input are session *inputs*, so one ONNX Runtime
  session serves every candidate, and candidate weights are stacked along the output channels so
  a whole grid of per-channel candidates costs a single run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import helper

from onnxq.backends import ort as ort_backend
from onnxq.calib.heap import cap_heap_retention
from onnxq.errors import OnnxqError
from onnxq.graph.plan import Layer, QuantPlan
from onnxq.graph.placement import GraphIndex

_NP_TO_ONNX = {np.dtype(k): v for k, v in ((np.float32, 1), (np.uint8, 2), (np.int8, 3), (np.int32, 6), (np.int64, 7), (np.bool_, 9), (np.float16, 10), (np.float64, 11))}


def _elem(arr: np.ndarray) -> int:
    return _NP_TO_ONNX.get(arr.dtype, onnx.TensorProto.FLOAT)


class GraphRunner:
    """Node-by-node execution of ``model`` on ``chunks`` (a list of feed dicts).

    With ``plan`` set, activation sites are fake-quantized for their listed consumers and weight
    sites are fake-quantized, each with the qparams the plan holds *when the consuming node runs*.
    """

    def __init__(self, model: onnx.ModelProto, chunks: Sequence[dict[str, np.ndarray]], plan: QuantPlan | None = None,
                 sessions: dict[str, object] | None = None) -> None:
        cap_heap_retention()  # one session per node: keep their freed buffers out of the heap (calib/heap.py)
        self.model = model
        self.idx = GraphIndex(model)
        self.plan = plan
        self.nodes = list(model.graph.node)
        for n in self.nodes:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
                raise OnnxqError(f"node '{n.name}' ({n.op_type}) has a subgraph; layer-wise search does not support control flow")
        self.position = {n.name: i for i, n in enumerate(self.nodes)}
        self.next = 0
        self.values: dict[str, list[np.ndarray]] = {}
        self.remaining: dict[str, int] = defaultdict(int)
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.remaining[i] += 1
        for name in self.idx.graph_inputs:
            self.values[name] = [np.asarray(c[name]) for c in chunks]
        self.consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        #: one-node sessions, shareable between runners of the same model
        self.sessions: dict[str, object] = sessions if sessions is not None else {}
        self.act_consumers: dict[tuple[str, int], str] = {}
        self.weight_consumers: dict[tuple[str, int], str] = {}
        if plan is not None:
            for t, site in plan.activations.items():
                for c in site.consumers:
                    self.act_consumers[tuple(c)] = t  # type: ignore[index]
            for w, site in plan.weights.items():
                self.weight_consumers[(site.node, site.input_index)] = w

    # -- public ----------------------------------------------------------------------
    def value(self, tensor: str) -> np.ndarray:
        """The tensor's value over all samples (concatenated on axis 0), computing what is needed."""
        if tensor in self.consts:
            return self.consts[tensor]
        producer = self.idx.producer.get(tensor)
        if producer is not None:
            self._advance_to(self.position[producer.name])
        if tensor not in self.values:
            raise OnnxqError(f"tensor '{tensor}' was already released or never computed")
        parts = self.values[tensor]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def run_to(self, position: int) -> None:
        """Execute every node up to and including ``self.nodes[position]`` (no-op if already done).

        Afterwards ``values`` holds every tensor a later node still reads (a search's frontier).
        """
        self._advance_to(position)

    # -- execution -------------------------------------------------------------------
    def _advance_to(self, last: int) -> None:
        while self.next <= last:
            self._run_node(self.nodes[self.next])
            self.next += 1

    def _input_value(self, node: onnx.NodeProto, i: int, name: str, chunk: int) -> np.ndarray:
        if name in self.consts:
            v = self.consts[name]
            w = self.weight_consumers.get((node.name, i))
            if w is not None and self.plan is not None and self.plan.weights[w].qparams is not None:
                return self.plan.weights[w].qparams.fake_quantize(v)  # type: ignore[union-attr]
            return v
        v = self.values[name][chunk]
        t = self.act_consumers.get((node.name, i))
        if t is not None and self.plan is not None:
            q = self.plan.activations[t].qparams
            if q is not None:
                return q.fake_quantize(v)
        return v

    def _session(self, node: onnx.NodeProto, feeds: dict[str, np.ndarray]):
        sess = self.sessions.get(node.name)
        if sess is None:
            inputs = [helper.make_tensor_value_info(k, _elem(v), None) for k, v in feeds.items()]
            sub = helper.make_graph([node], node.name, inputs, [onnx.ValueInfoProto(name=o) for o in node.output if o])
            m = helper.make_model(sub, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
            known = self.idx.types  # types from the whole model's shape inference
            try:
                inferred = onnx.shape_inference.infer_shapes(m)
                known = {**{vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info if vi.type.tensor_type.elem_type},
                         **{o.name: o.type.tensor_type.elem_type for o in inferred.graph.output if o.type.tensor_type.elem_type}, **known}
            except Exception:  # unknown or custom op: fall back on the model's types
                pass
            del m.graph.output[:]
            for o in node.output:
                if o:
                    m.graph.output.append(helper.make_tensor_value_info(o, known.get(o) or onnx.TensorProto.FLOAT, None))
            sess = ort_backend.make_session(m, "disable", threads=None, arena=False)
            self.sessions[node.name] = sess
        return sess

    def _run_node(self, node: onnx.NodeProto) -> None:
        if node.op_type == "Constant":
            val = onnx.numpy_helper.to_array(node.attribute[0].t) if node.attribute and node.attribute[0].name == "value" else None
            if val is not None:
                self.consts[node.output[0]] = val
                return
        n_chunks = max((len(v) for v in self.values.values()), default=1)
        outs: dict[str, list[np.ndarray]] = {o: [] for o in node.output if o}
        for c in range(n_chunks):
            feeds = {}
            for i, name in enumerate(node.input):
                if name:
                    feeds[name] = self._input_value(node, i, name, c)
            sess = self._session(node, feeds)
            res = ort_backend.run(sess, feeds)
            for o, r in zip([o for o in node.output if o], res):
                outs[o].append(np.asarray(r))
        self.values.update(outs)
        for name in node.input:
            if name and name not in self.consts:
                self.remaining[name] -= 1
                if self.remaining[name] <= 0:
                    self.values.pop(name, None)


def _post_activation(node: onnx.NodeProto | None, consts: dict[str, np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    if node is None:
        return lambda y: y
    # in place: ``y`` is always a fresh ONNX Runtime output owned by the caller
    if node.op_type == "Relu":
        return lambda y: np.maximum(y, 0, out=y)
    if node.op_type == "LeakyRelu":
        alpha = next((a.f for a in node.attribute if a.name == "alpha"), 0.01)
        return lambda y: np.where(y >= 0, y, alpha * y)
    if node.op_type == "Clip":
        lo = float(consts[node.input[1]]) if len(node.input) > 1 and node.input[1] in consts else -np.inf
        hi = float(consts[node.input[2]]) if len(node.input) > 2 and node.input[2] in consts else np.inf
        for a in node.attribute:  # opset < 11
            if a.name == "min":
                lo = a.f
            if a.name == "max":
                hi = a.f
        return lambda y: np.clip(y, lo, hi, out=y)
    raise OnnxqError(f"unsupported post-activation {node.op_type}")


class LayerRunner:
    """Evaluate one weighted layer (and its objective activation) for many candidates."""

    def __init__(self, model: onnx.ModelProto, layer: Layer, idx: GraphIndex | None = None) -> None:
        self.idx = idx or GraphIndex(model)
        self.layer = layer
        self.node = self.idx.nodes[layer.node]
        consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        act = None
        if layer.objective != layer.output:
            act = self.idx.producer[layer.objective]
        self.post = _post_activation(act, consts)
        self.bias = consts.get(self.node.input[2]) if len(self.node.input) > 2 and self.node.input[2] else None
        self.op = self.node.op_type
        self.channel_axis = 1 if self.op in ("Conv", "ConvTranspose") else -1
        self.opsets = list(model.opset_import)
        self.ir_version = model.ir_version
        self.group = next((a.i for a in self.node.attribute if a.name == "group"), 1)
        self._sess = None

    @property
    def stackable(self) -> bool:
        """Candidates can be stacked along output channels (not for grouped ConvTranspose)."""
        return not (self.op == "ConvTranspose" and self.group != 1)

    def _session(self, x: np.ndarray, w: np.ndarray, with_bias: bool):
        if self._sess is None:
            ins = ["X", "W"] + (["B"] if with_bias else [])
            attrs = {a.name: helper.get_attribute_value(a) for a in self.node.attribute}
            node = helper.make_node(self.op, ins, ["Y"], **attrs)
            inputs = [helper.make_tensor_value_info("X", _elem(x), None), helper.make_tensor_value_info("W", _elem(w), None)]
            if with_bias:
                inputs.append(helper.make_tensor_value_info("B", onnx.TensorProto.FLOAT, None))
            g = helper.make_graph([node], "layer", inputs, [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)])
            m = helper.make_model(g, opset_imports=self.opsets, ir_version=self.ir_version)
            self._sess = ort_backend.make_session(m, "basic", arena=False)
        return self._sess

    def run(self, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None, post: bool = True) -> np.ndarray:
        """Objective tensor for input ``x`` and weight ``w`` (bias from the model unless given;
        ``post=False`` returns the layer's raw output, before its following activation)."""
        b = self.bias if bias is None else bias
        feeds = {"X": x, "W": w}
        if b is not None:
            feeds["B"] = b.astype(np.float32)
        y = ort_backend.run(self._session(x, w, b is not None), feeds)[0]
        return self.post(y) if post else y

    def run_linear(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The layer's output without bias and activation: linear in ``w``."""
        return self.run(x, w, np.zeros_like(self.bias) if self.bias is not None else None, post=False)

    def run_stacked_rows(self, x: np.ndarray, weights: np.ndarray, axis: int, linear: bool = False) -> np.ndarray:
        """Run K candidate weights at once: ``weights`` is [K, *w.shape]; returns [N, C, K, S]
        (S: positions per channel and sample).

        Candidate ``k`` of output channel ``c`` becomes output channel ``c·K + k`` (which also
        keeps grouped and depthwise convolutions' channel groups intact). For convolutions the
        result is a view of ONNX Runtime's output (no copy), so per-channel scores read contiguous
        rows. ``linear``: without bias and activation.
        """
        k = weights.shape[0]
        w = np.moveaxis(weights, 0, axis + 1)
        shape = list(weights.shape[1:])
        shape[axis] *= k
        w = np.ascontiguousarray(w.reshape(shape))
        b = None if self.bias is None else np.repeat(self.bias, k)
        y = self.run(x, w, None if b is None else np.zeros_like(b), post=False) if linear else self.run(x, w, b)
        n = y.shape[0]
        if self.channel_axis % y.ndim == 1:
            return y.reshape(n, y.shape[1] // k, k, -1)
        rows = y.reshape(n, -1, y.shape[-1] // k, k)  # [N, R, C, K]
        return np.ascontiguousarray(np.moveaxis(rows, 1, 3))
