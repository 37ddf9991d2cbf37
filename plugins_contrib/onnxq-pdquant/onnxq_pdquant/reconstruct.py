"""PD-Quant's block reconstruction with PyTorch (plugins_contrib/onnxq-pdquant/README.md).

For each block (onnxq-brecq's blocks: the graph cut at single-tensor articulation points), in order:

1. Distribution correction (DC), as the paper's released code does it: the block's FP32 input
   ``x_fp`` becomes a free variable ``x'``; Adam minimises, ``batch`` samples at a time, the
   per-sample BatchNorm term ``Σ_BN mean_n Σ_c (μ_c − mean_hw(x_BN))² + (σ_c − std_hw(x_BN))²``
   plus ``||x' − x_fp||²/λ_c``, ``x_BN`` the pre-BatchNorm values of the block's BatchNorms (FP32
   block run on ``x'``). The FP32 block on ``x'`` gives the target ``Y``. Without BatchNorm in the
   block (or ``-o dc false``) ``x' = x_fp`` and the target is the FP32 block output, as in BRECQ.
2. The block's weight rounding (AdaRound) and its activation steps (LSQ-style) are learned together
   on ``||Ŷ − Y||²`` (normalised by its round-to-nearest value) ``+ KL(softmax(z_fp/T) ||
   softmax(z_q/T))/λ_r`` ``+`` the rounding regulariser, where ``z_q`` is the block output on the
   quantized prefix's output passed through the rest of the network in FP32 and ``z_fp`` the FP32
   model's logits on the same samples. QDrop (the paper builds on it): while learning, each
   activation element is quantized with probability ``qdrop_prob``, and the MSE term's block input
   mixes quantized-prefix and ``x'`` elements with that probability.
3. If the hardened result scores worse on that objective (all calibration samples, no dropping) than
   nearest rounding with the initial steps, the initial grid is kept.

With ``cut_pooling`` (the default at 8-bit activations) a block ending in a global pooling is
compared before the pooling (:func:`cut_before_pooling`); with ``dc_gate`` > 0 a block's DC target
is used only where its own prediction difference is within ``dc_gate`` times the starting point's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
from onnxq.graph.plan import QuantPlan
from onnxq.search.evaluator import GraphRunner
from onnxq_brecq.blocks import Block, constant_names, external_inputs, find_blocks
from onnxq_brecq.torch_graph import AdaRoundWeight, Unsupported

from onnxq_pdquant.bn_stats import BNStat
from onnxq_pdquant.net import ActStep, Net


def _mse(pred: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """Squared error summed per sample, averaged over samples (BRECQ's ``lp_loss``, p = 2)."""
    total = torch.zeros(())
    for p, t in zip(pred, target):
        total = total + (p - t).pow(2).reshape(p.shape[0], -1).sum(1).mean()
    return total


def pd_kl(z_fp: torch.Tensor, z_q: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(z_fp/T) || softmax(z_q/T))``, averaged over samples (logits on the last axis)."""
    p_log = torch.log_softmax(z_fp / temperature, dim=-1)
    q_log = torch.log_softmax(z_q / temperature, dim=-1)
    return (p_log.exp() * (p_log - q_log)).reshape(z_fp.shape[0], -1).sum(1).mean()


def pd_block_weight(kl0: float, lambda_r: float, mode: str) -> float:
    """The weight of a block's PD term (``-o pd_weight``): 1 (``fixed``, the paper's), or
    ``kl0/(kl0 + λ_r)`` (``distance``), ``kl0`` the block's starting prediction difference.

    [design decision] With the block MSE normalised to 1 at the starting point, ``ρ = kl0/λ_r`` is the
    PD term's size beside the reconstruction term there; ``ρ/(1 + ρ)`` keeps the paper's weight where the
    start's prediction difference dominates and shrinks it in proportion where the block's quantization
    barely moves the predictions (README, "A PD weight that shrinks as the block's start nears FP32").
    """
    if mode == "fixed":
        return 1.0
    if mode != "distance":
        raise ValueError(f"pd_weight must be fixed or distance, not {mode!r}")
    kl0 = max(float(kl0), 0.0)
    return kl0 / (kl0 + lambda_r)


def bn_loss(values: dict[str, torch.Tensor], stats: list[BNStat]) -> torch.Tensor:
    """``Σ_BN mean_n Σ_c (μ_c − mean_hw(x_nc))² + (σ_c − std_hw(x_nc))²``, ``x`` the pre-BatchNorm value.

    Statistics per sample and channel over space, as the paper's released DC computes them; a
    tensor without spatial axes uses statistics over the batch instead.
    """
    total = torch.zeros(())
    for s in stats:
        y = values[s.tensor]
        c = y.shape[1]
        shape = (1, c) + (1,) * (y.dim() - 2)
        x = (y - torch.as_tensor(s.shift, dtype=y.dtype).reshape(shape)) * torch.as_tensor(s.gain, dtype=y.dtype).reshape(shape) \
            + torch.as_tensor(s.offset, dtype=y.dtype).reshape(shape)
        flat = x.reshape(x.shape[0], c, -1) if x.dim() > 2 else x.transpose(0, 1).reshape(1, c, -1)
        mean = flat.mean(2)
        std = (flat.var(2, unbiased=False) + 1e-8).sqrt()
        mu, sigma = torch.as_tensor(s.mean, dtype=y.dtype), torch.as_tensor(s.std, dtype=y.dtype)
        total = total + ((mu - mean).pow(2).sum(1) + (sigma - std).pow(2).sum(1)).mean()
    return total


def _closeness(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distance summed over channels (axis 1), averaged over the other axes (the paper's ``lp_loss``)."""
    d = (a - b).pow(2)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def _n(x: dict[str, torch.Tensor]) -> int:
    return max(int(v.shape[0]) if v.dim() else 1 for v in x.values())


def _take(x: dict[str, torch.Tensor], idx: Any, n: int) -> dict[str, torch.Tensor]:
    return {k: v[idx] if v.dim() and v.shape[0] == n else v for k, v in x.items()}


def _outputs(net: Net, x: dict[str, torch.Tensor], n: int, chunk: int = 256) -> list[torch.Tensor]:
    """``net``'s block outputs on all ``n`` samples of ``x``, run ``chunk`` samples at a time (no gradients)."""
    with torch.no_grad():
        return [torch.cat(v) for v in zip(*(net(_take(x, slice(s, s + chunk), n))[0] for s in range(0, n, chunk)))]


def distribution_correction(net: Net, x: dict[str, torch.Tensor], stats: list[BNStat], iters: int, lr: float, lambda_c: float,
                            batch: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """PD-Quant's DC: the FP32 block inputs ``x`` as free variables, optimised ``batch`` samples at a
    time for ``iters`` Adam steps each (reduce-on-plateau, patience 100) on ``bn_loss`` of the FP32
    block ``net`` plus the squared distance to ``x`` over ``λ_c``; returns the corrected inputs and
    the BatchNorm loss on all samples before and after."""
    keep = {s.tensor for s in stats}
    was = net.quantize
    net.quantize = False
    n = _n(x)
    free_keys = [k for k, v in x.items() if v.is_floating_point() and v.dim() and v.shape[0] == n]
    with torch.no_grad():
        before = float(bn_loss(net(x, keep)[1], stats))
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in free_keys}
    for start in range(0, n, batch):
        rows = slice(start, min(n, start + batch))
        ref = {k: x[k][rows] for k in free_keys}
        free = {k: v.clone().requires_grad_(True) for k, v in ref.items()}
        opt = torch.optim.Adam(list(free.values()), lr=lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=100, min_lr=1e-5)
        for _ in range(iters):
            _, vals = net({**_take(x, rows, n), **free}, keep)
            loss = bn_loss(vals, stats) + sum((_closeness(free[k], ref[k]) for k in free), torch.zeros(())) / lambda_c
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step(float(loss.detach()))
        for k in free_keys:
            parts[k].append(free[k].detach())
    corrected = {**x, **{k: torch.cat(v) for k, v in parts.items()}}
    with torch.no_grad():
        after = float(bn_loss(net(corrected, keep)[1], stats))
    net.quantize = was
    return corrected, {"bn_loss_before": before, "bn_loss_after": after}


#: weight-free ops that reduce a feature map to a vector (and the reshapes that follow them)
POOL_TAIL = {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "Flatten", "Reshape", "Squeeze"}
_POOLING = {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax"}


def cut_before_pooling(blocks: list[Block], model: onnx.ModelProto) -> list[Block]:
    """Move a block's trailing global pooling (and reshapes after it) to the start of the next block.

    [design decision] A block that ends in a global pooling is otherwise compared on the pooled
    vector: a few numbers per sample, which the rounding of the convs before it can match on 128
    calibration samples in many ways, most of them worse on other images (README). Cut before the
    pooling, the block is compared on the feature map, and the pooling becomes part of the next
    block (and of the rest of the network for the PD loss).
    """
    consts = constant_names(model)
    graph_outputs = {o.name for o in model.graph.output}
    out = list(blocks)
    for i in range(len(out) - 1):
        b = out[i]
        k = 0
        while k < len(b.nodes) - 1 and b.nodes[-1 - k].op_type in POOL_TAIL and b.nodes[-1 - k].name not in b.learnable:
            k += 1
        tail = b.nodes[len(b.nodes) - k :]
        if not any(n.op_type in _POOLING for n in tail):
            continue
        head = b.nodes[: len(b.nodes) - k]
        nxt = out[i + 1]
        later = tail + nxt.nodes + [n for blk in out[i + 2 :] for n in blk.nodes]
        reads = {t for n in later for t in n.input if t} | graph_outputs
        outputs = [o for n in head for o in n.output if o and o in reads]
        nodes = tail + nxt.nodes
        out[i] = Block(head, b.inputs, outputs, b.learnable)
        out[i + 1] = Block(nodes, external_inputs(nodes, consts), nxt.outputs, nxt.learnable)
    return out


class Rest:
    """The FP32 rest of the network after a unit: its logits from the unit's outputs, plus the earlier
    tensors it also reads (``side``, all samples; picked per mini-batch)."""

    def __init__(self, net: Net, side: dict[str, torch.Tensor]) -> None:
        self.net, self.side = net, side

    def __call__(self, outputs: dict[str, torch.Tensor], idx: Any) -> torch.Tensor:
        n = _n(self.side) if self.side else 0
        return self.net({**outputs, **_take(self.side, idx, n)})[0][0]


class PDReconstructor:
    """Learns weight rounding and activation steps block by block with PD-Quant's objective."""

    def __init__(self, model: onnx.ModelProto, plan: QuantPlan, chunks: list[dict[str, np.ndarray]], learnable: dict[str, tuple[str, int, str]],
                 bn: dict[str, BNStat], options: Any, progress: Callable[[int], None] | None = None) -> None:
        self.model, self.plan, self.o, self.learnable, self.bn = model, plan, options, learnable, bn
        self.sessions: dict[str, object] = {}
        self.q_run = GraphRunner(model, chunks, plan, self.sessions)
        self.f_run = GraphRunner(model, chunks, None, self.sessions)
        self.logits_name = model.graph.output[0].name
        fp = GraphRunner(model, chunks, None, self.sessions, keep=[self.logits_name])
        fp.run_all()
        self.z_fp = torch.from_numpy(np.ascontiguousarray(fp.value(self.logits_name), dtype=np.float32))
        self.consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        self.nodes = [n for n in model.graph.node if n.op_type != "Constant"]
        self.weight_edges = {(s.node, s.input_index): key for key, s in plan.weights.items()}
        grouped = {t for g in plan.share_groups for t in g}
        # activation steps learned per tensor; a TensorRT share group (one scale for several tensors) stays fixed
        self.act_sites = {t: s for t, s in plan.activations.items() if s.qparams is not None and t not in grouped}
        self.fixed_acts = {tuple(c): s.qparams for t, s in plan.activations.items() if t in grouped and s.qparams is not None for c in s.consumers}
        self.results: dict[str, np.ndarray] = {}
        self.report: list[dict[str, Any]] = []
        self.progress = progress or (lambda n: None)
        self.gen = torch.Generator().manual_seed(int(options.seed))
        self.pd_w = 1.0  # the current block's PD weight (pd_block_weight)

    def run(self) -> None:
        with torch.random.fork_rng():  # QDrop's masks draw from torch's global generator: seeded, and restored after
            torch.manual_seed(int(self.o.seed))
            blocks = find_blocks(self.model, set(self.learnable), self.o.unit)
            if self.o.cut_pooling and self.o.unit == "block":
                blocks = cut_before_pooling(blocks, self.model)
            for block in blocks:
                try:
                    self._block(block)
                except Unsupported as exc:
                    self.report.append({"block": block.names, "skipped": str(exc)})
                    self.progress(len(block.learnable))

    # -- pieces ------------------------------------------------------------------------------
    def _block_net(self, block: Block) -> tuple[Net, dict[str, AdaRoundWeight], dict[str, ActStep]]:
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
                if node.name in self.learnable and self.learnable[node.name][1] == i:
                    m = AdaRoundWeight(self.consts[name], site.qparams)  # type: ignore[arg-type]
                    m.site = key
                    rounding[(node.name, i)] = m
                    modules[name] = m
                else:
                    fixed[(node.name, i)] = site.qparams.fake_quantize(self.results.get(name, self.consts[name]))  # type: ignore[union-attr]
        steps: dict[str, ActStep] = {}
        acts: dict[tuple[str, int], ActStep] = {}
        for t, site in self.act_sites.items():
            for c in site.consumers:
                if c[0] in names:
                    if t not in steps:
                        steps[t] = ActStep(site.qparams)  # type: ignore[arg-type]
                    acts[tuple(c)] = steps[t]  # type: ignore[index]
        for c, q in self.fixed_acts.items():
            if c[0] in names:
                fixed_step = ActStep(q)
                fixed_step.u.requires_grad_(False)
                acts[c] = fixed_step  # type: ignore[index]
        if not self.o.learn_act_steps:
            for s in steps.values():
                s.u.requires_grad_(False)
        net = Net(block.nodes, self.consts, block.outputs, rounding, fixed, acts)
        return net, modules, steps

    def _rest_net(self, block: Block) -> Rest | None:
        """FP32 nodes after the block, from its output(s) to the logits (None: the block ends the network).

        A layer unit inside a residual block leaves tensors the rest also reads (the skip branch):
        those are the quantized prefix's values, read once for all samples.
        """
        if self.logits_name in block.outputs:
            return None
        last = max(i for i, n in enumerate(self.nodes) if n.name in set(block.names))
        rest = self.nodes[last + 1 :]
        net = Net(rest, self.consts, [self.logits_name])
        net.quantize = False
        produced = {o for nd in rest for o in nd.output}
        side = {t for nd in rest for t in nd.input if t and t not in produced and t not in self.consts and t not in block.outputs}
        return Rest(net, {t: torch.from_numpy(np.ascontiguousarray(self.q_run.value(t))) for t in sorted(side)})

    def _objective(self, net: Net, rest: Rest | None, x, y, idx, n: int, norm: float, x_fp=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised block MSE, PD loss) on samples ``idx``.

        With ``x_fp`` (QDrop, while learning) the block runs on two copies of the batch, as the
        paper's code does: the MSE on inputs mixed element-wise (probability ``qdrop_prob``) from the
        quantized ``x`` and the FP32 ``x_fp``, the PD loss on the quantized inputs alone.
        """
        xq = _take(x, idx, n)
        b = len(idx)
        if x_fp is None:
            out, _ = net(xq)
            rec_out = pd_out = out
        else:
            xf = _take(x_fp, idx, n)
            feeds = {}
            for k, v in xq.items():
                if v.dim() and v.shape[0] == b and v.is_floating_point():
                    mixed = torch.where(torch.rand_like(v) < self.o.qdrop_prob, v, xf[k])
                    feeds[k] = torch.cat([mixed, v]) if self.o.pd_loss else mixed
                else:
                    feeds[k] = v
            out, _ = net(feeds)
            rec_out = [o[:b] for o in out]
            pd_out = [o[b:] for o in out] if self.o.pd_loss else rec_out
        rec = _mse(rec_out, [t[idx] for t in y]) * norm
        if not self.o.pd_loss:
            return rec, torch.zeros(())
        z_q = pd_out[net.outputs.index(self.logits_name)] if rest is None else rest(dict(zip(net.outputs, pd_out)), idx)
        return rec, pd_kl(self.z_fp[idx], z_q, self.o.temperature) / self.o.lambda_r * self.pd_w  # x 1.0 exact: fixed is unchanged

    def _score(self, net: Net, rest: Rest | None, x, y, norm: float, chunk: int = 256) -> tuple[float, float]:
        """(normalised block MSE, PD loss) on all samples."""
        n = _n(x)
        rec_sum = pd_sum = 0.0
        with torch.no_grad():
            for s in range(0, n, chunk):
                idx = torch.arange(s, min(n, s + chunk))
                rec, pd = self._objective(net, rest, x, y, idx, n, norm)
                rec_sum += float(rec) * len(idx)
                pd_sum += float(pd) * len(idx)
        return rec_sum / n, pd_sum / n

    def _logits_kl(self, rest: Rest | None, block: Block, y: list[torch.Tensor], chunk: int = 256) -> float:
        """KL(softmax(z_fp/T) || softmax(z/T)) of the logits that block outputs ``y`` (all samples) give through the rest of the network."""
        n = int(y[0].shape[0])
        total = 0.0
        with torch.no_grad():
            for s in range(0, n, chunk):
                out = [t[s : s + chunk] for t in y]
                z = out[block.outputs.index(self.logits_name)] if rest is None else rest(dict(zip(block.outputs, out)), slice(s, s + chunk))
                total += float(pd_kl(self.z_fp[s : s + chunk], z, self.o.temperature)) * len(out[0])
        return total / n

    # -- one block ---------------------------------------------------------------------------
    def _block(self, block: Block) -> None:
        o = self.o
        t0 = time.perf_counter()
        net, modules, steps = self._block_net(block)
        rest = self._rest_net(block)
        x = {t: torch.from_numpy(np.ascontiguousarray(self.q_run.value(t))) for t in block.inputs}
        x_fp = {t: torch.from_numpy(np.ascontiguousarray(self.f_run.value(t))) for t in block.inputs}
        n = _n(x)
        produced = {out for nd in block.nodes for out in nd.output}
        stats = [s for t, s in self.bn.items() if t in produced]
        entry: dict[str, Any] = {"block": block.names, "layers": [k for k in block.names if k in self.learnable],
                                 "act_steps": len(steps), "batchnorms": len(stats)}
        y = [torch.from_numpy(np.ascontiguousarray(self.f_run.value(t), dtype=np.float32)) for t in block.outputs]
        for m in modules.values():
            m.mode = "nearest"
        # the starting point's prediction difference: nearest rounding, initial steps, quantized prefix
        kl0 = self._logits_kl(rest, block, _outputs(net, x, n))
        entry["kl_start"] = kl0
        self.pd_w = pd_block_weight(kl0, o.lambda_r, o.pd_weight)
        entry["pd_weight"] = self.pd_w
        if o.dc and stats:
            # as the paper's released code: the FP32 block input is corrected, and the FP32 block on it
            # gives the target (the quantized block still reads the quantized prefix's output)
            x_dc, dc_rep = distribution_correction(net, x_fp, stats, o.dc_iters, o.dc_lr, o.lambda_c, o.batch)
            entry.update(dc_rep)
            net.quantize = False
            y_dc = _outputs(net, x_dc, n)
            net.quantize = True
            # [design decision] the corrected target's own prediction difference against how far the
            # quantized block is from FP32: DC is used only where its target is the closer one by dc_gate
            entry["kl_dc_target"] = self._logits_kl(rest, block, y_dc)
            entry["dc_used"] = o.dc_gate <= 0 or entry["kl_dc_target"] <= o.dc_gate * kl0
            if entry["dc_used"]:
                x_fp, y = x_dc, y_dc
        with torch.no_grad():
            rec0 = sum(float(_mse(net(_take(x, slice(s, s + 256), n))[0], [t[s : s + 256] for t in y])) * min(256, n - s) for s in range(0, n, 256)) / n
        norm = 1.0 / max(rec0, 1e-12)
        start = self._score(net, rest, x, y, norm)
        for m in modules.values():
            m.mode = "soft"
        params = [{"params": [m.v for m in modules.values()], "lr": o.lr}]
        act_params = [s.u for s in steps.values() if s.u.requires_grad]
        if act_params:
            params.append({"params": act_params, "lr": o.act_lr})
        if modules or act_params:
            opt = torch.optim.Adam(params)
            warm = int(o.warmup * o.iters)
            qdrop = o.qdrop_prob < 1.0
            for s in steps.values():
                s.prob = o.qdrop_prob
            for it in range(o.iters):
                idx = torch.randint(0, n, (min(o.batch, n),), generator=self.gen)
                rec, pd = self._objective(net, rest, x, y, idx, n, norm, x_fp if qdrop else None)
                loss = rec + pd
                if it >= warm and modules:
                    rel = (it - warm) / max(1, o.iters - warm)
                    beta = o.beta_end + (o.beta_start - o.beta_end) * max(0.0, 1.0 - rel)
                    loss = loss + o.reg_weight * sum(m.regulariser(beta) for m in modules.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for s in steps.values():
            s.prob = 1.0
        for m in modules.values():
            m.mode = "hard"
        learned = self._score(net, rest, x, y, norm)
        keep = sum(learned) <= sum(start)
        entry.update({"mse_start": start[0], "mse_learned": learned[0], "pd_start": start[1], "pd_learned": learned[1],
                      "kept": "learned" if keep else "initial"})
        if keep:
            for t, s in steps.items():
                q = s.qparams()
                site = self.plan.activations[t]
                site.qparams = q
                site.range = tuple(float(v) for v in q.real_range())  # type: ignore[assignment]
            entry["step_change"] = {t: float(torch.exp(s.u.detach())) for t, s in steps.items()}
        for name, m in modules.items():
            ints = m.integers("hard" if keep else "nearest")
            value = (ints.astype(np.float32) * m.step.numpy()).astype(np.float32)
            self.results[name] = value
            self.q_run.consts[name] = value
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        self.report.append(entry)
        self.progress(len(modules))

