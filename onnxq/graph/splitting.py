"""Coarse & fine weight splitting of re-parameterized convolutions (docs/methods.md: CFWS).

A re-parameterized (RepVGG-style) 3×3 conv carries its folded 1×1 and identity branches on the
kernel centre, so the centre taps dwarf the other eight and set the per-channel step. The split
rewrites ``Conv(x, W, b)`` as ``Add(Conv3x3(x, W_fine), Conv1x1(x, W_coarse, b))``:

* ``W_coarse`` is the kernel centre rounded onto its own per-output-channel grid
  ``s_c[k] = max_j |W[k, j, 1, 1]| / qmax`` (an exact multiple of ``s_c``, so quantizing it with
  step ``s_c`` loses nothing);
* ``W_fine`` is ``W`` with its centre replaced by the rounding residual (``|R| ≤ s_c / 2``), so its
  step is set by the off-centre taps.

``W_coarse + W_fine = W``, so the rewrite is exact in float (to rounding). Everything here is
pure graph and numpy work; the ``cfws`` method (``onnxq/plugins/cfws.py``) decides when to use it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.graph import edit
from onnxq.graph.edit import Namer
from onnxq.graph.model_io import new_initializer, tensor_array
from onnxq.qparams import MIN_SCALE

__all__ = ["RepConvDecision", "SplitConv", "centre_ratio", "find_rep_convs", "split_convs", "split_kernel", "weight_mse"]


@dataclass(frozen=True)
class RepConvDecision:
    """Whether one Conv is split, and why (for the run report)."""

    node: str
    weight: str
    ratio: float
    split: bool
    reason: str
    #: the coarse branch can be a 1×1 conv (3×3 kernel, symmetric pads 1, dilation 1)
    pointwise_coarse: bool = False


@dataclass
class SplitConv:
    """One conv after the split: the nodes and initializers that replaced it."""

    node: str
    ratio: float
    fine_node: str
    coarse_node: str
    sum_node: str
    fine_weight: str
    coarse_weight: str
    #: the coarse part's step per output channel (``W_coarse`` is an exact multiple of it)
    coarse_scale: np.ndarray = field(repr=False)
    coarse_form: str = "1x1"


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def centre_ratio(weight: np.ndarray) -> float:
    """``max |centre tap| / max |off-centre tap|`` of a ``[Co, Ci, kh, kw]`` kernel (inf if no off-centre mass)."""
    w = np.abs(np.asarray(weight, np.float64))
    ch, cw = w.shape[2] // 2, w.shape[3] // 2
    centre = w[:, :, ch, cw].max() if w.size else 0.0
    off = w.copy()
    off[:, :, ch, cw] = 0.0
    m = off.max() if off.size else 0.0
    if m == 0.0:
        return float("inf") if centre > 0 else 0.0
    return float(centre / m)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _geometry_ok(node: onnx.NodeProto, shape: tuple[int, ...]) -> tuple[bool, str]:
    """3×3 kernel, dilation 1, explicit pads (1, 1, 1, 1): the 1×1 coarse form is exact."""
    a = _attrs(node)
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad not in ("NOTSET", ""):
        return False, f"auto_pad={auto_pad}"
    dil = tuple(a.get("dilations", (1, 1)))
    if dil != (1, 1):
        return False, f"dilations {list(dil)}"
    pads = tuple(a.get("pads", (0, 0, 0, 0)))
    if pads != (1, 1, 1, 1):
        return False, f"pads {list(pads)}"
    return True, ""


def find_rep_convs(model: onnx.ModelProto, tau: float = 1.5, include: Iterable[str] = (), exclude: Iterable[str] = (),
                   quantized: Iterable[str] | None = None) -> list[RepConvDecision]:
    """Decide, for every Conv with a constant float 4-D weight, whether it is split (docs/methods.md: CFWS).

    A conv is split when its kernel is 3×3 and either it matches an ``include`` glob (forced) or it
    has dilation 1, explicit pads (1, 1, 1, 1) and ``centre_ratio ≥ tau``. ``exclude`` globs win over
    everything; ``quantized`` (node names the plan quantizes) restricts the split to those nodes.
    """
    include, exclude = tuple(include), tuple(exclude)
    inits = {t.name: t for t in model.graph.initializer}
    allowed = None if quantized is None else set(quantized)
    out: list[RepConvDecision] = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = tensor_array(inits[node.input[1]])
        if w.dtype.kind != "f" or w.ndim != 4:
            continue
        forced = _matches(node.name, include)
        shape = tuple(w.shape)
        ratio = centre_ratio(w) if shape[2:] == (3, 3) else float("nan")
        geometry_ok, why = _geometry_ok(node, shape)

        def decide(split: bool, reason: str) -> RepConvDecision:
            return RepConvDecision(node.name, node.input[1], ratio, split, reason, split and shape[2:] == (3, 3) and geometry_ok)

        if _matches(node.name, exclude):
            out.append(decide(False, "excluded by the 'exclude' option"))
        elif allowed is not None and node.name not in allowed:
            out.append(decide(False, "left in float by the quantization plan"))
        elif shape[2:] != (3, 3):
            out.append(decide(False, f"kernel {shape[2]}x{shape[3]}, not 3x3"))
        elif forced:
            out.append(decide(True, "listed in the 'include' option" + ("" if geometry_ok else f" ({why}: coarse part kept as a 3x3 kernel)")))
        elif not geometry_ok:
            out.append(decide(False, f"{why} (a rep conv has pads 1 and dilation 1)"))
        elif ratio >= tau:
            out.append(decide(True, f"centre/off-centre ratio {ratio:.2f} >= tau {tau:g}"))
        else:
            out.append(decide(False, f"centre/off-centre ratio {ratio:.2f} < tau {tau:g}"))
    return out


def split_kernel(weight: np.ndarray, qmax: int = 127, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coarse & fine split of a ``[Co, Ci, 3, 3]`` kernel (docs/methods.md: CFWS).

    Returns ``(coarse_centre [Co, Ci], fine [Co, Ci, 3, 3], coarse_scale [Co])``, all float32, with
    ``coarse_centre == coarse_scale[:, None] * k`` for integers ``|k| ≤ qmax`` (computed as that
    float32 product, so a DequantizeLinear with this scale reproduces it bit for bit) and
    ``fine`` equal to ``weight`` except at the centre, where it holds the rounding residual.
    """
    w = np.asarray(weight, np.float32)
    ch, cw = w.shape[2] // 2, w.shape[3] // 2
    centre = w[:, :, ch, cw]
    co = w.shape[0]
    absmax = np.abs(centre).reshape(co, -1).max(axis=1) if per_channel else np.full(co, np.abs(centre).max(), np.float32)
    scale = np.maximum(absmax.astype(np.float64) / qmax, MIN_SCALE).astype(np.float32)
    k = np.clip(np.rint(centre / scale[:, None]), -qmax, qmax)
    coarse = (k.astype(np.float32) * scale[:, None]).astype(np.float32)
    fine = w.copy()
    fine[:, :, ch, cw] = centre - coarse
    return coarse, fine, scale


def split_convs(model: onnx.ModelProto, decisions: Iterable[RepConvDecision], qmax: int = 127,
                per_channel: bool = True) -> tuple[onnx.ModelProto, list[SplitConv]]:
    """Return a copy of ``model`` with every conv whose decision says ``split`` rewritten (§3.7).

    ``Conv(x, W, b) -> y`` becomes ``Conv(x, W_fine) -> y_fine`` (original attributes),
    ``Conv(x, W_coarse, b) -> y_coarse`` (1×1, pads 0, same strides and group; or a 3×3 kernel that
    is zero off-centre with the original attributes where the 1×1 form would not be exact) and
    ``Add(y_fine, y_coarse) -> y``. Unused original weights are dropped.
    """
    todo = {d.node: d for d in decisions if d.split}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not todo:
        return out, []
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    fresh = Namer.of(out).fresh

    new_nodes: list[onnx.NodeProto] = []
    splits: list[SplitConv] = []
    for node in g.node:
        d = todo.get(node.name)
        if d is None:
            new_nodes.append(node)
            continue
        w = tensor_array(inits[node.input[1]])
        coarse, fine, scale = split_kernel(w, qmax, per_channel)
        attrs = _attrs(node)
        y = node.output[0]
        wf = fresh(f"{node.input[1]}_cfws_fine")
        wc = fresh(f"{node.input[1]}_cfws_coarse")
        g.initializer.append(new_initializer(model, fine, wf))
        if d.pointwise_coarse:
            g.initializer.append(new_initializer(model, coarse[:, :, None, None], wc))
            coarse_attrs = {"kernel_shape": [1, 1], "pads": [0, 0, 0, 0], "strides": list(attrs.get("strides", (1, 1))),
                            "group": int(attrs.get("group", 1)), "dilations": [1, 1]}
            form = "1x1"
        else:
            full = np.zeros_like(w, dtype=np.float32)
            full[:, :, w.shape[2] // 2, w.shape[3] // 2] = coarse
            g.initializer.append(new_initializer(model, full, wc))
            coarse_attrs = dict(attrs)
            form = "3x3"
        y_fine, y_coarse = fresh(f"{y}_cfws_fine"), fresh(f"{y}_cfws_coarse")
        fine_name, coarse_name, sum_name = fresh(f"{node.name}/cfws_fine"), fresh(f"{node.name}/cfws_coarse"), fresh(f"{node.name}/cfws_sum")
        bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
        new_nodes.append(helper.make_node("Conv", [node.input[0], wf], [y_fine], name=fine_name, **attrs))
        new_nodes.append(helper.make_node("Conv", [node.input[0], wc, *bias], [y_coarse], name=coarse_name, **coarse_attrs))
        new_nodes.append(helper.make_node("Add", [y_fine, y_coarse], [y], name=sum_name))
        splits.append(SplitConv(node.name, d.ratio, fine_name, coarse_name, sum_name, wf, wc, scale, form))
    del g.node[:]
    g.node.extend(new_nodes)
    out = edit.cleanup(out, sort=False)  # the replaced weights go (and their graph.input listing, IR < 4 aside)
    return out, splits


def weight_mse(weight: np.ndarray, fake_quantized: np.ndarray) -> float:
    """Mean squared error between a float weight and its fake-quantized value."""
    return float(np.mean((np.asarray(weight, np.float64) - np.asarray(fake_quantized, np.float64)) ** 2))
