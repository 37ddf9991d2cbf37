"""TensorRT backend: build engines from onnxq QDQ models (and FP32 models), run them, time them.

``tensorrt`` is imported only inside the functions that need it, so onnxq imports and tests fine
without it; using the backend without it (or without an NVIDIA GPU) raises
:class:`TensorRTUnavailable`, one line naming what is missing.

Two TensorRT generations, told apart by :func:`version_gate` (see docs/tensorrt.md):

* **TensorRT 10.x**: Q/DQ models are built strongly typed (``NetworkDefinitionCreationFlag.
  STRONGLY_TYPED``), exactly as on 11. In addition an FP32 model can be built the old implicit way
  -- weakly typed, ``BuilderFlag.INT8`` and TensorRT's own ``IInt8EntropyCalibrator2`` or
  ``IInt8MinMaxCalibrator`` fed by onnxq's batches, with calibration cache read/write -- which is
  the baseline ``onnxq compare --backend trt`` puts beside onnxq's methods. Those calibrators are
  deprecated from 10.1 on (TensorRT logs a warning).
* **TensorRT >= 11**: every network is strongly typed, the precision flags and the implicit
  calibrators are gone. Only explicit Q/DQ models are built; FP16 for the layers outside Q/DQ has
  to be in the graph (:func:`onnxq.backends.trt_fp16.convert_to_fp16`), and the comparison uses
  onnxq's ``trt-entropy`` re-implementation of the entropy calibrator in place of TensorRT's.

The module has two halves. The first is pure Python and tested without TensorRT: the version
gate, :class:`BuildSettings`, optimization-profile derivation (:func:`derive_profiles`) and the
network recipe (:func:`network_recipe`). The second talks to TensorRT and CUDA and ends with
:class:`TensorRTBackend`, whose :class:`TrtRunner` puts an engine behind the runner protocol; the
FP32-vs-Q/DQ comparison built on it is :func:`onnxq.evaluate.tensorrt.evaluate_trt`.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from onnxq.backends.trt_fp16 import Fp16Conversion, convert_to_fp16
from onnxq.errors import DataError, ModelError, OnnxqError, OptionError
from onnxq.runtime.runner import Backend, ModelLike, Runner

log = logging.getLogger(__name__)

__all__ = [
    "BuildSettings", "ShapeRange", "TensorRTBackend", "TensorRTUnavailable", "TrtEngine", "TrtGate", "TrtRunner", "NetworkRecipe",
    "convert_to_fp16", "build_engine", "derive_profiles", "make_calibrator", "network_recipe", "observed_shapes", "require_tensorrt",
    "unavailable_reason", "version_gate",
]

INSTALL_HINT = "pip install 'onnxq[trt]' on a machine with an NVIDIA GPU and driver"


class TensorRTUnavailable(OnnxqError):
    """TensorRT, a CUDA binding for Python, or an NVIDIA GPU is missing."""


# =============================================================================================
# Pure part: version gate, settings, profiles, recipe (no tensorrt import)
# =============================================================================================

@dataclass(frozen=True)
class TrtGate:
    """What an installed TensorRT version can do, as far as onnxq cares."""

    version: tuple[int, int, int]
    #: ``IInt8EntropyCalibrator2`` / ``IInt8MinMaxCalibrator`` / ``config.int8_calibrator`` exist (10.x)
    implicit_calibrators: bool
    #: the calibrators exist but are deprecated (10.1 <= version < 11)
    calibrators_deprecated: bool
    #: ``BuilderFlag.INT8`` / ``BuilderFlag.FP16`` exist (weak typing; 10.x)
    precision_flags: bool
    #: every network is strongly typed; the STRONGLY_TYPED creation flag is deprecated and ignored (11+)
    always_strongly_typed: bool

    @property
    def label(self) -> str:
        return "TensorRT " + ".".join(map(str, self.version))

    def note(self) -> str:
        """One line on how this version is used by ``onnxq compare --backend trt``."""
        if self.implicit_calibrators:
            dep = " (deprecated since 10.1: TensorRT logs a warning)" if self.calibrators_deprecated else ""
            return (f"{self.label}: Q/DQ models are built strongly typed; TensorRT's own implicit INT8 calibrator "
                    f"runs on the FP32 model as the baseline row{dep}")
        return (f"{self.label}: TensorRT's implicit INT8 calibrators (IInt8EntropyCalibrator2, IInt8MinMaxCalibrator) no longer exist "
                f"(removed in 11.0); the comparison uses onnxq's trt-entropy-exact re-implementation of the entropy calibrator instead. "
                f"Every network is strongly typed; FP16 outside Q/DQ comes from the graph (--fp16 rewrites it).")


def parse_version(version: str) -> tuple[int, int, int]:
    """``"10.16.1.11"`` -> ``(10, 16, 1)``; raises :class:`OnnxqError` for something unparsable."""
    parts = re.findall(r"\d+", str(version))
    if not parts:
        raise OnnxqError(f"cannot read the TensorRT version '{version}'")
    nums = [int(p) for p in parts[:3]] + [0, 0]
    return nums[0], nums[1], nums[2]


def version_gate(version: str) -> TrtGate:
    """The capabilities of TensorRT ``version`` (a string like ``tensorrt.__version__``).

    TensorRT < 10 is refused (onnxq uses the 10.x name-based tensor APIs).
    """
    v = parse_version(version)
    if v[0] < 10:
        raise TensorRTUnavailable(f"TensorRT {version} is too old: onnxq needs TensorRT 10 or newer ({INSTALL_HINT})")
    ten = v[0] == 10
    return TrtGate(v, implicit_calibrators=ten, calibrators_deprecated=ten and v >= (10, 1, 0), precision_flags=ten, always_strongly_typed=not ten)


@dataclass(frozen=True)
class ShapeRange:
    """min/opt/max shape of one network input in an optimization profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        for k in ("min", "opt", "max"):
            object.__setattr__(self, k, tuple(int(d) for d in getattr(self, k)))
        if not len(self.min) == len(self.opt) == len(self.max):
            raise OptionError(f"profile shapes differ in rank: {self.min} / {self.opt} / {self.max}")
        if any(d < 1 for d in self.min):
            raise OptionError(f"profile shape {self.min} has a dimension below 1")
        if not all(a <= b <= c for a, b, c in zip(self.min, self.opt, self.max)):
            raise OptionError(f"profile needs min <= opt <= max in every dimension, got {self.min} / {self.opt} / {self.max}")

    @classmethod
    def fixed(cls, shape: Sequence[int]) -> "ShapeRange":
        return cls(tuple(shape), tuple(shape), tuple(shape))


@dataclass(frozen=True)
class BuildSettings:
    """How engines are built. Everything here is plain data; see :func:`build_engine`."""

    #: ``MemoryPoolType.WORKSPACE`` limit in bytes
    workspace_bytes: int = 2 << 30
    #: let the layers outside Q/DQ run in FP16: on 11.x (and for strongly typed Q/DQ builds on 10.x)
    #: by rewriting the graph to float16; for the 10.x implicit calibrator build by ``BuilderFlag.FP16``
    fp16: bool = False
    #: allow TF32 for float convolutions/matmuls (TensorRT's default); False for a closer FP32 reference
    tf32: bool = True
    #: read/write TensorRT's timing cache here (faster rebuilds); None: no cache file
    timing_cache: Path | None = None
    #: optimization profile per dynamic input; empty: derived from the data (:func:`derive_profiles`)
    profiles: Mapping[str, ShapeRange] = field(default_factory=dict)
    #: ``builder_optimization_level`` 0-5 (None: TensorRT's default, 3)
    optimization_level: int | None = None

    def __post_init__(self) -> None:
        if int(self.workspace_bytes) < 1 << 20:
            raise OptionError(f"workspace of {self.workspace_bytes} bytes is too small (at least 1 MiB)")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise OptionError("builder optimization level must be between 0 and 5")
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))


def observed_shapes(batches: Iterable[Any], extra: Iterable[Mapping[str, np.ndarray]] = ()) -> dict[str, list[tuple[int, ...]]]:
    """Every input shape seen in ``batches`` (objects with ``.feeds`` or feed dicts) and ``extra`` feeds."""
    seen: dict[str, list[tuple[int, ...]]] = {}
    for b in list(batches) + list(extra):
        feeds = b.feeds if hasattr(b, "feeds") else b
        for name, arr in feeds.items():
            seen.setdefault(name, []).append(tuple(int(d) for d in np.shape(arr)))
    return seen


def derive_profiles(inputs: Sequence[Any], observed: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, ShapeRange]:
    """One optimization-profile range per model input from the shapes the data has.

    ``inputs`` are objects with ``name`` and ``shape`` (ints for static dims, names/None/<=0 for
    dynamic ones), e.g. :func:`onnxq.calib.feeds.model_inputs`. Static dims stay fixed; a dynamic
    dim gets the smallest and largest value seen as min and max, and the most frequent shape (the
    larger on a tie) as opt, the shape TensorRT tunes its kernels for. A fully static input needs
    no data. Raises :class:`DataError` when data contradicts a static dim or the rank, or a
    dynamic input has no data.
    """
    out: dict[str, ShapeRange] = {}
    for spec in inputs:
        declared = tuple(spec.shape)
        static = [isinstance(d, int) and d > 0 for d in declared]
        shapes = [tuple(int(x) for x in s) for s in observed.get(spec.name, [])]
        if not shapes:
            if declared and all(static):
                out[spec.name] = ShapeRange.fixed(declared)  # type: ignore[arg-type]
                continue
            raise DataError(f"input '{spec.name}' has dynamic dimensions {list(declared)} and no data to derive an optimization profile from")
        for s in shapes:
            if declared and len(s) != len(declared):
                raise DataError(f"input '{spec.name}': data of shape {list(s)} does not have the model's rank {len(declared)}")
            for axis, (got, want, fixed) in enumerate(zip(s, declared, static)):
                if fixed and got != want:
                    raise DataError(f"input '{spec.name}': data of shape {list(s)} contradicts the model's static dim {want} on axis {axis}")
        rank = len(shapes[0])
        if any(len(s) != rank for s in shapes):
            raise DataError(f"input '{spec.name}': the data changes rank between batches")
        lo = tuple(min(s[i] for s in shapes) for i in range(rank))
        hi = tuple(max(s[i] for s in shapes) for i in range(rank))
        counts = Counter(shapes)
        opt = max(counts, key=lambda s: (counts[s], int(np.prod(s)), s))
        out[spec.name] = ShapeRange(lo, opt, hi)
    return out


BuildMode = Literal["explicit", "fp32", "implicit"]


@dataclass(frozen=True)
class NetworkRecipe:
    """How one engine is built on one TensorRT version (pure data, decided by :func:`network_recipe`)."""

    #: pass ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` to ``create_network`` (10.x; 11 is always strongly typed)
    strongly_typed_flag: bool
    #: names of ``trt.BuilderFlag`` members to set / clear
    set_flags: tuple[str, ...]
    clear_flags: tuple[str, ...]
    #: rewrite the ONNX model to float16 outside Q/DQ before parsing (FP16 the strongly typed way)
    fp16_graph_rewrite: bool
    #: attach TensorRT's implicit INT8 calibrator
    calibrator: bool
    description: str


def network_recipe(gate: TrtGate, settings: BuildSettings, mode: BuildMode) -> NetworkRecipe:
    """Decide typing, builder flags and graph rewrites for ``mode`` on ``gate``'s TensorRT.

    * ``explicit``: a Q/DQ model; strongly typed on every version, no precision flags (TensorRT's
      rule for explicit quantization); ``settings.fp16`` -> float16 graph rewrite.
    * ``fp32``: the FP32 reference; strongly typed, float32 (TF32 unless ``settings.tf32`` is off).
    * ``implicit``: the FP32 model with TensorRT's own calibrator (10.x only): weakly typed,
      ``BuilderFlag.INT8`` (+ ``FP16`` if ``settings.fp16``).
    """
    st_flag = not gate.always_strongly_typed
    clear = () if settings.tf32 else ("TF32",)
    if mode == "implicit":
        if not gate.implicit_calibrators:
            raise OnnxqError(gate.note())
        flags = ("INT8", "FP16") if settings.fp16 else ("INT8",)
        return NetworkRecipe(False, flags, clear, False, True, f"{gate.label}, weakly typed, implicit INT8 with TensorRT's calibrator" + (", FP16 flag" if settings.fp16 else ""))
    if mode == "fp32":
        return NetworkRecipe(st_flag, (), clear, False, False, f"{gate.label}, strongly typed FP32" + ("" if settings.tf32 else " (TF32 off)"))
    if mode == "explicit":
        return NetworkRecipe(st_flag, (), clear, settings.fp16, False,
                             f"{gate.label}, strongly typed Q/DQ" + (", float16 outside Q/DQ (graph rewrite)" if settings.fp16 else ", float32 outside Q/DQ"))
    raise ValueError(f"unknown build mode {mode!r}")


# =============================================================================================
# TensorRT and CUDA (imported lazily)
# =============================================================================================

def require_tensorrt():
    """Import and return ``tensorrt``, or raise :class:`TensorRTUnavailable` naming what is missing."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as exc:
        detail = "" if exc.name == "tensorrt" else f" ({exc})"
        raise TensorRTUnavailable(f"tensorrt is not installed{detail}: {INSTALL_HINT}") from None
    except Exception as exc:  # a broken install (missing libnvinfer, CUDA mismatch)
        raise TensorRTUnavailable(f"tensorrt is installed but cannot be imported: {type(exc).__name__}: {exc}") from None
    return trt


class _Cuda:
    """Device memory, copies and one stream, through cuda-python (``cuda.bindings``) or PyTorch."""

    def __init__(self) -> None:
        self.kind = ""
        self._rt = None
        self._torch = None
        self._keep: dict[int, Any] = {}
        try:
            try:
                from cuda.bindings import runtime as rt  # type: ignore[import-not-found]
            except ImportError:
                from cuda import cudart as rt  # type: ignore[import-not-found,no-redef]
            self._rt, self.kind = rt, "cuda-python"
        except ImportError:
            try:
                import torch  # type: ignore[import-not-found]

                self._torch, self.kind = torch, "torch"
            except ImportError:
                raise TensorRTUnavailable("neither cuda-python nor torch is installed, so data cannot reach the GPU: pip install cuda-python") from None
        self._stream: Any = None

    # -- cuda-python helpers
    def _ok(self, res: Any, what: str) -> Any:
        err, *rest = res if isinstance(res, tuple) else (res,)
        if err != self._rt.cudaError_t.cudaSuccess:
            name = getattr(err, "name", str(err))
            raise TensorRTUnavailable(f"CUDA {what} failed: {name}") if what == "device query" else OnnxqError(f"CUDA {what} failed: {name}")
        return rest[0] if len(rest) == 1 else rest

    def device_count(self) -> int:
        try:
            if self._rt is not None:
                return int(self._ok(self._rt.cudaGetDeviceCount(), "device query"))
            return int(self._torch.cuda.device_count()) if self._torch.cuda.is_available() else 0
        except Exception:  # no driver, no device, a CUDA library that cannot load
            return 0

    def stream(self) -> Any:
        if self._stream is None:
            if self._rt is not None:
                self._stream = self._ok(self._rt.cudaStreamCreate(), "stream creation")
            else:
                self._stream = self._torch.cuda.Stream()
        return self._stream

    def stream_handle(self) -> int:
        s = self.stream()
        return int(s) if self._rt is not None else int(s.cuda_stream)

    def malloc(self, nbytes: int) -> int:
        nbytes = max(int(nbytes), 1)
        if self._rt is not None:
            return int(self._ok(self._rt.cudaMalloc(nbytes), "allocation"))
        t = self._torch.empty(nbytes, dtype=self._torch.uint8, device="cuda")
        self._keep[t.data_ptr()] = t
        return int(t.data_ptr())

    def free(self, ptr: int) -> None:
        if self._rt is not None:
            self._rt.cudaFree(ptr)
        else:
            self._keep.pop(ptr, None)

    def to_device(self, ptr: int, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        if self._rt is not None:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._ok(self._rt.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, kind, self.stream()), "copy to device")
            self.synchronize()  # ``arr`` may be a temporary
        else:
            with self._torch.cuda.stream(self.stream()):
                self._keep[ptr][: arr.nbytes].copy_(self._torch.from_numpy(arr.reshape(-1).view(np.uint8)))
            self.synchronize()

    def to_host(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        if self._rt is not None:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._ok(self._rt.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, kind, self.stream()), "copy to host")
            self.synchronize()
        else:
            self.synchronize()
            out.reshape(-1).view(np.uint8)[:] = self._keep[ptr][: out.nbytes].cpu().numpy()
        return out

    def synchronize(self) -> None:
        if self._rt is not None:
            self._ok(self._rt.cudaStreamSynchronize(self.stream()), "stream synchronize")
        else:
            self.stream().synchronize()


def cuda_device() -> _Cuda:
    """A CUDA helper on a machine with at least one NVIDIA GPU, or :class:`TensorRTUnavailable`."""
    cuda = _Cuda()
    if cuda.device_count() < 1:
        raise TensorRTUnavailable(f"no NVIDIA GPU: CUDA reports no device (checked with {cuda.kind})")
    return cuda


def unavailable_reason() -> str | None:
    """Why the TensorRT backend cannot run here ("tensorrt is not installed ...", "no NVIDIA GPU ..."), or None."""
    try:
        trt = require_tensorrt()
        version_gate(getattr(trt, "__version__", "0"))
        cuda_device()
    except TensorRTUnavailable as exc:
        return str(exc)
    return None


def _make_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that forwards to Python logging and remembers errors for exception texts."""

    class Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return Logger()


@dataclass
class BuiltEngine:
    """A serialized engine and how it was made."""

    serialized: bytes
    recipe: NetworkRecipe
    build_seconds: float
    fp16: Fp16Conversion | None = None
    calibration_cache: bytes | None = None


def _model_proto(model: onnx.ModelProto | str | os.PathLike[str]) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    from onnxq.graph.model_io import load_model

    return load_model(model)


def build_engine(model: onnx.ModelProto | str | os.PathLike[str], settings: BuildSettings = BuildSettings(), mode: BuildMode = "explicit",
                 calibrator: Any = None, calibration_shapes: Mapping[str, Sequence[int]] | None = None) -> BuiltEngine:
    """Parse ``model`` with TensorRT's ONNX parser and build a serialized engine.

    ``mode`` picks the recipe (:func:`network_recipe`). Dynamic inputs need ``settings.profiles``.
    ``mode="implicit"`` needs a ``calibrator`` from :func:`make_calibrator` and the fixed
    ``calibration_shapes`` of its batches (the calibration profile).
    """
    trt = require_tensorrt()
    gate = version_gate(trt.__version__)
    recipe = network_recipe(gate, settings, mode)
    proto = _model_proto(model)
    conversion = None
    if recipe.fp16_graph_rewrite:
        conversion = convert_to_fp16(proto)
        proto = conversion.model
    logger = _make_logger(trt)
    t0 = time.perf_counter()
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if recipe.strongly_typed_flag else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory(prefix="onnxq-trt-") as tmp:
        if proto.ByteSize() > 2**31 - 1:
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(proto, path, save_as_external_data=True, location="model.onnx.data")
            ok = parser.parse_from_file(path)
        else:
            ok = parser.parse(proto.SerializeToString())
    if not ok:
        errors = "; ".join(str(parser.get_error(i)).strip().splitlines()[0] for i in range(parser.num_errors)) or "no detail"
        raise ModelError(f"TensorRT's ONNX parser rejected the model: {errors} (run `onnxq lint` on a Q/DQ model to see TensorRT's rules)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_bytes))
    for name in recipe.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in recipe.clear_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    if settings.optimization_level is not None:
        config.builder_optimization_level = int(settings.optimization_level)
    dynamic = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if any(d < 0 for d in t.shape):
            dynamic[t.name] = tuple(t.shape)
    if dynamic:
        missing = [n for n in dynamic if n not in settings.profiles]
        if missing:
            raise DataError(f"input '{missing[0]}' has dynamic shape {list(dynamic[missing[0]])} and no optimization profile")
        profile = builder.create_optimization_profile()
        for name in dynamic:
            r = settings.profiles[name]
            profile.set_shape(name, r.min, r.opt, r.max)
        config.add_optimization_profile(profile)
    if recipe.calibrator:
        if calibrator is None:
            raise ValueError("implicit INT8 needs a calibrator")
        config.int8_calibrator = calibrator
        if calibration_shapes:
            cprofile = builder.create_optimization_profile()
            for name, shape in calibration_shapes.items():
                cprofile.set_shape(name, tuple(shape), tuple(shape), tuple(shape))
            config.set_calibration_profile(cprofile)
    timing_cache = _load_timing_cache(config, settings.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = logger.errors[-1] if logger.errors else "see TensorRT's log"
        raise ModelError(f"TensorRT could not build the engine: {detail}")
    if timing_cache is not None and settings.timing_cache is not None:
        _save_timing_cache(config, settings.timing_cache)
    cache_bytes = getattr(calibrator, "cache_bytes", None) if calibrator is not None else None
    return BuiltEngine(bytes(serialized), recipe, time.perf_counter() - t0, conversion, cache_bytes)


def _load_timing_cache(config: Any, path: Path | None) -> Any:
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        log.warning("timing cache %s was made on another device or TensorRT version; starting an empty one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def _save_timing_cache(config: Any, path: Path) -> None:
    data = config.get_timing_cache().serialize()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(bytes(data))
    os.replace(tmp, path)


class TrtEngine:
    """A deserialized engine with one execution context, one stream and reusable device buffers."""

    def __init__(self, serialized: bytes, cuda: _Cuda | None = None) -> None:
        trt = require_tensorrt()
        self._trt = trt
        self.cuda = cuda or cuda_device()
        self._logger = _make_logger(trt)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(serialized)
        if self.engine is None:
            raise ModelError("TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._buffers: dict[str, tuple[int, int]] = {}
        self.size_bytes = len(serialized)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self.cuda.free(ptr)
            ptr, size = self.cuda.malloc(nbytes), max(nbytes, 1)
            self._buffers[name] = (ptr, size)
        return ptr

    def _stage(self, feeds: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise DataError(f"no data for engine input '{missing[0]}'")
        for name in self.inputs:
            arr = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            if not self.context.set_input_shape(name, tuple(arr.shape)):
                raise DataError(f"input '{name}' of shape {list(arr.shape)} is outside the engine's optimization profile")
            ptr = self._buffer(name, arr.nbytes)
            self.cuda.to_device(ptr, arr)
            self.context.set_tensor_address(name, ptr)
        shapes = []
        for name in self.outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ModelError(f"output '{name}' has a data-dependent shape {list(shape)}, which onnxq's TensorRT runner does not support")
            ptr = self._buffer(name, int(np.prod(shape)) * self.dtypes[name].itemsize)
            self.context.set_tensor_address(name, ptr)
            shapes.append((name, shape))
        return shapes

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.cuda.stream_handle()):
            raise ModelError("TensorRT failed to run the engine: " + (self._logger.errors[-1] if self._logger.errors else "see its log"))

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; outputs by name, as float32 when the engine returns float16."""
        shapes = self._stage(feeds)
        self._execute()
        self.cuda.synchronize()
        out = {}
        for name, shape in shapes:
            out[name] = self.cuda.to_host(self._buffers[name][0], shape, self.dtypes[name])
        return out

    def latency_ms(self, feeds: Mapping[str, np.ndarray], repeats: int = 100, warmup: int = 10) -> float:
        """Median GPU time of one inference in ms (inputs staged once; host copies not included)."""
        self._stage(feeds)
        for _ in range(warmup):
            self._execute()
        self.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self._execute()
            self.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self.cuda.free(ptr)
        self._buffers.clear()
        self.context = None
        self.engine = None

    def __enter__(self) -> "TrtEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


CalibratorKind = Literal["entropy", "minmax"]


def make_calibrator(kind: CalibratorKind, batches: Callable[[], Iterable[Any]], cuda: _Cuda, cache_in: Path | None = None) -> Any:
    """TensorRT's ``IInt8EntropyCalibrator2`` or ``IInt8MinMaxCalibrator`` fed by onnxq batches (TensorRT 10.x only).

    All batches must have the shape of the first one (the calibration profile); others are
    skipped and counted in ``skipped``. ``cache_in``: an existing cache TensorRT may reuse instead of
    calibrating (``read_calibration_cache``); whatever TensorRT writes back is kept in ``cache_bytes``.
    """
    trt = require_tensorrt()
    gate = version_gate(trt.__version__)
    if not gate.implicit_calibrators or not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise OnnxqError(gate.note())
    base = trt.IInt8EntropyCalibrator2 if kind == "entropy" else trt.IInt8MinMaxCalibrator

    class Calibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # TensorRT's trampoline classes must be initialised explicitly
            self.kind = kind
            self.cache_bytes: bytes | None = None
            self.shapes: dict[str, tuple[int, ...]] | None = None
            self.used = 0
            self.skipped = 0
            self._it: Iterator[Any] | None = None
            self._buffers: dict[str, int] = {}

        def first_shapes(self) -> dict[str, tuple[int, ...]]:
            first = next(iter(batches()), None)
            if first is None:
                raise DataError("the calibration data is empty")
            feeds = first.feeds if hasattr(first, "feeds") else first
            self.shapes = {k: tuple(np.shape(v)) for k, v in feeds.items()}
            return self.shapes

        def get_batch_size(self) -> int:
            return 1  # explicit-batch networks: the batch dimension is part of the calibration profile

        def get_batch(self, names):  # noqa: ANN001 - TensorRT's callback
            if self.shapes is None:
                self.first_shapes()
            if self._it is None:
                self._it = iter(batches())
            for b in self._it:
                feeds = b.feeds if hasattr(b, "feeds") else b
                if {k: tuple(np.shape(v)) for k, v in feeds.items()} != self.shapes:
                    self.skipped += 1
                    continue
                ptrs = []
                for name in names:
                    arr = np.ascontiguousarray(feeds[name])
                    if name not in self._buffers:
                        self._buffers[name] = cuda.malloc(arr.nbytes)
                    cuda.to_device(self._buffers[name], arr)
                    ptrs.append(self._buffers[name])
                self.used += 1
                return ptrs
            for ptr in self._buffers.values():
                cuda.free(ptr)
            self._buffers.clear()
            return None

        def read_calibration_cache(self):
            if cache_in is not None and cache_in.is_file() and cache_in.stat().st_size:
                return cache_in.read_bytes()
            return None

        def write_calibration_cache(self, cache):  # noqa: ANN001
            self.cache_bytes = bytes(memoryview(cache))

    return Calibrator()


# =============================================================================================
# The backend: engines behind the runner protocol
# =============================================================================================

class TrtRunner(Runner):
    """A built engine behind the runner protocol: ``activate`` deserializes it, ``infer`` runs one batch on the GPU.

    Float16 outputs come back as float32; latency is the median GPU time of one inference
    (label ``"gpu"``, host copies excluded); size is the serialized engine's.
    """

    def __init__(self, built: BuiltEngine, name: str, cuda: _Cuda | None = None, latency_repeats: int = 100) -> None:
        super().__init__(name)
        self.built = built
        self.cuda = cuda
        self.latency_repeats = latency_repeats
        self._engine: TrtEngine | None = None

    def activate_impl(self) -> None:
        self._engine = TrtEngine(self.built.serialized, self.cuda)

    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self._engine is not None
        res = self._engine.run(feeds)
        return {n: np.asarray(v, np.float32) if v.dtype == np.float16 else v for n, v in res.items()}

    def deactivate_impl(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    @property
    def output_names(self) -> list[str]:
        return list(self._engine.outputs) if self._engine is not None else []

    @property
    def size_bytes(self) -> int | None:
        return len(self.built.serialized)

    def latency_ms(self, feeds: Mapping[str, np.ndarray]) -> dict[str, float]:
        assert self._engine is not None
        return {"gpu": self._engine.latency_ms(feeds, repeats=self.latency_repeats)}

    def details(self) -> dict[str, Any]:
        out: dict[str, Any] = {"engine_bytes": len(self.built.serialized), "build_seconds": round(self.built.build_seconds, 3),
                               "recipe": self.built.recipe.description}
        if self.built.fp16 is not None:
            out["fp16_rewrite"] = {"float32_nodes": self.built.fp16.float32_nodes, "max_scale_relative_change": self.built.fp16.max_scale_relative_change}
        return out


class TensorRTBackend(Backend):
    """TensorRT on an NVIDIA GPU: the reference builds as FP32, candidates as strongly typed Q/DQ engines.

    ``settings`` need an optimization profile for every dynamic input (:func:`derive_profiles`).
    """

    name = "trt"
    summary = "TensorRT on an NVIDIA GPU (strongly typed Q/DQ engines; latency is GPU time)"
    targets = ("trt",)

    def __init__(self, threads: Sequence[int] = (1,), settings: BuildSettings = BuildSettings(), latency_repeats: int = 100,
                 cuda: _Cuda | None = None) -> None:
        super().__init__(threads)
        self.settings = settings
        self.latency_repeats = latency_repeats
        self.cuda = cuda

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return unavailable_reason()

    def runner(self, model: ModelLike, name: str, reference: bool = False) -> TrtRunner:
        """Build the engine now (``fp32`` for the reference, ``explicit`` otherwise) and wrap it."""
        if self.cuda is None:
            self.cuda = cuda_device()
        built = build_engine(model, self.settings, "fp32" if reference else "explicit")
        return TrtRunner(built, name, self.cuda, self.latency_repeats)


def check_trt_cli(save_cache: Path | None = None) -> None:
    """Fail early, in one line, when the TensorRT backend cannot run here or an output would be clobbered."""
    reason = unavailable_reason()
    if reason is not None:
        raise TensorRTUnavailable(f"--backend trt: {reason}")
    if save_cache is not None and Path(save_cache).exists():
        from onnxq.errors import OutputError

        raise OutputError(f"output '{save_cache}' already exists; remove it first")
