"""Cross-layer equalization of conv activations, as an exact float rewrite.

A per-tensor activation step is set by the tensor's widest channel. When the channels of one
tensor differ a lot in range — typically a ``BatchNormalization`` left in the graph whose
channels have very different variances, feeding a depthwise conv (PP-OCRv4's recognizer: one
channel spans ±11, others 0.07 in standard deviation) — the narrow channels get a few levels
and their quantization noise, amplified by their own large filter, dominates the next layer.

For a tensor ``T`` with channel axis 1 read only by a conv ``C`` with constant weights, and
produced by an op whose output channels can absorb a positive factor, the rewrite

    T'_c = k_c · T_c,     C's weights reading channel c divided by k_c,     C(T') = C(T)

is exact (convolution is linear per input channel and zero padding stays zero). The factor is
folded into the producer: ``BatchNormalization`` (γ and β times ``k``) or a ``Conv`` with
constant weights (its output-channel rows and bias times ``k``), optionally through
positively homogeneous ops between them (``Relu``, ``LeakyRelu``, ``MaxPool``, ``AveragePool``:
f(k·x) = k·f(x) per channel for k > 0). No op is added at run time.

Choice of ``k`` from the per-channel max-abs ``a_c`` measured on calibration data:

* depthwise consumer (one weight row per input channel, quantized per output channel anyway):
  ``k_c = max(a) / a_c`` — every channel spans the full range, at no cost to the weights;
* ordinary conv consumer (``group = 1``), whose weight columns then shrink by ``k_c``:
  SmoothQuant's balance ``k_c ∝ (w_c / a_c)^α`` with ``w_c = max_o |W[o, c]|`` and α = 0.5,
  normalised so that the widest channel keeps its range.

``k`` is clamped to ``[1/max_scale, max_scale]`` and rounded down to a power of two, which makes
the rewrite exact in floating point as well (every product is the same); dead channels
(``a_c = 0``) keep ``k = 1``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxq.graph.index import GraphIndex, node_attr
from onnxq.graph.model_io import new_initializer, tensor_array
from onnxq.graph.smoothing import channel_absmax_model

__all__ = ["EqualizeSite", "find_equalize_sites", "channel_absmax", "equalize_scales", "apply_equalization"]

#: ops between the producer and the tensor that commute with a positive per-channel factor: the activations, and the
#: pooling of a VGG-style or audio CNN (Conv, Relu, MaxPool, Conv: max and mean of k·x are k times those of x; with
#: power-of-two factors exactly)
HOMOGENEOUS_OPS = ("Relu", "LeakyRelu", "MaxPool", "AveragePool")


@dataclass
class EqualizeSite:
    """One conv input tensor whose channels can be rescaled into its producer and its conv."""

    tensor: str
    consumer: str  # the Conv node reading ``tensor``
    producer: str  # BatchNormalization or Conv node that absorbs the factor
    through: list[str]  # homogeneous activation nodes between producer and tensor
    depthwise: bool
    channels: int
    scale: np.ndarray | None = field(default=None, repr=False)


def _const_initializer(idx: GraphIndex, name: str) -> np.ndarray | None:
    """The value of a float initializer (only initializers can be rewritten in place)."""
    if name not in idx.initializers:
        return None
    v = tensor_array(idx.initializers[name])
    return v if v.dtype.kind == "f" else None


def _consumer_kind(idx: GraphIndex, node: onnx.NodeProto) -> tuple[bool, int] | None:
    """(depthwise, input channels) for a Conv whose weights can absorb ``1/k`` per input channel."""
    if node.op_type != "Conv" or len(node.input) < 2:
        return None
    w = _const_initializer(idx, node.input[1])
    if w is None or w.ndim < 3:
        return None
    group = int(node_attr(node, "group", 1))
    cin = w.shape[1] * group
    if node_attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        return None  # SAME_* pads with zeros as well, but keep the rule set small and obvious
    if group == 1:
        return False, cin
    if w.shape[1] == 1 and w.shape[0] % group == 0:
        return True, cin
    return None


def _producer_ok(idx: GraphIndex, node: onnx.NodeProto, channels: int) -> bool:
    if node.op_type == "BatchNormalization":
        return (len(node.output) == 1 and all(_const_initializer(idx, n) is not None for n in node.input[1:3])
                and _const_initializer(idx, node.input[1]).shape == (channels,))  # type: ignore[union-attr]
    if node.op_type == "Conv":
        w = _const_initializer(idx, node.input[1]) if len(node.input) > 1 else None
        b_ok = len(node.input) < 3 or not node.input[2] or _const_initializer(idx, node.input[2]) is not None
        return w is not None and w.shape[0] == channels and b_ok
    return False


def _scaled_constants(producer: onnx.NodeProto, consumer: onnx.NodeProto) -> list[str]:
    """The initializers a site's factors rescale: the producer's weight and bias (a BatchNormalization's scale and
    bias), then the consumer's weight."""
    names = [producer.input[1], producer.input[2]] if producer.op_type == "BatchNormalization" else list(producer.input[1:3])
    return [n for n in names if n] + [consumer.input[1]]


def _shared_constants(idx: GraphIndex, producer: onnx.NodeProto, consumer: onnx.NodeProto) -> bool:
    """Whether another node reads one of the initializers the site would rescale (a module called twice): the factor
    would reach that node too. Such a site is not one (its report entry, with no change made, misled)."""
    return any(len(idx.consumers.get(n, [])) > 1 for n in _scaled_constants(producer, consumer))


def find_equalize_sites(model: onnx.ModelProto, exclude: Iterable[str] = ()) -> list[EqualizeSite]:
    """Conv input tensors whose channels can be equalized (see the module docstring).

    ``exclude`` holds node-name globs of consumer convs to leave alone. A tensor (and every
    tensor between it and its producer) must have exactly one consumer: a factor folded into the
    producer would otherwise reach other readers too.
    """
    idx = GraphIndex(model)
    exclude = tuple(exclude)
    sites: list[EqualizeSite] = []
    claimed: set[str] = set()  # producers already scaled for another site
    for node in model.graph.node:
        kind = _consumer_kind(idx, node)
        if kind is None or any(fnmatch.fnmatchcase(node.name, p) for p in exclude):
            continue
        depthwise, cin = kind
        t = node.input[0]
        if idx.sole_consumer(t) is not node:
            continue
        through: list[str] = []
        cur = idx.producer.get(t)
        while (cur is not None and cur.op_type in HOMOGENEOUS_OPS and len([o for o in cur.output if o]) == 1
               and idx.sole_consumer(cur.input[0]) is cur):  # a MaxPool's Indices output would see no factor
            through.append(cur.name)
            cur = idx.producer.get(cur.input[0])
        if cur is None or cur.name in claimed or not _producer_ok(idx, cur, cin) or _shared_constants(idx, cur, node):
            continue
        claimed.add(cur.name)
        sites.append(EqualizeSite(t, node.name, cur.name, through, depthwise, cin))
    return sites


def channel_absmax(model: onnx.ModelProto, tensors: list[str], batches: Iterable[dict[str, np.ndarray]],
                   session: Callable[[onnx.ModelProto], object]) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) max-abs of ``tensors`` over ``batches``, reduced inside the graph
    (:func:`onnxq.graph.smoothing.channel_absmax_model`)."""
    probe, outs = channel_absmax_model(model, tensors, channel_axis=1)
    sess = session(probe)
    names = {i.name for i in sess.get_inputs()}  # type: ignore[attr-defined]
    acc: dict[str, np.ndarray] = {}
    for feeds in batches:
        vals = sess.run(outs, {k: v for k, v in feeds.items() if k in names})  # type: ignore[attr-defined]
        for t, v in zip(tensors, vals):
            acc[t] = v if t not in acc else np.maximum(acc[t], v)
    return acc


def equalize_scales(site: EqualizeSite, amax: np.ndarray, consumer_weight: np.ndarray, alpha: float = 0.5,
                    max_scale: float = 1000.0) -> np.ndarray:
    """The per-channel factors ``k`` for one site (module docstring)."""
    a = np.asarray(amax, np.float64)
    live = a > 0
    k = np.ones_like(a)
    if not np.any(live):
        return k
    top = a[live].max()
    if site.depthwise:
        k[live] = top / a[live]
    else:
        w = np.abs(consumer_weight.astype(np.float64)).reshape(consumer_weight.shape[0], consumer_weight.shape[1], -1).max(axis=(0, 2))
        ok = live & (w > 0)
        k[ok] = (w[ok] / a[ok]) ** alpha
        if np.any(ok):
            k[ok] *= top / (a[ok] * k[ok]).max()  # the widest channel keeps its range
    k = np.clip(k, 1.0 / max_scale, max_scale)
    # powers of two: scaling by 2^e is exact in floating point, so the rewritten model computes
    # bit-identical products (a deep detector showed 2.6e-5 relative drift with arbitrary factors);
    # rounding down keeps every channel within (top/2, top]
    k = np.exp2(np.floor(np.log2(k)))
    over = float((a * k).max() / top) if top > 0 else 1.0
    if over > 1.0:
        k /= np.exp2(np.ceil(np.log2(over)))
    return k


def apply_equalization(model: onnx.ModelProto, sites: list[EqualizeSite]) -> onnx.ModelProto:
    """A copy of ``model`` with every site's ``scale`` folded into its producer and consumer."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    idx = GraphIndex(out)
    inits = idx.initializers

    def scale_init(name: str, factor: np.ndarray, axis: int) -> None:
        v = tensor_array(inits[name])
        shape = [1] * v.ndim
        shape[axis] = -1
        inits[name].CopyFrom(new_initializer(model, (v * factor.reshape(shape)).astype(v.dtype), name))

    for s in sites:
        if s.scale is None:
            continue
        k = np.asarray(s.scale, np.float64)
        prod, cons = idx.nodes[s.producer], idx.nodes[s.consumer]
        if _shared_constants(idx, prod, cons):
            raise ValueError(f"equalization site '{s.tensor}' rescales an initializer another node reads")  # find_equalize_sites excludes them
        names = _scaled_constants(prod, cons)
        for n in names[:-1]:
            scale_init(n, k, 0)
        w = tensor_array(inits[cons.input[1]])
        if s.depthwise:
            inits[cons.input[1]].CopyFrom(new_initializer(model, (w / np.repeat(k, w.shape[0] // len(k)).reshape(-1, *[1] * (w.ndim - 1))).astype(w.dtype), cons.input[1]))
        else:
            scale_init(cons.input[1], 1.0 / k, 1)
    return out


def iter_feeds(batches: Iterable[object], limit: int, max_batch: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Feed dicts of the first ``limit`` samples of a host batch stream, in runs of at most
    ``max_batch`` samples (None: as the stream batches them, for models with a fixed batch)."""
    seen = 0
    for b in batches:
        feeds = b.feeds  # type: ignore[attr-defined]
        n = next(iter(feeds.values())).shape[0]
        take = min(n, limit - seen)
        step = max_batch or take
        for start in range(0, take, step):
            yield {k: v[start : min(start + step, take)] for k, v in feeds.items()}
        seen += take
        if seen >= limit:
            return
