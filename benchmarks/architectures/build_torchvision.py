"""Architectures from torchvision with random weights, exported to ONNX, with calibration and evaluation images.

    python benchmarks/architectures/build_torchvision.py resnet18 mobilenet_v3_small efficientnet_b0 lraspp ...
    python benchmarks/architectures/build_torchvision.py mobilenet_v3_small_unfolded resnet18_dynamo

No hub is reachable here, so no pretrained weights: each model is initialized as torchvision does it,
and its BatchNorm statistics are then measured on mean/std-normalized synthetic images (gradients,
ellipses and noise from ``pypi_models.images``), so every layer's activations have the scale of a
trained network's. What the figures mean: whether each recipe runs, writes a valid model and keeps
the outputs of *this* network; random classifiers have nearly flat logits, so their top-1 and
neighbour figures are fragile and say little about a trained model. Suffixes: ``_unfolded`` keeps
BatchNormalization nodes (no constant folding, training mode preserved), ``_dynamo`` uses the
dynamo exporter (opset 18, weights in an external data file; needs onnxscript). Written to
``.bench/arch/NAME.onnx`` with ``NAME.calib.npz`` (64 images) and ``NAME.eval.npz`` (32 others).

The torchvision wheel on PyPI is built against CUDA torch: with the CPU torch its compiled
operators (nms, roi_align) do not load, and registering their fake kernels fails at import. None of
the models here uses them, so that registration is skipped while torchvision is imported.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
_register_fake = torch.library.register_fake
torch.library.register_fake = lambda *a, **k: (lambda f: f)
import torchvision  # noqa: E402
from torchvision import models as M  # noqa: E402

torch.library.register_fake = _register_fake
from pypi_models import images  # noqa: E402

OUT = HERE.parents[1] / ".bench" / "arch"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def small_vit() -> torch.nn.Module:
    m = torchvision.models.VisionTransformer(image_size=96, patch_size=16, num_layers=4, num_heads=4, hidden_dim=192, mlp_dim=384,
                                             num_classes=100)
    torch.nn.init.normal_(m.heads.head.weight, std=0.05)  # zero-initialized by torchvision: every output would be 0
    return m


ARCH = {
    "resnet18": lambda: M.resnet18(num_classes=100),
    "mobilenet_v2": lambda: M.mobilenet_v2(num_classes=100),
    "mobilenet_v3_small": lambda: M.mobilenet_v3_small(num_classes=100),
    "efficientnet_b0": lambda: M.efficientnet_b0(num_classes=100),
    "regnet_x_400mf": lambda: M.regnet_x_400mf(num_classes=100),
    "convnext_tiny": lambda: M.convnext_tiny(num_classes=100),
    "shufflenet_v2": lambda: M.shufflenet_v2_x0_5(num_classes=100),
    "squeezenet": lambda: M.squeezenet1_1(num_classes=100),
    "densenet121": lambda: M.densenet121(num_classes=100),
    "mnasnet": lambda: M.mnasnet0_5(num_classes=100),
    "googlenet": lambda: M.googlenet(num_classes=100, aux_logits=False, init_weights=True),
    "vit_small": small_vit,
    "swin_t": lambda: M.swin_t(num_classes=100),
    "lraspp": lambda: M.segmentation.lraspp_mobilenet_v3_large(num_classes=21, weights_backbone=None),
    "deeplabv3_mbv3": lambda: M.segmentation.deeplabv3_mobilenet_v3_large(num_classes=21, weights_backbone=None, aux_loss=False),
    "r3d_18": lambda: M.video.r3d_18(num_classes=50),
}
VARIANTS = ("_unfolded", "_dynamo")


class Segmentation(torch.nn.Module):
    """The segmentation models return a dict; the ONNX model returns its ``out`` map [N, 21, H, W]."""

    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)["out"]


def build(name: str, size: int = 96, out: Path = OUT) -> Path:
    """Build ``name`` (an ``ARCH`` key, optionally with a ``VARIANTS`` suffix) and its data; the model's path."""
    base, variant = name, ""
    for v in VARIANTS:
        if name.endswith(v):
            base, variant = name[: -len(v)], v
    torch.manual_seed(0)
    m = ARCH[base]()
    if base in ("lraspp", "deeplabv3_mbv3"):
        m = Segmentation(m)
    video = base == "r3d_18"

    def batch(n: int, seed: int) -> np.ndarray:
        if video:  # 4 frames of 64 x 64: [N, 3, 4, 64, 64]
            x = (images(n * 4, seed, 64) - MEAN) / STD
            return x.reshape(n, 4, 3, 64, 64).transpose(0, 2, 1, 3, 4).astype(np.float32).copy()
        return ((images(n, seed, size) - MEAN) / STD).astype(np.float32)

    for mod in m.modules():  # BatchNorm statistics of these images, a cumulative average
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.momentum = None
            mod.reset_running_stats()
    m.train()
    with torch.no_grad():
        for s in range(6):
            m(torch.from_numpy(batch(16, 100 + s)))
    m.eval()
    calib, ev = batch(64, 1), batch(32, 2)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.onnx"
    if variant == "_dynamo":
        torch.onnx.export(m, (torch.from_numpy(calib[:2]),), str(path), opset_version=18, dynamo=True, input_names=["input"],
                          output_names=["out"], dynamic_shapes=({0: torch.export.Dim("N", min=1, max=1024)},))
    else:
        torch.onnx.export(m, torch.from_numpy(calib[:1]), str(path), opset_version=17, dynamo=False, input_names=["input"],
                          output_names=["out"], dynamic_axes={"input": {0: "N"}, "out": {0: "N"}},
                          do_constant_folding=variant != "_unfolded",
                          training=torch.onnx.TrainingMode.PRESERVE if variant == "_unfolded" else torch.onnx.TrainingMode.EVAL)
    np.savez(out / f"{name}.calib.npz", input=calib)
    np.savez(out / f"{name}.eval.npz", input=ev)
    return path


if __name__ == "__main__":
    for n in sys.argv[1:]:
        print(n, build(n), flush=True)
