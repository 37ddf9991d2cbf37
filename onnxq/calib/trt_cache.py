"""TensorRT INT8 calibration caches: read them, and write onnxq's activation scales as one.

The format (what TensorRT's implicit-quantization calibrators write through
``writeCalibrationCache`` and read back through ``readCalibrationCache``, and what ``trtexec
--calib=FILE`` loads) is plain text::

    TRT-101601-EntropyCalibration2
    input: 3c010a14
    /stem/Relu_output_0: 3d1c3f0e
    (Unnamed Layer* 12) [Shuffle]_output: 0

* line 1: ``TRT-<version>-<algorithm>``; the version is TensorRT's ``NV_TENSORRT_VERSION``
  (``major*10000 + minor*100 + patch`` since TensorRT 10, ``major*1000 + ...`` for 8.x), the
  algorithm one of ``EntropyCalibration2``, ``EntropyCalibration``, ``MinMaxCalibration``,
  ``LegacyCalibration``. TensorRT ignores a cache whose version or algorithm differ from its own
  and recalibrates.
* every other line: ``<tensor name>: <hex>``, the hex digits being the IEEE-754 bits of a
  big-endian float32 **scale** = dynamic range / 127 (so the clip threshold is ``scale * 127``).
  Tensor names can themselves contain ``": "``; the value is what follows the last one. TensorRT
  writes the bits without zero padding (a zero scale is written ``0``).

Scales here are always TensorRT's (range / 127), whatever bit width the onnxq model used: an INT7
activation quantized with step ``s`` on ``[-63, 63]`` has range ``63 s`` and is written as
``63 s / 127``, so importing the cache into an INT7 run gives back ``s``.
"""

from __future__ import annotations

import math
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.errors import DataError, OutputError

#: the integer level TensorRT's scales refer to: dynamic range = scale * 127
TRT_QMAX = 127
#: calibration algorithms named in cache headers
ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
#: TensorRT version used for headers when none is given and tensorrt is not importable: the last
#: release line that still has the implicit calibrators (they were removed in 11.0)
DEFAULT_HEADER_VERSION = "10.16.1"

_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")


@dataclass
class CalibrationCache:
    """A parsed calibration cache: its header and one TensorRT scale per tensor."""

    header: str
    scales: dict[str, float] = field(default_factory=dict)

    @property
    def algorithm(self) -> str | None:
        m = _HEADER.match(self.header)
        return m.group(2) if m else None

    @property
    def version_code(self) -> int | None:
        m = _HEADER.match(self.header)
        return int(m.group(1)) if m else None

    def thresholds(self) -> dict[str, float]:
        """Clip threshold (dynamic range) of each tensor: ``scale * 127``."""
        return {k: v * TRT_QMAX for k, v in self.scales.items()}


def version_code(version: str) -> int:
    """TensorRT's ``NV_TENSORRT_VERSION`` for a version string (``"10.16.1"`` -> 101601, ``"8.6.1"`` -> 8601)."""
    parts = [int(p) for p in re.findall(r"\d+", version)[:3]]
    if not parts:
        raise ValueError(f"not a TensorRT version: {version!r}")
    major, minor, patch = (parts + [0, 0])[:3]
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def make_header(version: str = DEFAULT_HEADER_VERSION, algorithm: str = "EntropyCalibration2") -> str:
    """The first line of a cache, e.g. ``TRT-101601-EntropyCalibration2``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown calibration algorithm {algorithm!r} (one of {', '.join(ALGORITHMS)})")
    return f"TRT-{version_code(version)}-{algorithm}"


def scale_to_hex(scale: float) -> str:
    """The hex TensorRT writes for a scale: big-endian float32 bits, lower case, no padding."""
    return format(struct.unpack(">I", struct.pack(">f", float(scale)))[0], "x")


def hex_to_scale(text: str) -> float:
    """Inverse of :func:`scale_to_hex` (accepts padded and unpadded digits)."""
    bits = int(text, 16)
    if bits > 0xFFFFFFFF:
        raise ValueError(f"'{text}' is longer than 32 bits")
    return struct.unpack(">f", struct.pack(">I", bits))[0]


def parse_cache(text: str | bytes, source: str = "calibration cache") -> CalibrationCache:
    """Parse a cache's text; malformed content raises :class:`DataError` naming the line."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{source} is not a text TensorRT calibration cache") from None
    lines = text.splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        raise DataError(f"{source} is empty")
    header = lines[0].strip()
    if not _HEADER.match(header):
        raise DataError(f"{source} does not start with a TensorRT header like 'TRT-101601-EntropyCalibration2' (got {header[:60]!r})")
    scales: dict[str, float] = {}
    for no, raw in enumerate(lines[1:], start=2):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        name, sep, value = line.rpartition(": ")
        if not sep or not name:
            raise DataError(f"{source} line {no} is not 'tensor: hexscale': {line[:80]!r}")
        try:
            scale = hex_to_scale(value.strip())
        except ValueError:
            raise DataError(f"{source} line {no}: {value.strip()[:20]!r} is not a hexadecimal float32") from None
        scales[name] = scale
    return CalibrationCache(header, scales)


def read_cache(path: str | os.PathLike[str]) -> CalibrationCache:
    """Read a cache file (see :func:`parse_cache`)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"calibration cache '{p}' does not exist" if not p.exists() else f"calibration cache '{p}' is not a file")
    return parse_cache(p.read_bytes(), f"calibration cache '{p}'")


def format_cache(scales: Mapping[str, float], header: str | None = None) -> str:
    """Cache text for ``{tensor: TensorRT scale}``, tensors in the given order."""
    header = header or make_header()
    if not _HEADER.match(header):
        raise ValueError(f"bad cache header {header!r}")
    out = [header]
    for name, scale in scales.items():
        if "\n" in name or "\r" in name:
            raise ValueError(f"tensor name {name!r} contains a line break; a calibration cache cannot hold it")
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"scale of '{name}' is {scale}; a calibration cache needs finite, non-negative scales")
        out.append(f"{name}: {scale_to_hex(scale)}")
    return "\n".join(out) + "\n"


def write_cache(path: str | os.PathLike[str], scales: Mapping[str, float], header: str | None = None, force: bool = False) -> Path:
    """Write a cache atomically (temporary file in the same folder, then rename); never clobbers without ``force``."""
    out = Path(path)
    if out.exists() and not force:
        raise OutputError(f"output '{out}' already exists (use --force to replace it)")
    if out.exists() and out.is_dir():
        raise OutputError(f"output '{out}' is a directory")
    text = format_cache(scales, header)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------
# onnxq scales -> TensorRT scales
# ---------------------------------------------------------------------------------------------

def trt_scale(step: float, qmin: int, qmax: int, zero_point: float = 0.0) -> float:
    """TensorRT scale (range / 127) of an activation quantized with ``step`` on ``[qmin, qmax]``.

    A symmetric signed grid (zero point 0) has range ``step * qmax``: INT8 gives back ``step``
    itself (the extra -128 level is not part of TensorRT's symmetric range), INT7 ``63 step / 127``.
    An asymmetric grid has range ``max |step (q - zero_point)|`` over its two ends.
    """
    if zero_point == 0 and qmin < 0:
        amax = step * qmax
    else:
        amax = max(abs(step * (qmin - zero_point)), abs(step * (qmax - zero_point)))
    if qmax == TRT_QMAX and zero_point == 0 and qmin < 0:
        return float(np.float32(step))  # exact: no round trip through the range
    return float(np.float32(amax / TRT_QMAX))


def scales_from_plan(plan) -> dict[str, float]:
    """TensorRT scales of the activation sites of a finished :class:`~onnxq.graph.plan.QuantPlan`."""
    out: dict[str, float] = {}
    for name, site in plan.activations.items():
        q = site.qparams
        if q is None:
            continue
        if np.ndim(q.scale) and np.size(q.scale) != 1:
            continue  # per-channel activations have no place in a TensorRT cache
        out[name] = trt_scale(float(np.ravel(q.scale)[0]), q.qmin, q.qmax, float(np.ravel(q.zero_point)[0]))
    return out


@dataclass
class ExtractedScales:
    """Activation scales read from a QDQ model, and what was skipped and why."""

    scales: dict[str, float]
    skipped: list[tuple[str, str]] = field(default_factory=list)


_CONTAINER = {onnx.TensorProto.INT8: (-128, 127), onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT4: (-8, 7), onnx.TensorProto.UINT4: (0, 15)}


def scales_from_qdq_model(model: onnx.ModelProto) -> ExtractedScales:
    """TensorRT scales of every activation a QDQ model quantizes (QuantizeLinear on a non-constant).

    The key is the float tensor the QuantizeLinear reads, looking through a Clip that narrows the
    range (onnxq's INT7): that is the tensor name TensorRT's calibrator uses for the same
    activation of the FP32 model. The integer range comes from the Clip (INT7) or the container
    type. Per-channel activation scales and non-constant scales are skipped.
    """
    g = model.graph
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    producer = {o: n for n in g.node for o in n.output}
    found: dict[str, float] = {}
    skipped: list[tuple[str, str]] = []
    for n in g.node:
        if n.op_type != "QuantizeLinear":
            continue
        src = n.input[0]
        if src in consts:
            continue  # a weight
        scale = consts.get(n.input[1])
        if scale is None:
            skipped.append((src, "scale is not a constant"))
            continue
        if np.size(scale) != 1:
            skipped.append((src, "per-channel activation scale"))
            continue
        step = float(np.ravel(scale)[0])
        zp_arr = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        zp = float(np.ravel(zp_arr)[0]) if zp_arr is not None and np.size(zp_arr) == 1 else 0.0
        dtype = _q_output_type(n, consts)
        qmin, qmax = _CONTAINER.get(dtype, (-128, 127))
        clip = producer.get(src)
        if clip is not None and clip.op_type == "Clip" and len(clip.input) >= 3:
            lo, hi = consts.get(clip.input[1]), consts.get(clip.input[2])
            if lo is not None and hi is not None and step > 0:
                qmin = max(qmin, int(round(float(lo) / step + zp)))
                qmax = min(qmax, int(round(float(hi) / step + zp)))
                src = clip.input[0]
        value = trt_scale(step, qmin, qmax, zp)
        if src in found and not math.isclose(found[src], value, rel_tol=1e-6):
            skipped.append((src, f"quantized with two different scales; kept the larger ({max(found[src], value):g})"))
            value = max(found[src], value)
        found[src] = value
    return ExtractedScales(found, skipped)


def _q_output_type(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> int:
    for a in node.attribute:
        if a.name == "output_dtype" and a.i:
            return a.i
    if len(node.input) > 2 and node.input[2] in consts:
        arr = consts[node.input[2]]
        return {np.dtype(np.int8): onnx.TensorProto.INT8, np.dtype(np.uint8): onnx.TensorProto.UINT8}.get(arr.dtype, onnx.TensorProto.INT8)
    return onnx.TensorProto.UINT8  # ONNX default when no zero point is given
