"""ONNX Runtime backend: sessions, runs, latency and the integer-kernel check."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Literal

import numpy as np
import onnx

from onnxq.errors import ModelError, first_line

Optimization = Literal["disable", "basic", "extended", "all"]

#: ONNX Runtime ops that compute in integers (what QDQ groups fuse into on the CPU EP)
INTEGER_OPS = frozenset(
    {
        "QLinearConv", "NhwcQLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "ConvInteger",
        "MatMulInteger", "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat",
        "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
        "QLinearSoftmax", "MatMulNBits", "QAttention", "QLinearReduceMean",
    }
)
#: float compute ops that should have become integer ops in a quantized model
FLOAT_COMPUTE_OPS = frozenset({"Conv", "FusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedGemm",
                               "LSTM", "GRU", "RNN", "Einsum", "Attention"})  # the last five onnxq leaves float: counted, not hidden


def _level(opt: Optimization):
    import onnxruntime as ort

    return {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt]


Arena = bool | Literal["shared"]

#: folder that external-data locations of in-memory models are relative to: onnxq keeps the weights
#: of models over 2 GB on disk and names them by their real path from the root (onnxq.graph.model_io)
EXTERNAL_DATA_ROOT = "/"


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
_shared_arena = False
#: the severity ONNX Runtime's process-wide logger returns to after :func:`quiet_default_logger` (its own default:
#: warnings; the CLI asks for errors only, :func:`set_default_log_severity`)
_default_severity = 2
#: whether that severity was asked for and still waits for ONNX Runtime to be imported (by the first session)
_severity_pending = False


def set_default_log_severity(level: int) -> None:
    """Set ONNX Runtime's process-wide logger (kernels log through it, not through a session's) to ``level``, from the
    first session onnxq makes: importing ONNX Runtime here would cost every command's start-up (`onnxq --help` too)."""
    global _default_severity, _severity_pending
    _default_severity, _severity_pending = level, True


def _apply_default_severity(ort) -> None:
    global _severity_pending
    if _severity_pending:
        ort.set_default_logger_severity(_default_severity)
        _severity_pending = False


@contextmanager
def quiet_default_logger() -> Iterator[None]:
    """ONNX Runtime's process-wide logger at errors only for the block, then back to :data:`_default_severity`."""
    import onnxruntime as ort

    global _severity_pending
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_default_severity)
        _severity_pending = False


def _register_shared_arena() -> None:
    """Register one process-wide CPU arena with ONNX Runtime's environment (once)."""
    global _shared_arena
    if _shared_arena:
        return
    import onnxruntime as ort

    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    # kSameAsRequested: grow by exactly what a run asks for, not by doubling chunks
    ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1, "initial_chunk_size_bytes": 1 << 20}))
    _shared_arena = True


def session_options(optimization: Optimization = "all", threads: int | None = None, optimized_path: str | None = None, arena: Arena = True):
    """SessionOptions with a given optimization level and intra-op thread count.

    ``arena=False`` returns memory to the system after each run instead of keeping ORT's arena at
    its peak (calibration passes use it to keep the process's peak memory low). ``arena="shared"``
    is for the many small sessions of a search: they share one process-wide arena, which
    :func:`run` shrinks back after every run. Without an arena every run's buffers are fresh pages
    (ORT's conv scratch is read before it is written, so each page costs a copy-on-write fault and
    a TLB shootdown on the other core); that measured 45% of EasyQuant's time on PP-OCR rec.
    """
    import onnxruntime as ort

    _apply_default_severity(ort)
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = bool(arena)
    if arena == "shared":
        _register_shared_arena()
        so.add_session_config_entry("session.use_env_allocators", "1")
    so.graph_optimization_level = _level(optimization)
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return so


def make_session(model: onnx.ModelProto | str | os.PathLike[str], optimization: Optimization = "all", threads: int | None = None,
                 optimized_path: str | None = None, arena: Arena = True):
    """Create a CPU InferenceSession from a ModelProto or a path; errors become ModelError.

    ``arena``: see :func:`session_options`.
    """
    import onnxruntime as ort

    so = session_options(optimization, threads, optimized_path, arena)
    if isinstance(model, onnx.ModelProto) and _has_external_data(model):
        # weights left on disk: ONNX Runtime reads them itself, from paths relative to the root
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", EXTERNAL_DATA_ROOT)
    try:
        if isinstance(model, onnx.ModelProto):
            if model.ByteSize() > 2**31 - 1:
                tmp = tempfile.mkdtemp(prefix="onnxq-")
                path = os.path.join(tmp, "model.onnx")
                onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
                sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            else:
                sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        else:
            sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        msg = first_line(exc)
        raise ModelError(f"ONNX Runtime cannot load the model: {msg}") from None
    if arena == "shared":
        # hand the arena's free chunks back after each run: the peak stays one run's working set
        ro = ort.RunOptions()
        ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        sess._onnxq_run_options = ro
    return sess


def optimized_op_counts(model: onnx.ModelProto | str | os.PathLike[str], optimization: Optimization = "extended") -> Counter[str]:
    """Op types of the graph ONNX Runtime actually runs after its optimizations.

    ``extended`` is used by default: it applies the QDQ fusions (QLinearConv, QGemm, ...) without
    the platform-specific layout transforms of ``all``.
    """
    with tempfile.TemporaryDirectory(prefix="onnxq-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        make_session(model, optimization, optimized_path=path)
        optimized = onnx.load(path, load_external_data=False)
    return Counter(n.op_type for n in optimized.graph.node)


def integer_kernel_report(model: onnx.ModelProto | str | os.PathLike[str]) -> dict[str, object]:
    """How many compute ops ONNX Runtime runs on integer kernels vs in float."""
    counts = optimized_op_counts(model)
    integer = {k: v for k, v in counts.items() if k in INTEGER_OPS}
    float_ = {k: v for k, v in counts.items() if k in FLOAT_COMPUTE_OPS}
    return {
        "integer_ops": integer,
        "float_compute_ops": float_,
        "integer_fraction": sum(integer.values()) / max(1, sum(integer.values()) + sum(float_.values())),
        "dequantize_nodes": counts.get("DequantizeLinear", 0),
    }


def tensor_outputs(session) -> list[str]:
    """The session's outputs that are tensors: a sequence or a map (scikit-learn's ZipMap of class probabilities) has no
    array to compare, and ONNX Runtime returns it as Python lists of dicts."""
    return [o.name for o in session.get_outputs() if o.type.startswith("tensor")]


@lru_cache(maxsize=None)
def has_qdq_kernels(opset: int, ir_version: int) -> bool:
    """Whether this ONNX Runtime runs QuantizeLinear and DequantizeLinear at ``opset``: a release runs float models of
    opsets newer than its Q/DQ kernels (1.32 runs opset 28 models, its Q/DQ kernels end at 25 or so), and a model
    quantized at such an opset failed to load only after the whole run."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              [numpy_helper.from_array(np.array(1.0, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    try:
        run(make_session(probe, "disable", threads=1), {"x": np.zeros(1, np.float32)})
    except ModelError:
        return False
    return True


def feedable(array: np.ndarray) -> bool:
    """Whether ONNX Runtime's Python API takes ``array`` as a feed: numpy's own types only, not ml_dtypes' int4, uint4,
    float8 or bfloat16 (a model's 4-bit or float8 weights behind a DequantizeLinear), which stop a run with "Numpy_type
    ... can't be converted to MLDataType"; those go into the model as initializers instead."""
    return array.dtype.kind in "biufc"


def run(session, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
    """Run a session; ORT errors become ModelError with one line."""
    try:
        return session.run(list(outputs) if outputs else None, feeds, getattr(session, "_onnxq_run_options", None))
    except Exception as exc:
        msg = first_line(exc)
        raise ModelError(f"ONNX Runtime failed to run the model: {msg}") from None


def latency_ms(model: onnx.ModelProto | str | os.PathLike[str], feeds: dict[str, np.ndarray], threads: int = 1, repeats: int = 50, warmup: int = 5) -> float:
    """Median wall time in milliseconds of one run, after warm-up, with full optimizations."""
    sess = make_session(model, "all", threads=threads)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
