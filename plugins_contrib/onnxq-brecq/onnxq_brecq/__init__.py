"""``brecq``: BRECQ-style block reconstruction with learned (AdaRound) weight rounding (plugins_contrib/onnxq-brecq/README.md).

1. Weight steps per output channel from BRECQ's Lp init (p = 2.4, max-abs shrunk by 1% up to 80
   times) on a ``weight_bits`` grid (int8 storage restricted to the W-bit range, e.g. [−7, 7]
   for narrow 4-bit weights); the first and last weighted layers stay at the target's bits.
2. For each block (the graph cut at single-tensor articulation points, so residual blocks come out
   whole; or one layer per block with ``-o blocks layer``): learn the rounding of every weight in
   it with AdaRound's rectified sigmoid and annealed regulariser, input from the quantized prefix,
   target the FP32 block output. PyTorch does the optimisation (optional dependency:
   ``pip install 'onnxq-brecq[torch]'``).
3. The learned integers are written back as ``integer × step`` float weights, which the host's
   ordinary QDQ rewrite turns into exactly those integers + ``DequantizeLinear``.

Activations follow the target (``--bits``) and whatever calibrator runs before (``-p mse -p
brecq``; the host's default is ``trt-entropy``), so ``-o weight_bits 4`` gives W4A8. Not done in
this version: BRECQ's step 3 (LSQ learning of activation steps) and the Fisher-weighted loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnxq.graph.edit import with_initializers
from onnxq.calib.statistics import StatRequest
from onnxq.search.samples import samples_request, take_samples
from onnxq.calib.progress import progress
from onnxq.errors import OnnxqError, OptionError
from onnxq.hookspecs import hookimpl
from onnxq.method import QuantMethod, RunContext

from onnxq.options import option

from onnxq_brecq.grid import lp_steps, maxabs_steps, weight_qparams, weight_range

__version__ = "0.1.0"


@dataclass(frozen=True)
class BrecqOptions:
    """Options of BRECQ (defaults: plugins_contrib/onnxq-brecq/README.md, iterations cut for CPU)."""

    weight_bits: int | None = option(None, "weight grid bits, 2-8 (default: the target's --bits); 4 gives W4A8 with int8 storage restricted to the 4-bit range")
    keep_first_last: bool = option(True, "keep the first and last weighted layers at the target's bits (BRECQ's default)")
    rounding: Literal["learned", "nearest"] = option("learned", "learned: AdaRound block reconstruction; nearest: the same step init with round-to-nearest (the baseline)")
    init: Literal["lp", "maxabs"] = option("lp", "weight step init: Lp search (p=2.4, shrink max-abs by 1% up to 80 times) or per-channel max-abs")
    init_p: float = option(2.4, "p of the Lp step search")
    blocks: Literal["block", "layer"] = option("block", "reconstruction unit: blocks between single-tensor cuts of the graph, or single layers (+ their Relu)")
    iters: int = option(2000, "Adam iterations per block (paper: 20000)")
    batch: int = option(32, "samples per iteration")
    lr: float = option(3e-3, "Adam learning rate of the rounding variables")
    reg_weight: float = option(0.1, "weight λ of the rounding regulariser (paper 0.01 on an unnormalised loss over 20k iterations)")
    beta_start: float = option(20.0, "regulariser exponent β at the end of the warm-up")
    beta_end: float = option(2.0, "regulariser exponent β at the last iteration")
    warmup: float = option(0.2, "fraction of the iterations without the regulariser")
    normalize: bool = option(True, "divide the reconstruction loss by the block's round-to-nearest loss, so reg_weight means the same in every block")
    samples: int = option(1024, "calibration samples used for reconstruction")
    act_quant: bool = option(True, "fake-quantize activations inside the block (fixed steps, straight-through) while learning")
    seed: int = option(0, "seed of the mini-batch sampling")
    threads: int = option(1, "PyTorch intra-op threads (0: PyTorch's default)")

    def validate(self) -> None:
        if self.weight_bits is not None and not 2 <= self.weight_bits <= 8:
            raise ValueError("weight_bits must be between 2 and 8")
        if self.iters < 0 or self.batch < 1 or self.samples < 1:
            raise ValueError("iters must be >= 0, batch and samples >= 1")
        if not 0 <= self.warmup < 1 or self.lr <= 0 or self.reg_weight < 0:
            raise ValueError("need 0 <= warmup < 1, lr > 0, reg_weight >= 0")
        if self.threads < 0:
            raise ValueError("threads must be >= 0")


class Brecq(QuantMethod):
    """Lp-initialised W-bit weight steps, then block-wise AdaRound reconstruction of the weight rounding."""

    name = "brecq"
    summary = "BRECQ: block-wise reconstruction with learned (AdaRound) weight rounding; -o weight_bits 4 for W4A8 (needs torch)"
    Options = BrecqOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        #: learned ``integer × step`` weights by initializer, written by quantized_rewrite
        self._learned: dict[str, np.ndarray] = {}

    def quantized_rewrite(self, ctx: RunContext) -> onnx.ModelProto | None:
        """The working model with the learned weights in place of the float ones (None if nothing was learned)."""
        return with_initializers(ctx.model, {k: v.astype(np.float32) for k, v in self._learned.items()}) if self._learned else None

    def declare_statistics(self, ctx: RunContext) -> list[StatRequest]:
        """The default requests, plus the reconstruction's calibration samples from the same pass."""
        o = self.options
        learns = o.rounding == "learned" and o.iters > 0
        return super().declare_statistics(ctx) + ([samples_request(o.samples)] if learns else [])

    def refine(self, ctx: RunContext) -> None:
        o = self.options
        self._learned = {}
        if getattr(ctx.profile, "weight_only", False):
            raise OptionError("brecq learns the rounding of per-channel weight grids; for 4-bit weights use --bits 8 with -o weight_bits 4 "
                              "(the --bits 4 block-wise weight-only format is not supported)")
        plan = ctx.plan
        bits = o.weight_bits or ctx.profile.bits
        learnable = self._learnable(ctx)
        order = [n.name for n in ctx.model.graph.node if n.name in learnable]
        edge = {order[0], order[-1]} if (o.keep_first_last and order) else set()
        layer_bits: dict[str, int] = {}
        for node, (key, _i, init) in learnable.items():
            site = plan.weights[key]
            b = ctx.profile.bits if node in edge else bits
            qmin, qmax = weight_range(b, ctx.profile)
            w = ctx.weight(init)
            steps = lp_steps(w, site.axis, qmin, qmax, o.init_p) if o.init == "lp" else maxabs_steps(w, site.axis, qmax)
            site.qparams = weight_qparams(steps, site.axis, qmin, qmax)
            layer_bits[node] = b
        report: dict[str, Any] = {"weight_bits": bits, "layer_bits": layer_bits, "rounding": o.rounding, "init": o.init}
        ctx.report[self.name] = report
        if o.rounding == "nearest" or not learnable or o.iters == 0:
            return
        try:
            import torch
        except ImportError:
            raise OnnxqError("brecq needs PyTorch to learn the rounding: pip install 'onnxq-brecq[torch]' (or use -o rounding nearest)") from None
        from onnxq_brecq.reconstruct import Reconstructor

        saved_threads = torch.get_num_threads()
        if o.threads:
            torch.set_num_threads(o.threads)
        try:
            chunks = take_samples(ctx, o.samples)
            with progress("brecq: layers", ctx.show_progress, total=len(learnable), unit="layer") as bar:
                rec = Reconstructor(ctx.model, plan, chunks, learnable, o, bar.update)
                rec.run()
        finally:
            torch.set_num_threads(saved_threads)
        self._learned = rec.results
        report["samples"] = int(sum(next(iter(c.values())).shape[0] for c in chunks))
        report["blocks"] = rec.report

    @staticmethod
    def _learnable(ctx: RunContext) -> dict[str, tuple[str, int, str]]:
        """Weighted node → (weight-site key, input index, initializer) for weights read by exactly one node."""
        readers: dict[str, int] = {}
        for n in ctx.model.graph.node:
            for i in n.input:
                readers[i] = readers.get(i, 0) + 1
        out = {}
        for key, site in ctx.plan.weights.items():
            if site.qparams is not None and getattr(site.qparams, "block_size", None):
                continue  # blocked (weight-only INT4) grids are left to their own method
            if readers.get(site.initializer, 0) == 1:
                out[site.node] = (key, site.input_index, site.initializer)
        return out


@hookimpl
def register_methods(register) -> None:
    register(Brecq)
