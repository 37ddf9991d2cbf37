"""The run as stages over one :class:`Run` object.

:func:`~onnxq.pipeline.optimize` calls, in order: :func:`configure` → :func:`load` →
:func:`prepare` → :func:`open_data` → :func:`target_rewrites` → :func:`place` →
:func:`float_rewrites` → :func:`calibrate` → :func:`choose_qparams` → :func:`refine` (each method's
refine, then its quantized rewrite) → :func:`rewrite_qdq` → :func:`validate` → :func:`save` →
:func:`check` (the fidelity check, after the save so that a failure never loses the model) → :func:`diagnose` (the HTML
report's data, when asked) → :func:`report`. Each stage reads what earlier stages left on the run and adds its own part.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.calib import statistics
from onnxq.calib.feeds import batch_is_dynamic, model_inputs
from onnxq.calib.readers import Batch, DataReader, sample_count
from onnxq.errors import DataError, InternalError, ModelError, OnnxqError, OptionError, first_line
from onnxq.graph import model_io, prepare as graph_prepare
from onnxq.graph.constfold import fold_constants
from onnxq.graph.edit import name_nodes
from onnxq.graph.folding import fold_affine
from onnxq.graph.placement import build_plan, left_float_warnings, matches_exclude
from onnxq.graph.qdq import apply_commands, commands_from_plan, int32_biases, keep_float_layers_float, propagate_across_moves
from onnxq.graph.rewrites import gemm_outputs_to_matmul
from onnxq.evaluate.compare import batch_axes
from onnxq.evaluate.fidelity import check_fidelity
from onnxq.graph.targets import TargetProfile
from onnxq.host import Host
from onnxq.graph.bias_range import raise_steps_for_bias
from onnxq.method import QuantMethod, RangeMethod, RunContext, set_weight_qparams
from onnxq.pipeline.checks import check_feeds, check_float_rewrite, float_rewrite_verdict, model_changes, model_outputs, relative_error
from onnxq.pipeline.compose import calibrator_of, check_applicable, resolve_methods
from onnxq.pipeline.data import DataSpec, batch_source, make_reader
from onnxq.pipeline.diagnostics import Diagnostics, collect_diagnostics
from onnxq.pipeline.report import Fidelity, LeftInFloat, QuantizedRewrite, Report, WeightOnlyFormat
from onnxq.runtime import ort as ort_backend

log = logging.getLogger(__name__)

#: relative output error folding may always cause. Folding re-rounds every folded layer's float32
#: weights, and the roundings add up with depth: on PP-OCRv4 det (61 folded ops) the folded model
#: differs by 1.9e-5, as much as ONNX Runtime's own Conv+BatchNorm/Mul/Add fusions (level "basic":
#: 1.7e-5) move it; a wrong fold is off by orders of magnitude more. Above it, the fold is held to the
#: float rewrites' rule (a multiple of the model's own rounding noise, checks.float_rewrite_verdict):
#: on some PP-OCRv4 rec lines that noise is 5e-4 and the fold's change 4.6e-4, which a fixed 1e-4 took
#: for a broken fold, so whether the model was folded depended on the calibration lines.
FOLD_TOLERANCE = 1e-4

#: the calibrator the host adds when no selected method sets activation ranges: the error-guarded
#: entropy calibrator, not TensorRT's exact one (trt-entropy-exact), which collapses on normalized
#: inputs (docs/methods.md: Baseline calibrators, with the figures that chose it)
DEFAULT_CALIBRATOR = "trt-entropy"


@dataclass
class Settings:
    """The arguments of one :func:`~onnxq.pipeline.optimize` call."""

    model: str | os.PathLike[str] | onnx.ModelProto
    output: str | os.PathLike[str] | None = None
    method: str | Sequence[str] = DEFAULT_CALIBRATOR
    options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None
    data: DataSpec | None = None
    data_options: Mapping[str, Any] | None = None
    reader: str | None = None
    target: str | TargetProfile = "ort"
    bits: int = 8
    block_size: int | None = None
    batch_size: int = 16
    max_samples: int | None = None
    exclude: Sequence[str] = ()
    cache_dir: str | os.PathLike[str] | None = None
    force: bool = False
    show_progress: bool = True
    #: fold BatchNorm and constant Mul/Add after Conv/ConvTranspose/Gemm/MatMul into their weights
    fold: bool = True
    #: run the fidelity check after the save (:func:`check`)
    check: bool = True
    #: the fidelity check's data (None: a sample of the calibration data, reported as in-sample)
    eval_data: DataSpec | None = None
    #: collect what the HTML report charts into ``Report.diagnostics`` (:func:`diagnose`)
    diagnostics: bool = False


@dataclass
class Run:
    """One quantization run: its settings and everything the stages have made so far."""

    settings: Settings
    host: Host
    started: float = field(default_factory=time.perf_counter)
    profile: TargetProfile | None = None
    #: the selected methods, in order (calibrate may put the default calibrator first)
    methods: list[QuantMethod] = field(default_factory=list)
    in_path: Path | None = None
    out_path: Path | None = None
    float_model: onnx.ModelProto | None = None
    #: the model the methods work on; only the host replaces it (with checked method results)
    work: onnx.ModelProto | None = None
    shape_status: str = "none"
    inputs: list[Any] = field(default_factory=list)
    reader: DataReader | None = None
    source: Any = None
    #: the first calibration batch, on which every returned model is checked
    first: Batch | None = None
    ctx: RunContext | None = None
    #: the method whose choose_qparams sets the ranges (None: weight-only without one)
    calibrator: QuantMethod | None = None
    gemm_rewrites: list[str] = field(default_factory=list)
    #: the BatchNorm/Mul/Add/... nodes folded into the weighted op before them
    folded: list[str] = field(default_factory=list)
    #: the constant-only nodes (Transpose/Cast/... of weights) folded into initializers
    constants_folded: list[str] = field(default_factory=list)
    quantized_rewrites: list[QuantizedRewrite] = field(default_factory=list)
    #: measure each quantized rewrite's output error as it is installed (``-p auto`` measures only its chosen
    #: candidate's: its many builds would each run the float and the rewritten model on the first batch)
    measure_rewrites: bool = True
    #: the methods whose "changed nothing" was said (a float rewrite's report section is still there after refine)
    said_unchanged: set[str] = field(default_factory=set)
    #: the left-float warnings (and widened bias steps) already logged (``-p auto`` shares one set across its builds: its
    #: 20-odd builds of one model said the same control-flow line each, openwakeword's hey_jarvis 17 times)
    warned_float: set[str] = field(default_factory=set)
    #: the float model's outputs on the first batch (computed at the first quantized rewrite)
    float_outputs: list[np.ndarray] | None = None
    quantized: onnx.ModelProto | None = None
    #: seconds per timed stage: "calibration", "refine"
    timings: dict[str, float] = field(default_factory=dict)
    #: the fidelity check's result (None: not run)
    fidelity: Fidelity | None = None
    #: the HTML report's data (None: not collected)
    diagnostics: Diagnostics | None = None

    def warn_once(self, line: str, key: str | None = None) -> None:
        """Log ``line`` unless it (or ``key``, for a line whose figures vary between builds) was said in this search."""
        if (key or line) not in self.warned_float:
            self.warned_float.add(key or line)
            log.warning("%s", line)

    def install(self, model: onnx.ModelProto, replan: bool = False) -> None:
        """Make ``model`` the working model (checked by the caller); ``replan`` places it again."""
        self.work = model
        assert self.ctx is not None
        self.ctx.model = model
        if replan:
            self.ctx.plan = build_plan(model, self.profile, self.settings.exclude)

    def expect_untouched(self, method: QuantMethod, step: str) -> None:
        """Refuse a method that assigned ``ctx.model`` instead of returning its model."""
        if self.ctx is not None and self.ctx.model is not self.work:
            raise OnnxqError(f"method '{method.name}' assigned ctx.model in {step}; "
                             "return the changed model from float_rewrite or quantized_rewrite instead")


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------

def configure(run: Run) -> None:
    """The target profile and the selected methods with their options."""
    s = run.settings
    check_applicable(s.bits, s.block_size)
    target = s.target
    profile = target if isinstance(target, TargetProfile) else run.host.target(target, s.bits, s.block_size)
    if isinstance(target, TargetProfile) and s.bits != target.bits:
        profile = target.with_bits(s.bits)
        profile.validate_bits()
    run.profile = profile
    if s.batch_size < 1:
        raise OptionError("batch size must be at least 1")
    run.methods = resolve_methods(s.method, s.options, run.host)
    ranges = [m.name for m in run.methods if isinstance(m, RangeMethod) and m.name != "minmax"]
    if profile.weight_only and ranges:
        # a tiny LLaMA at --bits 4: -p mse wrote minmax's model to the bit (0.961), and the fidelity hint sent users to it
        log.warning("-p %s chooses activation ranges, and --bits 4 quantizes weights only: the model is the one -p minmax "
                    "writes (weights rounded to nearest); -p gptq rounds them to keep each layer's output", ranges[0])


def load(run: Run) -> None:
    """Load (or check) the float model and settle the output path; the input is never overwritten."""
    s = run.settings
    if isinstance(s.model, onnx.ModelProto):
        model_io.check_model(s.model)
        run.float_model = model_io.unique_node_names(s.model)  # a copy, where it renames: the caller's model stays as given
    else:
        run.in_path = Path(s.model)
        run.float_model = model_io.load_model(run.in_path)
    if s.output is not None:
        run.out_path = model_io.ensure_output_path(s.output, [run.in_path] if run.in_path else [], s.force)


def prepare(run: Run) -> None:
    """A working copy at the opset Q/DQ needs, constants as initializers, named nodes, shapes."""
    profile = run.profile
    graph_prepare.check_not_quantized(run.float_model)
    work = onnx.ModelProto()
    work.CopyFrom(run.float_model)
    work, functions = graph_prepare.inline_functions(work)
    if functions:
        log.info("inlined the model's %d local functions, so that the layers inside them are quantized", functions)
    work = graph_prepare.upgrade_opset(work, graph_prepare.MIN_INT4_OPSET if profile.weight_only else graph_prepare.MIN_QDQ_OPSET)
    _check_qdq_kernels(work)
    graph_prepare.constants_to_initializers(work)
    if graph_prepare.unfuse_runtime_ops(work):
        log.info("ONNX Runtime's fused Conv/Gemm written back as Conv/Gemm and their activation, to quantize them")
    if profile.name == "trt":
        contrib = Counter(n.op_type for n in work.graph.node if n.domain == "com.microsoft")
        if contrib:  # onnxq lint's contrib-op error, said before calibrating: the output would not build
            run.warn_once(f"the model holds ONNX Runtime contrib ops TensorRT cannot import ({', '.join(f'{k} x{v}' for k, v in contrib.most_common(4))}): "
                          "the quantized model will not build in TensorRT; quantize the model as exported, before ONNX Runtime's "
                          "transformer optimizer fuses it")
    graph_prepare.initializers_as_constants(work)  # weights listed in graph.input are constants here
    name_nodes(work)  # after the opset upgrade, which may add unnamed nodes
    run.work, run.shape_status = graph_prepare.infer_shapes(work)
    run.inputs = model_inputs(run.work)


def _check_qdq_kernels(model: onnx.ModelProto) -> None:
    """Refuse, before calibrating, a model at an opset this ONNX Runtime runs in float but has no Q/DQ kernels for."""
    opset = graph_prepare.default_opset(model)
    if ort_backend.has_qdq_kernels(opset, model.ir_version):
        return
    import onnxruntime

    lower = next((o for o in range(opset - 1, graph_prepare.MIN_QDQ_OPSET - 1, -1) if ort_backend.has_qdq_kernels(o, model.ir_version)), None)
    where = f"opset {lower} or lower (onnx.version_converter.convert_version)" if lower else "an older opset"
    raise ModelError(f"ONNX Runtime {onnxruntime.__version__} runs this opset-{opset} model in float but has no QuantizeLinear/"
                     f"DequantizeLinear kernels at opset {opset}, so a quantized copy would not load: export or convert the "
                     f"model to {where}, or use a newer ONNX Runtime")


def open_data(run: Run) -> None:
    """The calibration reader and batch source; the first batch must exist and the model must load."""
    s = run.settings
    data, data_options = s.data, s.data_options
    if data is None:
        needing = [m.name for m in run.methods if m.needs_data]
        if not run.profile.weight_only or needing:
            who = f" by method '{needing[0]}'" if needing else ""
            raise DataError(f"calibration data is required{who}: pass data= (a folder or file of .npz/.npy, an image folder, "
                            "module:function, a reader or feed dicts), or data='random' to calibrate on random inputs (a smoke run)")
        data = "random:1"  # 4-bit weight-only scales do not depend on data; one batch validates the output
        data_options = {"warn": False}
    run.reader = make_reader(data, run.inputs, run.host, data_options, s.reader, shared_with=s.eval_data)
    run.source = batch_source(run.reader, run.inputs, s.batch_size, s.max_samples)
    run.first = next(iter(run.source()), None)
    if run.first is None:
        raise DataError("the calibration data is empty")
    ort_backend.make_session(run.work, "disable")  # the float model itself must load


def target_rewrites(run: Run) -> None:
    """Folding (constant-only nodes into initializers, then BatchNorm and constant affine ops into
    the conv before them, unless ``fold=False``)
    and the target's own float rewrites (Gemm outputs as MatMul), each checked to 1e-5."""
    profile = run.profile
    if run.settings.fold:  # weights computed from initializers at run time first: placement quantizes constant weights only
        run.constants_folded = _checked_fold(run, fold_constants, "folding constants")
        run.folded = _checked_fold(run, fold_affine, "folding")
    if profile.gemm_outputs_as_matmul or profile.weight_only:
        candidate, run.gemm_rewrites = gemm_outputs_to_matmul(run.work, every_gemm=profile.weight_only)
        if run.gemm_rewrites:
            check_float_rewrite("target " + profile.name, run.work, candidate, run.first)
            run.work = candidate
    for pattern in run.settings.exclude:
        # a typo in a node name kept nothing float and said nothing
        if not any(matches_exclude(n, [pattern]) for n in run.work.graph.node):
            log.warning("--exclude '%s' names no node of the model (a node-name glob or an op type; BatchNorms are folded "
                        "into their convs): nothing is kept float by it", pattern)


def _checked_fold(run: Run, fold: Callable[[onnx.ModelProto], tuple[onnx.ModelProto, list[str]]], what: str) -> list[str]:
    """Install ``fold(run.work)`` if it keeps the outputs within :data:`FOLD_TOLERANCE`; the nodes folded.

    Never lose a run to the default preparation: a fold that moves the outputs further is logged and
    the model quantized unfolded."""
    candidate, folded = fold(run.work)
    if not folded:
        return []
    try:
        verdict = float_rewrite_verdict(run.work, candidate, run.first, floor=FOLD_TOLERANCE)
    except ModelError as exc:  # the model loaded and ran before the fold (open_data): the fold broke it
        log.warning("%s gave a model ONNX Runtime cannot run (%s); leaving it unfolded", what, exc)
        return []
    if not verdict.ok:
        log.warning("%s changed the float model's outputs (%s); leaving it unfolded", what, verdict)
        return []
    run.work = candidate
    return folded


def place(run: Run) -> None:
    """The quantization plan of the working model, and the context methods see."""
    s = run.settings
    run.ctx = RunContext(run.work, run.profile, build_plan(run.work, run.profile, s.exclude), run.source,
                         show_progress=s.show_progress, host=run.host, collect_options={"batch_size": s.batch_size},
                         float_model=run.float_model)


def float_rewrites(run: Run) -> None:
    """Each method's float rewrite, checked to 1e-5 against the model before it (or, for a method
    that ``approximates``, recorded with its output error like a quantized rewrite), then placed again."""
    for m in run.methods:
        rewritten = m.float_rewrite(run.ctx)
        run.expect_untouched(m, "float_rewrite")
        say_unchanged(run, m, rewritten)  # -p auto builds its float forms itself and notes them per form instead
        if rewritten is not None:
            if m.approximates:
                quantized_rewrite(run, m, rewritten)  # records the change and its error against the float model
            else:
                check_float_rewrite(f"method '{m.name}'", run.work, rewritten, run.first)
            run.install(rewritten, replan=True)


def say_unchanged(run: Run, method: QuantMethod, rewritten: onnx.ModelProto | None) -> None:
    """A rewrite asked for by name that found nothing to change says why (its report section's ``changed_nothing``)."""
    section = run.ctx.report.get(method.name)
    if rewritten is None and isinstance(section, dict) and section.get("changed_nothing") and method.name not in run.said_unchanged:
        run.said_unchanged.add(method.name)
        log.warning("%s changed nothing: %s", method.name, section["changed_nothing"])


#: fewer calibration samples than this get a warning
FEW_SAMPLES = 8


def calibrate(run: Run) -> None:
    """Pick the calibrator (adding the default one if needed) and collect every requested statistic."""
    s, ctx = run.settings, run.ctx
    run.calibrator = calibrator_of(run.methods)
    if run.calibrator is None and not run.profile.weight_only:  # 4-bit weight-only has no activations to calibrate
        run.calibrator = run.host.method(DEFAULT_CALIBRATOR)()
        run.methods.insert(0, run.calibrator)
    requests = [r for m in run.methods for r in m.declare_statistics(ctx)]
    fingerprint = run.reader.fingerprint() if s.cache_dir is not None else None
    samples = [0]

    def counted() -> Iterator[Batch]:  # the pass counts what it reads (a cached pass reads nothing, and says nothing)
        n = 0
        for b in run.source():
            n += b.size
            yield b
        samples[0] = max(samples[0], n)

    t0 = time.perf_counter()
    ctx.stats = statistics.collect(
        ctx.model, requests, counted, batch_size=s.batch_size, cache_dir=s.cache_dir,
        data_fingerprint=(fingerprint + f":{s.max_samples}") if fingerprint else None,
        show_progress=s.show_progress,
    )
    run.timings["calibration"] = time.perf_counter() - t0
    if 0 < samples[0] < FEW_SAMPLES and run.calibrator is not None:
        # one image calibrated a CNN to 95.5 % against FP32's 99.5 % (a sample's cosine -0.92), and nothing was said
        log.warning("calibrated on %d sample(s): activation ranges from so few are rough; a few hundred typical inputs "
                    "make them representative", samples[0])


def choose_qparams(run: Run) -> None:
    """Activation ranges from the calibrator, then per-channel max-abs for weights it left without qparams."""
    if run.calibrator is not None:
        run.calibrator.choose_qparams(run.ctx)
        run.expect_untouched(run.calibrator, "choose_qparams")
    set_weight_qparams(run.ctx)


def refine(run: Run) -> None:
    """Method by method: refine the plan, then install its quantized rewrite (so the next method sees it).

    The host's checks of quantized rewrites are not counted in the refine time.
    """
    checking = 0.0
    t0 = time.perf_counter()
    for m in run.methods:
        m.refine(run.ctx)
        run.expect_untouched(m, "refine")
        rewritten = m.quantized_rewrite(run.ctx)
        run.expect_untouched(m, "quantized_rewrite")
        say_unchanged(run, m, rewritten)
        if rewritten is not None:
            t_check = time.perf_counter()
            quantized_rewrite(run, m, rewritten)
            checking += time.perf_counter() - t_check
    run.timings["refine"] = time.perf_counter() - t0 - checking
    missing = run.ctx.plan.missing_qparams()
    if missing:
        raise OnnxqError(f"no quantization parameters were chosen for '{missing[0]}'")
    for line in leave_constant_inputs_float(run.ctx):
        run.warn_once(line)
    if run.profile.int32_bias or run.profile.quantize_outputs:  # the bias is added in int32 (ONNX Runtime's fused kernels)
        raised = raise_steps_for_bias(run.ctx.model, run.ctx.plan)
        if raised:  # once a search (-p auto builds many candidates, each step a little different), not once a build
            tensor, old, new = max(raised, key=lambda r: r[2] / r[1])
            run.warn_once(f"{len(raised)} activation step(s) widened so that the int32 bias of the layers reading them does not "
                          f"overflow (the activation is nearly zero on the calibration data): '{tensor}' {old:.3g} -> {new:.3g}",
                          key="bias steps: " + ",".join(sorted(t for t, _, _ in raised)))


def error_against_float(run: Run, model: onnx.ModelProto, float_model: onnx.ModelProto | None = None) -> float:
    """Worst output's relative error of ``model`` against the float model on the first calibration
    batch (the float outputs computed once, while the working model is still the float one, or from
    ``float_model`` when a measurement was deferred past the rewrite: ``-p auto``'s chosen candidate)."""
    reference = run.work if float_model is None else float_model
    feeds = check_feeds(reference, run.first)
    if run.float_outputs is None:
        run.float_outputs = model_outputs(reference, feeds)
    return relative_error(run.float_outputs, model_outputs(model, feeds))


def rewrite_error(run: Run, model: onnx.ModelProto, who: str, float_model: onnx.ModelProto | None = None) -> float | None:
    """:func:`error_against_float` of a quantized rewrite, for the report: None, with a warning, when ``model`` does not
    run (the final model is validated on its own)."""
    try:
        return error_against_float(run, model, float_model)
    except Exception as exc:  # noqa: BLE001 - the figure is a report
        log.warning("could not run the model rewritten by %s to measure its output error: %s", who, exc)
        return None


def quantized_rewrite(run: Run, method: QuantMethod, model: onnx.ModelProto) -> None:
    """Record what a method's quantized rewrite changed and how far it moved the outputs, then install it."""
    if model is run.work:
        raise OnnxqError(f"method '{method.name}' returned ctx.model from quantized_rewrite; return a changed copy (or None)")
    error = rewrite_error(run, model, f"method '{method.name}'") if run.measure_rewrites else None
    run.quantized_rewrites.append(QuantizedRewrite(method.name, **model_changes(run.work, model), output_error=error))
    run.install(model)


def rewrite_qdq(run: Run) -> None:
    """The plan (and methods' extra commands) as Q/DQ nodes; int4 MatMulNBits; producer and metadata."""
    profile, ctx = run.profile, run.ctx
    origin = "+".join(m.name for m in run.methods)
    commands = commands_from_plan(ctx.plan, origin) + [c for m in run.methods for c in m.commands(ctx)]
    # never a silent no-op; a method that rewrote the weights itself (emb4bit's 4-bit tables) quantized something
    for line in left_float_warnings(ctx.model, ctx.plan, bool(commands) or bool(run.quantized_rewrites)):
        run.warn_once(line)
    quantized = apply_commands(ctx.model, commands)
    for m in run.methods:
        quantized = qdq_rewrite(run, m, quantized)
    if profile.int32_bias:
        quantized, _ = int32_biases(quantized)
    if profile.explicit_propagation:
        quantized, moved = propagate_across_moves(quantized)
        if moved:
            log.info("%d Q/DQ pair(s) written across Reshape/Transpose/... as ONNX Runtime's QDQ propagation would add them", moved)
    if profile.guard_float_layers:
        quantized, guarded = keep_float_layers_float(quantized)
        if guarded:
            log.info("%d float layer(s) read their input through a per-axis DequantizeLinear, so that ONNX Runtime does not quantize "
                     "their weights itself: %s", len(guarded), ", ".join(guarded))
    if profile.weight_only and profile.int4_matmulnbits:
        from onnxq.graph.int4 import dq_matmul_to_matmulnbits

        quantized, _ = dq_matmul_to_matmulnbits(quantized)
    if profile.weight_only:
        quantized.ir_version = max(quantized.ir_version, 10)  # int4 tensors need IR version 10
    quantized.producer_name = "onnxq"
    quantized.producer_version = _onnxq_version()
    _set_metadata(quantized, {"onnxq.method": origin, "onnxq.target": profile.name, "onnxq.bits": str(profile.bits)})
    run.quantized = quantized


def leave_constant_inputs_float(ctx: RunContext) -> list[str]:
    """Take out of the plan each graph input that held one value on every calibration sample, and each quantized tensor
    computed from it that did too; a warning line for each input.

    Its grid is a single point (a step of 1e-8 at it), so whatever it takes in use is rounded back to that value: an
    LSTM calibrated with zero h and c states, the usual first try for a streaming model, got both quantized to zero
    (and the recurrent projections h·Wh with them) and lost its memory (task accuracy 0.964 -> 0.443 in a closed loop)
    while every check, run on the same zero states, passed. Left float, the layers reading them compute with what they
    really hold; the warning says what data to calibrate with, since the ranges after them saw none of it either.
    """
    if not ctx.stats:
        return []

    def constant(tensor: str) -> bool:
        st = ctx.stats.get(tensor)
        return st is not None and bool(st.count) and st.min == st.max

    inputs = [i.name for i in ctx.model.graph.input if i.name in ctx.plan.activations and constant(i.name)]
    tainted = set(inputs)
    for node in ctx.model.graph.node:  # topological order: a constant computed from a constant input is one too
        if any(i in tainted for i in node.input):
            tainted.update(o for o in node.output if o and constant(o))
    lines = []
    for tensor in [t for t in ctx.plan.activations if t in tainted]:
        del ctx.plan.activations[tensor]
        if tensor in inputs:
            value = ctx.stats[tensor].min
            empty = "" if value else " (or no element: a decoder's empty cache)"
            why = (f"held {value:g} in every calibration sample{empty}, so its grid is that one value; left float, with what is "
                   "computed from it alone (calibrate it with the values it takes in use: for a recurrent state or cache, "
                   "the states the model produces)")
            ctx.plan.skipped.append((f"input '{tensor}'", why))
            lines.append(f"input '{tensor}' {why}")
    return lines


def qdq_rewrite(run: Run, method: QuantMethod, quantized: onnx.ModelProto) -> onnx.ModelProto:
    """A method's change of the QDQ model (:meth:`QuantMethod.qdq_rewrite`), checked and recorded; the model it returns, or ``quantized``."""
    if type(method).qdq_rewrite is QuantMethod.qdq_rewrite:
        return quantized  # not overridden: no copy (models over 2 GB)
    own = onnx.ModelProto()
    own.CopyFrom(quantized)  # the method's own copy: editing it in place cannot corrupt the host's model
    rewritten = method.qdq_rewrite(run.ctx, own)
    if rewritten is None:
        return quantized
    who = f"the model returned by method '{method.name}' from qdq_rewrite"
    # the user's model loaded and ran: a broken rewrite of it is the method's bug, not a user error
    try:
        model_io.check_model(rewritten, who)
    except ModelError as exc:
        raise InternalError(str(exc)) from exc
    try:
        error = error_against_float(run, rewritten)
    except Exception as exc:
        raise InternalError(f"{who} does not run in ONNX Runtime: {exc}") from exc
    run.quantized_rewrites.append(QuantizedRewrite(method.name, **model_changes(quantized, rewritten), output_error=error))
    return rewritten


def validate(run: Run) -> None:
    """The quantized model passes the ONNX checker and loads and runs in ONNX Runtime.

    The float model did both before quantization (:func:`load`), so a failure here is onnxq's (or a
    method plugin's) fault: :class:`~onnxq.errors.InternalError`, exit code 4, not a user error.
    """
    try:
        model_io.check_model(run.quantized, "the quantized model")
        sess = ort_backend.make_session(run.quantized, "all", arena=False)
        feeds = run.first.feeds
        ort_backend.run(sess, {k: v[:1] for k, v in feeds.items()} if batch_is_dynamic(run.inputs) else feeds)
    except ModelError as exc:
        raise InternalError(f"{exc} (the float model loaded and ran; the quantized model onnxq built from it did not)") from exc


def save(run: Run) -> None:
    """Write the validated model atomically, if an output was given."""
    if run.out_path is not None:
        model_io.save_model_atomic(run.quantized, run.out_path, force=run.settings.force, inputs=[run.in_path] if run.in_path else [])


#: the in-sample fidelity check reads at most this many calibration batches and samples (it must stay cheap)
CHECK_BATCHES, CHECK_SAMPLES = 4, 64
#: the fidelity check on evaluation data reads at most this many samples
CHECK_EVAL_SAMPLES = 512


def check(run: Run) -> None:
    """The fidelity check: the quantized model against FP32 on the evaluation data, or in-sample on a few calibration batches.

    A collapse is logged as a warning naming the outputs, the worst layers and a suggestion. The
    check never fails the run: if it cannot run, the reason is logged and kept in the report
    (``fidelity.error``); ``optimize(strict=True)`` turns either into an error after the save.
    """
    s = run.settings
    if not s.check:
        return
    t0 = time.perf_counter()
    in_sample = s.eval_data is None
    try:
        if in_sample:
            # a model of one sample per run (a fixed batch of 1: a streaming VAD) was checked on 4 samples
            one_each = sample_count(run.first.feeds, batch_axes(run.float_model)) == 1
            source, batches, samples = run.source, CHECK_SAMPLES if one_each else CHECK_BATCHES, CHECK_SAMPLES
        else:
            inputs = model_inputs(run.float_model)
            opts = s.data_options if isinstance(s.eval_data, (str, os.PathLike)) else None
            source = batch_source(make_reader(s.eval_data, inputs, run.host, opts, s.reader, evaluation=True), inputs, s.batch_size)
            batches, samples = None, CHECK_EVAL_SAMPLES
        run.fidelity = check_fidelity(run.float_model, run.quantized, source, in_sample=in_sample, methods=[m.name for m in run.methods],
                                      target=run.profile.name, bits=run.profile.bits, max_batches=batches, max_samples=samples)
    except Exception as exc:  # the model is saved; a check that cannot run is reported, not fatal
        msg = first_line(exc)
        if not isinstance(exc, OnnxqError):
            msg = f"{type(exc).__name__}: {msg}"
        log.warning("the fidelity check could not run: %s", msg)
        run.fidelity = Fidelity("calibration" if in_sample else "evaluation", in_sample, 0, [], False, [], [], None, msg,
                                round(time.perf_counter() - t0, 3))
        return
    log_fidelity(run.fidelity)


def log_fidelity(fid: Fidelity) -> None:
    """The fidelity check's warnings as logged warnings (the command line's stderr lines)."""
    for line in fid.warnings:
        log.warning("fidelity check%s: %s", " (in-sample)" if fid.in_sample else "", line)
    if fid.warned:
        if fid.worst_layers:
            log.warning("fidelity check: worst layers (SQNR vs FP32): %s",
                        ", ".join(f"{w.tensor} {w.sqnr_db:.1f} dB" for w in fid.worst_layers))
        if fid.suggestion:
            log.warning("fidelity check: %s", fid.suggestion)


def diagnose(run: Run) -> None:
    """With ``diagnostics=True``: per-layer error, the worst layers' histograms with each calibrator's threshold, the worst
    weights' ranges and TensorRT lint findings, for the HTML report (after the save; never fails the run)."""
    if run.settings.diagnostics:
        run.diagnostics = collect_diagnostics(run)
        if run.diagnostics.error:
            log.warning("the report's diagnostics could not be collected: %s", run.diagnostics.error)


def report(run: Run) -> Report:
    """The typed report of the run, with plugins' sections in ``extra``."""
    profile, plan = run.profile, run.ctx.plan
    rep = Report(
        model=str(run.in_path) if run.in_path else "<in-memory>",
        output=str(run.out_path) if run.out_path else None,
        method=[m.name for m in run.methods],
        options={m.name: _options_dict(m.options) for m in run.methods},
        target=profile.name,
        bits=profile.bits,
        int7_note=int7_note(profile) if profile.bits == 7 else None,
        weight_only=WeightOnlyFormat(4, profile.block_size, "int4 symmetric" if profile.activation_signed else "uint4 with zero points")
        if profile.weight_only else None,
        shape_inference=run.shape_status,
        quantized_activations=len(plan.activations),
        quantized_weights=len(plan.weights),
        layers=len(plan.layers),
        float_rewrites={k: v for k, v in (("fold_constants", run.constants_folded), ("fold_affine", run.folded), ("gemm_to_matmul", run.gemm_rewrites)) if v},
        left_in_float=[LeftInFloat(n, r) for n, r in plan.skipped],
        calibration_seconds=round(run.timings["calibration"], 3),
        refine_seconds=round(run.timings["refine"], 3),
        total_seconds=round(time.perf_counter() - run.started, 3),
        methods=run.ctx.report,
        quantized_rewrites=run.quantized_rewrites,
        fidelity=run.fidelity,
        diagnostics=run.diagnostics,
    )
    rep.extra = run.host.report_sections(rep.to_dict())
    return rep


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def int7_note(profile: TargetProfile) -> str:
    """What INT7 means on ``profile``'s runtime (the report's ``int7_note``)."""
    note = "INT7 is an int8 container restricted to 7-bit ranges: runtimes run it on INT8 kernels, with no INT7 speed-up"
    if profile.activation_signed and not profile.quantize_outputs:
        return note + " (TensorRT fuses the Clip that enforces the 7-bit activation range)"
    return note + ("; on ONNX Runtime the Clip that enforces the 7-bit activation range blocks the QLinearConv/QLinearMatMul fusions, so convolutions run in float"
                   " (an accuracy emulation; use --bits 8 for speed) while MatMuls may still run as MatMulIntegerToFloat: `onnxq compare` reports the integer-kernel share")


def _onnxq_version() -> str:
    # the installed distribution's version: `onnxq.__version__` sits in the top layer
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxq")
    except PackageNotFoundError:
        return "unknown"


def _set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for k, v in values.items():
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.add(key=k, value=v)


def _options_dict(options: Any) -> dict[str, Any]:
    import dataclasses

    if dataclasses.is_dataclass(options):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(options).items()}
    return dict(options) if isinstance(options, Mapping) else {}
