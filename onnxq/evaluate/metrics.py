"""Agreement metrics between reference (FP32) and quantized outputs."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)
#: warnings about the data said in this process (each output's rows share one data set)
_SAID: set[str] = set()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-sample cosine similarity (axis 0 is the sample axis)."""
    a = np.asarray(a, np.float64).reshape(len(a), -1) if np.ndim(a) else np.asarray(a, np.float64).reshape(1, 1)
    b = np.asarray(b, np.float64).reshape(a.shape)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-30)
    cos[both_zero] = 1.0
    return float(np.mean(cos))


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf for identical tensors)."""
    ref = np.asarray(reference, np.float64)
    return sqnr_of_sums(float(np.sum(ref**2)), float(np.sum((ref - np.asarray(test, np.float64)) ** 2)))


def sqnr_of_sums(signal: float, noise: float) -> float:
    """SQNR in dB from the summed squares of the reference and of the error (inf without error, -inf without signal)."""
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return float(10 * np.log10(signal / noise))


def max_abs_error(reference: np.ndarray, test: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(reference, np.float64) - np.asarray(test, np.float64)))) if np.size(reference) else 0.0


def top1(logits: np.ndarray) -> np.ndarray:
    """Arg-max over the last axis of a [N, ..., C] output."""
    return np.asarray(logits).reshape(len(logits), -1, np.shape(logits)[-1]).argmax(-1).reshape(len(logits), -1)[:, 0] if np.ndim(logits) > 2 else np.asarray(logits).argmax(-1)


def looks_like_logits(output: np.ndarray) -> bool:
    """A [N, C] float output with a handful of classes is scored as classification."""
    return np.ndim(output) == 2 and 2 <= np.shape(output)[1] <= 100_000 and np.asarray(output).dtype.kind == "f"


def common_part(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` (of one rank) cut to the shape both have: an output whose length the model computes from its
    data (an autoregressive decoder's Loop, a detector's NMS) compared on what both models computed."""
    common = tuple(slice(0, min(x, y)) for x, y in zip(np.shape(a), np.shape(b)))
    return np.asarray(a)[common], np.asarray(b)[common]


#: outputs of more values per sample than this get no explained variance (its three per-element sums, 8 bytes a value,
#: would hold them all: at most 48 MB; a 3 x 640 x 640 image takes 30)
VARIANCE_MAX_ELEMENTS = 1 << 21
#: an element counts in the explained variance when its variance across the samples is at least this share of its mean
#: square: one image copied 32 times varies by float round-off (1e-14) and read -5.9e11 on a good model, while a price
#: 1000 +- 5 varies by 2.5e-5 and is still what the model is for
VARIANCE_MIN_SHARE = 1e-6

#: the fewest classes an output per position is judged by its arg-max with: an RGB(A) image, a box [x, y, w, h] or a
#: depth map has a clear largest channel at most pixels too, and nothing reads its arg-max (an image-to-image UNet, a
#: style-transfer net and a super-resolution net, 3 channels, showed a clear winner at 91 % of their pixels)
DENSE_MIN_CLASSES = 5

#: a sequence of class scores per step ([N, T, C]) or of class ids (the model's ArgMax, [N, T]) whose most frequent
#: FP32 class takes at least this share of the steps is read as a CTC output, that class as its blank: the check then
#: also compares the greedy decodes (arg-max, repeats merged, blank dropped). Blank steps agree whatever happens to the
#: characters between them (71-79 % of the steps of PP-OCRv5's and ddddocr's readers)
CTC_BLANK_SHARE = 0.5
#: the decodes are compared on at most this many steps per model (the first samples'): 8 MB of ids each
DECODE_MAX_STEPS = 1 << 21


def dense_class_axis(output: np.ndarray, axis: int | None = 0) -> int | None:
    """The class axis of an output that may hold class scores per position: a float [N, T, C] or [T, N, C] sequence (the
    last axis: token logits, CTC) or [N, C, H, W] map (axis 1: segmentation), ``DENSE_MIN_CLASSES`` <= C <= 100,000; else None.
    Whether it does hold class scores is told by how often FP32 has a clear winner (:func:`_confident`), as for [N, C]
    outputs."""
    if np.asarray(output).dtype.kind != "f" or np.ndim(output) not in (3, 4) or not (axis == 0 or (axis == 1 and np.ndim(output) == 3)):
        return None  # [T, N, C] (time-major, samples on axis 1) has its classes last too
    c = 2 if np.ndim(output) == 3 else 1
    return c if DENSE_MIN_CLASSES <= np.shape(output)[c] <= 100_000 else None


def output_metrics(reference: np.ndarray, test: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """Every metric that applies to one output."""
    m = {"cosine": cosine(reference, test), "sqnr_db": sqnr_db(reference, test), "max_abs_error": max_abs_error(reference, test)}
    if looks_like_logits(reference):
        m["top1_agreement"] = float(np.mean(top1(reference) == top1(test)))
        if labels is not None:
            m["accuracy"] = float(np.mean(top1(test) == labels))
    return m


class OutputAccumulator:
    """Streams one output's agreement metrics over batches of any shapes, one sample at a time.

    Nothing but a few sums and one float per sample is kept, so an evaluation holds no outputs
    between batches and batches of different shapes (sequence lengths) are never glued together.
    ``update`` takes one batch's reference and test outputs with the sample axis ``axis`` (None:
    the whole output is one sample, for outputs with no batch axis). ``role`` is what the graph says
    the output is (:func:`onnxq.graph.index.output_roles`): a ``TopK``'s values, an L2-normalized
    embedding and rows the data picks are no class scores, a TopK's indices' first column is the
    class id, and an ``ArgMax`` map's values are compared position by position.
    """

    def __init__(self, role: str | None = None) -> None:
        self.role = role
        self.signal = 0.0
        self.noise = 0.0
        self.max_abs = 0.0
        self.cosines: list[float] = []
        #: class scores only: the per-sample cosines after each sample's mean score is taken off (a softmax reads only the
        #: differences); what the fidelity check's 1st-percentile rule judges for them
        self.centred_cosines: list[float] = []
        self.top1_same = 0
        self.top1_total = 0
        self.confident = 0
        self.correct = 0
        self.labelled = 0
        self.classification: bool | None = None
        self.integer = False
        #: per FP32 class: samples, and samples whose quantized top-1 is the same class (the worst class's agreement)
        self.class_total: dict[int, int] = {}
        self.class_same: dict[int, int] = {}
        #: one value per sample in every batch so far (a probability, a score, a regression value): its per-sample cosine
        #: is the sign of a product, 1 whatever the error, so :meth:`result` also gives the explained variance
        self.scalar: bool | None = None
        #: the explained variance's sums (:meth:`_update_variance`): FP32's sum per output element over the samples (None
        #: before the first batch, False once the samples' shapes differ), and the squares of FP32's values and of the error
        self.element_sum: np.ndarray | None | bool = None
        self.element_square: np.ndarray | None = None
        self.element_noise: np.ndarray | None = None
        self.variance_samples = 0
        #: [N, T, C] / [N, C, H, W] outputs (:func:`dense_class_axis`): positions, those with a clear FP32 winner, and
        #: those of them whose quantized arg-max is the same class
        self.positions = 0
        self.positions_clear = 0
        self.positions_same = 0
        #: sequences (:data:`CTC_BLANK_SHARE`): per batch, FP32's and the quantized arg-max ids, one row per sample
        self.steps: list[tuple[np.ndarray, np.ndarray]] = []
        self.steps_kept = 0
        #: batches compared, and those whose output had another shape than FP32's (compared on the common part)
        self.batches = 0
        self.length_differs = 0
        #: integer outputs (class ids, indices, masks): values compared, and those equal to FP32's
        self.values = 0
        self.equal = 0
        #: a TopK's indices (``role``): the first index of each row, compared, and equal to FP32's
        self.firsts = 0
        self.firsts_equal = 0
        #: those class ids (a TopK's first index, an ArgMax label) against the data's labels: the accuracy
        self.id_correct = 0
        self.id_labelled = 0
        #: labels that cannot be class ids of this output (strings, floats, ids past its classes), as first seen: no
        #: accuracy is read from them (they gave 0 % for FP32 and every model, and --max-drop measured a 0-point drop)
        self.bad_labels: str | None = None
        #: an output a Concat makes of parts of different kinds (a detector's boxes and class scores): per part, the
        #: per-sample cosines (``parts`` of :meth:`update`)
        self.part_cosines: list[list[float]] = []

    def update(self, reference: np.ndarray, test: np.ndarray, axis: int | None = 0, labels: np.ndarray | None = None,
               parts: tuple[int, Sequence[int]] | None = None) -> None:
        """Add one batch (``labels``: one class per sample, for accuracy; ``parts``: the output is a concatenation, the
        axis and each part's size along it (:func:`onnxq.graph.index.concatenated_outputs`), each part also compared
        on its own)."""
        self.integer = self.integer or np.asarray(reference).dtype.kind in "iub"
        ref = np.asarray(reference, np.float64)
        got = np.asarray(test, np.float64)
        self.batches += 1
        if ref.shape != got.shape:
            if ref.ndim != got.ndim or (axis is not None and ref.ndim and ref.shape[axis] != got.shape[axis]):
                raise ValueError(f"output shapes differ: reference {list(ref.shape)}, quantized {list(got.shape)}")
            # a length the model computes from its data (an autoregressive decoder's Loop, a detector's NMS): the
            # quantized model decoded more or fewer steps than FP32; compare what both computed and count the batch
            # (SLANet's table decoder: 52 against 76 steps, and the whole evaluation failed)
            ref, got = common_part(ref, got)
            reference = common_part(reference, ref)[0]
            self.length_differs += 1
        diff = ref - got
        self.signal += float(np.sum(ref * ref))
        self.noise += float(np.sum(diff * diff))
        if ref.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
        if axis is None or ref.ndim == 0:
            a, b = ref.reshape(1, -1), got.reshape(1, -1)
        else:
            a = np.moveaxis(ref, axis, 0).reshape(ref.shape[axis], -1)
            b = np.moveaxis(got, axis, 0).reshape(a.shape)
        self.cosines.extend(row_cosines(a, b).tolist())
        if parts is not None and axis is not None and ref.ndim > max(parts[0], axis) and ref.shape[parts[0]] == sum(parts[1]):
            self._update_parts(ref, got, axis, *parts)
        one_value = a.shape[1] == 1 and axis is not None and ref.ndim > 0
        if np.asarray(reference).dtype.kind in "iub":
            self.values += ref.size
            self.equal += int(np.count_nonzero(ref == got))
            ids = None
            if self.role == "topk_indices" and ref.ndim >= 2 and axis is not None:
                # the first index of a TopK over the classes is the arg-max class: one id per sample, judged as a label
                first_r, ids = np.take(ref, 0, axis=-1), np.take(got, 0, axis=-1)
                self.firsts += first_r.size
                self.firsts_equal += int(np.count_nonzero(first_r == ids))
            elif self.role == "argmax" and one_value:
                ids = b[:, 0]
            elif self.role == "argmax" and ref.ndim == 2 and axis is not None:
                self._keep_steps(a, b)  # a greedy decode the model computes: [N, T] class ids
            if ids is not None and labels is not None and np.size(ids) == len(labels):
                # a classifier exported with its ArgMax (or TopK) has no logits to read its accuracy from
                self.id_correct += int(np.sum(np.asarray(ids).reshape(-1) == np.asarray(labels).reshape(-1)))
                self.id_labelled += len(labels)
        self.scalar = one_value if self.scalar is None else (self.scalar and one_value)
        # a TopK's values and rows the data picks (a detector's [N, 100, 6] list) hold no class scores per position
        dense = dense_class_axis(reference, axis) if self.role not in ("topk_values", "selected", "embedding") else None
        if dense is not None:
            classes = ref.shape[dense]
            r = np.moveaxis(ref, dense, -1).reshape(-1, classes)
            clear = _confident(r, scale=True)
            same = r.argmax(-1) == np.moveaxis(got, dense, -1).reshape(-1, classes).argmax(-1)
            self.positions += len(r)
            self.positions_clear += int(clear.sum())
            self.positions_same += int((same & clear).sum())
            if ref.ndim == 3:  # a sequence: [N, T, C], or [T, N, C] with the samples on axis 1
                ids_r, ids_q = ref.argmax(-1), got.argmax(-1)
                self._keep_steps(ids_r.T if axis == 1 else ids_r, ids_q.T if axis == 1 else ids_q)
        is_logits = looks_like_logits(reference) and axis == 0 and self.role not in ("topk_values", "embedding")
        self.classification = is_logits if self.classification is None else (self.classification and is_logits)
        if axis is not None and ref.ndim > 0 and np.asarray(reference).dtype.kind == "f":
            self._update_variance(a, b, centre=is_logits)
        if is_logits:
            self.centred_cosines.extend(row_cosines(a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)).tolist())
            ref_top, got_top = top1(ref), top1(got)
            self.top1_same += int(np.sum(ref_top == got_top))
            for c, n_all, n_same in zip(*_class_counts(ref_top, ref_top == got_top)):
                self.class_total[c] = self.class_total.get(c, 0) + n_all
                self.class_same[c] = self.class_same.get(c, 0) + n_same
            self.top1_total += len(ref)
            self.confident += int(np.sum(_confident(ref)))
            if labels is not None and len(labels) == len(ref):
                lab = np.asarray(labels).reshape(-1)
                if _class_ids_of(lab, ref.shape[-1]):
                    self.correct += int(np.sum(top1(got) == lab))
                    self.labelled += len(ref)
                elif self.bad_labels is None:
                    self.bad_labels = f"the data's labels are not class ids 0-{ref.shape[-1] - 1} of this output (first: {lab[:3].tolist()}, {lab.dtype})"

    def _keep_steps(self, ref_ids: np.ndarray, test_ids: np.ndarray) -> None:
        """Keep one batch's arg-max ids per step ([samples, steps], more than one step) for the decoded agreement, up to
        :data:`DECODE_MAX_STEPS`."""
        if ref_ids.ndim == 2 and ref_ids.shape[1] > 1 and self.steps_kept + ref_ids.size <= DECODE_MAX_STEPS:
            self.steps.append((np.asarray(ref_ids, np.int64), np.asarray(test_ids, np.int64)))
            self.steps_kept += ref_ids.size

    def _update_variance(self, a: np.ndarray, b: np.ndarray, centre: bool) -> None:
        """Sums for the share of FP32's variation across samples the quantized output keeps (``a``, ``b``: one row per
        sample). Class scores are compared after taking each sample's mean off its scores (a softmax reads only their
        differences, so a shift common to a sample's logits is no error)."""
        if self.element_sum is False:
            return
        if centre:
            a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        if self.element_sum is None:
            if a.shape[1] > VARIANCE_MAX_ELEMENTS:
                self.element_sum = False
                return
            self.element_sum, self.element_square, self.element_noise = (np.zeros(a.shape[1]) for _ in range(3))
        elif self.element_sum.shape != (a.shape[1],):  # type: ignore[union-attr]
            self.element_sum = False  # samples of different sizes (sequences): no element has a mean over the samples
            return
        self.element_sum += a.sum(0)  # type: ignore[operator]
        self.element_square += (a * a).sum(0)  # type: ignore[operator]
        self.element_noise += ((a - b) ** 2).sum(0)  # type: ignore[operator]
        self.variance_samples += len(a)

    def _explained_variance(self) -> float | None:
        """1 - sum (q - r)^2 / sum (r - mean over the samples of r)^2 over the elements FP32 varies across the samples (by
        more than :data:`VARIANCE_MIN_SHARE` of their energy); None where none does."""
        n = self.variance_samples
        spread = self.element_square - self.element_sum**2 / n  # type: ignore[operator]
        varies = spread > VARIANCE_MIN_SHARE * self.element_square  # type: ignore[operator]
        total = float(spread[varies].sum())
        return 1.0 - float(self.element_noise[varies].sum()) / total if total > 0 else None  # type: ignore[index]

    def _update_parts(self, ref: np.ndarray, got: np.ndarray, axis: int, along: int, sizes: Sequence[int]) -> None:
        if not self.part_cosines:
            self.part_cosines = [[] for _ in sizes]
        for k, c in enumerate(part_cosines(ref, got, axis, (along, sizes))):
            if c is not None:
                self.part_cosines[k].extend(c[~np.isnan(c)].tolist())

    def result(self, with_accuracy: bool = True) -> dict[str, float]:
        """The metrics: cosine (per-sample mean), cosine_worst, cosine_p1, sqnr_db, max_abs_error, samples,
        for outputs of one value per sample explained_variance, for [N, T, C] and [N, C, H, W] outputs position_clear_share
        and position_agreement (the arg-max agreement at the positions where FP32's winner is clear), and for [N, C]
        outputs top1_agreement, confident_share
        (:func:`_confident`), for integer outputs label_agreement (one value per sample: a class id) or exact_agreement
        (the share of values equal to FP32's), length_differs (the share of batches whose output had another shape than FP32's: a
        length computed from the data; the figures then cover the part both computed), the worst FP32 class's top-1 agreement (worst_class, worst_class_agreement,
        worst_class_samples) and accuracy when every sample had a label."""
        cos = np.asarray(self.cosines) if self.cosines else np.ones(1)
        sqnr = sqnr_of_sums(self.signal, self.noise)
        m = {"cosine": float(np.mean(cos)), "cosine_worst": float(np.min(cos)), "cosine_p1": float(np.percentile(cos, 1)),
             "sqnr_db": sqnr, "max_abs_error": self.max_abs, "samples": len(self.cosines)}
        if self.integer:
            m["integer"] = 1.0
            if self.values:
                # a class id's cosine says nothing (3 against 4 is 1.0): equal or not is what a reader of it sees
                m["label_agreement" if self.scalar else "exact_agreement"] = self.equal / self.values
                if self.role == "argmax" and not self.scalar:
                    # a class map or a greedy decode the model computes (ArgMax per pixel, per time step): its values are
                    # the arg-max per position, judged as a float class-score map's are; every position counts
                    m["position_clear_share"], m["position_agreement"] = 1.0, self.equal / self.values
            if self.firsts:
                m["label_agreement"] = self.firsts_equal / self.firsts
            if with_accuracy and self.id_labelled and self.id_labelled == len(self.cosines):
                m["accuracy"] = self.id_correct / self.id_labelled
        if isinstance(self.element_sum, np.ndarray) and not self.integer and self.variance_samples > 1 and self.length_differs == 0:
            # the share of FP32's variation across samples the quantized output keeps, element by element:
            # 1 - sum (q - r)^2 / sum (r - mean over the samples of r)^2. A sigmoid output squashed to 0.5 by a collapsed
            # layer keeps every per-sample cosine at 1 and this near 0; so do a depth map, a forecast or a price whose
            # offset the cosine reads (a depth net at cosine 0.94 kept 7 % of its pixels within 5 % of the truth)
            ev = self._explained_variance()
            if ev is not None:
                m["explained_variance"] = ev
                m["one_value"] = float(bool(self.scalar))
        judged = [(float(np.mean(c)), k) for k, c in enumerate(self.part_cosines) if c]
        if judged:
            worst, k = min(judged)
            m["worst_part"], m["worst_part_cosine"] = float(k), worst
        if self.length_differs:
            m["length_differs"] = self.length_differs / self.batches
        if self.positions:
            m["position_clear_share"] = self.positions_clear / self.positions
            if self.positions_clear:
                m["position_agreement"] = self.positions_same / self.positions_clear
        if self.steps:
            m.update(decoded_agreement(self.steps))
        if self.classification and self.top1_total:
            m["top1_agreement"] = self.top1_same / self.top1_total
            if len(self.centred_cosines) == len(self.cosines):
                m["cosine_p1_centred"] = float(np.percentile(self.centred_cosines, 1))
            m["confident_share"] = self.confident / self.top1_total
            worst = min(self.class_total, key=lambda c: (self.class_same[c] / self.class_total[c], -self.class_total[c]))
            m["worst_class"] = float(worst)
            m["worst_class_agreement"] = self.class_same[worst] / self.class_total[worst]
            m["worst_class_samples"] = float(self.class_total[worst])
            if with_accuracy and self.labelled == self.top1_total:
                m["accuracy"] = self.correct / self.labelled
            elif with_accuracy and self.bad_labels is not None and self.bad_labels not in _SAID:
                _SAID.add(self.bad_labels)  # once, not once for FP32 and once for each model compared with it
                log.warning("%s: no accuracy is read from them", self.bad_labels)
        return m


def greedy_decode(ids: np.ndarray, blank: int) -> np.ndarray:
    """A CTC reader's greedy decode of one sample's arg-max ids per step: repeats merged, then ``blank`` dropped."""
    ids = np.asarray(ids).reshape(-1)
    keep = np.ones(len(ids), bool)
    keep[1:] = ids[1:] != ids[:-1]
    return ids[keep & (ids != blank)]


def edit_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Levenshtein distance between two id sequences (unit costs), one numpy row of the table at a time."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if len(a) < len(b):
        a, b = b, a
    if not len(b):
        return len(a)
    steps = np.arange(len(b) + 1)
    prev = steps
    for i, x in enumerate(a, 1):
        cur = np.empty_like(prev)
        cur[0] = i
        cur[1:] = np.minimum(prev[:-1] + (b != x), prev[1:] + 1)  # substitution or match, deletion
        prev = np.minimum.accumulate(cur - steps) + steps  # insertion: cur[j] = min over k <= j of cur[k] + j - k
    return int(prev[-1])


def ctc_blank(ids: Sequence[np.ndarray]) -> int | None:
    """The blank of a CTC output, given FP32's arg-max ids per step (any shapes): the most frequent id when it takes at
    least :data:`CTC_BLANK_SHARE` of the steps, else None (no CTC output)."""
    values, counts = np.unique(np.concatenate([np.asarray(i).reshape(-1) for i in ids]) if len(ids) else np.zeros(0), return_counts=True)
    if not len(values) or counts.max() < CTC_BLANK_SHARE * counts.sum():
        return None
    return int(values[counts.argmax()])


def _decode_distances(ref_ids: np.ndarray, test_ids: np.ndarray, blank: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sample (rows of [samples, steps] arg-max ids): the edit distance between the greedy decodes, and the length
    of FP32's."""
    distances, lengths = np.zeros(len(ref_ids)), np.zeros(len(ref_ids))
    for k, (x, y) in enumerate(zip(ref_ids, test_ids)):
        dx, dy = greedy_decode(x, blank), greedy_decode(y, blank)
        lengths[k] = len(dx)
        if not np.array_equal(dx, dy):
            distances[k] = edit_distance(dx, dy)
    return distances, lengths


def decoded_scores(ref_ids: np.ndarray, test_ids: np.ndarray, blank: int) -> np.ndarray:
    """Per sample (rows of [samples, steps] arg-max ids), 1 - the edit distance between the greedy decodes over FP32's
    decoded length (0 for a sample FP32 decodes as nothing and the test model does not), at least 0."""
    distances, lengths = _decode_distances(ref_ids, test_ids, blank)
    return np.maximum(0.0, 1.0 - distances / np.maximum(lengths, 1))


def decoded_agreement(steps: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """For a CTC output (:data:`CTC_BLANK_SHARE`), given FP32's and the quantized arg-max ids per step (batches of
    [samples, steps]): decoded_agreement, 1 - the edit distance between the greedy decodes over FP32's decoded length
    (the share of read characters kept: a character error rate against FP32), decoded_exact, the share of samples
    decoded exactly as FP32's, and ctc_blank, the class taken as the blank. Empty for other sequences (token logits
    with no class on most steps, or nothing decoded)."""
    blank = ctc_blank([r for r, _ in steps])
    if blank is None:
        return {}
    distances, lengths = (np.concatenate(v) for v in zip(*(_decode_distances(r, q, blank) for r, q in steps)))
    if not lengths.sum():
        return {}
    return {"decoded_agreement": max(0.0, 1.0 - float(distances.sum() / lengths.sum())),
            "decoded_exact": float(np.mean(distances == 0)), "ctc_blank": float(blank)}


def _class_ids_of(labels: np.ndarray, classes: int) -> bool:
    """Whether ``labels`` can be class ids of an output of ``classes`` scores: whole numbers in [0, classes)."""
    if labels.dtype.kind not in "iuf" or not labels.size:
        return False
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels) & (labels == np.round(labels))):
        return False
    return bool(labels.min() >= 0 and labels.max() < classes)


def _class_counts(classes: np.ndarray, same: np.ndarray) -> tuple[list[int], list[int], list[int]]:
    """Per class present in ``classes``: the class, its sample count and how many of those are ``same``."""
    values, index = np.unique(np.asarray(classes).reshape(-1), return_inverse=True)
    totals = np.bincount(index)
    agreeing = np.bincount(index, weights=np.asarray(same, np.float64).reshape(-1))
    return [int(v) for v in values], [int(t) for t in totals], [int(a) for a in agreeing]


def _confident(reference: np.ndarray, scale: bool = False) -> np.ndarray:
    """Per sample of an [N, C] output: is its FP32 top class clear (top-1 minus top-2 over a tenth of the scores' range)?

    Class scores have a clear winner on most samples; an embedding of the same shape almost never
    does (its largest coordinates are close together), so this share tells the two apart. ``scale``: rows are the
    positions of one map, and a winner is clear only against the map's widest range too (at least half of it counts):
    a pose net's heatmaps are near zero at background pixels, whose tiny winner is noise (78 % of the "clear" pixels
    of a keypoint net were background, their arg-max changed under good quantization and the check warned, with every
    keypoint where FP32 put it), while a segmentation map's background is a class with scores of its own.
    """
    if reference.shape[-1] < 2:
        return np.zeros(len(reference), bool)
    part = np.partition(reference, -2, axis=-1)
    gap = part[:, -1] - part[:, -2]
    span = reference.max(-1) - reference.min(-1)
    if scale and span.size:
        span = np.maximum(span, 0.5 * float(span.max()))
    return gap > 0.1 * np.maximum(span, 1e-30)


def part_cosines(ref: np.ndarray, got: np.ndarray, axis: int, parts: tuple[int, Sequence[int]]) -> list[np.ndarray | None]:
    """Per part of an output a Concat made (``parts``: the concatenated axis and each part's size along it), each
    sample's cosine with FP32's part (samples on ``axis``): NaN for a sample whose FP32 part is all zero (no direction
    to keep), None for a part of one value per sample (its cosine is a sign). The fidelity check and ``-p auto`` both
    judge a concatenated output by these."""
    along, sizes = parts
    cuts = np.cumsum(sizes)[:-1]
    out: list[np.ndarray | None] = []
    for r, q in zip(np.split(ref, cuts, axis=along), np.split(got, cuts, axis=along)):
        a = np.moveaxis(r, axis, 0).reshape(r.shape[axis], -1)
        if a.shape[1] < 2:
            out.append(None)
            continue
        b = np.moveaxis(q, axis, 0).reshape(a.shape)
        out.append(np.where(np.any(a != 0, axis=1), row_cosines(a, b), np.nan))
    return out


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b`` (1 where both rows are zero)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-30)
    cos[(na == 0) & (nb == 0)] = 1.0
    return cos
