"""Entry-point module of the built-in task losses (``tasks = "onnxq.tasks.builtin"``)."""

from __future__ import annotations

from onnxq.hookspecs import hookimpl
from onnxq.tasks.dense import ClassificationLoss, MseLoss, SegmentationMapLoss
from onnxq.tasks.detection import DetectionLoss


@hookimpl
def register_task_losses(register) -> None:
    for cls in (DetectionLoss, SegmentationMapLoss, ClassificationLoss, MseLoss):
        register(cls)
