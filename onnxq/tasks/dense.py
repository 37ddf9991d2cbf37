"""Built-in task losses for dense maps, classifiers and anything else: ``segmentation-map``,
``classification`` and ``mse``. All compare the quantized outputs with the FP32 outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from onnxq.options import option
from onnxq.tasks import TaskLoss, bernoulli_kl, sigmoid


@dataclass(frozen=True)
class SegmentationOptions:
    """Options of the segmentation-map task."""

    logits: bool = option(False, "the map holds logits (sigmoid is applied) instead of probabilities")
    threshold: float = option(0.3, "FP32 probability from which a pixel counts as foreground (text); DBNet's binarisation threshold")
    weighting: Literal["balanced", "uniform"] = option("balanced", "balanced: foreground and background pixels each carry half the loss; uniform: every pixel the same")
    bce_weight: float = option(1.0, "weight of the soft-target BCE term (KL form, 0 when the maps match)")
    l1_weight: float = option(1.0, "weight of the L1 term")

    def validate(self) -> None:
        if not 0 < self.threshold < 1:
            raise ValueError("threshold must be in (0, 1)")
        if self.bce_weight < 0 or self.l1_weight < 0:
            raise ValueError("weights must be >= 0")


class SegmentationMapLoss(TaskLoss):
    """Dense probability maps (e.g. DBNet text detectors): weighted soft BCE + L1 against the FP32 map."""

    name = "segmentation-map"
    summary = "dense probability maps (DBNet-style text detectors, masks): soft BCE + L1 vs FP32, foreground/background balanced"
    Options = SegmentationOptions
    roles = ("map",)

    def _prob(self, x) -> np.ndarray:
        x = np.asarray(x, np.float64)
        return sigmoid(x) if self.options.logits else np.clip(x, 0.0, 1.0)

    def prepare(self, reference):
        y = self._prob(self.role(reference, "map"))
        fg = y >= self.options.threshold
        if self.options.weighting == "balanced" and fg.any() and (~fg).any():
            w = np.where(fg, 0.5 / fg.sum(), 0.5 / (~fg).sum())
        else:
            w = np.full(y.shape, 1.0 / y.size)
        return {"y": y, "w": w, "fg_fraction": float(fg.mean())}

    def terms(self, outputs, targets) -> dict[str, float]:
        o = self.options
        q = self._prob(self.role(outputs, "map"))
        y, w = targets["y"], targets["w"]
        bce = float((w * bernoulli_kl(y, q)).sum())
        l1 = float((w * np.abs(q - y)).sum())
        return {"bce": bce, "l1": l1, "loss": o.bce_weight * bce + o.l1_weight * l1}

    def loss(self, outputs, targets) -> float:
        return self.terms(outputs, targets)["loss"]


@dataclass(frozen=True)
class ClassificationOptions:
    """Options of the classification task."""

    axis: int = option(-1, "class axis of the logits")
    temperature: float = option(1.0, "softmax temperature")

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


class ClassificationLoss(TaskLoss):
    """KL(softmax(FP32 logits) ‖ softmax(quantized logits)), averaged over samples (and positions)."""

    name = "classification"
    summary = "KL divergence of the softmax of quantized logits from the FP32 softmax"
    Options = ClassificationOptions
    roles = ("logits",)

    def prepare(self, reference):
        o = self.options
        logp = _log_softmax(self.role(reference, "logits") / o.temperature, o.axis)
        return {"logp": logp, "p": np.exp(logp)}

    def loss(self, outputs, targets) -> float:
        o = self.options
        logq = _log_softmax(self.role(outputs, "logits") / o.temperature, o.axis)
        kl = (targets["p"] * (targets["logp"] - logq)).sum(axis=o.axis)
        return float(max(kl.mean(), 0.0))


@dataclass(frozen=True)
class MseOptions:
    """Options of the mse task."""

    normalize: bool = option(True, "divide each output's MSE by its FP32 mean square, so outputs of different scales count alike")


class MseLoss(TaskLoss):
    """Mean squared error of every named output (all graph outputs by default), summed over outputs."""

    name = "mse"
    summary = "mean squared error of the outputs vs FP32 (each normalised by its mean square), summed over outputs"
    Options = MseOptions

    def prepare(self, reference):
        ref = {n: np.asarray(reference[n], np.float64) for n in self.outputs}
        scale = {n: (max(float(np.mean(v * v)), 1e-12) if self.options.normalize else 1.0) for n, v in ref.items()}
        return {"ref": ref, "scale": scale}

    def terms(self, outputs, targets) -> dict[str, float]:
        out = {n: float(np.mean((np.asarray(outputs[n], np.float64) - r) ** 2) / targets["scale"][n]) for n, r in targets["ref"].items()}
        out["loss"] = float(sum(out.values()))
        return out

    def loss(self, outputs, targets) -> float:
        return self.terms(outputs, targets)["loss"]
