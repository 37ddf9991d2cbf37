"""Train, plant outliers in, and export the decoder-only transformer fixture (needs torch).

The task is copying: ``[BOS, a_1..a_15, SEP, a_1..a_15]`` with ``a_i`` drawn uniformly from tokens
2..63, so the 15 tokens after ``SEP`` are exactly predictable from the sequence so far (an
induction-style lookup a causal transformer must learn). The model is a GPT-style pre-LayerNorm
decoder: token + learned position embeddings, 2 blocks of causal multi-head attention (4 heads)
and a GELU MLP (64 -> 256 -> 64), a final LayerNorm and a linear head over the 64-token vocabulary.

After training, outlier channels are planted the way large language models show them: a few
channels of each LayerNorm output (the inputs of the Q/K/V and first MLP MatMuls) and of the
value projection (the input of the attention output MatMul) are multiplied by 24-48, and the rows
of the MatMul weights that read them are divided by the same factor, so the float function is
unchanged (checked below to 1e-4 relative) while those MatMuls see inputs with a few channels
20-50x larger than the rest.

Run from the repository root (writes model.onnx, calib.npz and eval.npz beside this file)::

    python plugins_contrib/fixtures_decoder/train.py
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
VOCAB, SEQ, HALF = 64, 32, 15
BOS, SEP = 0, 1
D, HEADS, FFN, LAYERS = 64, 4, 256, 2
#: planted outlier channels and their factors (same channels in every block, as in real LLMs)
OUTLIERS = {5: 24.0, 17: 32.0, 42: 48.0}


def sequences(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` copy-task sequences of length 32 (int64)."""
    a = rng.integers(2, VOCAB, (n, HALF))
    return np.concatenate([np.full((n, 1), BOS), a, np.full((n, 1), SEP), a], axis=1).astype(np.int64)


def targets(ids: np.ndarray) -> np.ndarray:
    """Next-token labels, -1 where the next token is not determined by the prefix (the random half)."""
    label = np.full(ids.shape, -1, np.int64)
    label[:, HALF + 1:SEQ - 1] = ids[:, HALF + 2:]
    return label


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(D, FFN), nn.Linear(FFN, D)
        self.register_buffer("mask", torch.triu(torch.full((SEQ, SEQ), -1e4), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).reshape(b, t, HEADS, D // HEADS).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(D // HEADS) + self.mask[:t, :t], dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, D))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(SEQ, D)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos.weight[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


@torch.no_grad()
def plant_outliers(model: Decoder) -> None:
    """Scale the outlier channels of each LayerNorm output and value projection; compensate in the readers."""
    for blk in model.blocks:
        for c, s in OUTLIERS.items():
            blk.ln1.weight[c] *= s
            blk.ln1.bias[c] *= s
            for lin in (blk.q, blk.k, blk.v):
                lin.weight[:, c] /= s
            blk.ln2.weight[c] *= s
            blk.ln2.bias[c] *= s
            blk.fc1.weight[:, c] /= s
            blk.v.weight[c] *= s  # value channel c (head c // 16) reaches the output projection's input c
            blk.v.bias[c] *= s
            blk.o.weight[:, c] /= s


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a tiny model: more threads only contend
    rng = np.random.default_rng(0)
    model = Decoder()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps = 1500  # at most: training stops once the copied half is predicted almost perfectly
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for step in range(steps):
        ids = torch.from_numpy(sequences(64, rng))
        logits = model(ids)[:, HALF + 1:SEQ - 1]  # only the determined (copied) half is learnable
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, HALF + 2:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            acc = float((logits.argmax(-1) == ids[:, HALF + 2:]).float().mean())
            print(f"step {step}: loss {loss.item():.3f}, copy accuracy {acc:.3f}", flush=True)
            if acc > 0.998 and step >= 300:
                break
    model.eval()
    calib, evaluation = sequences(64, np.random.default_rng(1)), sequences(256, np.random.default_rng(2))
    label = targets(evaluation)
    with torch.no_grad():
        before = model(torch.from_numpy(evaluation)).numpy()
        plant_outliers(model)
        after = model(torch.from_numpy(evaluation)).numpy()
    drift = float(np.abs(after - before).max() / np.abs(before).max())
    assert drift < 1e-4, f"planting outliers changed the function ({drift:.2e})"
    scored = label >= 0
    acc = float((after.argmax(-1)[scored] == label[scored]).mean())
    print(f"outliers planted (relative change {drift:.1e}); copy accuracy {acc:.4f}")
    torch.onnx.export(model, (torch.from_numpy(calib[:2]),), str(HERE / "model.onnx"), dynamo=False, opset_version=17,
                      input_names=["input_ids"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch"}, "logits": {0: "batch"}})
    np.savez_compressed(HERE / "calib.npz", input_ids=calib)
    np.savez_compressed(HERE / "eval.npz", input_ids=evaluation, label=label)


if __name__ == "__main__":
    main()
