"""Train the bundled onnxq example model (a small CNN on scikit-learn digits).

Re-run from the repository root (CPU only, about a minute on 2 cores)::

    python examples/digits/train.py

It needs torch, onnx, onnxruntime, numpy and scikit-learn. Nothing is
downloaded: ``sklearn.datasets.load_digits()`` ships with scikit-learn.

What it does
------------
1. Loads the 1,797 8x8 grey digit images and makes a fixed stratified split
   (``random_state=0``): 1,297 train / 500 held-out test.
2. Preprocesses every image (here, not inside the model):
   ``x = pixels / 16``  (values in [0, 1]), then bilinear upsampling to 16x16
   with ``torch.nn.functional.interpolate(mode="bilinear",
   align_corners=False)``. No mean/std normalisation: the model input is the
   [0, 1] image, shape [N, 1, 16, 16], float32.
3. Trains ``DigitsNet`` with Adam, light augmentation (random shifts of up to
   +-1 pixel on the 16x16 image), fixed seed.
4. Folds every BatchNorm into the preceding Conv in torch, exports with the
   legacy TorchScript exporter (``dynamo=False``, opset 17, dynamic batch dim
   ``N``), checks the model with ``onnx.checker`` and onnxruntime, and makes
   sure ORT's top-1 predictions on the test set equal torch's.
5. Writes (next to this script)::

       model.onnx                 input "input" [N,1,16,16] f32 -> "logits" [N,10] f32
       calib/calib_000..015.npz   "input" [16,1,16,16] f32   (256 TRAIN samples)
       eval/eval_000..003.npz     "input" [125,1,16,16] f32, "label" [125] i64
                                  (the 500 held-out TEST samples, split order)

The .npz files are written with fixed zip timestamps so that re-running the
script does not change them byte-wise (the data do not depend on training).
"""

from __future__ import annotations

import io
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn.utils.fusion import fuse_conv_bn_eval

SEED = 0
N_TEST = 500
IMG = 16
EPOCHS = 40
BATCH = 64
LR = 3e-3
N_CALIB = 256
CALIB_BATCH = 16
EVAL_FILES = 4
OPSET = 17

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- data
def preprocess(images: np.ndarray) -> np.ndarray:
    """[N, 8, 8] raw digits pixels (0..16) -> [N, 1, 16, 16] float32 in [0, 1]."""
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(IMG, IMG), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0).numpy()


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed stratified split: (x_train, y_train, x_test, y_test), preprocessed."""
    digits = load_digits()
    images, labels = digits.images, digits.target.astype(np.int64)
    im_tr, im_te, y_tr, y_te = train_test_split(
        images, labels, test_size=N_TEST, stratify=labels, random_state=SEED
    )
    return preprocess(im_tr), y_tr, preprocess(im_te), y_te


def random_shift(x: torch.Tensor, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by a random (dy, dx) in [-max_shift, max_shift], zero fill."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2))
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy : dy + IMG, dx : dx + IMG]
    return out


# -------------------------------------------------------------------------- model
class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=False),
        )


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, Add identity, ReLU."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(ch, ch, 3)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.bn2(self.conv2(self.conv1(x))))


class BranchBlock(nn.Module):
    """Two parallel branches (1x1 and 3x3 conv, each +BN+ReLU) joined by Concat."""

    def __init__(self, cin: int, cbranch: int) -> None:
        super().__init__()
        self.b1 = ConvBNReLU(cin, cbranch, 1)
        self.b3 = ConvBNReLU(cin, cbranch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x)], dim=1)


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNReLU(1, 16, 3)  # 16x16
        self.res = ResidualBlock(16)  # 16x16
        self.pool = nn.MaxPool2d(2)  # -> 8x8
        self.branch = BranchBlock(16, 24)  # -> 48 ch
        self.head_conv = ConvBNReLU(48, 64, 3)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.res(self.stem(x)))
        x = self.head_conv(self.branch(x))
        return self.fc(self.flatten(self.gap(x)))


def fold_bn(module: nn.Module) -> nn.Module:
    """Fold every (Conv2d, BatchNorm2d) pair into one Conv2d (eval mode, in place).

    Handles the pairs inside nn.Sequential (ConvBNReLU) and the explicit
    conv2/bn2 pair of ResidualBlock.
    """
    for child in module.children():
        fold_bn(child)
    if isinstance(module, nn.Sequential):
        mods = list(module)
        for i in range(len(mods) - 1):
            if isinstance(mods[i], nn.Conv2d) and isinstance(mods[i + 1], nn.BatchNorm2d):
                module[i] = fuse_conv_bn_eval(mods[i], mods[i + 1])
                module[i + 1] = nn.Identity()
    if isinstance(module, ResidualBlock) and isinstance(module.bn2, nn.BatchNorm2d):
        module.conv2 = fuse_conv_bn_eval(module.conv2, module.bn2)
        module.bn2 = nn.Identity()
    return module


# ----------------------------------------------------------------------- training
def train(model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=1e-4)
    steps = EPOCHS * ((len(xt) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt))
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(xt), BATCH):
            idx = perm[i : i + BATCH]
            xb, yb = random_shift(xt[idx]), yt[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        if epoch % 10 == 9 or epoch == EPOCHS - 1:
            print(f"epoch {epoch + 1:3d}  loss {loss_sum / total:.4f}  train acc {correct / total:.4f}")


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    return model(torch.from_numpy(x)).numpy()


# ------------------------------------------------------------------------- output
def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like np.savez (uncompressed, loadable with np.load) but with fixed zip timestamps."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def export_onnx(model: nn.Module, path: Path) -> onnx.ModelProto:
    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (plain, predictable graph).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, IMG, IMG),),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            do_constant_folding=True,
            export_params=True,
        )
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name = "onnxq examples/digits/train.py"
    proto.doc_string = "Small CNN on scikit-learn digits (8x8 -> /16 -> bilinear 16x16)."
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    return proto


def main() -> None:
    t0 = time.time()
    torch.manual_seed(SEED)
    np.random.seed(SEED)

    x_tr, y_tr, x_te, y_te = load_split()
    print(f"train {x_tr.shape} test {x_te.shape}  (pixel range {x_tr.min():.2f}..{x_tr.max():.2f})")

    model = DigitsNet()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params:,} (before BN folding)")
    train(model, x_tr, y_tr)

    acc_torch = float((predict(model, x_te).argmax(1) == y_te).mean())
    model = fold_bn(model.eval())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    logits_torch = predict(model, x_te)
    pred_torch = logits_torch.argmax(1)
    acc_folded = float((pred_torch == y_te).mean())
    print(f"params: {sum(p.numel() for p in model.parameters()):,} (after BN folding)")
    print(f"FP32 test top-1 (torch):            {acc_torch:.4f}")
    print(f"FP32 test top-1 (torch, BN folded): {acc_folded:.4f}")

    onnx_path = HERE / "model.onnx"
    proto = export_onnx(model, onnx_path)
    ops = Counter(n.op_type for n in proto.graph.node)
    print(f"ONNX ops: {dict(ops)}")
    assert set(ops) <= {
        "Conv", "Relu", "Add", "MaxPool", "Concat", "GlobalAveragePool", "Flatten", "Gemm"
    }, ops

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits_ort = sess.run(["logits"], {"input": x_te})[0]
    pred_ort = logits_ort.argmax(1)
    acc_ort = float((pred_ort == y_te).mean())
    print(f"FP32 test top-1 (onnxruntime):      {acc_ort:.4f}")
    print(f"max |logits_ort - logits_torch|:    {np.abs(logits_ort - logits_torch).max():.2e}")
    assert np.array_equal(pred_ort, pred_torch), "ORT and torch top-1 disagree"

    # Calibration feeds: 256 TRAIN samples (fixed random subset), 16 files x 16.
    calib_dir, eval_dir = HERE / "calib", HERE / "eval"
    for d in (calib_dir, eval_dir):
        d.mkdir(exist_ok=True)
        for old in d.glob("*.npz"):
            old.unlink()
    calib_idx = np.sort(np.random.default_rng(SEED).permutation(len(x_tr))[:N_CALIB])
    calib = x_tr[calib_idx]
    for i in range(N_CALIB // CALIB_BATCH):
        chunk = calib[i * CALIB_BATCH : (i + 1) * CALIB_BATCH]
        save_npz(calib_dir / f"calib_{i:03d}.npz", input=chunk.astype(np.float32))

    # Held-out evaluation set: the 500 TEST samples in split order, 4 files x 125.
    per = N_TEST // EVAL_FILES
    for i in range(EVAL_FILES):
        sl = slice(i * per, (i + 1) * per)
        save_npz(
            eval_dir / f"eval_{i:03d}.npz",
            input=x_te[sl].astype(np.float32),
            label=y_te[sl].astype(np.int64),
        )

    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.glob("*.npz")) if p.is_dir() else p.stat().st_size

    print("file sizes:")
    print(f"  model.onnx  {size(onnx_path):>9,} B")
    print(f"  calib/      {size(calib_dir):>9,} B  ({len(list(calib_dir.glob('*.npz')))} files)")
    print(f"  eval/       {size(eval_dir):>9,} B  ({len(list(eval_dir.glob('*.npz')))} files)")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
