"""The fidelity check every ``optimize`` run ends with: the quantized model against FP32, and a warning on a collapse.

It runs both models on a few batches (the evaluation data when given, otherwise a sample of
the calibration data, labelled in-sample), streams per-output agreement through
:func:`~onnxq.evaluate.compare.compare_runners` (per-sample cosine: mean, worst, 1st percentile;
SQNR; top-1 agreement where an output holds class scores) and warns when an output collapsed.
Outputs that look like embeddings (``[N, D]`` floats that are not class scores) are also judged
by how they rank the compared samples against each other (:func:`neighbour_agreement`): a
sentence embedding can keep a cosine of 0.97 with FP32 and still swap which sentences are
nearest, which is what a retrieval task reads. Only on a warning does the check pay for the
per-layer SQNR (:func:`~onnxq.evaluate.compare.layer_errors`), to name the layers where the error
starts, and a suggestion of what to try.

Thresholds (:data:`THRESHOLDS`) were chosen by measurement: docs/methods.md, "Fidelity check".
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.backends.ort import OrtBackend
from onnxq.calib.readers import Batch
from onnxq.graph.index import concatenated_outputs, output_roles
from onnxq.evaluate.compare import LAYER_OPS, Candidate, batch_axes, compare_runners, layer_errors, sample_count, split_batch
from onnxq.options import described
from onnxq.runtime.runner import Runner


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
    cosine_p1_centred: float | None = described(
        "class-score outputs only: the 1st percentile of the per-sample cosine after each sample's mean score is taken off "
        "(a softmax reads only the differences between a sample's scores); the 1st-percentile rule judges this one for "
        "them: a class whose logits FP32 lifts by a large common offset read 0.3-0.5 raw where a clipped range removed "
        "the offset, with no top-1 changed", default=None)
    neighbour_agreement: float | None = described(
        "embedding-like outputs ([N, D] floats, not class scores) only: share of sample triples (i, j, k) of the compared samples "
        "on which the quantized output orders cos(i, j) and cos(i, k) as FP32 does (what a retrieval reads; 0.5: chance)", default=None)
    explained_variance: float | None = described(
        "float outputs of the same size on every sample: 1 - sum((quantized - FP32)^2) / sum((FP32 - its mean over the "
        "samples)^2), element by element, the share of FP32's variation across samples kept (class scores after each "
        "sample's mean is taken off: a softmax reads their differences); judged for outputs of one value per sample, "
        "whose cosine is 1 whatever the error, and for maps, images and regression targets, whose cosine reads their "
        "offset; not for embeddings and class maps, judged by neighbours and arg-max", default=None)
    length_differs: float | None = described(
        "outputs whose length the model computes from its data (a decoder's loop, NMS): the share of compared batches "
        "in which the quantized output had another shape than FP32's (the other figures then cover the part both "
        "computed); null: always the same shape", default=None)
    worst_part: str | None = described(
        "outputs a Concat makes of parts (a detector's boxes and class scores: YOLOv8's [N, 4 + classes, anchors]): the part "
        "with the lowest mean per-sample cosine, as its positions along the concatenated axis", default=None)
    worst_part_cosine: float | None = described(
        "that part's mean per-sample cosine with FP32, judged as the whole output's is (the whole output's cosine reads "
        "its largest part: a detector's boxes in pixels)", default=None)
    label_agreement: float | None = described(
        "integer outputs of one value per sample (a class id an ArgMax computed in the model) only: share of samples whose "
        "value equals FP32's; judged at the top-1 threshold", default=None)
    exact_agreement: float | None = described(
        "other integer outputs (indices, masks, token ids): share of values equal to FP32's (reported, not judged: one "
        "swapped near-tie shifts every index after it)", default=None)
    position_agreement: float | None = described(
        "class scores per position only ([N, T, C] token or CTC logits: last axis; [N, C, H, W] segmentation maps: axis 1; "
        "FP32 with a clear winner at most positions): share of those clear positions whose arg-max class matches FP32; "
        "for a map of class ids the model's own ArgMax computes (a segmentation map, a greedy CTC decode): share of all "
        "positions whose id matches", default=None)
    decoded_agreement: float | None = described(
        "CTC outputs (a sequence whose most frequent FP32 arg-max class, the blank, takes at least half the steps; also a "
        "greedy decode the model's ArgMax computes): 1 - the edit distance between FP32's and the quantized greedy decodes "
        "(repeats merged, blank dropped) over FP32's decoded length, the share of read characters kept; judged at 0.95, "
        "at most one character in twenty changed (the blank steps between characters agree whatever happens to the "
        "characters)", default=None)
    decoded_exact: float | None = described("CTC outputs: share of samples decoded exactly as FP32's (reported, not judged)",
                                            default=None)
    accuracy_drop: float | None = described(
        "class-score outputs on labelled data only: FP32's accuracy less the quantized model's, in points; judged when it "
        "exceeds both the threshold and twice its noise (accuracy_drop_noise)", default=None)
    accuracy_drop_noise: float | None = described(
        "the drop's standard deviation were the changed predictions right or wrong at random: 100 sqrt(changed) / samples, "
        "points (a few changed predictions of a small evaluation set are no measured drop)", default=None)
    one_value: bool = described("one value per sample (a probability, a score): judged by its explained variance alone, "
                                "its per-sample cosine being the sign of a product", default=False)
    role: str | None = described(
        "what the graph says the output is, where it holds decisions rather than scores: 'argmax' (the model's ArgMax), "
        "'topk_values' / 'topk_indices' (a TopK's; the indices' first column is judged as a class id), 'embedding' (divided "
        "by its norm: no class scores, judged by its neighbours), 'selected' (rows "
        "picked by the data: behind a NonMaxSuppression or gathered by a TopK's indices, so their order follows near-ties "
        "and the 1st-percentile cosine is not judged)", default=None)


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
    #: neighbour agreement with FP32 below this, for embedding-like outputs (:func:`neighbour_agreement`): MiniLM's
    #: sentence embedding keeps 0.977-0.986 with -p smoothquant -p minmax, 0.91-0.955 with trt-entropy, percentile and
    #: every calibrator on --target trt (retrieval top-1 agreement with FP32 <= 0.86)
    neighbour_agreement: float = 0.96
    #: explained variance below this, for outputs of one value per sample (the share of FP32's variation across samples
    #: kept): a binary classifier's sigmoid output squashed toward 0.5 (SQNR 4 dB) kept every per-sample cosine at 1.0; a
    #: click-through model at 0.836 had lost 3 points of AUC (0.80, the error a per-sample cosine of 0.9 allows, before)
    explained_variance: float = 0.90
    #: the same, element by element, for outputs of several values per sample (maps, images, regression targets): good
    #: recipes kept 0.985 or more on eleven trained models and 0.893 on a YOLOX detector's raw anchors (box F1 0.991,
    #: its background anchors' box offsets weigh in), damage read 0.18-0.86 (a denoiser made worse than its noisy input:
    #: 0.857, a forecast with 3x the MAE: 0.869)
    explained_variance_elements: float = 0.85
    #: arg-max agreement per position below this, for class scores per position (token logits, CTC, segmentation),
    #: counted where FP32's winner is clear: the top-1 threshold, per position (torchvision's LR-ASPP kept cosine 0.966
    #: with 70 % of its pixel labels, random weights, and the check said nothing)
    position_agreement: float = 0.90
    #: decoded agreement below this, for CTC outputs: at most one character in twenty read differently from FP32. A
    #: reader's own error rate is a few percent at most, so nearly every character changed is an error, as for the
    #: accuracy drop: a speech CTC model at 0.929-0.949 had its lines read right fall from 98 % to 70-74 % (its symbol
    #: error rate from 0.2 % to 5-7 %), quiet at the top-1 threshold, 0.90, used until 2026-12-08. PP-OCRv5's
    #: recognizer on --target trt kept 0.911 per position with 16 % of its characters and 69 % of its lines read
    #: differently
    decoded_agreement: float = 0.95
    #: accuracy drop in points above this (and twice its noise), for class scores on labelled data: on an accurate model
    #: almost every changed prediction is an error, so top-1 agreement lets many points go (a 98 %-accurate GroupNorm net
    #: at `-o percentile 99` lost 3.05 points with agreement 0.9625, quiet; a RegNetY 2.85 at 0.9365), where good recipes
    #: moved accuracy by -0.75 to +0.65 on five trained nets
    accuracy_drop: float = 2.0
    #: share of compared batches whose output length differed from FP32's above this (a decoder stopping at another
    #: step, a detector keeping another number of boxes): the top-1 threshold's tenth, per batch
    length_differs: float = 0.10


THRESHOLDS = Thresholds()
#: an [N, C] output counts as class scores when at least this share of samples has a clear FP32 winner
#: (digits logits: all; MiniLM's 384-wide sentence embedding: few)
CLASS_SCORES_SHARE = 0.5
#: an [N, D] output that is not class scores counts as an embedding from this width on (narrower:
#: box coordinates, a handful of regression targets, whose neighbours mean nothing)
EMBEDDING_MIN_WIDTH = 16
#: the neighbour agreement is measured on at most this many samples (the first ones the check reads)
#: and on at most this many bytes of one output's rows per model
NEIGHBOUR_SAMPLES, NEIGHBOUR_BYTES = 128, 16 << 20


def neighbour_agreement(reference: np.ndarray, test: np.ndarray) -> float:
    """How well ``test`` keeps the ranking of the samples by similarity that ``reference`` gives (both [N, D], one row per sample).

    For every anchor sample ``i`` and every pair of other samples ``j < k``: does the quantized
    output order ``cos(i, j)`` and ``cos(i, k)`` as FP32 does? The share of such triples that
    agree, ``(1 + Kendall's tau) / 2`` of each anchor's row of the cosine-similarity matrix,
    averaged. It reads what a retrieval or clustering reads (which samples are nearer), needs no
    labels, and counts a swap between near-ties as one triple among ``(N-1)(N-2)/2``, unlike the
    agreement of the single nearest neighbour, which flips on near-duplicates under noise that
    costs nothing. 1.0 keeps every ranking; 0.5 is chance.
    """
    s_ref = _similarities(reference)
    s_got = _similarities(test)
    n = len(s_ref)
    if n < 3:
        return 1.0
    j, k = np.triu_indices(n, 1)
    agree = total = 0
    for i in range(n):  # one anchor at a time: n^2 memory, not n^3
        keep = (j != i) & (k != i)
        d_ref = np.sign(s_ref[i, j[keep]] - s_ref[i, k[keep]])
        d_got = np.sign(s_got[i, j[keep]] - s_got[i, k[keep]])
        agree += int(np.sum(d_ref == d_got))
        total += int(keep.sum())
    return agree / total


def _similarities(x: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair of rows."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    return u @ u.T


class _Recording(Runner):
    """A runner that passes everything to ``inner`` and keeps the first rows of its [N, D] outputs (for :func:`neighbour_agreement`)."""

    def __init__(self, inner: Runner, axes: Mapping[str, int | None]) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self.axes = axes
        self.rows: dict[str, list[np.ndarray]] = {}
        self.kept: dict[str, int] = {}

    def activate_impl(self) -> None:
        self.inner.activate()

    def deactivate_impl(self) -> None:
        self.inner.deactivate()

    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.inner.infer(feeds)
        n = sample_count(feeds, self.axes)
        for name, value in out.items():
            value = _as_rows(value)
            if value is None or np.shape(value)[0] != n or np.shape(value)[1] < EMBEDDING_MIN_WIDTH or value.dtype.kind != "f":
                continue
            room = min(NEIGHBOUR_SAMPLES, NEIGHBOUR_BYTES // (4 * np.shape(value)[1])) - self.kept.get(name, 0)
            if room > 0:
                self.rows.setdefault(name, []).append(np.array(value[:room], np.float32))
                self.kept[name] = self.kept.get(name, 0) + min(room, n)
        return out

    @property
    def output_names(self) -> list[str]:
        return self.inner.output_names

    @property
    def size_bytes(self) -> int | None:
        return self.inner.size_bytes

    def latency_ms(self, feeds: Mapping[str, np.ndarray]) -> dict[str, float]:
        return self.inner.latency_ms(feeds)

    def kernel_report(self) -> dict | None:
        return self.inner.kernel_report()

    def details(self) -> dict:
        return self.inner.details()

    def kept_rows(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.rows.items()}


def recorded_rows(reference: onnx.ModelProto, quantized: onnx.ModelProto, batches: Callable[[], Iterable[Batch]],
                  max_samples: int = NEIGHBOUR_SAMPLES) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The first ``max_samples`` rows of every [N, D] float output of both models, ``{name: (fp32, quantized)}``.

    What :func:`fidelity_of` runs when it is given metrics but no rows (``optimize --eval-data``,
    ``onnxq check``): both models once more, on at most ``max_samples`` samples.
    """
    axes = batch_axes(reference)
    backend = OrtBackend()
    recs: list[_Recording] = []
    for model, name in ((reference, "fp32"), (quantized, "quantized")):
        rec = _Recording(backend.runner(model, name, reference=name == "fp32"), axes)
        with rec:
            for b in limited(batches, None, max_samples, axes)():
                for piece in split_batch(b, axes):
                    rec.infer(piece.feeds)
        recs.append(rec)
    return _paired_rows(*recs)


def _paired_rows(fp32: _Recording, quantized: _Recording) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (fp32 rows, quantized rows)}`` for the outputs both runners kept alike."""
    ref, got = fp32.kept_rows(), quantized.kept_rows()
    return {k: (ref[k], got[k]) for k in ref if k in got and ref[k].shape == got[k].shape}


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
        # integer outputs are decisions, not scores: a class id per sample is judged as top-1 is (a classifier exported
        # with its ArgMax has no other output, and kept every cosine near 1 with a third of its labels changed);
        # indices, masks and ids are reported only
        if out.label_agreement is not None and out.label_agreement < t.top1_agreement:
            return f"label agreement {out.label_agreement:.3f} < {t.top1_agreement} (the class id per sample changed)"
        if out.position_agreement is not None and out.position_agreement < t.position_agreement:
            # a segmentation map or a greedy CTC decode exported with its ArgMax: 82 % of pixels kept (mIoU 0.21), 78 % of
            # time steps (5 % of lines decoded as FP32 does) passed as "reported only"
            return (f"class id agreement per position {out.position_agreement:.3f} < {t.position_agreement} (the model's own "
                    "ArgMax map changed)")
        return _decoded_collapse(out, t)
    why = []
    if out.top1_agreement is not None and out.top1_agreement < t.top1_agreement:
        why.append(f"top-1 agreement {out.top1_agreement:.3f} < {t.top1_agreement}")
    if out.accuracy_drop is not None and out.accuracy_drop > max(t.accuracy_drop, 2 * (out.accuracy_drop_noise or 0.0)):
        why.append(f"accuracy {out.accuracy_drop:.2f} points below FP32's on the labelled data (more than {t.accuracy_drop:g} points, "
                   f"and than twice its noise, {2 * (out.accuracy_drop_noise or 0.0):.2f})")
    if out.length_differs is not None and out.length_differs > t.length_differs:
        why.append(f"its length differs from FP32's in {100 * out.length_differs:.0f} % of the batches (more than "
                   f"{100 * t.length_differs:.0f} %: a decoder stopping at another step, another number of detections)")
    if out.position_agreement is not None and out.position_agreement < t.position_agreement:
        why.append(f"arg-max agreement per position {out.position_agreement:.3f} < {t.position_agreement} (the class at the "
                   "positions FP32 labels clearly changed)")
    if why_decoded := _decoded_collapse(out, t):
        why.append(why_decoded)
    if out.neighbour_agreement is not None and out.neighbour_agreement < t.neighbour_agreement:
        why.append(f"neighbour agreement {out.neighbour_agreement:.3f} < {t.neighbour_agreement} (the samples' nearest neighbours changed)")
    if out.explained_variance is not None and out.one_value and out.explained_variance < t.explained_variance:
        why.append(f"explained variance {out.explained_variance:.3f} < {t.explained_variance} (one value per sample: FP32's "
                   "variation across samples is lost)")
    elif out.explained_variance is not None and out.explained_variance < t.explained_variance_elements:
        if out.role not in ("embedding", "selected", "topk_values") and out.neighbour_agreement is None and out.position_agreement is None:
            # an image, a map, a forecast or regression targets: the per-sample cosine reads their common offset and level
            # (a depth map at cosine 0.94 with 7 % of its pixels within 5 % of the truth); embeddings and class maps are
            # judged by their neighbours and arg-max above
            why.append(f"explained variance {out.explained_variance:.3f} < {t.explained_variance_elements} (FP32's variation across "
                       "samples, element by element, is lost: the cosine reads the output's offset and level)")
    # one value per sample: its cosine is the sign of a product, and a value near zero that changes sign reads -1 (a
    # Keras Dense(1) regression at 35 dB SQNR was warned for a 1st-percentile cosine of -0.46); the explained variance
    # above judges it
    by_sign = out.explained_variance is not None and out.one_value
    if not by_sign and out.cosine < t.cosine:
        why.append(f"mean cosine {out.cosine:.4f} < {t.cosine}")
    if out.worst_part_cosine is not None and out.worst_part_cosine < t.cosine:
        why.append(f"mean cosine {out.worst_part_cosine:.4f} < {t.cosine} of its part at {out.worst_part} (the output "
                   "concatenates parts of different scales, a detector's boxes and class scores, and its own cosine reads the largest)")
    # rows the data picks (NMS, TopK): a near-tie swaps two rows and a good sample reads 0.46 (F1 0.99 against FP32)
    if out.cosine_p1_centred is not None and out.top1_agreement is not None:
        if out.cosine_p1_centred < t.cosine_p1:
            why.append(f"1st-percentile cosine {out.cosine_p1_centred:.4f} < {t.cosine_p1} (each sample's class scores less their mean)")
    elif not by_sign and out.role != "selected" and out.cosine_p1 < t.cosine_p1:
        why.append(f"1st-percentile cosine {out.cosine_p1:.4f} < {t.cosine_p1}")
    return ", ".join(why) or None


def _decoded_collapse(out: OutputFidelity, t: Thresholds) -> str | None:
    """Why a CTC output's greedy decodes count as changed, or None."""
    if out.decoded_agreement is None or out.decoded_agreement >= t.decoded_agreement:
        return None
    lines = f": {100 * (1 - out.decoded_exact):.0f} % of the samples decode differently" if out.decoded_exact is not None else ""
    return (f"decoded agreement {out.decoded_agreement:.3f} < {t.decoded_agreement} (1 - the edit distance between the "
            f"greedy CTC decodes over FP32's length{lines})")


def suggest(methods: Sequence[str], target: str, bits: int, worst_node: str | None = None, matmul_net: bool = False) -> str | None:
    """The command-line change most likely to fix a collapse of a run with ``methods`` on ``target``.

    ``matmul_net``: the model is built of MatMuls without convolutions (a transformer encoder),
    where SmoothQuant is what keeps the activations' outlier channels (MiniLM: the sentence
    embedding's neighbour agreement 0.985 with ``-p smoothquant -p minmax``, 0.92-0.97 with any
    calibrator alone; docs/methods.md, "Fidelity check").
    """
    exclude = f"--exclude '{worst_node}'" if worst_node else "--exclude NODE"
    if bits == 4:
        # weight-only: the calibrators and -p auto have nothing to choose at 4 bits (a tiny LLaMA: minmax and mse alike
        # 0.961, auto refused); GPTQ's error-compensating rounding took it to 0.994
        if "gptq" not in methods:
            return f"try -p gptq (error-compensating rounding of the 4-bit weights), or keep the worst layer in float with {exclude}"
        return f"keep the worst layer in float with {exclude}, or try --block-size 16"
    if matmul_net and "smoothquant" not in methods and "percentile" not in methods and bits == 8:
        return "try -p smoothquant -p minmax: activation outlier channels of MatMul layers need smoothing before INT8"
    kl = [m for m in methods if "entropy" in m or m in ("cfws",)]
    if kl:
        return f"try -p mse (or -p minmax) instead of -p {kl[0]}: KL thresholds can clip what matters on this model"
    if "percentile" in methods:
        return "try -p mse, or -o percentile closer to 100: the percentile clips too much of this model's ranges"
    if bits == 7:
        return "try --bits 8"
    if target == "trt":
        return "try --target ort to see whether TensorRT's Q/DQ placement is at fault; `onnxq lint --target trt` checks it"
    # the worst layer by SQNR is where the error shows, not always where float helps: openwakeword's melspectrogram
    # shows it at the STFT convs, while the layer to keep float is the mel MatMul whose output a Log reads
    measured = "-p auto, which measures the layers whose float form helps"
    if "mse" not in methods:
        return f"try -p mse, keep the worst layer in float with {exclude}, or {measured}"
    return f"keep the worst layer in float with {exclude}, or {measured}"


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
    # both runners keep the first rows of their [N, D] outputs on the way: the neighbour agreement needs no second pass
    recs = [_Recording(backend.runner(reference, "fp32", reference=True), axes), _Recording(backend.runner(quantized, "quantized"), axes)]
    rows = [Candidate("fp32", lambda: recs[0]), Candidate("quantized", lambda: recs[1])]
    parts = concatenated_outputs(reference)
    evals = compare_runners(rows, source, axes=axes, parts=parts, roles=output_roles(reference))
    fid = fidelity_of(evals[1].outputs, reference, quantized, source, in_sample=in_sample, methods=methods, target=target, bits=bits,
                      thresholds=thresholds, rows=_paired_rows(*recs), parts=parts, fp32=evals[0].outputs)
    fid.seconds = round(time.perf_counter() - t0, 3)
    return fid


def fidelity_of(metrics: Mapping[str, Mapping[str, float]], reference: onnx.ModelProto, quantized: onnx.ModelProto,
                batches: Callable[[], Iterable[Batch]], *, in_sample: bool, methods: Sequence[str] = (), target: str = "ort", bits: int = 8,
                thresholds: Thresholds = THRESHOLDS, rows: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                parts: Mapping[str, tuple[int, tuple[int, ...]]] | None = None,
                fp32: Mapping[str, Mapping[str, float]] | None = None) -> Fidelity:
    """The fidelity verdict from per-output metrics already measured (a comparison row's ``outputs``).

    ``optimize --eval-data`` judges its evaluation table's row this way instead of running the
    models twice. ``rows`` are the first rows of the [N, D] outputs of both models,
    ``{name: (fp32, quantized)}``, for the neighbour agreement of embedding-like outputs; without
    them, and only when the model has such an output, both models run once more on at most
    :data:`NEIGHBOUR_SAMPLES` samples of ``batches()`` (:func:`recorded_rows`). On a collapse the
    worst layers are measured on the first of ``batches()``. ``parts``: the concatenated outputs the metrics were
    measured with (:func:`~onnxq.graph.index.concatenated_outputs`), to name a worst part without a second shape
    inference. ``fp32``: FP32's own row of the same evaluation (its accuracy, for the accuracy drop on labelled data).
    """
    t0 = time.perf_counter()
    outputs = []
    if parts is None:  # the evaluation's own (check_fidelity's), else found again to name the worst part
        parts = concatenated_outputs(reference) if any("worst_part" in m for m in metrics.values()) else {}
    roles = output_roles(reference)
    for name, m in metrics.items():
        rounded = functools.partial(_rounded, m)
        # class scores per position: judged where FP32 has a clear winner at most positions
        per_position = m.get("position_clear_share", 0.0) >= CLASS_SCORES_SHARE
        out = OutputFidelity(name, round(m["cosine"], 6), round(m["cosine_worst"], 6), round(m["cosine_p1"], 6),
                             round(m["sqnr_db"], 3) if math.isfinite(m["sqnr_db"]) else m["sqnr_db"],
                             rounded("top1_agreement", m.get("confident_share", 0.0) >= CLASS_SCORES_SHARE),
                             not m.get("integer", False),
                             cosine_p1_centred=rounded("cosine_p1_centred"), explained_variance=rounded("explained_variance"),
                             one_value=bool(m.get("one_value", 0.0)), position_agreement=rounded("position_agreement", per_position),
                             decoded_agreement=rounded("decoded_agreement", per_position),
                             decoded_exact=rounded("decoded_exact", per_position), length_differs=rounded("length_differs"),
                             label_agreement=rounded("label_agreement"), exact_agreement=rounded("exact_agreement"),
                             worst_part=_part_span(parts.get(name), m.get("worst_part")),
                             worst_part_cosine=rounded("worst_part_cosine"), role=roles.get(name))
        base = (fp32 or {}).get(name, {})
        if out.top1_agreement is not None and "accuracy" in m and "accuracy" in base and m.get("samples"):
            out.accuracy_drop = round(100 * (base["accuracy"] - m["accuracy"]), 4)
            out.accuracy_drop_noise = round(100 * math.sqrt((1 - out.top1_agreement) * m["samples"]) / m["samples"], 4)
        outputs.append(out)
    embeddings = [o for o in outputs if o.scored and o.top1_agreement is None and _may_be_embedding(reference, o.name)]
    if embeddings and rows is None:
        rows = recorded_rows(reference, quantized, batches)
    for o in embeddings:
        if rows and o.name in rows and len(rows[o.name][0]) >= 3:
            o.neighbour_agreement = round(neighbour_agreement(*rows[o.name]), 6)
    samples = max((int(m["samples"]) for m in metrics.values()), default=0)
    warnings = [f"output '{o.name}' collapsed against FP32 ({why})" for o in outputs if (why := collapsed(o, thresholds))]
    fid = Fidelity("calibration" if in_sample else "evaluation", in_sample, samples, outputs, bool(warnings), warnings, [], None, None, 0.0)
    if warnings:
        producer = {n.output[0]: n.name for n in quantized.graph.node if n.op_type in LAYER_OPS and n.output}
        errors = layer_errors(reference, quantized, list(producer), batches, max_batches=1)
        # a layer whose output is FP32's to the bit (one left float, or before every quantized one) is not where it broke
        changed = [kv for kv in errors.items() if kv[1]["sqnr_db"] != math.inf]
        worst = sorted(changed, key=lambda kv: _key(kv[1]["sqnr_db"]))[:3]
        fid.worst_layers = [LayerFidelity(t, producer[t], v["sqnr_db"], v["cosine"]) for t, v in worst]
        ops = {n.op_type for n in reference.graph.node}
        fid.suggestion = suggest(methods, target, bits, fid.worst_layers[0].node if fid.worst_layers else None,
                                 matmul_net="MatMul" in ops and not ops & {"Conv", "ConvTranspose"})
    fid.seconds = round(time.perf_counter() - t0, 3)
    return fid


def _rounded(metrics: Mapping[str, float], key: str, judged: bool = True) -> float | None:
    """``metrics[key]`` to six places, or None where it was not measured or is not judged for this output."""
    return round(metrics[key], 6) if key in metrics and judged else None


def _part_span(parts: tuple[int, tuple[int, ...]] | None, k: float | None) -> str | None:
    """'4-21 of axis 1': where part ``k`` of a concatenated output lies."""
    if parts is None or k is None:
        return None
    axis, sizes = parts
    lo = sum(sizes[: int(k)])
    return f"{lo}-{lo + sizes[int(k)] - 1} of axis {axis}"


def _may_be_embedding(model: onnx.ModelProto, name: str) -> bool:
    """A graph output declared (or of unknown shape, so possibly) [N, D] with D >= :data:`EMBEDDING_MIN_WIDTH`, or [N,
    1, ..., D, ..., 1]: one axis besides the batch's longer than 1 (openwakeword's [N, 1, 1, 96] embedding was judged by
    its cosine alone and passed at a neighbour agreement of 0.913)."""
    vi = next((o for o in model.graph.output if o.name == name), None)
    if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return True
    dims = vi.type.tensor_type.shape.dim[1:]
    wide = [d for d in dims if not (d.HasField("dim_value") and d.dim_value == 1)]
    return len(dims) >= 1 and len(wide) == 1 and not (wide[0].HasField("dim_value") and wide[0].dim_value < EMBEDDING_MIN_WIDTH)


def _as_rows(value: np.ndarray) -> np.ndarray | None:
    """``value`` as [N, D] rows: itself when 2-D, [N, 1, ..., D, ..., 1] with the ones dropped, else None."""
    value = np.asarray(value)
    if value.ndim == 2:
        return value
    if value.ndim < 2 or sum(d > 1 for d in value.shape[1:]) > 1:
        return None
    return value.reshape(value.shape[0], -1)


def _key(sqnr: float) -> float:
    return sqnr if not np.isnan(sqnr) else -math.inf
