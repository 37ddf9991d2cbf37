"""Load, check and save ONNX models safely.

* Models over 2 GB use external data; external-data paths that leave the model's folder are
  refused (a model file must not make onnxq read arbitrary files).
* Saving is atomic: the model is written to a temporary file in the destination folder and moved
  into place only when complete, so a failure never leaves a partial output, and the input model is
  never overwritten.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from onnxq.errors import ModelError, OutputError

#: protobuf's hard limit; above it weights must live in external data files.
PROTOBUF_LIMIT = 2**31 - 1


def _check_external_paths(model: onnx.ModelProto, folder: Path) -> None:
    root = folder.resolve()
    for tensor in _all_tensors(model):
        if not uses_external_data(tensor):
            continue
        try:  # onnx validates offset/length here (a negative offset is a ValueError: the file's fault, not ours)
            location = ExternalDataInfo(tensor).location
        except (ValueError, TypeError) as exc:
            raise ModelError(f"initializer '{tensor.name}' has invalid external-data fields: {exc}") from None
        target = (root / location).resolve()
        if os.path.isabs(location) or root not in target.parents:
            raise ModelError(
                f"initializer '{tensor.name}' points to external data '{location}' outside the model's folder; refusing to read it"
            )
        if not target.is_file():
            raise ModelError(f"external data file '{location}' of initializer '{tensor.name}' is missing")


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def load_model(path: str | os.PathLike[str], check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model (with its external data) and check it.

    Raises :class:`ModelError` with one clear line for a missing, truncated or invalid file.
    """
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file '{p}' does not exist")
    if not p.is_file():
        raise ModelError(f"'{p}' is not a file")
    if p.stat().st_size == 0:
        raise ModelError(f"'{p}' is empty, not an ONNX model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others
        raise ModelError(f"'{p}' is not a valid ONNX model (cannot parse: {type(exc).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"'{p}' is not a valid ONNX model (no graph)")
    _check_external_paths(model, p.parent)
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
    except Exception as exc:
        raise ModelError(f"cannot read external data of '{p}': {exc}") from None
    if check:
        check_model(model, str(p))
    return model


def check_model(model: onnx.ModelProto, label: str = "model") -> None:
    """Run onnx.checker; large models are checked without their weights."""
    try:
        if model.ByteSize() > PROTOBUF_LIMIT:
            stripped = onnx.ModelProto()
            stripped.CopyFrom(model)
            for t in stripped.graph.initializer:
                t.ClearField("raw_data")
            onnx.checker.check_model(stripped)
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "validation failed"
        raise ModelError(f"{label} fails the ONNX checker: {first}") from None


def model_size_bytes(path: str | os.PathLike[str]) -> int:
    """Size on disk of a model file plus the external data files it references."""
    p = Path(path)
    total = p.stat().st_size
    model = onnx.load(str(p), load_external_data=False)
    seen = set()
    for tensor in _all_tensors(model):
        if uses_external_data(tensor):
            loc = ExternalDataInfo(tensor).location
            if loc not in seen:
                seen.add(loc)
                f = p.parent / loc
                if f.is_file():
                    total += f.stat().st_size
    return total


def ensure_output_path(output: str | os.PathLike[str], inputs: list[str | os.PathLike[str]], force: bool) -> Path:
    """Validate an output path: never one of the inputs, never clobber without ``force``."""
    out = Path(output)
    for inp in inputs:
        if Path(inp).exists() and out.exists() and out.resolve() == Path(inp).resolve():
            raise OutputError(f"output '{out}' is the input model; choose another path")
        if out.resolve() == Path(inp).resolve():
            raise OutputError(f"output '{out}' is the input model; choose another path")
    if out.exists() and not force:
        raise OutputError(f"output '{out}' already exists (use --force to replace it)")
    if out.exists() and out.is_dir():
        raise OutputError(f"output '{out}' is a directory")
    if out.parent.exists() and not out.parent.is_dir():
        raise OutputError(f"output folder '{out.parent}' is not a folder")
    return out


def save_model_atomic(model: onnx.ModelProto, output: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``output`` atomically (temp file in the same folder, then rename).

    Models over the protobuf limit are written with one external data file beside them, also
    moved into place only after both files are complete.
    """
    out = Path(output)
    folder = out.parent
    folder.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > PROTOBUF_LIMIT
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    data_name = out.name + ".data"
    tmp_data = folder / f".{data_name}.tmp"
    try:
        if large:
            onnx.save_model(
                model,
                str(tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=tmp_data.name,
                size_threshold=1024,
            )
            # the model refers to the temporary data name: rewrite locations, then move both
            reloaded = onnx.load(str(tmp), load_external_data=False)
            for t in _all_tensors(reloaded):
                if uses_external_data(t):
                    for entry in t.external_data:
                        if entry.key == "location":
                            entry.value = data_name
            with open(tmp, "wb") as fh:
                fh.write(reloaded.SerializeToString())
            os.replace(tmp_data, folder / data_name)
        else:
            with open(tmp, "wb") as fh:
                fh.write(model.SerializeToString())
                fh.flush()
                os.fsync(fh.fileno())
        # mkstemp creates the file owner-only; give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        tmp_data.unlink(missing_ok=True)
        raise
    return out
