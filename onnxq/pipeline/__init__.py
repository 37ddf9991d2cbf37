"""The quantization run and its Python entry point :func:`optimize`.

configure → load → prepare → open data → float rewrites (the target's, then the methods', each
checked to 1e-5) → placement → statistics → qparams → refine and quantized rewrites (reported) →
QDQ rewrite → validate → save → report. The stages live in :mod:`onnxq.pipeline.stages`, each a
function of one :class:`~onnxq.pipeline.stages.Run`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from onnxq.graph.targets import TargetProfile
from onnxq.host import Host, get_host
from onnxq.pipeline import stages
from onnxq.pipeline.checks import outputs_error
from onnxq.pipeline.compose import check_composition, resolve_methods
from onnxq.pipeline.data import DataSpec, batch_source, make_reader
from onnxq.errors import OptionError, QualityGateError
from onnxq.pipeline.report import Fidelity, LeftInFloat, QuantizedRewrite, Report, WeightOnlyFormat
from onnxq.pipeline.stages import Run, Settings

__all__ = [
    "DataSpec", "Fidelity", "LeftInFloat", "QuantResult", "QuantizedRewrite", "Report", "Run", "Settings", "WeightOnlyFormat",
    "batch_source", "check_composition", "fidelity_failure", "make_reader", "optimize", "outputs_error", "resolve_methods",
]


@dataclass
class QuantResult:
    """What :func:`optimize` returns."""

    model: onnx.ModelProto
    path: Path | None
    report: Report


#: the stages of a run, in order (each a function of the :class:`Run`)
STAGES = (
    stages.configure, stages.load, stages.prepare, stages.open_data, stages.target_rewrites, stages.place,
    stages.float_rewrites, stages.calibrate, stages.choose_qparams, stages.refine, stages.rewrite_qdq,
    stages.validate, stages.save, stages.check, stages.diagnose,
)


def optimize(
    model: str | os.PathLike[str] | onnx.ModelProto,
    output: str | os.PathLike[str] | None = None,
    *,
    method: str | Sequence[str] = "trt-entropy",
    options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    data: DataSpec | None = None,
    data_options: Mapping[str, Any] | None = None,
    reader: str | None = None,
    target: str | TargetProfile = "ort",
    bits: int = 8,
    block_size: int | None = None,
    batch_size: int = 16,
    max_samples: int | None = None,
    exclude: Sequence[str] | None = (),
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    show_progress: bool = True,
    host: Host | None = None,
    fold: bool = True,
    check: bool = True,
    strict: bool = False,
    eval_data: DataSpec | None = None,
    diagnostics: bool = False,
) -> QuantResult:
    """Quantize ``model`` with the selected method(s) and return the quantized model and a report.

    ``output`` (optional) is written atomically after the result has been validated in ONNX
    Runtime; the input model is never overwritten. ``data`` is a path, ``module:function``,
    ``random``, a DataReader or an iterable of feed dicts; it is required (``data="random"`` to
    calibrate on random inputs, a smoke run) except for 4-bit weight-only runs. ``fold=False`` keeps BatchNorm and
    constant Mul/Add after convolutions as they are (folded into the weights by default).

    ``method="auto"`` searches for the recipe (docs/methods.md, "auto"): ``options`` are then those of
    :class:`onnxq.pipeline.auto.AutoOptions` (``min_cosine``, ``max_drop``, ``min_agreement``, ``time_budget``, ...),
    and ``eval_data``, when given, is what the candidates are scored on.

    ``check`` runs the fidelity check after the save (on ``eval_data`` when given, otherwise on a
    few calibration batches, reported as in-sample) into ``report.fidelity``; a collapse is a
    logged warning, and with ``strict`` a :class:`~onnxq.errors.QualityGateError` (the written
    model is kept).

    ``diagnostics`` collects what the HTML report charts into ``report.diagnostics`` (per-layer error,
    histograms with calibrator thresholds, weight ranges, TensorRT lint; :mod:`onnxq.report_html`).
    """
    if isinstance(exclude, str):
        # a bare string would be read as its characters, each a node name that matches nothing
        raise OptionError(f"exclude takes a list of node names, not the string {exclude!r}")
    settings = Settings(model, output, method, options, data, data_options, reader, target, bits, block_size, batch_size,
                        max_samples, tuple(exclude or ()), cache_dir, force, show_progress, fold, check=check, eval_data=eval_data,
                        diagnostics=diagnostics)
    if method == "auto" or (not isinstance(method, str) and list(method) == ["auto"]):
        result, run = _optimize_auto(settings, host or get_host())
    else:
        run = Run(settings, host or get_host())
        for stage in STAGES:
            stage(run)
        result = QuantResult(run.quantized, run.out_path, stages.report(run))
    if strict and run.fidelity is not None and run.fidelity.failed():
        raise QualityGateError(fidelity_failure(run.fidelity, run.out_path))
    return result


def _optimize_auto(settings: Settings, host: Host) -> tuple[QuantResult, Run]:
    """``method="auto"``: the search of :mod:`onnxq.pipeline.auto`, then the chosen model's validate, save and check stages."""
    from onnxq.pipeline import auto

    started = time.perf_counter()
    run, found = auto.search(settings, host, settings.options)
    run.started = started
    for stage in (stages.validate, stages.save, stages.check, stages.diagnose):
        stage(run)
    rep = stages.report(run)
    rep.auto = found
    return QuantResult(run.quantized, run.out_path, rep), run


def fidelity_failure(fid: Fidelity, written: str | os.PathLike[str] | None) -> str:
    """One line saying why a strict run fails its fidelity check (and where the kept model is)."""
    why = fid.warnings[0] if fid.warnings else f"it could not run: {fid.error}"
    more = f" (and {len(fid.warnings) - 1} more)" if len(fid.warnings) > 1 else ""
    kept = f"; the quantized model was kept at {written}" if written is not None else ""
    return f"fidelity check failed{' (in-sample)' if fid.in_sample else ''}: {why}{more}{kept}"
