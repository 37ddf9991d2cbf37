"""Train the normalized-input fixtures of tests/calib/test_robust_entropy.py (issue 15).

Re-run from the repository root (CPU, about three minutes on one core; nothing downloaded)::

    python tests/calib/normalized/train.py

Data: scikit-learn's 1,797 8x8 digits, a fixed stratified split (1,297 train / 500 test,
``random_state=0``), ``pixels / 16`` upsampled bilinearly to 28x28 and then normalized the way
torchvision's MNIST recipes do, ``(x - 0.1307) / 0.3081``. Every background pixel becomes
exactly -0.4242 (a spike holding about 60 % of all input values) and the strokes spread up to
2.82: the distribution on which TensorRT's entropy calibration clips every stroke.

Two models, both exported with opset 17, input ``input`` [N,1,28,28] -> ``logits`` [N,10]:

* ``resnet.onnx``: conv 1->16 (BN folded) + ReLU, a residual block (two 3x3 convs, Add, ReLU),
  max-pool, conv 16->32 + ReLU, global average pool, Gemm 32->10;
* ``repvgg.onnx``: four RepVGG blocks (3x3+BN, 1x1+BN, identity BN when shapes allow) trained
  in branch form and exported folded into one 3x3 conv each (centre-heavy kernels, as cfws expects).

``calib.npz`` holds 128 train images, ``eval.npz`` the 500 test images with labels.
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn.utils.fusion import fuse_conv_bn_eval

HERE = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
MEAN, STD = 0.1307, 0.3081


def data():
    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32))[:, None]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = ((x - MEAN) / STD).numpy().astype(np.float32)
    return train_test_split(x, d.target.astype(np.int64), test_size=500, stratify=d.target, random_state=0)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.r1, self.rb1 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.r2, self.rb2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.rb1(self.r1(x)))
        x = F.relu(x + self.rb2(self.r2(y)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))

    def fold(self) -> nn.Module:
        m = ResNet().eval()
        m.load_state_dict(self.state_dict())
        for c, b in (("c1", "b1"), ("r1", "rb1"), ("r2", "rb2"), ("c2", "b2")):
            setattr(m, c, fuse_conv_bn_eval(getattr(m, c), getattr(m, b)))
            setattr(m, b, nn.Identity())
        return m


class RepBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.k3, self.b3 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.k1, self.b1 = nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.bid = nn.BatchNorm2d(cout) if cin == cout else None
        self.deploy: nn.Conv2d | None = None

    def forward(self, x):
        if self.deploy is not None:
            return F.relu(self.deploy(x))
        y = self.b3(self.k3(x)) + self.b1(self.k1(x))
        return F.relu(y + self.bid(x) if self.bid is not None else y)

    def fold(self) -> None:
        def kb(kernel, bn):
            t = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            return kernel * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t

        w3, c3 = kb(self.k3.weight, self.b3)
        w1, c1 = kb(F.pad(self.k1.weight, [1, 1, 1, 1]), self.b1)
        w, b = w3 + w1, c3 + c1
        if self.bid is not None:
            ident = torch.zeros_like(self.k3.weight)
            for i in range(ident.shape[0]):
                ident[i, i, 1, 1] = 1.0
            wi, ci = kb(ident, self.bid)
            w, b = w + wi, b + ci
        conv = nn.Conv2d(self.k3.in_channels, self.k3.out_channels, 3, padding=1)
        conv.weight.data, conv.bias.data = w.detach(), b.detach()
        self.deploy = conv


class RepVgg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([RepBlock(1, 16), RepBlock(16, 16), RepBlock(16, 16), RepBlock(16, 16)])
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i in (1, 3):
                x = F.max_pool2d(x, 2)
        return self.fc(x.mean((2, 3)))

    def fold(self) -> nn.Module:
        for b in self.blocks:
            b.fold()
        return self


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = epochs * -(-len(xt) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
            sched.step()
    model.eval()


def export(model: nn.Module, path: Path) -> None:
    torch.onnx.export(model, torch.zeros(1, 1, 28, 28), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """npz with fixed zip timestamps, so re-running does not change the bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for k, v in arrays.items():
            buf = io.BytesIO()
            np.save(buf, v)
            info = zipfile.ZipInfo(f"{k}.npy", date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, buf.getvalue())


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x_tr, x_te, y_tr, y_te = data()
    for name, net, epochs in (("resnet", ResNet(), 20), ("repvgg", RepVgg(), 30)):
        train(net, x_tr, y_tr, epochs)
        folded = net.fold()
        folded.eval()
        with torch.no_grad():
            acc = float((folded(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
        print(f"{name}: FP32 test top-1 {acc:.3f}")
        export(folded, HERE / f"{name}.onnx")
    rng = np.random.default_rng(0)
    save_npz(HERE / "calib.npz", input=x_tr[rng.choice(len(x_tr), 128, replace=False)])
    save_npz(HERE / "eval.npz", input=x_te, label=y_te)


if __name__ == "__main__":
    main()
