"""The quantization run (design.md §1) and its Python entry point :func:`optimize`.

load & check → prepare → float rewrites → placement → statistics → qparams → refine →
QDQ rewrite → validate & save → report.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.runtime import ort as ort_backend
from onnxq.calib import statistics
from onnxq.calib.feeds import batch_is_dynamic, model_inputs, rebatch
from onnxq.calib.readers import Batch, DataReader
from onnxq.errors import DataError, ModelError, OnnxqError, OptionError
from onnxq.graph import model_io, prepare
from onnxq.graph.placement import build_plan, name_nodes
from onnxq.graph.qdq import apply_commands, commands_from_plan
from onnxq.graph.rewrites import gemm_outputs_to_matmul
from onnxq.graph.targets import TargetProfile, get_profile
from onnxq.host import Host, get_host
from onnxq.method import QuantMethod, RunContext, set_weight_qparams
from onnxq.options import parse_options

log = logging.getLogger(__name__)

DataSpec = str | os.PathLike[str] | Iterable[Mapping[str, np.ndarray]] | DataReader


@dataclass
class QuantResult:
    """What :func:`optimize` returns."""

    model: onnx.ModelProto
    path: Path | None
    report: dict[str, Any] = field(default_factory=dict)


def make_reader(data: DataSpec, inputs, host: Host, data_options: Mapping[str, Any] | None = None, reader: str | None = None) -> DataReader:
    """Turn a data spec (path, ``module:function``, ``random``, iterable of feeds, or reader) into a reader."""
    if isinstance(data, DataReader):
        return data
    if isinstance(data, (str, os.PathLike)):
        spec = os.fspath(data)
        cls = host.reader(reader) if reader else host.reader_for(spec)
        if cls.name == "npz" and not Path(spec).exists():
            raise DataError(f"data path '{spec}' does not exist")
        opts = parse_options(cls.Options, data_options, f"data reader '{cls.name}'")
        return cls(spec, opts, inputs)
    if data_options:
        raise OptionError("data options apply only to a data spec string")
    return _IterableReader(data, inputs)


class _IterableReader(DataReader):
    name = "iterable"

    def __init__(self, items: Iterable[Mapping[str, np.ndarray]], inputs) -> None:
        super().__init__("<iterable>", None, inputs)
        self._items = items if isinstance(items, (list, tuple)) else list(items)

    def __iter__(self):
        names = {i.name for i in self.inputs}
        for k, item in enumerate(self._items):
            labels = None
            if isinstance(item, tuple):
                item, labels = item
            feeds = {n: np.asarray(v) for n, v in item.items() if n in names or n not in ("label", "labels")}
            if labels is None:
                labels = next((np.asarray(v) for n, v in item.items() if n in ("label", "labels") and n not in names), None)
            yield Batch(feeds, labels, source=f"item {k}")


def batch_source(reader: DataReader, inputs, batch_size: int, limit: int | None = None):
    """A re-iterable source of validated, re-batched calibration batches."""

    def source() -> Iterable[Batch]:
        seen = 0
        for b in rebatch(reader, inputs, batch_size):
            if limit is not None:
                n = next(iter(b.feeds.values())).shape[0]
                if seen >= limit:
                    return
                if seen + n > limit:
                    keep = limit - seen
                    b = Batch({k: v[:keep] for k, v in b.feeds.items()}, b.labels[:keep] if b.labels is not None else None, b.source)
                    n = keep
                seen += n
            yield b

    return source


def resolve_methods(methods: str | Sequence[str], options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None, host: Host) -> list[QuantMethod]:
    """Instantiate the selected methods with validated options.

    ``options`` is one mapping (applied to the method that accepts each key; ``method.key`` targets
    one method explicitly) or one mapping per method.
    """
    names = [methods] if isinstance(methods, str) else list(methods)
    if not names:
        raise OptionError("no method given")
    classes = [host.method(n) for n in names]
    per_method: list[dict[str, Any]] = [{} for _ in classes]
    if isinstance(options, Sequence) and not isinstance(options, (str, Mapping)):
        for i, o in enumerate(options):
            per_method[i].update(o)
    elif options:
        from onnxq.options import describe_options

        for key, value in options.items():
            target, dot, sub = key.partition(".")
            if dot and target in names:
                per_method[names.index(target)][sub] = value
                continue
            owners = [i for i, c in enumerate(classes) if key.replace("-", "_") in {o.name for o in describe_options(c.Options)}]
            if not owners:
                if len(classes) == 1:
                    per_method[0][key] = value  # let parse_options name the valid options
                    continue
                raise OptionError(f"no selected method has an option '{key}' (methods: {', '.join(names)})")
            for i in owners:
                per_method[i][key] = value
    return [cls(parse_options(cls.Options, per_method[i], f"method '{cls.name}'")) for i, cls in enumerate(classes)]


def _outputs_match(a: onnx.ModelProto, b: onnx.ModelProto, batch: Batch, rtol: float = 1e-5) -> float:
    # a few samples suffice to catch a wrong rewrite; one model at a time and no arena keep a
    # large-input model (PP-OCR det: 16 pages of 640x640) from holding two arenas at their peak
    feeds = {k: v[:4] for k, v in batch.feeds.items()} if batch_is_dynamic(model_inputs(a)) else batch.feeds
    ra = ort_backend.run(ort_backend.make_session(a, "disable", arena=False), feeds)
    rb = ort_backend.run(ort_backend.make_session(b, "disable", arena=False), feeds)
    worst = 0.0
    for x, y in zip(ra, rb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12)))
    return worst


def _check_rewrite(who: str, before: onnx.ModelProto, after: onnx.ModelProto, batch: Batch) -> None:
    err = _outputs_match(before, after, batch)
    if err > 1e-5:
        raise ModelError(f"{who} changed the float model's outputs (relative error {err:.2e} > 1e-5); this is a bug")


def optimize(
    model: str | os.PathLike[str] | onnx.ModelProto,
    output: str | os.PathLike[str] | None = None,
    *,
    method: str | Sequence[str] = "trt-entropy",
    options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    data: DataSpec | None = "random",
    data_options: Mapping[str, Any] | None = None,
    reader: str | None = None,
    target: str | TargetProfile = "ort",
    bits: int = 8,
    block_size: int | None = None,
    batch_size: int = 16,
    max_samples: int | None = None,
    exclude: Sequence[str] = (),
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    show_progress: bool = True,
    host: Host | None = None,
) -> QuantResult:
    """Quantize ``model`` with the selected method(s) and return the quantized model and a report.

    ``output`` (optional) is written atomically after the result has been validated in ONNX
    Runtime; the input model is never overwritten. ``data`` is a path, ``module:function``,
    ``random``, a DataReader or an iterable of feed dicts.
    """
    host = host or get_host()
    t_start = time.perf_counter()
    profile = target if isinstance(target, TargetProfile) else get_profile(target, bits, block_size)
    if isinstance(target, TargetProfile) and bits != target.bits:
        profile = target.with_bits(bits)
        profile.validate_bits()
    if batch_size < 1:
        raise OptionError("batch size must be at least 1")
    methods = resolve_methods(method, options, host)
    in_path = None
    if isinstance(model, onnx.ModelProto):
        float_model = model
        model_io.check_model(float_model)
    else:
        in_path = Path(model)
        float_model = model_io.load_model(in_path)
    out_path = model_io.ensure_output_path(output, [in_path] if in_path else [], force) if output is not None else None

    # prepare
    work = onnx.ModelProto()
    work.CopyFrom(float_model)
    work = prepare.upgrade_opset(work, prepare.MIN_INT4_OPSET if profile.weight_only else prepare.MIN_QDQ_OPSET)
    prepare.constants_to_initializers(work)
    name_nodes(work)  # after the opset upgrade, which may add unnamed nodes
    work, shape_status = prepare.infer_shapes(work)
    inputs = model_inputs(work)
    if data is None:
        needing = [m.name for m in methods if getattr(m, "needs_data", False)]
        if not profile.weight_only or needing:
            who = f" by method '{needing[0]}'" if needing else ""
            raise DataError(f"calibration data is required{who} (use data='random' for a smoke run)")
        data = "random:1"  # 4-bit weight-only scales do not depend on data; one batch validates the output
        data_options = {"warn": False}
    rdr = make_reader(data, inputs, host, data_options, reader)
    source = batch_source(rdr, inputs, batch_size, max_samples)
    first = next(iter(source()), None)
    if first is None:
        raise DataError("the calibration data is empty")
    ort_backend.make_session(work, "disable")  # the float model itself must load

    # float rewrites (each must preserve outputs): the target's own, then the methods'
    rewritten_gemms: list[str] = []
    if profile.gemm_outputs_as_matmul or profile.weight_only:
        candidate, rewritten_gemms = gemm_outputs_to_matmul(work, every_gemm=profile.weight_only)
        if rewritten_gemms:
            _check_rewrite("target " + profile.name, work, candidate, first)
            work = candidate
    ctx = RunContext(work, profile, build_plan(work, profile, exclude), source, show_progress=show_progress, host=host)
    for m in methods:
        rewritten = m.float_rewrite(ctx)
        if rewritten is not None:
            _check_rewrite(f"method '{m.name}'", ctx.model, rewritten, first)
            ctx.model = rewritten
            ctx.plan = build_plan(rewritten, profile, exclude)

    # statistics
    calibrators = [m for m in methods if m.calibrates]
    if not calibrators and not profile.weight_only:  # 4-bit weight-only has no activations to calibrate
        default = host.method("trt-entropy")()
        methods.insert(0, default)
        calibrators = [default]
    requests = [r for m in methods for r in m.declare_statistics(ctx)]
    t_cal = time.perf_counter()
    ctx.stats = statistics.collect(
        ctx.model, requests, source, batch_size=batch_size, cache_dir=cache_dir,
        data_fingerprint=(rdr.fingerprint() + f":{max_samples}") if cache_dir is not None and rdr.fingerprint() else None,
        show_progress=show_progress,
    )
    calib_seconds = time.perf_counter() - t_cal

    # qparams and refinement
    if calibrators:
        calibrators[0].choose_qparams(ctx)
    set_weight_qparams(ctx)
    t_ref = time.perf_counter()
    for m in methods:
        m.refine(ctx)
    refine_seconds = time.perf_counter() - t_ref
    missing = ctx.plan.missing_qparams()
    if missing:
        raise OnnxqError(f"no quantization parameters were chosen for '{missing[0]}'")

    # rewrite, validate, save
    origin = "+".join(m.name for m in methods)
    commands = commands_from_plan(ctx.plan, origin) + [c for m in methods for c in m.commands(ctx)]
    quantized = apply_commands(ctx.model, commands)
    if profile.weight_only and profile.int4_matmulnbits:
        from onnxq.graph.int4 import dq_matmul_to_matmulnbits

        quantized, _ = dq_matmul_to_matmulnbits(quantized)
    if profile.weight_only:
        quantized.ir_version = max(quantized.ir_version, 10)  # int4 tensors need IR version 10
    quantized.producer_name = "onnxq"
    from onnxq import __version__

    quantized.producer_version = __version__
    _set_metadata(quantized, {"onnxq.method": origin, "onnxq.target": profile.name, "onnxq.bits": str(profile.bits)})
    model_io.check_model(quantized, "the quantized model")
    sess = ort_backend.make_session(quantized, "all", arena=False)
    dyn = batch_is_dynamic(inputs)
    ort_backend.run(sess, {k: v[:1] for k, v in first.feeds.items()} if dyn else first.feeds)  # it loads and runs
    if out_path is not None:
        model_io.save_model_atomic(quantized, out_path)

    report = {
        "model": str(in_path) if in_path else "<in-memory>",
        "output": str(out_path) if out_path else None,
        "method": [m.name for m in methods],
        "options": {m.name: _jsonable(m.options) for m in methods},
        "target": profile.name,
        "bits": profile.bits,
        "int7_note": _int7_note(profile) if profile.bits == 7 else None,
        "weight_only": {"bits": 4, "block_size": profile.block_size, "format": "int4 symmetric" if profile.activation_signed else "uint4 with zero points"} if profile.weight_only else None,
        "shape_inference": shape_status,
        "quantized_activations": len(ctx.plan.activations),
        "quantized_weights": len(ctx.plan.weights),
        "layers": len(ctx.plan.layers),
        "float_rewrites": {"gemm_to_matmul": rewritten_gemms} if rewritten_gemms else {},
        "left_in_float": [{"node": n, "reason": r} for n, r in ctx.plan.skipped],
        "calibration_seconds": round(calib_seconds, 3),
        "refine_seconds": round(refine_seconds, 3),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "methods": ctx.report,
    }
    report.update(host.report_sections(report))
    return QuantResult(quantized, out_path, report)


def _int7_note(profile: TargetProfile) -> str:
    note = "INT7 is an int8 container restricted to 7-bit ranges: runtimes run it on INT8 kernels, with no INT7 speed-up"
    if profile.activation_signed and not profile.quantize_outputs:
        return note + " (TensorRT fuses the Clip that enforces the 7-bit activation range)"
    return note + ("; on ONNX Runtime the Clip that enforces the 7-bit activation range blocks the QLinearConv/QLinearMatMul fusions, so convolutions run in float"
                   " (an accuracy emulation; use --bits 8 for speed) while MatMuls may still run as MatMulIntegerToFloat: `onnxq compare` reports the integer-kernel share")


def _set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for k, v in values.items():
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.add(key=k, value=v)


def _jsonable(options: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(options):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(options).items()}
    return options
