"""The fidelity check every ``optimize`` run ends with: the quantized model against FP32, and a warning on a collapse.

It runs both models on a few batches (the evaluation data when given, otherwise a sample of
the calibration data, labelled in-sample), streams per-output agreement through
:func:`~onnxq.evaluate.compare.compare_runners` (per-sample cosine: mean, worst, 1st percentile;
SQNR; top-1 agreement where an output holds class scores) and warns when an output collapsed.
Only then does it pay for the per-layer SQNR (:func:`~onnxq.evaluate.compare.layer_errors`), to
name the layers where the error starts, and a suggestion of what to try.

Thresholds (:data:`THRESHOLDS`) were chosen by measurement: docs/methods.md, "Fidelity check".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.backends.ort import OrtBackend
from onnxq.calib.readers import Batch
from onnxq.evaluate.compare import LAYER_OPS, Candidate, batch_axes, compare_runners, layer_errors, sample_count
from onnxq.options import described


@dataclass
class OutputFidelity:
    """Agreement of one model output with FP32."""

    name: str = described("output name")
    cosine: float = described("mean per-sample cosine similarity with FP32")
    cosine_worst: float = described("worst sample's cosine")
    cosine_p1: float = described("1st percentile of the per-sample cosine")
    sqnr_db: float = described("signal-to-quantization-noise ratio over all samples, dB (null: identical)")
    top1_agreement: float | None = described("share of samples whose arg-max class matches FP32 (class-score outputs only: [N, C] with a "
                                              "clear FP32 winner on most samples, unlike an embedding)")
    scored: bool = described("a float output, judged by the thresholds (integer outputs are reported only)", default=True)


@dataclass
class LayerFidelity:
    """One layer output's error against FP32 (computed only when the check warns)."""

    tensor: str = described("layer output tensor")
    node: str = described("the node that computes it (what --exclude takes)")
    sqnr_db: float = described("SQNR against FP32, dB")
    cosine: float = described("mean per-sample cosine against FP32")


@dataclass
class Fidelity:
    """The run's fidelity check: the quantized model against FP32."""

    data: str = described('"evaluation" (the evaluation data) or "calibration" (a sample of it: in-sample)')
    in_sample: bool = described("measured on calibration data the model was calibrated on (optimistic)")
    samples: int = described("samples compared")
    outputs: list[OutputFidelity] = described("per-output agreement")
    warned: bool = described("the check found a collapse (see warnings)")
    warnings: list[str] = described("one line per collapsed output")
    worst_layers: list[LayerFidelity] = described("the layers with the lowest SQNR (only when warned)")
    suggestion: str | None = described("what to try instead, when onnxq knows")
    error: str | None = described("why the check could not run (null: it ran)")
    seconds: float = described("time the check took")

    def failed(self) -> bool:
        """Warned, or could not run."""
        return self.warned or self.error is not None


@dataclass(frozen=True)
class Thresholds:
    """When an output counts as collapsed (any one suffices)."""

    #: mean per-sample cosine below this
    cosine: float = 0.90
    #: 1st-percentile per-sample cosine below this (a few samples destroyed while the mean looks fine)
    cosine_p1: float = 0.50
    #: top-1 agreement with FP32 below this, for class-score outputs
    top1_agreement: float = 0.90


THRESHOLDS = Thresholds()
#: an [N, C] output counts as class scores when at least this share of samples has a clear FP32 winner
#: (digits logits: all; MiniLM's 384-wide sentence embedding: few)
CLASS_SCORES_SHARE = 0.5


def limited(batches: Callable[[], Iterable[Batch]], max_batches: int | None, max_samples: int | None,
            axes: dict[str, int | None] | None = None) -> Callable[[], Iterator[Batch]]:
    """A re-iterable source of the first batches of ``batches()``: stops after ``max_batches`` or once ``max_samples`` are in."""

    def source() -> Iterator[Batch]:
        seen = 0
        for k, b in enumerate(batches()):
            if (max_batches is not None and k >= max_batches) or (max_samples is not None and seen >= max_samples):
                return
            seen += sample_count(b.feeds, axes)
            yield b

    return source


def collapsed(out: OutputFidelity, t: Thresholds = THRESHOLDS) -> str | None:
    """Why ``out`` counts as collapsed, or None."""
    if not (math.isfinite(out.cosine) and math.isfinite(out.cosine_p1)) or (isinstance(out.sqnr_db, float) and math.isnan(out.sqnr_db)):
        return "the quantized output holds NaN or Inf"
    if not out.scored:
        return None  # integer outputs (indices, ids, masks) are decisions, not scores: reported, not judged
    why = []
    if out.top1_agreement is not None and out.top1_agreement < t.top1_agreement:
        why.append(f"top-1 agreement {out.top1_agreement:.3f} < {t.top1_agreement}")
    if out.cosine < t.cosine:
        why.append(f"mean cosine {out.cosine:.4f} < {t.cosine}")
    if out.cosine_p1 < t.cosine_p1:
        why.append(f"1st-percentile cosine {out.cosine_p1:.4f} < {t.cosine_p1}")
    return ", ".join(why) or None


def suggest(methods: Sequence[str], target: str, bits: int, worst_node: str | None = None) -> str | None:
    """The command-line change most likely to fix a collapse of a run with ``methods`` on ``target``."""
    exclude = f"--exclude '{worst_node}'" if worst_node else "--exclude NODE"
    kl = [m for m in methods if "entropy" in m or m in ("cfws",)]
    if kl:
        return f"try -p mse (or -p minmax) instead of -p {kl[0]}: KL thresholds can clip what matters on this model"
    if "percentile" in methods:
        return "try -p mse, or -o percentile closer to 100: the percentile clips too much of this model's ranges"
    if bits == 7:
        return "try --bits 8"
    if target == "trt":
        return "try --target ort to see whether TensorRT's Q/DQ placement is at fault; `onnxq lint --target trt` checks it"
    if "mse" not in methods:
        return f"try -p mse, or keep the worst layer in float with {exclude}"
    return f"keep the worst layer in float with {exclude}"


def check_fidelity(reference: onnx.ModelProto, quantized: onnx.ModelProto, batches: Callable[[], Iterable[Batch]], *,
                   in_sample: bool, methods: Sequence[str] = (), target: str = "ort", bits: int = 8,
                   thresholds: Thresholds = THRESHOLDS, max_batches: int | None = None, max_samples: int | None = None) -> Fidelity:
    """Compare ``quantized`` with the FP32 ``reference`` on (the first batches of) ``batches()``.

    Per-layer SQNR is computed only when an output collapsed, on one batch, to name the worst
    layers. ``methods``, ``target`` and ``bits`` pick the suggestion.
    """
    t0 = time.perf_counter()
    axes = batch_axes(reference)
    source = limited(batches, max_batches, max_samples, axes)
    backend = OrtBackend()
    rows = [Candidate("fp32", lambda: backend.runner(reference, "fp32", reference=True)), Candidate("quantized", lambda: backend.runner(quantized, "quantized"))]
    evals = compare_runners(rows, source, axes=axes)
    fid = fidelity_of(evals[1].outputs, reference, quantized, source, in_sample=in_sample, methods=methods, target=target, bits=bits,
                      thresholds=thresholds)
    fid.seconds = round(time.perf_counter() - t0, 3)
    return fid


def fidelity_of(metrics: Mapping[str, Mapping[str, float]], reference: onnx.ModelProto, quantized: onnx.ModelProto,
                batches: Callable[[], Iterable[Batch]], *, in_sample: bool, methods: Sequence[str] = (), target: str = "ort", bits: int = 8,
                thresholds: Thresholds = THRESHOLDS) -> Fidelity:
    """The fidelity verdict from per-output metrics already measured (a comparison row's ``outputs``).

    ``optimize --eval-data`` judges its evaluation table's row this way instead of running the
    models twice. On a collapse the worst layers are measured on the first of ``batches()``.
    """
    t0 = time.perf_counter()
    outputs = []
    for name, m in metrics.items():
        outputs.append(OutputFidelity(name, round(m["cosine"], 6), round(m["cosine_worst"], 6), round(m["cosine_p1"], 6),
                                      round(m["sqnr_db"], 3) if math.isfinite(m["sqnr_db"]) else m["sqnr_db"],
                                      round(m["top1_agreement"], 6) if m.get("confident_share", 0.0) >= CLASS_SCORES_SHARE else None,
                                      not m.get("integer", False)))
    samples = max((int(m["samples"]) for m in metrics.values()), default=0)
    warnings = [f"output '{o.name}' collapsed against FP32 ({why})" for o in outputs if (why := collapsed(o, thresholds))]
    fid = Fidelity("calibration" if in_sample else "evaluation", in_sample, samples, outputs, bool(warnings), warnings, [], None, None, 0.0)
    if warnings:
        producer = {n.output[0]: n.name for n in quantized.graph.node if n.op_type in LAYER_OPS and n.output}
        errors = layer_errors(reference, quantized, list(producer), batches, max_batches=1)
        worst = sorted(errors.items(), key=lambda kv: _key(kv[1]["sqnr_db"]))[:3]
        fid.worst_layers = [LayerFidelity(t, producer[t], v["sqnr_db"], v["cosine"]) for t, v in worst]
        fid.suggestion = suggest(methods, target, bits, fid.worst_layers[0].node if fid.worst_layers else None)
    fid.seconds = round(time.perf_counter() - t0, 3)
    return fid


def _key(sqnr: float) -> float:
    return sqnr if not np.isnan(sqnr) else -math.inf
