"""The quantized model as a function of its qparams: one ONNX Runtime session for every evaluation.

plugins_contrib/onnxq-lapq/README.md: "keep scales as graph inputs to avoid rebuilding sessions". Every
activation site gets ``Clip(lo, hi) → QuantizeLinear(scale, zero_point) → DequantizeLinear`` with
all four as graph *inputs* (:class:`onnxq.search.tail.ProbedQDQ`, as detptq's tails have; the Clip realises narrowed grids such as A4 in an 8-bit container and
is a no-op otherwise), and every quantized weight slot reads a graph input fed with the weight
fake-quantized in numpy by the same :class:`~onnxq.qparams.QParams` arithmetic the QDQ rewrite
uses. Where the target adds biases in int32 (``int32_bias``: ONNX Runtime), each such layer's bias is a graph
input too, fed rounded to its step ``s_x · s_w`` for the qparams being tried. So each evaluation computes what the
deployed QDQ graph computes (run with graph optimizations disabled, docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnxq.runtime import ort as ort_backend
from onnxq.graph import edit
from onnxq.graph.bias_range import Int32Bias, bias_step, int32_bias_layers, quantize_bias
from onnxq.graph.plan import QuantPlan
from onnxq.qparams import QParams
from onnxq.search.tail import ProbedQDQ


class LossModel:
    """Runs the model with given activation/weight qparams and returns the loss of its first output."""

    def __init__(self, model: onnx.ModelProto, plan: QuantPlan, feeds: list[dict[str, np.ndarray]], labels: np.ndarray | None, loss: str,
                 int32_bias: bool = False) -> None:
        self.plan = plan
        self.feeds = feeds
        m = onnx.ModelProto()
        m.CopyFrom(model)
        g = m.graph
        nodes = {n.name: n for n in g.node}
        fresh = edit.Namer.of(m)
        self.act_inputs: dict[str, ProbedQDQ] = {}
        chains: list[onnx.NodeProto] = []
        for t, site in plan.activations.items():
            if site.qparams is None:
                continue
            probe = self.act_inputs[t] = ProbedQDQ.build(t, site.qparams.dtype, fresh, f"lapq/{t}/")
            g.input.extend(probe.inputs)
            chains += probe.nodes
            for node_name, i in site.consumers:
                nodes[node_name].input[i] = probe.output
        self.weight_inputs: dict[str, str] = {}
        inits = {t.name: t for t in g.initializer}
        for key, site in plan.weights.items():
            if site.qparams is None:
                continue
            name = fresh(f"lapq/{key}/w")
            self.weight_inputs[key] = name
            dims = list(inits[site.initializer].dims)
            g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
            nodes[site.node].input[site.input_index] = name
        # biases the target adds in int32: rounded to the step of the qparams tried (profile.int32_bias)
        self.bias_inputs: dict[str, tuple[Int32Bias, np.ndarray]] = {}
        for layer in int32_bias_layers(model, plan) if int32_bias else []:
            name = fresh(f"lapq/{layer.node}/bias")
            self.bias_inputs[name] = (layer, np.asarray(onnx.numpy_helper.to_array(inits[layer.bias]), np.float32))
            g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(inits[layer.bias].dims)))
            nodes[layer.node].input[2] = name
        # each Q/DQ chain right after the producer of its tensor; the float weights, now graph inputs, go
        edit.insert_after_producers(g, chains)
        runnable = edit.cleanup(m, sort=False, keep_nodes=True)
        self.session = ort_backend.make_session(runnable, "disable")
        self.out_name = runnable.graph.output[0].name
        self.weights = {key: np.asarray(onnx.numpy_helper.to_array(inits[s.initializer]), np.float32) for key, s in plan.weights.items() if key in self.weight_inputs}
        self._wcache: dict[str, tuple[bytes, np.ndarray]] = {}
        self.reference = self._fp_output(model)
        self.labels = labels
        self.loss_kind = _resolve_loss(loss, self.reference, labels)
        self.evaluations = 0

    def _fp_output(self, model: onnx.ModelProto) -> np.ndarray:
        sess = ort_backend.make_session(model, "disable")
        return np.concatenate([np.asarray(sess.run([model.graph.output[0].name], f)[0], np.float64) for f in self.feeds])

    def output(self, acts: Mapping[str, QParams], weights: Mapping[str, QParams]) -> np.ndarray:
        feeds: dict[str, np.ndarray] = {}
        for t, probe in self.act_inputs.items():
            feeds.update(probe.feeds(acts[t]))
        for key, name in self.weight_inputs.items():
            q = weights[key]
            tag = q.scale.tobytes() + bytes([q.qmin & 0xFF, q.qmax & 0xFF])
            hit = self._wcache.get(key)
            if hit is None or hit[0] != tag:
                hit = (tag, q.fake_quantize(self.weights[key]))
                self._wcache[key] = hit
            feeds[name] = hit[1]
        for name, (layer, bias) in self.bias_inputs.items():
            step = bias_step(acts[layer.activation].scale, weights[layer.weight].scale)
            feeds[name] = (quantize_bias(bias, step) * step).astype(np.float32)
        self.evaluations += 1
        return np.concatenate([np.asarray(self.session.run([self.out_name], {**chunk, **feeds})[0], np.float64) for chunk in self.feeds])

    def loss(self, acts: Mapping[str, QParams], weights: Mapping[str, QParams]) -> float:
        return task_loss(self.loss_kind, self.output(acts, weights), self.reference, self.labels)


def _resolve_loss(kind: str, reference: np.ndarray, labels: np.ndarray | None) -> str:
    classes = reference.ndim == 2 and reference.shape[1] > 1
    if kind == "auto":
        if labels is not None and classes and len(labels) == len(reference) and labels.min() >= 0 and labels.max() < reference.shape[1]:
            return "ce"
        return "kl" if classes else "mse"
    if kind == "ce" and (labels is None or not classes):
        from onnxq.errors import DataError

        raise DataError("lapq: loss 'ce' needs labels in the calibration data (a 'label' key) and a [N, classes] output")
    if kind == "kl" and not classes:
        from onnxq.errors import OptionError

        raise OptionError("lapq: loss 'kl' needs a [N, classes] output; use mse")
    return kind


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def task_loss(kind: str, out: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> float:
    """Cross-entropy with labels, KL(FP ‖ quantized) of the softmax outputs, or MSE to the FP output."""
    if not np.all(np.isfinite(out)):
        return float("inf")
    if kind == "ce":
        return float(-_log_softmax(out)[np.arange(len(out)), labels.astype(np.int64)].mean())  # type: ignore[union-attr]
    if kind == "kl":
        lp, lq = _log_softmax(reference), _log_softmax(out)
        return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())
    return float(np.mean((out - reference) ** 2))
