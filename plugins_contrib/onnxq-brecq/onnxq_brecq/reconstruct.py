"""Block-wise reconstruction of weight rounding with PyTorch (plugins_contrib/onnxq-brecq/README.md).

For each block in topological order: the block input comes from the *quantized* prefix (earlier
blocks already use their learned integers), the target is the FP32 block output, both computed
by onnxq's :class:`~onnxq.search.evaluator.GraphRunner`. The rounding variables ``V`` of every
weight in the block are learned with Adam on ``||Ŷ − Y||² + λ·Σ(1 − |2h(V) − 1|^β)`` (no
regulariser during the warm-up, then ``β`` annealed linearly from ``beta_start`` to
``beta_end``), then hardened. If the hardened rounding reconstructs the block worse than
round-to-nearest on the calibration samples, nearest rounding is kept (never worse by construction).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
from onnxq.search.evaluator import GraphRunner
from onnxq.graph.plan import QuantPlan

from onnxq_brecq.blocks import Block, find_blocks
from onnxq_brecq.torch_graph import AdaRoundWeight, TorchBlock, Unsupported


def _rec_loss(pred: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """BRECQ's ``lp_loss`` with p = 2: squared error summed per sample, averaged over samples."""
    total = torch.zeros(())
    for p, t in zip(pred, target):
        total = total + (p - t).pow(2).reshape(p.shape[0], -1).sum(1).mean()
    return total


def _samples(x: dict[str, torch.Tensor]) -> int:
    """The number of calibration samples a block's inputs carry: their largest leading dimension."""
    return max(int(v.shape[0]) if v.dim() else 1 for v in x.values())


def _take(x: dict[str, torch.Tensor], idx: torch.Tensor | slice, n: int) -> dict[str, torch.Tensor]:
    """Pick samples ``idx`` of every per-sample input; an input that does not carry the sample axis
    (a batch-1 tensor broadcast over the batch, such as a detection head's anchor grid) is passed whole."""
    return {k: v[idx] if v.dim() and v.shape[0] == n else v for k, v in x.items()}


class Reconstructor:
    """Learns the rounding of every learnable weight, block by block."""

    def __init__(self, model: onnx.ModelProto, plan: QuantPlan, chunks: list[dict[str, np.ndarray]], learnable: dict[str, tuple[str, int, str]],
                 options: Any, progress: Callable[[int], None] | None = None) -> None:
        """``learnable``: weighted node name → (weight site key, weight input index, initializer name)."""
        self.model = model
        self.plan = plan
        self.o = options
        self.learnable = learnable
        self.sessions: dict[str, object] = {}
        self.chunks = chunks
        self.q_run = GraphRunner(model, chunks, plan, self.sessions)
        self.f_run = GraphRunner(model, chunks, None, self.sessions)
        self.consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        self.act_edges: dict[tuple[str, int], Any] = {}
        for site in plan.activations.values():
            for node, i in site.consumers:
                self.act_edges[(node, i)] = site.qparams
        self.weight_edges = {(s.node, s.input_index): key for key, s in plan.weights.items()}
        #: learned float weights (integers × step) by initializer name
        self.results: dict[str, np.ndarray] = {}
        self.report: list[dict[str, Any]] = []
        self.progress = progress or (lambda n: None)
        self.gen = torch.Generator().manual_seed(int(options.seed))

    def run(self) -> None:
        blocks = find_blocks(self.model, set(self.learnable), self.o.blocks)
        for block in blocks:
            self._run_block(block, allow_split=self.o.blocks == "block")

    # -- one block -------------------------------------------------------------------------
    def _run_block(self, block: Block, allow_split: bool) -> None:
        try:
            x = {t: self.q_run.value(t) for t in block.inputs}
            y = [self.f_run.value(t) for t in block.outputs]
            tb, modules = self._torch_block(block)
            self._learn(block, tb, modules, x, y)
        except Unsupported as exc:
            if allow_split and len(block.learnable) > 0:
                sub = find_blocks(self.model, set(block.learnable), "layer")
                self.report.append({"block": block.names, "fallback": f"per-layer ({exc})"})
                # the FP runner may have run (and released) the block's inner tensors: start it again
                self.f_run = GraphRunner(self.model, self.chunks, None, self.sessions)
                for b in sub:
                    self._run_block(b, allow_split=False)
            else:
                self.report.append({"block": block.names, "fallback": f"nearest rounding ({exc})"})
                self.progress(len(block.learnable))

    def _torch_block(self, block: Block) -> tuple[TorchBlock, dict[str, AdaRoundWeight]]:
        names = set(block.names)
        rounding: dict[tuple[str, int], AdaRoundWeight] = {}
        modules: dict[str, AdaRoundWeight] = {}
        fixed: dict[tuple[str, int], np.ndarray] = {}
        for node in block.nodes:
            for i, name in enumerate(node.input):
                key = self.weight_edges.get((node.name, i))
                if key is None:
                    continue
                site = self.plan.weights[key]
                value = self.results.get(name, self.consts[name])
                if node.name in self.learnable and self.learnable[node.name][1] == i:
                    m = AdaRoundWeight(self.consts[name], site.qparams)  # type: ignore[arg-type]
                    m.site = key
                    rounding[(node.name, i)] = m
                    modules[name] = m
                else:
                    fixed[(node.name, i)] = site.qparams.fake_quantize(value)  # type: ignore[union-attr]
        act = {k: q for k, q in self.act_edges.items() if k[0] in names and q is not None} if self.o.act_quant else {}
        consts = {k: v for k, v in self.consts.items() if k not in self.results}
        consts.update(self.results)
        return TorchBlock(block.nodes, consts, rounding, fixed, act, block.outputs), modules

    def _loss_all(self, tb: TorchBlock, x: dict[str, torch.Tensor], y: list[torch.Tensor], chunk: int = 256) -> float:
        n = _samples(x)
        total = 0.0
        with torch.no_grad():
            for s in range(0, n, chunk):
                pred = tb(_take(x, slice(s, s + chunk), n))
                total += float(_rec_loss(pred, [t[s : s + chunk] for t in y])) * min(chunk, n - s)
        return total / n

    def _learn(self, block: Block, tb: TorchBlock, modules: dict[str, AdaRoundWeight], x_np: dict[str, np.ndarray], y_np: list[np.ndarray]) -> None:
        o = self.o
        t0 = time.perf_counter()
        x = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in x_np.items()}
        y = [torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for v in y_np]
        n = _samples(x)
        for m in modules.values():
            m.mode = "nearest"
        loss_nearest = self._loss_all(tb, x, y)  # also checks the block runs (raises Unsupported)
        if not modules:
            self.report.append({"block": block.names, "layers": [], "note": "no learnable weight"})
            return
        for m in modules.values():
            m.mode = "soft"
        # [D] the reconstruction term is divided by the block's round-to-nearest loss, so λ weighs the
        # regulariser the same way in every block whatever the scale of its outputs
        norm = 1.0 / max(loss_nearest, 1e-12) if o.normalize else 1.0
        params = [m.v for m in modules.values()]
        opt = torch.optim.Adam(params, lr=o.lr)
        warm = int(o.warmup * o.iters)
        for it in range(o.iters):
            idx = torch.randint(0, n, (min(o.batch, n),), generator=self.gen)
            pred = tb(_take(x, idx, n))
            loss = _rec_loss(pred, [t[idx] for t in y]) * norm
            if it >= warm:
                rel = (it - warm) / max(1, o.iters - warm)
                beta = o.beta_end + (o.beta_start - o.beta_end) * max(0.0, 1.0 - rel)
                loss = loss + o.reg_weight * sum(m.regulariser(beta) for m in modules.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            h = torch.cat([m.h().reshape(-1) for m in modules.values()])
            undecided = float(((h > 0.01) & (h < 0.99)).float().mean())
        for m in modules.values():
            m.mode = "hard"
        loss_learned = self._loss_all(tb, x, y)
        keep_learned = loss_learned <= loss_nearest
        flipped = 0
        total = 0
        for name, m in modules.items():
            q = self.plan.weights[m.site].qparams
            ints = m.integers("hard" if keep_learned else "nearest")
            flipped += int(np.sum(ints != m.integers("nearest")))
            total += ints.size
            value = (ints.astype(np.float32) * m.step.numpy()).astype(np.float32)
            assert np.array_equal(q.quantize(value).astype(np.int64), ints), "learned integers are not reproduced by the exported grid"  # type: ignore[union-attr]
            self.results[name] = value
            self.q_run.consts[name] = value
        self.progress(len(modules))
        self.report.append({
            "block": block.names,
            "layers": [n for n in block.names if n in self.learnable],
            "loss_nearest": loss_nearest,
            "loss_learned": loss_learned,
            "kept": "learned" if keep_learned else "nearest",
            "changed_vs_nearest": flipped / max(total, 1),
            "soft_undecided_at_end": undecided,
            "seconds": round(time.perf_counter() - t0, 3),
        })
