"""``detection`` task loss, plus the numpy detection helpers it needs (decoding, GIoU, box F1).

Supported head layouts (the graph must expose the raw head outputs, cut before NMS):

* **dense**: scores ``[N, C, H, W]``, boxes ``[N, 4, H, W]`` on the same H×W grid (CenterNet,
  FCOS, YOLO-style single-level heads). ``box_format`` says what the 4 box channels are:
  ``centernet`` (dx, dy, w, h in cells: centre = (col + dx, row + dy)), ``ltrb`` (distances from
  the cell centre (col + 0.5, row + 0.5) in cells, FCOS), ``xyxy`` or ``cxcywh`` (absolute boxes).
  Cell units are multiplied by ``stride`` for reporting; losses and IoUs do not depend on it.
* **list**: scores ``[N, A, C]``, boxes ``[N, A, 4]`` (anchors/points already flattened, boxes
  already decoded as ``xyxy`` or ``cxcywh``).

ODOL (the loss; onnxq's variant, see docs/methods.md "DetPTQ")::

    y = FP32 class probabilities, q = quantized ones (sigmoid applied if the outputs are logits)
    D = the FP32 detections (decoded, score >= score_threshold): the pseudo-labels
    L_cls = Σ_a,c |y − q|^γ · KL(Bern(y) ‖ Bern(q)) / max(1, |D|)     (soft-target BCE, every location)
    L_reg = mean over d in D of (1 − GIoU(box_q at d's location, box_fp of d))   (matched boxes)
    ODOL  = cls_weight · L_cls + reg_weight · L_reg

The KL form of the soft-target BCE is 0 when the outputs match, so the loss of an unquantized
model is exactly 0; the classification term is normalised per pseudo-label object (CenterNet's
and RetinaNet's normalisation), not per location, so the many background cells do not dilute it.
GIoU on decoded boxes makes the box term independent of the box encoding and the image scale.
``reg_on=confidence`` instead weights every location's box by its FP32 confidence ``max_c y``
(docs/methods.md: DetPTQ). The focal exponent defaults to γ = 0: quantization changes scores
by small amounts, which γ = 2 all but ignores (measured on the shapes fixture, docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from onnxq.errors import OptionError
from onnxq.options import option
from onnxq.tasks import TaskLoss, bernoulli_kl, sigmoid

BoxFormat = Literal["centernet", "ltrb", "xyxy", "cxcywh"]


@dataclass
class Detections:
    """Detections of one image: ``boxes`` [K, 4] xyxy, ``scores`` [K], ``labels`` [K]."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


# -- boxes ------------------------------------------------------------------------------------
def dense_boxes(boxes: np.ndarray, box_format: BoxFormat, stride: float = 1.0) -> np.ndarray:
    """[N, 4, H, W] box channels -> [N, H, W, 4] xyxy boxes (cell units × ``stride`` for grid formats)."""
    b = np.moveaxis(np.asarray(boxes, np.float64), 1, -1)
    if box_format in ("xyxy", "cxcywh"):
        return _to_xyxy(b, box_format)
    h, w = b.shape[1:3]
    row, col = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    if box_format == "centernet":
        cx, cy = col + b[..., 0], row + b[..., 1]
        hw, hh = b[..., 2] / 2, b[..., 3] / 2
        out = np.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=-1)
    elif box_format == "ltrb":
        cx, cy = col + 0.5, row + 0.5
        out = np.stack([cx - b[..., 0], cy - b[..., 1], cx + b[..., 2], cy + b[..., 3]], axis=-1)
    else:
        raise OptionError(f"unknown box format '{box_format}' (centernet, ltrb, xyxy, cxcywh)")
    return out * stride


def _to_xyxy(b: np.ndarray, box_format: str) -> np.ndarray:
    if box_format == "xyxy":
        return b
    if box_format == "cxcywh":
        return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], axis=-1)
    raise OptionError(f"box format '{box_format}' needs a dense [N, 4, H, W] box output (list outputs take xyxy or cxcywh)")


def giou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Generalised IoU of paired xyxy boxes ``a[..., 4]`` and ``b[..., 4]`` (degenerate boxes allowed)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    ax0, ay0 = np.minimum(a[..., 0], a[..., 2]), np.minimum(a[..., 1], a[..., 3])
    ax1, ay1 = np.maximum(a[..., 0], a[..., 2]), np.maximum(a[..., 1], a[..., 3])
    bx0, by0 = np.minimum(b[..., 0], b[..., 2]), np.minimum(b[..., 1], b[..., 3])
    bx1, by1 = np.maximum(b[..., 0], b[..., 2]), np.maximum(b[..., 1], b[..., 3])
    inter = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None) * np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None)
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (np.maximum(ax1, bx1) - np.minimum(ax0, bx0)) * (np.maximum(ay1, by1) - np.minimum(ay0, by0))
    iou = inter / np.maximum(union, 1e-12)
    return iou - (hull - union) / np.maximum(hull, 1e-12)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of [K, 4] and [L, 4] xyxy boxes -> [K, L]."""
    a = np.asarray(a, np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(b, np.float64).reshape(-1, 4)[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


# -- decoding ----------------------------------------------------------------------------------
def _peaks(scores: np.ndarray, k: int) -> np.ndarray:
    """True where a [C, H, W] score equals the maximum of its k×k neighbourhood (CenterNet's NMS)."""
    r = k // 2
    c, h, w = scores.shape
    padded = np.full((c, h + 2 * r, w + 2 * r), -np.inf)
    padded[:, r : r + h, r : r + w] = scores
    best = scores.copy()
    for dy in range(k):
        for dx in range(k):
            best = np.maximum(best, padded[:, dy : dy + h, dx : dx + w])
    return scores >= best


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy NMS (highest score first)."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while len(order):
        i = order[0]
        keep.append(int(i))
        if len(order) == 1:
            break
        ious = box_iou(boxes[i : i + 1], boxes[order[1:]])[0]
        order = order[1:][ious < iou]
    return np.asarray(keep, np.int64)


def decode(scores: np.ndarray, boxes: np.ndarray, box_format: BoxFormat = "centernet", score_threshold: float = 0.3,
           stride: float = 1.0, suppression: Literal["peak", "nms", "none"] = "peak", nms_iou: float = 0.5,
           top_k: int = 100, logits: bool = False) -> list[Detections]:
    """Decode raw head outputs into per-image detections (see the module docstring for layouts).

    ``suppression``: ``peak`` keeps 3×3 local maxima of each class map (dense layout only),
    ``nms`` runs class-wise greedy NMS at ``nms_iou``, ``none`` keeps everything above the threshold.
    """
    s = np.asarray(scores, np.float64)
    s = sigmoid(s) if logits else s
    if s.ndim == 4:
        xyxy = dense_boxes(boxes, box_format, stride)  # [N, H, W, 4]
        n, c = s.shape[:2]
        keep_mask = np.stack([_peaks(s[i], 3) for i in range(n)]) if suppression == "peak" else np.ones(s.shape, bool)
        flat_scores = np.moveaxis(s, 1, -1).reshape(n, -1, c)  # [N, HW, C]
        flat_keep = np.moveaxis(keep_mask, 1, -1).reshape(n, -1, c)
        flat_boxes = xyxy.reshape(n, -1, 4)
    elif s.ndim == 3:
        if suppression == "peak":
            suppression = "nms"
        flat_scores = s
        flat_keep = np.ones(s.shape, bool)
        flat_boxes = _to_xyxy(np.asarray(boxes, np.float64), box_format)
    else:
        raise OptionError(f"detection scores must be [N, C, H, W] or [N, A, C], got shape {list(s.shape)}")
    out = []
    for i in range(len(flat_scores)):
        loc, cls = np.nonzero((flat_scores[i] >= score_threshold) & flat_keep[i])
        sc = flat_scores[i][loc, cls]
        bx = flat_boxes[i][loc]
        if suppression == "nms" and len(sc):
            kept = [idx for c in np.unique(cls) for idx in np.flatnonzero(cls == c)[nms(bx[cls == c], sc[cls == c], nms_iou)]]
            kept_arr = np.asarray(kept, np.int64)
            loc, cls, sc, bx = loc[kept_arr], cls[kept_arr], sc[kept_arr], bx[kept_arr]
        order = np.argsort(-sc, kind="stable")[:top_k]
        out.append(Detections(bx[order].astype(np.float32), sc[order].astype(np.float32), cls[order].astype(np.int64)))
    return out


# -- metrics -----------------------------------------------------------------------------------
def _as_pairs(items) -> list[tuple[np.ndarray, np.ndarray | None]]:
    out = []
    for it in items:
        if isinstance(it, Detections):
            out.append((it.boxes, it.labels))
        elif isinstance(it, tuple):
            out.append((np.asarray(it[0]).reshape(-1, 4), None if it[1] is None else np.asarray(it[1]).reshape(-1)))
        else:
            out.append((np.asarray(it).reshape(-1, 4), None))
    return out


def box_f1(pred, truth, iou: float = 0.5) -> float:
    """Micro-averaged F1 of greedy one-to-one matching (highest IoU first, IoU >= ``iou``).

    ``pred`` and ``truth`` are per-image lists of :class:`Detections`, ``(boxes, labels)`` pairs or
    plain box arrays; when both sides have labels only boxes of the same class match. 1.0 when
    both sides are empty.
    """
    pa, pb = _as_pairs(pred), _as_pairs(truth)
    if len(pa) != len(pb):
        raise ValueError(f"different numbers of images: {len(pa)} and {len(pb)}")
    matched = total = 0
    for (ba, la), (bb, lb) in zip(pa, pb):
        total += len(ba) + len(bb)
        if not len(ba) or not len(bb):
            continue
        ious = box_iou(ba, bb)
        if la is not None and lb is not None:
            ious = np.where(la[:, None] == lb[None, :], ious, -np.inf)
        for flat in np.argsort(-ious, axis=None, kind="stable"):
            i, j = np.unravel_index(flat, ious.shape)
            if not ious[i, j] >= iou:
                break
            matched += 1
            ious[i, :] = -np.inf
            ious[:, j] = -np.inf
    return 2.0 * matched / total if total else 1.0


# -- the task loss -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectionOptions:
    """Options of the detection task (``-o task_options "k=v,..."``)."""

    box_format: BoxFormat = option("centernet", "what the box output holds: centernet (dx,dy,w,h in cells), ltrb (FCOS distances in cells), xyxy or cxcywh")
    logits: bool = option(False, "the score output holds logits (sigmoid is applied) instead of probabilities")
    gamma: float = option(0.0, "focal exponent |y − q|^γ of the classification term (0: plain soft-target BCE; RetinaNet: 2)")
    cls_weight: float = option(1.0, "weight of the classification term")
    reg_weight: float = option(1.0, "weight of the box term (1 − GIoU of decoded boxes)")
    reg_on: Literal["detections", "confidence"] = option("detections", "box term at the FP32 detections (pseudo-labels), or at every location weighted by its FP32 confidence")
    min_weight: float = option(0.05, "reg_on=confidence: locations whose FP32 confidence is below this get no box term")
    score_threshold: float = option(0.3, "score threshold of the FP32 detections (pseudo-labels) and of decoded detections")
    suppression: Literal["peak", "nms", "none"] = option("peak", "duplicate suppression when decoding: 3x3 peaks of dense maps (CenterNet), class-wise NMS, or none")
    nms_iou: float = option(0.5, "IoU threshold of suppression=nms")
    stride: float = option(1.0, "input pixels per cell of a dense head (only scales decoded boxes)")

    def validate(self) -> None:
        if self.gamma < 0 or self.cls_weight < 0 or self.reg_weight < 0:
            raise ValueError("gamma, cls_weight and reg_weight must be >= 0")
        if not 0 <= self.min_weight < 1 or not 0 < self.score_threshold < 1:
            raise ValueError("min_weight must be in [0, 1) and score_threshold in (0, 1)")


class DetectionLoss(TaskLoss):
    """ODOL: soft-target BCE on class scores + GIoU on the boxes of the FP32 detections (pseudo-labels)."""

    name = "detection"
    summary = "detection output loss (ODOL): soft-target BCE on class scores + GIoU of the boxes at the FP32 detections (pseudo-labels)"
    Options = DetectionOptions
    roles = ("scores", "boxes")

    def _probs(self, scores: np.ndarray) -> np.ndarray:
        s = np.asarray(scores, np.float64)
        return sigmoid(s) if self.options.logits else s

    def _boxes(self, boxes: np.ndarray, scores_ndim: int) -> np.ndarray:
        """Decoded xyxy boxes per location, [N, L, 4] (L = H·W or A)."""
        o = self.options
        if scores_ndim == 4:
            xyxy = dense_boxes(boxes, o.box_format)
            return xyxy.reshape(xyxy.shape[0], -1, 4)
        return _to_xyxy(np.asarray(boxes, np.float64), o.box_format)

    def _scores(self, scores: np.ndarray) -> np.ndarray:
        """Class probabilities per location, [N, L, C]."""
        p = self._probs(scores)
        if p.ndim == 4:
            return np.moveaxis(p, 1, -1).reshape(p.shape[0], -1, p.shape[1])
        if p.ndim != 3:
            raise OptionError(f"task 'detection': scores output '{self.outputs[0]}' must be [N, C, H, W] or [N, A, C], got {list(p.shape)}")
        return p

    def _pseudo_labels(self, scores: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """[N, L] mask of the locations holding an FP32 detection (decoded with this task's options)."""
        o = self.options
        p = self._probs(scores)
        if p.ndim == 4 and o.suppression == "peak":
            keep = np.stack([_peaks(pi, 3) for pi in p]) & (p >= o.score_threshold)
            return np.moveaxis(keep, 1, -1).reshape(p.shape[0], -1, p.shape[1]).any(-1)
        flat = self._scores(scores)
        mask = flat.max(-1) >= o.score_threshold
        if o.suppression != "none":  # nms (list layouts use it for "peak" too, as decode does)
            for i in range(len(flat)):
                loc = np.flatnonzero(mask[i])
                if len(loc):
                    cls = flat[i, loc].argmax(-1)
                    kept = [loc[np.flatnonzero(cls == c)][nms(boxes[i, loc[cls == c]], flat[i, loc[cls == c], c], o.nms_iou)] for c in np.unique(cls)]
                    mask[i] = False
                    mask[i, np.concatenate(kept)] = True
        return mask

    def prepare(self, reference):
        o = self.options
        raw = self.role(reference, "scores")
        y = self._scores(raw)
        raw_boxes = self.role(reference, "boxes")
        boxes = self._boxes(raw_boxes, raw.ndim)
        if boxes.shape[:2] != y.shape[:2]:
            raise OptionError(f"task 'detection': {self.outputs[1]} does not match {self.outputs[0]} location for location "
                              f"({list(np.shape(raw_boxes))} vs {list(raw.shape)})")
        dets = self._pseudo_labels(raw, boxes)
        if o.reg_on == "detections":
            w = dets.astype(np.float64)
        else:
            w = y.max(axis=-1)
            w = np.where(w >= o.min_weight, w, 0.0)
        return {"y": y, "boxes": boxes, "w": w, "detections": int(dets.sum()), "norm": max(1.0, float(dets.sum())), "ndim": raw.ndim}

    def terms(self, outputs, targets) -> dict[str, float]:
        o = self.options
        q = self._scores(self.role(outputs, "scores"))
        y = targets["y"]
        kl = bernoulli_kl(y, q)
        cls = float(((np.abs(y - q) ** o.gamma * kl) if o.gamma else kl).sum() / targets["norm"])
        w = targets["w"]
        reg = 0.0
        if w.sum() > 0:
            bq = self._boxes(self.role(outputs, "boxes"), targets["ndim"])
            sel = w > 0
            reg = float((w[sel] * (1.0 - giou(bq[sel], targets["boxes"][sel]))).sum() / w[sel].sum())
        return {"cls": cls, "reg": reg, "loss": o.cls_weight * cls + o.reg_weight * reg}

    def loss(self, outputs, targets) -> float:
        return self.terms(outputs, targets)["loss"]

    def detections(self, outputs) -> list[Detections]:
        """Decoded detections of ``outputs`` with this task's options (for reports and metrics)."""
        o = self.options
        return decode(self.role(outputs, "scores"), self.role(outputs, "boxes"), o.box_format, o.score_threshold, o.stride, o.suppression, o.nms_iou, logits=o.logits)
