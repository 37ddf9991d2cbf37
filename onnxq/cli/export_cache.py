"""``onnxq export-cache``: write a QDQ model's activation scales as a TensorRT calibration cache."""

from __future__ import annotations

from pathlib import Path

import click

from onnxq.cli.common import emit_json


@click.command("export-cache")
@click.argument("qdq_model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--trt-version", default=None, help="TensorRT version written in the header (default: the installed tensorrt, else 10.16.1). "
              "TensorRT ignores a cache from another version.")
@click.option("--algorithm", type=click.Choice(["EntropyCalibration2", "MinMaxCalibration", "EntropyCalibration", "LegacyCalibration"]),
              default="EntropyCalibration2", show_default=True, help="Calibrator named in the header (TensorRT only reads a cache made for its own calibrator).")
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def command(qdq_model: Path, out: Path, trt_version: str | None, algorithm: str, force: bool, as_json: bool) -> None:
    """Write the activation scales of QDQ_MODEL to OUT as a TensorRT calibration cache.

    Each QuantizeLinear on an activation gives one line, keyed by the float tensor it reads (the
    name TensorRT's calibrator uses for the FP32 model) with scale = range / 127. The cache works
    with TensorRT 10's implicit INT8 (`trtexec --int8 --calib=OUT`, a calibrator's
    read_calibration_cache) and re-imports with `onnxq optimize -p trt-cache -o path OUT`.
    """
    from onnxq.calib.trt_cache import DEFAULT_HEADER_VERSION, make_header, scales_from_qdq_model, write_cache
    from onnxq.errors import ModelError, OptionError
    from onnxq.graph.model_io import ensure_output_path, load_model

    ensure_output_path(out, [qdq_model], force)  # never the model or its external data, a device, or a full disk
    model = load_model(qdq_model)
    extracted = scales_from_qdq_model(model)
    if not extracted.scales:
        raise ModelError(f"'{qdq_model}' quantizes no activation (no QuantizeLinear on a non-constant tensor); nothing to export")
    version = trt_version or _installed_trt_version() or DEFAULT_HEADER_VERSION
    try:
        header = make_header(version, algorithm)
    except ValueError as exc:
        raise OptionError(f"--trt-version: {exc}") from None
    write_cache(out, extracted.scales, header, force=force)
    if as_json:
        emit_json({"output": str(out), "header": header, "tensors": len(extracted.scales), "skipped": [{"tensor": t, "reason": r} for t, r in extracted.skipped]})
        return
    for tensor, reason in extracted.skipped:
        click.echo(f"skipped {tensor}: {reason}", err=True)
    click.echo(f"wrote {out}: {len(extracted.scales)} activation scales, header {header}")


def _installed_trt_version() -> str | None:
    try:
        import tensorrt  # type: ignore[import-not-found]
    except Exception:
        return None
    return getattr(tensorrt, "__version__", None)
