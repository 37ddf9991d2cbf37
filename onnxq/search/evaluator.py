"""The evaluator search methods get from the host (the "refine" stage of docs/architecture.md).

* :class:`GraphRunner` executes a model in topological order on a fixed set of calibration
  samples, with the plan's *current* fake quantization applied where the deployed graph will have
  Q/DQ. Each request runs the stretch of nodes up to the requested tensor as one ONNX Runtime
  session (the fake quantization as float ops inside it, its parameters fed per run), computes
  each node at most once per pass and frees tensors once their consumers have run, so a
  layer-by-layer search in topological order costs about one forward pass per pass, and memory
  stays at one activation working set (not one per layer).
* :class:`LayerRunner` runs one weighted layer (Conv/ConvTranspose/Gemm/MatMul plus a following
  Relu/Clip/LeakyRelu) many times: weight and input are session *inputs*, so one ONNX Runtime
  session serves every candidate, and candidate weights are stacked along the output channels so
  a whole grid of per-channel candidates costs a single run.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxq.runtime import ort as ort_backend
from onnxq.runtime.ort import feedable
from onnxq.runtime.heap import cap_heap_retention
from onnxq.errors import OnnxqError
from onnxq.graph.edit import Namer, onnx_dtype, outer_scope_reads
from onnxq.graph.plan import Layer, QuantPlan
from onnxq.graph.index import GraphIndex
from onnxq.graph.model_io import tensor_array
from onnxq.graph.prepare import non_tensor_values
from onnxq.calib.feeds import batch_axes
from onnxq.calib.readers import sample_count


class GraphRunner:
    """Node-by-node execution of ``model`` on ``chunks`` (a list of feed dicts).

    With ``plan`` set, activation sites are fake-quantized for their listed consumers and weight
    sites are fake-quantized, each with the qparams the plan holds *when the consuming node runs*.
    Tensors named in ``keep`` are never released (e.g. graph outputs that later nodes also read),
    so :meth:`value` returns them after the runner has moved past their last reader.
    ``threads``: intra-op threads of the sessions it builds (None: ONNX Runtime's default).
    """

    def __init__(self, model: onnx.ModelProto, chunks: Sequence[dict[str, np.ndarray]], plan: QuantPlan | None = None,
                 sessions: dict[str, object] | None = None, keep: Sequence[str] = (), threads: int | None = None) -> None:
        cap_heap_retention()  # one session per node: keep their freed buffers out of the heap (calib/heap.py)
        self.model = model
        self.idx = GraphIndex(model)
        self.plan = plan
        self.threads = threads
        # a node that makes only a sequence or map (ZipMap) that no node reads has no array to carry between segments;
        # what a search reads is tensors
        skipped = set(non_tensor_values(model)) - {i for n in model.graph.node for i in n.input}
        self.nodes = [n for n in model.graph.node if not (n.output and all(o in skipped for o in n.output if o))]
        # what each node reads: its inputs and, for If/Loop/Scan, what its bodies read from the graph around them (such a
        # node runs alone in a session whose inputs those are; its body stays float, as the quantized model has it)
        self._reads = {n.name: [i for i in n.input if i] + (sorted(outer_scope_reads(n)) if _has_body(n) else []) for n in self.nodes}
        self.position = {n.name: i for i, n in enumerate(self.nodes)}
        self._opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.next = 0
        self.values: dict[str, list[np.ndarray]] = {}
        self.remaining: dict[str, int] = defaultdict(int)
        for n in self.nodes:
            for i in self._reads[n.name]:
                self.remaining[i] += 1
        self._keep = tuple(sorted(set(keep)))
        for name in self._keep:  # one read that never comes
            self.remaining[name] += 1
        for name in self.idx.graph_inputs:
            self.values[name] = [np.asarray(c[name]) for c in chunks]
        #: the graph's declared batch axes, and each chunk's sample count (:meth:`_sample_axis`)
        self._axes = batch_axes(model)
        self._chunk_samples = [sample_count({k: np.asarray(c[k]) for k in self.idx.graph_inputs if k in c}, self._axes) for c in chunks]
        self.consts = {t.name: tensor_array(t) for t in model.graph.initializer}  # weights on disk stay memory-mapped
        self._const_nodes: set[str] = set()
        for n in self.nodes:  # Constant nodes with a tensor value: constants from the start
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
                self._const_nodes.add(n.name)
        self.total_uses = dict(self.remaining)
        #: names of the tensors only segments have (fake-quantization steps and parameters, weight
        #: feeds): one per runner, none a name of the model
        self._fresh = Namer.of(model)
        self._aux: dict[str, str] = {}
        self._wq_cache: dict[str, tuple] = {}
        #: sessions (per node, or per stretch of nodes and fake-quantization layout), shareable
        #: between runners of the same model
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
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts, axis=self._sample_axis(tensor, parts))

    def _sample_axis(self, tensor: str, parts: Sequence[np.ndarray]) -> int:
        """The axis along which ``tensor``'s chunks hold their samples: the one whose size is each chunk's sample count
        (the declared batch axis of a graph output first, then axis 0). A recurrent net's time-major [T, N, H] tensors
        were joined on axis 0: chunks of 7 and 3 samples failed ("all the input array dimensions except for the
        concatenation axis must match"), chunks of one size would have interleaved time steps."""
        ndim = {np.ndim(p) for p in parts}
        if len(ndim) != 1:
            return 0
        fits = [k for k in range(ndim.pop()) if all(np.shape(p)[k] == n for p, n in zip(parts, self._chunk_samples))]
        declared = self._axes.get(tensor)
        return declared if declared in fits else (0 if 0 in fits or not fits else fits[0])

    def run_all(self) -> None:
        """Execute every remaining node (afterwards :meth:`value` serves the graph outputs and ``keep``)."""
        self._advance_to(len(self.nodes) - 1)

    def run_to(self, position: int) -> None:
        """Execute every node up to and including ``self.nodes[position]`` (no-op if already done).

        Afterwards ``values`` holds every tensor a later node still reads (a search's frontier).
        """
        self._advance_to(position)

    # -- execution -------------------------------------------------------------------
    def _advance_to(self, last: int) -> None:
        """Run nodes ``next..last``: as one ONNX Runtime session per stretch (fake quantization
        inside it), node by node only where the graph form of the fake quantization does not apply."""
        while self.next <= last:
            end = self.next
            if not self._in_segment(self.nodes[end]):
                self._run_node(self.nodes[end])
            else:
                while end < last and self._in_segment(self.nodes[end + 1]):
                    end += 1
                self._run_segment(self.next, end)
            self.next = end + 1

    def _active_acts(self, node: onnx.NodeProto) -> dict[int, str]:
        """Input index -> activation site whose fake quantization applies to it right now."""
        out = {}
        if self.plan is None:
            return out
        for i, name in enumerate(node.input):
            t = self.act_consumers.get((node.name, i))
            if t is not None and self.plan.activations[t].qparams is not None:
                out[i] = t
        return out

    def _in_segment(self, node: onnx.NodeProto) -> bool:
        """Whether ``node`` can run inside a segment: its fake-quantized inputs have per-tensor
        float qparams (the graph form of :meth:`_build_segment`) and the opset has Round (11)."""
        if node.name in self._const_nodes:
            return True  # folded into ``consts`` up front; a segment skips it
        if self._opset < 11 or _has_body(node):
            return False
        for i, t in self._active_acts(node).items():
            q = self.plan.activations[t].qparams  # type: ignore[union-attr]
            if q.scale.size != 1 or q.block_size or q.quant_scale is not None or self.idx.types.get(node.input[i], 1) != onnx.TensorProto.FLOAT:
                return False
        return True

    def _weight_value(self, w: str, v: np.ndarray) -> np.ndarray:
        """Fake-quantized weight, computed once per (qparams, weight array) pair."""
        q = self.plan.weights[w].qparams  # type: ignore[union-attr]
        hit = self._wq_cache.get(w)
        if hit is not None and hit[0] is q and hit[1] is v:
            return hit[2]
        fq = q.fake_quantize(v).astype(v.dtype, copy=False)  # a float16 model's weights stay float16: its ops take nothing else
        self._wq_cache[w] = (q, v, fq)
        return fq

    def _run_segment(self, first: int, last: int) -> None:
        nodes = [n for n in self.nodes[first : last + 1] if n.name not in self._const_nodes]
        if not nodes:  # only Constant nodes, already in ``consts``
            return
        acts = {n.name: self._active_acts(n) for n in nodes}
        weights = {}
        if self.plan is not None:
            for n in nodes:
                for i, name in enumerate(n.input):
                    w = self.weight_consumers.get((n.name, i))
                    if w is not None and name in self.consts and self.plan.weights[w].qparams is not None:
                        weights[(n.name, i)] = w
        key = (first, last, tuple(sorted((k, tuple(sorted(v.items()))) for k, v in acts.items() if v)), tuple(sorted(weights.items())))
        if self._keep:  # kept tensors are outputs of the segment that computes them: another layout
            key += (self._keep,)
        seg = self.sessions.get(key)
        if seg is None:
            seg = self.sessions[key] = self._build_segment(nodes, acts, weights)
        sess, external, wfeeds, sites, outputs = seg
        n_chunks = max((len(v) for v in self.values.values()), default=1)
        fixed = {}
        for feed_name, (w, src) in wfeeds.items():
            fixed[feed_name] = self._weight_value(w, self.consts[src])
        for t, (s, z, lo, hi) in sites.items():
            q = self.plan.activations[t].qparams  # type: ignore[union-attr]
            fixed[s] = q.scale.reshape(()).astype(np.float32)
            fixed[z] = q.zero_point.reshape(()).astype(np.float32)
            fixed[lo] = np.array(q.qmin, np.float32)
            fixed[hi] = np.array(q.qmax, np.float32)
        outs: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
        for c in range(n_chunks):
            feeds = dict(fixed)
            for name in external:
                feeds[name] = self.consts[name] if name in self.consts else self.values[name][c]
            for o, r in zip(outputs, ort_backend.run(sess, feeds, outputs)):
                outs[o].append(np.asarray(r))
        self.values.update(outs)
        self._release(nodes)

    def _release(self, nodes: Sequence[onnx.NodeProto]) -> None:
        """Count the reads of ``nodes`` done; drop values no later node reads."""
        for n in nodes:
            for name in self._reads[n.name]:
                if name not in self.consts:
                    self.remaining[name] -= 1
                    if self.remaining[name] <= 0:
                        self.values.pop(name, None)

    def _aux_name(self, base: str, key: str) -> str:
        """The segment-only tensor ``base::key``, under a name unused by the model (the same one for
        every segment of this runner)."""
        wanted = f"{base}::{key}"
        name = self._aux.get(wanted)
        if name is None:
            name = self._aux[wanted] = self._fresh(wanted)
        return name

    def _build_segment(self, nodes: list[onnx.NodeProto], acts: dict[str, dict[int, str]], weights: dict[tuple[str, int], str]):
        """One session for ``nodes``: every value and constant they read is an input (so later
        changes to ``consts`` apply), quantized weights are fed fake-quantized, and activation fake
        quantization is the float graph ``(clip(round(x/s) + z, lo, hi) - z)·s`` with s, z, lo, hi
        fed per run: the arithmetic of :meth:`QParams.fake_quantize`, in float32."""
        produced = {o for n in nodes for o in n.output if o}
        uses: dict[str, int] = defaultdict(int)
        for n in nodes:
            for name in n.input:
                if name:
                    uses[name] += 1
        external: list[str] = []
        embedded: dict[str, np.ndarray] = {}  # constants ONNX Runtime cannot take as feeds (int4, float8): never changed
        wfeeds: dict[str, tuple[str, str]] = {}
        #: activation site -> its fed parameters (scale, zero point, lo, hi)
        sites: dict[str, tuple[str, str, str, str]] = {}
        body: list[onnx.NodeProto] = []
        for n in nodes:
            clone = onnx.NodeProto()
            clone.CopyFrom(n)
            for i, name in enumerate(n.input):
                if not name:
                    continue
                if (n.name, i) in weights:
                    feed = self._aux_name(name, "wq")
                    wfeeds[feed] = (weights[(n.name, i)], name)
                    clone.input[i] = feed
                    continue
                if name in self.consts and not feedable(self.consts[name]):
                    embedded.setdefault(name, self.consts[name])
                elif name not in produced and name not in external:
                    external.append(name)
                t = acts[n.name].get(i)
                if t is not None:
                    if t not in sites:  # the chain goes right before its first reader (topological order)
                        sc, zp, lo, hi = sites[t] = tuple(self._aux_name(t, k) for k in ("s", "z", "lo", "hi"))  # type: ignore[assignment]
                        d, r, a, m, c, b, fq = (self._aux_name(t, k) for k in ("d", "r", "a", "m", "c", "b", "fq"))
                        body += [helper.make_node("Div", [name, sc], [d]), helper.make_node("Round", [d], [r]),
                                 helper.make_node("Add", [r, zp], [a]), helper.make_node("Max", [a, lo], [m]),
                                 helper.make_node("Min", [m, hi], [c]), helper.make_node("Sub", [c, zp], [b]),
                                 helper.make_node("Mul", [b, sc], [fq])]
                    clone.input[i] = self._aux_name(t, "fq")
            body.append(clone)
        outputs = [o for n in nodes for o in n.output if o and (self.total_uses.get(o, 0) == 0 or self.total_uses[o] > uses.get(o, 0))]
        sample = {name: (self.consts[name] if name in self.consts else self.values[name][0]) for name in external}
        inputs = [helper.make_tensor_value_info(k, onnx_dtype(v.dtype), None) for k, v in sample.items()]
        inputs += [helper.make_tensor_value_info(f, onnx_dtype(self.consts[src].dtype), None) for f, (_, src) in wfeeds.items()]
        for params in sites.values():
            inputs += [helper.make_tensor_value_info(f, onnx.TensorProto.FLOAT, []) for f in params]
        m = self._small_model(body, "segment", inputs, outputs, embedded)
        return segment_session(m, self.threads), external, wfeeds, sites, outputs

    def _small_model(self, nodes: list[onnx.NodeProto], name: str, inputs: list[onnx.ValueInfoProto], outputs: list[str],
                     constants: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
        """A model of ``nodes`` (the source model's opsets and IR version) whose outputs carry the
        element types :func:`_output_types` finds; ONNX Runtime infers the others (a contrib op's: ONNX's shape inference
        does not know EmbedLayerNormalization, whose mask index is int32, and a float guess failed the session)."""
        g = helper.make_graph(nodes, name, inputs, [onnx.ValueInfoProto(name=o) for o in outputs],
                              [onnx.numpy_helper.from_array(v, k) for k, v in (constants or {}).items()])
        m = helper.make_model(g, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        known = _output_types(m, self.idx.types)
        for vi in m.graph.output:
            if known.get(vi.name):
                vi.type.tensor_type.elem_type = known[vi.name]
        return m

    def _input_value(self, node: onnx.NodeProto, i: int, name: str, chunk: int) -> np.ndarray:
        if name in self.consts:
            v = self.consts[name]
            w = self.weight_consumers.get((node.name, i))
            if w is not None and self.plan is not None and self.plan.weights[w].qparams is not None:
                return self.plan.weights[w].qparams.fake_quantize(v).astype(v.dtype, copy=False)  # type: ignore[union-attr]
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
            inputs = [helper.make_tensor_value_info(k, onnx_dtype(v.dtype), None) for k, v in feeds.items() if feedable(v)]
            m = self._small_model([node], node.name, inputs, [o for o in node.output if o], {k: v for k, v in feeds.items() if not feedable(v)})
            sess = ort_backend.make_session(m, "disable", threads=self.threads, arena="shared")
            self.sessions[node.name] = sess
        return sess

    def _run_node(self, node: onnx.NodeProto) -> None:
        n_chunks = max((len(v) for v in self.values.values()), default=1)
        outs: dict[str, list[np.ndarray]] = {o: [] for o in node.output if o}
        for c in range(n_chunks):
            feeds = {}
            for i, name in enumerate(node.input):
                if name:
                    feeds[name] = self._input_value(node, i, name, c)
            for name in self._reads[node.name][len([i for i in node.input if i]):]:  # a body's reads from outside it
                feeds[name] = self.consts[name] if name in self.consts else self.values[name][c]
            sess = self._session(node, feeds)
            res = ort_backend.run(sess, {k: v for k, v in feeds.items() if feedable(v)})
            for o, r in zip([o for o in node.output if o], res):
                outs[o].append(np.asarray(r))
        self.values.update(outs)
        self._release([node])


#: most segment sessions :func:`segment_session` keeps
SEGMENT_SESSIONS = 512
_segments: OrderedDict[tuple[bytes, int | None], object] = OrderedDict()
_segments_lock = threading.Lock()
_segment_counts = {"hits": 0, "builds": 0}


def segment_session(model: onnx.ModelProto, threads: int | None = None):
    """An ONNX Runtime session for a runner's segment model, shared by every runner that builds the same one.

    A segment reads every value and constant as an input, so its model is the graph's structure and fake-quantization
    layout alone: runners of one graph with other weights or qparams (each ``pad-correction`` candidate of ``-p auto``,
    each recalibration on a subset) build byte-identical segments. Building the sessions was over half of a pad-correction
    pass on PP-OCR rec (1.7 of 3.1 s, 76 segments). Kept least recently used first, at most :data:`SEGMENT_SESSIONS`."""
    key = (hashlib.sha1(model.SerializeToString(deterministic=True)).digest(), threads)
    with _segments_lock:
        sess = _segments.get(key)
        if sess is not None:
            _segments.move_to_end(key)
            _segment_counts["hits"] += 1
            return sess
    sess = ort_backend.make_session(model, "disable", threads=threads, arena="shared")
    with _segments_lock:
        _segments[key] = sess
        _segment_counts["builds"] += 1
        while len(_segments) > SEGMENT_SESSIONS:
            _segments.popitem(last=False)
    return sess


def segment_cache_info() -> dict[str, int]:
    """How many segment sessions were built and how many were found already built (since the process started)."""
    with _segments_lock:
        return {**_segment_counts, "kept": len(_segments)}


@dataclass
class Windows:
    """Output windows of a 2-D convolution: per sample ``top``/``left`` corners ([N, per]) of
    ``shape`` windows, and the layer without padding (``runner``) that computes exactly them
    from the cut-out input patches."""

    runner: LayerRunner
    top: np.ndarray
    left: np.ndarray
    shape: tuple[int, int]
    strides: list[int]
    extent: list[int]
    pads: list[int]

    @property
    def per_sample(self) -> int:
        return self.top.shape[1]

    def _cut(self, y: np.ndarray, h: int, w: int, sh: int, sw: int) -> np.ndarray:
        n, per = self.top.shape
        out = np.empty((n * per, y.shape[1], h, w), y.dtype)
        for i in range(n):  # sample-major: rows i*per .. i*per+per-1 are sample i's windows
            for j in range(per):
                t, l = self.top[i, j] * sh, self.left[i, j] * sw
                out[i * per + j] = y[i, :, t : t + h, l : l + w]
        return out

    def input(self, x: np.ndarray) -> np.ndarray:
        """[N·per, C, h', w'] input patches (zero padding applied first), window halo included."""
        p = self.pads
        xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3]))) if any(p) else x
        (h, w), (sh, sw) = self.shape, self.strides
        return self._cut(xp, (h - 1) * sh + self.extent[0], (w - 1) * sw + self.extent[1], sh, sw)

    def output(self, y: np.ndarray) -> np.ndarray:
        """[N·per, C, h, w]: the same windows cut from a whole output."""
        return self._cut(y, *self.shape, 1, 1)


def _has_body(node: onnx.NodeProto) -> bool:
    """If, Loop, Scan: a node with subgraph attributes."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _output_types(m: onnx.ModelProto, model_types: dict[str, int]) -> dict[str, int]:
    """Element types of ``m``'s tensors: the whole model's inferred types, completed by inferring
    ``m`` alone (an unknown or custom op leaves the model's types)."""
    known = dict(model_types)
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
    except Exception:
        return known
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.type.tensor_type.elem_type and vi.name not in known:
            known[vi.name] = vi.type.tensor_type.elem_type
    return known


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
    """Evaluate one weighted layer (and its objective activation) for many candidates.

    ``threads``: intra-op threads of its session (None: ONNX Runtime's default).
    """

    def __init__(self, model: onnx.ModelProto, layer: Layer, idx: GraphIndex | None = None, threads: int | None = None) -> None:
        self.idx = idx or GraphIndex(model)
        self.threads = threads
        self.layer = layer
        self.node = self.idx.nodes[layer.node]
        consts = {t.name: tensor_array(t) for t in model.graph.initializer}
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
        self._unpadded: LayerRunner | None = None

    @property
    def stackable(self) -> bool:
        """Candidates can be stacked along output channels (not for grouped ConvTranspose)."""
        return not (self.op == "ConvTranspose" and self.group != 1)

    @property
    def samples_first(self) -> bool:
        """The input's samples are its axis 0, along which candidate inputs are stacked (not a Gemm with ``transA``)."""
        return not (self.op == "Gemm" and any(a.name == "transA" and a.i for a in self.node.attribute))

    def windows(self, x_shape: Sequence[int], max_positions: int, seed: int, side: int = 8, min_map: int = 256) -> Windows | None:
        """Random output windows standing in for a 2-D convolution's whole output, or None.

        None when the output has at most ``max_positions`` positions over all samples or at most
        ``min_map`` per sample, or the layer is not a 2-D ``Conv``. Otherwise each sample gets the
        same number of ``side×side`` windows (fewer rows or columns where the map is smaller) at
        random places, together about ``max_positions`` positions.
        """
        if self.op != "Conv" or len(x_shape) != 4 or max_positions <= 0:
            return None
        a = {at.name: helper.get_attribute_value(at) for at in self.node.attribute}
        k = list(a.get("kernel_shape") or [])
        if len(k) != 2:
            return None
        s, d = list(a.get("strides") or [1, 1]), list(a.get("dilations") or [1, 1])
        n, size = x_shape[0], x_shape[2:]
        ext = [(k[i] - 1) * d[i] + 1 for i in range(2)]
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out = [-(-size[i] // s[i]) for i in range(2)]
            total = [max((out[i] - 1) * s[i] + ext[i] - size[i], 0) for i in range(2)]
            small = [t // 2 for t in total]
            begin = small if auto == "SAME_UPPER" else [t - b for t, b in zip(total, small)]
            pads = begin + [t - b for t, b in zip(total, begin)]
        else:
            pads = list(a.get("pads") or [0, 0, 0, 0]) if auto != "VALID" else [0, 0, 0, 0]
            out = [(size[i] + pads[i] + pads[i + 2] - ext[i]) // s[i] + 1 for i in range(2)]
        hc, wc = min(side, out[0]), min(side, out[1])
        per = -(-max_positions // (n * hc * wc))
        if n * out[0] * out[1] <= max_positions or out[0] * out[1] <= min_map or per * hc * wc >= out[0] * out[1]:
            return None
        rng = np.random.default_rng(seed)
        top, left = rng.integers(0, out[0] - hc + 1, (n, per)), rng.integers(0, out[1] - wc + 1, (n, per))
        if self._unpadded is None:
            node = onnx.NodeProto()
            node.CopyFrom(self.node)
            del node.attribute[:]
            node.attribute.extend(at for at in self.node.attribute if at.name not in ("pads", "auto_pad"))
            self._unpadded = copy.copy(self)
            self._unpadded.node, self._unpadded._sess = node, None
        return Windows(self._unpadded, top, left, (hc, wc), s, ext, pads)

    def _session(self, x: np.ndarray, w: np.ndarray, with_bias: bool):
        if self._sess is None:
            ins = ["X", "W"] + (["B"] if with_bias else [])
            attrs = {a.name: helper.get_attribute_value(a) for a in self.node.attribute}
            node = helper.make_node(self.op, ins, ["Y"], **attrs)
            inputs = [helper.make_tensor_value_info("X", onnx_dtype(x.dtype), None), helper.make_tensor_value_info("W", onnx_dtype(w.dtype), None)]
            if with_bias:
                inputs.append(helper.make_tensor_value_info("B", onnx.TensorProto.FLOAT, None))
            g = helper.make_graph([node], "layer", inputs, [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)])
            m = helper.make_model(g, opset_imports=self.opsets, ir_version=self.ir_version)
            self._sess = ort_backend.make_session(m, "basic", threads=self.threads, arena="shared")
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
