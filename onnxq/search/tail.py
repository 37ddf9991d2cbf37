"""Run the *rest* of a graph, from a frontier of computed tensors, as one ONNX Runtime session.

Searches that score candidates by the model's outputs (``detptq``) evaluate every candidate of a
layer on the same prefix: :class:`~onnxq.search.evaluator.GraphRunner` computes the prefix once
(node by node, with the plan's fake quantization) and :class:`TailSession` runs the remaining
nodes for each candidate. The tail is one optimized ONNX Runtime session built once per layer:

* sites of the plan that already have qparams get ordinary Q/DQ (the QDQ transformer's own
  rewrite, Clip included for narrowed grids), the others stay float;
* the *probed* sites are parameters of the session: a probed activation gets
  ``Clip(lo, hi) → QuantizeLinear(scale, zero_point) → DequantizeLinear`` with all four values as
  graph inputs, a probed weight becomes a graph input fed with its fake-quantized value — so
  every candidate runs on the same session.

On large models this is one to two orders of magnitude faster than node-by-node execution (a
fused session instead of hundreds of single-node sessions and numpy fake quantization).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxq.runtime import ort as ort_backend
from onnxq.graph.edit import QDTYPE, Namer, insert_after_producers, onnx_dtype
from onnxq.graph.plan import QuantPlan
from onnxq.graph.prepare import tensor_types
from onnxq.graph.qdq import QuantizeActivation, QuantizeWeight, apply_commands
from onnxq.qparams import QParams


def _param(name: str) -> str:
    return name.replace("/", "_").replace(":", "_")


@dataclass(frozen=True)
class ProbedQDQ:
    """A parametric Q/DQ of one tensor: ``Clip(lo, hi) → QuantizeLinear(scale, zero_point) →
    DequantizeLinear`` whose four parameters are scalar graph inputs, so that one ONNX Runtime
    session evaluates the tensor on any per-tensor grid (the Clip realises grids narrower than
    their container, such as A4 in int8, and is a no-op otherwise).

    Add :attr:`inputs` to the graph's inputs, :attr:`nodes` after the tensor's producer
    (:func:`onnxq.graph.edit.insert_after_producers`), point the readers at :attr:`output`, and
    feed :meth:`feeds` of the qparams per run.
    """

    lo: str
    hi: str
    scale: str
    zero_point: str
    #: the dequantized tensor the readers take instead
    output: str
    inputs: tuple[onnx.ValueInfoProto, ...]
    nodes: tuple[onnx.NodeProto, ...]

    @classmethod
    def build(cls, tensor: str, zp_dtype: str, fresh: Namer, prefix: str) -> ProbedQDQ:
        """The chain for ``tensor`` with a ``zp_dtype`` ("int8", "uint8") zero point; every name is
        ``prefix`` plus its role, made unique by ``fresh``."""
        lo, hi, scale, zp = (fresh(prefix + k) for k in ("lo", "hi", "scale", "zp"))
        clipped, q, dq = (fresh(prefix + k) for k in ("clipped", "q", "dq"))
        inputs = tuple(helper.make_tensor_value_info(name, TensorProto.FLOAT, []) for name in (lo, hi, scale))
        inputs += (helper.make_tensor_value_info(zp, QDTYPE[zp_dtype], []),)
        nodes = (
            helper.make_node("Clip", [tensor, lo, hi], [clipped], name=fresh(prefix + "probe_clip")),
            helper.make_node("QuantizeLinear", [clipped, scale, zp], [q], name=fresh(prefix + "probe_q")),
            helper.make_node("DequantizeLinear", [q, scale, zp], [dq], name=fresh(prefix + "probe_dq")),
        )
        return cls(lo, hi, scale, zp, dq, inputs, nodes)

    def feeds(self, q: QParams) -> dict[str, np.ndarray]:
        """The four parameters of ``q`` (per-tensor) as this chain's inputs."""
        lo, hi = q.real_range()
        return {self.lo: np.asarray(lo, np.float32).reshape(()), self.hi: np.asarray(hi, np.float32).reshape(()),
                self.scale: np.asarray(q.scale, np.float32).reshape(()), self.zero_point: np.asarray(q.zero_point, q.np_dtype).reshape(())}


class TailSession:
    """``model.graph.node[start:]`` (only what ``outputs`` need) as one session.

    ``dtypes`` gives the element type of every tensor the tail may read from the prefix (e.g.
    ``{t: v.dtype for t, v in ...}``; float32 where missing). ``probe_weights``: weight-site
    keys fed per run; ``probe_activations``: activation tensor -> zero-point container ("int8"
    or "uint8") of the qparams fed per run.
    """

    def __init__(self, model: onnx.ModelProto, plan: QuantPlan, start: int, outputs: Sequence[str],
                 dtypes: Mapping[str, np.dtype] | None = None, probe_weights: Sequence[str] = (),
                 probe_activations: Mapping[str, str] | None = None,
                 optimization: ort_backend.Optimization = "all", threads: int | None = None) -> None:
        probe_activations = dict(probe_activations or {})
        nodes = list(model.graph.node)[start:]
        # keep only the nodes the outputs need
        needed = set(outputs)
        keep: list[onnx.NodeProto] = []
        for n in reversed(nodes):
            if any(o in needed for o in n.output):
                keep.append(n)
                needed.update(i for i in n.input if i)
        keep.reverse()
        produced = {o for n in keep for o in n.output if o}
        #: outputs the prefix already computed: returned from the frontier as they are
        self.passthrough = [o for o in outputs if o not in produced]
        computed = [o for o in outputs if o in produced]
        inits = {t.name: t for t in model.graph.initializer}
        reads = [i for n in keep for i in n.input if i]
        tail_names = {n.name for n in keep}
        probe_w = {plan.weights[w].initializer: w for w in probe_weights}
        fresh = Namer.of(model)
        read_set = set(reads)
        #: graph input of each probed weight read by the tail
        fq = {init: fresh(_param(init) + "__fq") for init in probe_w if init in read_set}
        self._inputs = list(dict.fromkeys(i for i in reads if i not in produced and i not in inits))
        #: tensors of the prefix that :meth:`run` needs in its ``frontier`` argument
        self.frontier = list(dict.fromkeys(self._inputs + self.passthrough))
        used_inits = [inits[i] for i in dict.fromkeys(reads) if i in inits and i not in probe_w]
        elem = tensor_types(model)
        for t, dt in (dtypes or {}).items():
            elem[t] = onnx_dtype(dt)
        graph_inputs = [helper.make_tensor_value_info(t, elem.get(t, TensorProto.FLOAT), None) for t in self._inputs]
        graph_inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in fq.values()]
        out_info = [helper.make_tensor_value_info(o, elem.get(o, TensorProto.FLOAT), None) for o in computed]
        sub = [onnx.NodeProto() for _ in keep]
        for s, n in zip(sub, keep):
            s.CopyFrom(n)
        for s in sub:
            for k, i in enumerate(s.input):
                if i in fq:
                    s.input[k] = fq[i]
        g = helper.make_graph(sub, "tail", graph_inputs, out_info, used_inits)
        tail = helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        # fixed Q/DQ of the plan's decided sites, for consumers inside the tail
        cmds: list = []
        for t, site in plan.activations.items():
            if site.qparams is None or t in probe_activations:
                continue
            cons = tuple(c for c in site.consumers if c[0] in tail_names)
            if cons:
                cmds.append(QuantizeActivation(t, site.qparams, cons, "tail"))
        by_init: dict[str, list] = {}
        for key, site in plan.weights.items():
            if site.qparams is None or site.initializer in probe_w or site.node not in tail_names:
                continue
            by_init.setdefault(site.initializer, [site.qparams, []])[1].append((site.node, site.input_index))
        for init, (q, cons) in by_init.items():
            cmds.append(QuantizeWeight(init, q, tuple(cons), "tail"))
        if cmds:
            tail = apply_commands(tail, cmds)
        # parametric Q/DQ of the probed activations
        self.act_inputs: dict[str, ProbedQDQ] = {}
        g = tail.graph
        fresh = Namer.of(tail)  # the Q/DQ commands added names of their own
        consumers = {(n.name, k): n for n in g.node for k in range(len(n.input))}
        new_nodes = []
        for t, zp_dtype in probe_activations.items():
            site = plan.activations[t]
            cons = [c for c in site.consumers if tuple(c) in consumers]
            if not cons:
                continue
            probe = self.act_inputs[t] = ProbedQDQ.build(t, zp_dtype, fresh, f"{_param(t)}__")
            g.input.extend(probe.inputs)
            new_nodes += probe.nodes
            for c in cons:
                consumers[tuple(c)].input[c[1]] = probe.output
        # each chain right after the producer of its tensor (at the front for a frontier tensor)
        insert_after_producers(g, new_nodes)
        self.weight_inputs = {probe_w[init]: name for init, name in fq.items()}
        self.outputs = list(outputs)
        self._computed = computed
        self.session = ort_backend.make_session(tail, optimization, threads) if computed else None

    def run(self, frontier: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray] | None = None,
            activations: Mapping[str, QParams] | None = None) -> dict[str, np.ndarray]:
        """Outputs for the given frontier values, probed weights (fake-quantized) and activation qparams."""
        out = {o: frontier[o] for o in self.passthrough}
        if self.session is None:
            return out
        feeds = {t: frontier[t] for t in self._inputs}
        for w, name in self.weight_inputs.items():
            feeds[name] = np.asarray(weights[w], np.float32)  # type: ignore[index]
        for t, probe in self.act_inputs.items():
            feeds.update(probe.feeds(activations[t]))  # type: ignore[index]
        out.update(zip(self._computed, ort_backend.run(self.session, feeds)))
        return out
