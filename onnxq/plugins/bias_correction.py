"""``bias-correction``: empirical bias correction of quantized layers (a refine step).

Quantizing weights and input activations shifts the mean of a layer's output per channel: a
systematic error that every later layer inherits, and that depthwise convs (few taps per output)
show most. Following the empirical variant of Nagel et al. ("Data-Free Quantization", 2019),
each Conv/ConvTranspose/Gemm layer with a float bias of its own (a Conv without one gets a new
zero bias first), and each MatMul followed by an Add of a constant bias (a Linear layer as PyTorch
exports it), in topological order, gets

    b_c  ←  b_c + mean over samples and positions of (y_fp − y_q)_c

where ``y_fp`` is the FP32 model's output of the layer and ``y_q`` the output of the model
quantized with the current plan, *including the corrections already made to earlier layers*.
Biases stay float in the QDQ graph (the runtime folds them), so the correction costs nothing at
run time. The corrected biases are a quantized rewrite: the method returns a corrected copy of the
model and the host reports the change. Compose after a calibrator or a search: ``-p mse -p bias-correction``,
``-p easyquant -p bias-correction``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.search.evaluator import GraphRunner
from onnxq.calib.feeds import CONSTANT_SHARE, constant_region
from onnxq.calib.progress import progress
from onnxq.calib.statistics import StatRequest
from onnxq.search.footprint import fitted_chunks
from onnxq.calib.readers import sample_count
from onnxq.search.samples import sample_batches, samples_request
from onnxq.graph.edit import Namer
from onnxq.graph.index import GraphIndex, node_attr
from onnxq.graph.model_io import tensor_array
from onnxq.hookspecs import hookimpl
from onnxq.method import QuantMethod, RunContext
from onnxq.options import option

CORRECTED_OPS = ("Conv", "ConvTranspose", "Gemm")


@dataclass(frozen=True)
class BiasCorrectionOptions:
    """Options of empirical bias correction."""

    samples: int = option(64, "calibration samples over which the output means are taken (at most; memory_mb may keep fewer)")
    memory_mb: float = option(768, "memory the correction may hold for its samples (the float and the quantized pass's activations kept between layers, plus one ONNX Runtime run); keeps fewer samples than `samples`, in smaller runs, where they do not fit (the report says how many)")

    def validate(self) -> None:
        if self.samples < 1 or self.memory_mb <= 0:
            raise ValueError("samples must be >= 1 and memory_mb > 0")


class BiasCorrection(QuantMethod):
    """Per-channel output-mean correction folded into each quantized layer's float bias."""

    name = "bias-correction"
    summary = "empirical bias correction: fold each quantized layer's mean per-channel output shift into its bias (compose after a calibrator)"
    Options = BiasCorrectionOptions

    def declare_statistics(self, ctx: RunContext) -> list[StatRequest]:
        # its samples are kept by the statistics pass (read back by take_samples)
        return super().declare_statistics(ctx) + [samples_request(self.options.samples)]

    def quantized_rewrite(self, ctx: RunContext) -> onnx.ModelProto | None:
        # the samples kept and the size of each run, bounded by memory_mb whatever the data's batch
        # size and sample count: a float and a quantized runner each hold their frontier
        chunks, fit = fitted_chunks(ctx.model, [b.feeds for b in sample_batches(ctx, self.options.samples)], int(self.options.memory_mb * 2**20), runners=2)
        model, section, skipped, errors = correct_biases(ctx, chunks, self.name)
        ctx.report[self.name] = {"corrected": section, "skipped": skipped, "samples": sum(sample_count(c) for c in chunks),
                                 "samples_kept": fit.describe(), **errors}
        if not section:
            reasons = "; ".join(sorted(set(skipped.values()))) or "no quantized layers"
            ctx.report[self.name]["changed_nothing"] = f"no quantized layer has a float bias to correct ({reasons})"
            return None
        return _unless_worse(ctx.report[self.name], model, "its samples")


@dataclass(frozen=True)
class PadCorrectionOptions:
    """Options of bias correction on the input's constant region."""

    samples: int = option(64, "calibration samples read to find each input's dominant (padding) value")
    min_share: float = option(CONSTANT_SHARE, "an input has a constant region when, in every channel, at least this share of the elements equal the channel's most frequent value")

    def validate(self) -> None:
        if self.samples < 1 or not 0 < self.min_share <= 1:
            raise ValueError("samples must be >= 1 and min_share in (0, 1]")


class PadCorrection(QuantMethod):
    """Bias correction measured on the input's constant region (padding) alone.

    Where the inputs repeat one value over a large share of their elements (text lines padded to a
    fixed width, letterboxed images), every layer's output there is one constant per channel, and the
    rounding of those constants on each activation grid is a systematic shift that the next layers
    inherit: on PP-OCR rec it makes the quantized model read spaces into the padded margin where FP32
    reads nothing, and which calibration lines set the scales moves character agreement by several
    points. This method makes one synthetic sample filled with each input channel's dominant value
    (:func:`onnxq.calib.feeds.constant_region`) and corrects each quantized layer's bias, in
    topological order, so that the quantized model's per-channel output on that sample matches FP32's:
    the update of ``bias-correction`` on that one sample, taken at the centre position instead of
    averaged over positions, so that the borders, where the convs' zero padding changes the constant,
    do not pull it. Inputs without such a value: the model is left as it is, with a warning and the
    reason in the report. Compose after a calibrator: ``-p mse -p pad-correction``.
    """

    name = "pad-correction"
    summary = "bias correction on the input's constant region (padding): each quantized layer's output shift on a sample of the inputs' dominant value (compose after a calibrator)"
    Options = PadCorrectionOptions

    def declare_statistics(self, ctx: RunContext) -> list[StatRequest]:
        return super().declare_statistics(ctx) + [samples_request(self.options.samples)]

    def quantized_rewrite(self, ctx: RunContext) -> onnx.ModelProto | None:
        feeds = [b.feeds for b in sample_batches(ctx, self.options.samples)]
        sample, info = constant_region(feeds, self.options.min_share)
        if sample is None:
            ctx.report[self.name] = {"corrected": {}, "skipped": {}, "constant": info, "changed_nothing": info["reason"]}
            return None
        # the centre position: a constant input gives one value per channel away from the borders, where the convs'
        # zero padding makes the rest differ (on a short feature map the borders are most of the positions)
        # not checked against the whole output as bias-correction is: what it corrects is the padding's interior, and on
        # the all-padding sample the borders' error grew while the interior's fell tenfold
        model, section, skipped, _ = correct_biases(ctx, [sample], self.name, at_centre=True, check=False)
        ctx.report[self.name] = {"corrected": section, "skipped": skipped, "constant": info}
        return model


def _unless_worse(section: dict, model: onnx.ModelProto, data: str) -> onnx.ModelProto | None:
    """``model``, unless its corrections made the model's outputs further from FP32's than the uncorrected model's on
    ``data``, the samples they were measured on: then None, and the report section says why (``changed_nothing``). Each correction
    brings its own layer's mean closer to FP32's, but a network can be insensitive to a layer's error and not to the
    correction: on PP-OCRv5's recognizer (layers at cosine 0.24-0.99 to FP32 under `minmax`, its output at 0.97) the
    corrections took the output from cosine 0.97 to 0.81 and its decoded characters from 0.98 to 0.11."""
    before, after = section["output_error_before"], section["output_error_after"]
    if after <= before:
        return model
    section["changed_nothing"] = (f"its corrections made the model's outputs further from FP32's on {data} (relative squared "
                                  f"error {before:.3g} without them, {after:.3g} with them): left out")
    return None


def correct_biases(ctx: RunContext, chunks: list[dict[str, np.ndarray]], label: str, at_centre: bool = False, check: bool = True
                   ) -> tuple[onnx.ModelProto, dict[str, dict[str, float]], dict[str, str], dict[str, float]]:
    """A copy of ``ctx.model`` whose quantized Conv/ConvTranspose/Gemm biases absorb the per-channel mean of
    ``y_fp − y_q`` over ``chunks`` (or its value at the centre position: ``at_centre``), layer by layer in topological
    order; the corrected layers, the skipped ones, and (``check``) the float outputs' relative squared error against
    FP32's on ``chunks`` without the corrections and with them (``output_error_before``, ``output_error_after``)."""
    # the runners and the corrections share one copy, as they shared the working model before
    model = onnx.ModelProto()
    model.CopyFrom(ctx.model)
    idx = GraphIndex(model)
    sessions: dict[str, object] = {}
    outputs = [o.name for o in model.graph.output]
    q_run = GraphRunner(model, chunks, ctx.plan, sessions, keep=outputs)
    f_run = GraphRunner(model, chunks, None, sessions, keep=outputs)
    inits = {t.name: t for t in model.graph.initializer}
    fresh = Namer.of(model)
    section: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    with progress(label, ctx.show_progress, total=len(ctx.plan.layers), unit="layer") as bar:
        for layer in ctx.plan.layers:
            bar.update(1)
            node = idx.nodes[layer.node]
            if layer.weight not in ctx.plan.weights:
                skipped[layer.node] = "weight not quantized"
                continue
            bias_add = _bias_add(idx, node, inits) if node.op_type == "MatMul" else None
            if node.op_type not in CORRECTED_OPS and bias_add is None:
                skipped[layer.node] = f"{node.op_type}: no bias input to fold into (nor a sole Add of a constant bias after it)"
                continue
            bias_name = bias_add or (node.input[2] if len(node.input) > 2 else "")
            add_bias = not bias_name and node.op_type in ("Conv", "ConvTranspose")  # the bias input is optional
            if not add_bias and (not bias_name or bias_name not in inits or len(idx.consumers.get(bias_name, [])) != 1):
                skipped[layer.node] = "no float bias of its own"
                continue
            ch_axis = 1 if node.op_type in ("Conv", "ConvTranspose") else -1
            shift, energy, channels, ndim = _mean_shift(f_run, q_run, node.output[0], ch_axis, at_centre)
            if add_bias:
                # both runners have already executed this node, so a new input is safe to add
                bias_name = fresh(f"{node.name}_bias")
                t = numpy_helper.from_array(np.zeros(channels, np.float32), bias_name)
                model.graph.initializer.append(t)
                inits[bias_name] = model.graph.initializer[-1]
                if len(node.input) > 2:
                    node.input[2] = bias_name  # an empty optional-input slot
                else:
                    node.input.append(bias_name)
            bias = tensor_array(inits[bias_name])
            if shift.shape != bias.shape or not np.all(np.isfinite(shift)):
                skipped[layer.node] = "output channels do not match the bias"
                continue
            # a Gemm adds beta × C: the shift goes into C divided by beta (beta 8 made the shift 6x worse, not better)
            beta = float(node_attr(node, "beta", 1.0)) if node.op_type == "Gemm" and bias_add is None else 1.0
            if beta == 0.0:
                skipped[layer.node] = "Gemm with beta 0: its bias is not used"
                continue
            new_bias = (bias + shift / beta).astype(bias.dtype)
            inits[bias_name].CopyFrom(numpy_helper.from_array(new_bias, bias_name))
            q_run.consts[bias_name] = new_bias
            if bias_add is None:
                # the quantized run already computed this output with the old bias: shift it, so
                # later layers are corrected against what the deployed model will feed them
                shape = [1] * ndim
                shape[ch_axis % ndim] = -1
                q_run.values[node.output[0]] = [v + shift.reshape(shape).astype(v.dtype) for v in q_run.values[node.output[0]]]
            # (a MatMul's bias Add comes after it in topological order: the runner has not run it yet and reads the new bias)
            section[layer.node] = {"mean_abs_shift": float(np.abs(shift).mean()), "relative_shift": float(np.abs(shift).mean() / max(energy, 1e-12))}
    errors = {}
    if section and check:
        # the uncorrected model's own run (its own sessions: a Conv given a bias reads one more input in the copy)
        plain = GraphRunner(ctx.model, chunks, ctx.plan, keep=outputs)
        errors = {"output_error_before": _output_error(f_run, plain, outputs), "output_error_after": _output_error(f_run, q_run, outputs)}
    return model, section, skipped, errors


def _output_error(f_run: GraphRunner, q_run: GraphRunner, outputs: list[str]) -> float:
    """The mean over the float graph outputs of sum (y_q - y_fp)^2 / sum y_fp^2 on the runners' samples."""
    errors = []
    for r in (f_run, q_run):
        r.run_all()
    for name in outputs:
        noise = signal = 0.0
        # chunk by chunk: chunks may differ in shape (a decoder's prefill and decode steps)
        for f, q in zip(f_run.values.get(name, []), q_run.values.get(name, [])):
            if f.dtype.kind == "f" and f.shape == q.shape:
                f64 = f.astype(np.float64)
                noise += float(np.sum((q - f64) ** 2))
                signal += float(np.sum(f64**2))
        if signal > 0:
            errors.append(noise / signal)
    return float(np.mean(errors)) if errors else 0.0


def _bias_add(idx: GraphIndex, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str | None:
    """The bias of a MatMul written as ``Add(MatMul(x, W), b)`` (a Linear layer as PyTorch exports it): the name of
    ``b``, a 1-D float initializer of the output's width read by that Add alone, where the Add is the MatMul's sole
    reader. None otherwise."""
    add = idx.sole_consumer(node.output[0])
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        return None
    name = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    b = inits.get(name)
    if w is None or b is None or len(w.dims) != 2 or list(b.dims) != [w.dims[1]] or b.data_type != onnx.TensorProto.FLOAT:
        return None
    return name if len(idx.consumers.get(name, [])) == 1 else None


def _mean_shift(f_run: GraphRunner, q_run: GraphRunner, tensor: str, ch_axis: int, at_centre: bool = False) -> tuple[np.ndarray, float, int, int]:
    """Per-channel mean of ``y_fp − y_q`` over samples and positions (or, ``at_centre``, its value at the middle index
    of every other axis of the first sample), the RMS of ``y_fp``, the channel count and the rank, accumulated run by
    run (never the whole tensor over every sample at once)."""
    for r in (f_run, q_run):
        producer = r.idx.producer.get(tensor)
        if producer is not None:
            r.run_to(r.position[producer.name])
    total = None
    count = 0
    square = 0.0
    for y_f, y_q in zip(f_run.values[tensor], q_run.values[tensor]):
        ch = ch_axis % y_f.ndim
        axes = tuple(a for a in range(y_f.ndim) if a != ch)
        f64 = y_f.astype(np.float64)
        part = (f64 - y_q).sum(axis=axes)
        total = part if total is None else total + part
        count += y_f.size // y_f.shape[ch]
        square += float(np.sum(f64**2))
    assert total is not None
    if at_centre:
        y_f, y_q = f_run.values[tensor][0], q_run.values[tensor][0]
        ch = ch_axis % y_f.ndim
        centre = tuple(slice(None) if a == ch else (0 if a == 0 else y_f.shape[a] // 2) for a in range(y_f.ndim))
        shift = y_f[centre].astype(np.float64) - y_q[centre]
    else:
        shift = total / max(count, 1)
    return shift, float(np.sqrt(square / max(count * len(total), 1))), len(total), y_f.ndim


@hookimpl
def register_methods(register) -> None:
    register(BiasCorrection)
    register(PadCorrection)
