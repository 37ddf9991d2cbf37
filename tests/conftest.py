"""Shared fixtures: the bundled digits example, a tiny conv model, and CLI runners.

Nothing here downloads anything. The statistics cache is pointed at a temporary folder for the
whole session (``XDG_CACHE_HOME``), so tests never write to the user's ``~/.cache``.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "examples" / "digits"

#: FP32 held-out top-1 accuracy of the bundled digits model (examples/digits/README.md)
DIGITS_FP32_ACCURACY = 0.994


# ---------------------------------------------------------------------------------------------
# Hermetic environment
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Send the default statistics cache (and anything else using XDG_CACHE_HOME) to a temp folder."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


# ---------------------------------------------------------------------------------------------
# The bundled digits example
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def digits_model() -> Path:
    path = DIGITS / "model.onnx"
    assert path.is_file(), f"bundled example model missing: {path}"
    return path


@pytest.fixture(scope="session")
def digits_calib() -> Path:
    path = DIGITS / "calib"
    assert len(list(path.glob("*.npz"))) == 16
    return path


@pytest.fixture(scope="session")
def digits_eval() -> Path:
    path = DIGITS / "eval"
    assert len(list(path.glob("*.npz"))) == 4
    return path


def load_npz_folder(folder: Path) -> list[dict[str, np.ndarray]]:
    """Every .npz file of ``folder`` (sorted) as a dict of arrays."""
    out = []
    for f in sorted(folder.glob("*.npz")):
        with np.load(f, allow_pickle=False) as z:
            out.append({k: z[k] for k in z.files})
    return out


@pytest.fixture(scope="session")
def digits_eval_arrays(digits_eval: Path) -> tuple[np.ndarray, np.ndarray]:
    """(inputs [500,1,16,16] float32, labels [500] int64) of the held-out split."""
    parts = load_npz_folder(digits_eval)
    x = np.concatenate([p["input"] for p in parts])
    y = np.concatenate([p["label"] for p in parts])
    assert x.shape == (500, 1, 16, 16) and y.shape == (500,)
    return x, y


@pytest.fixture(scope="session")
def digits_calib_feeds(digits_calib: Path) -> list[dict[str, np.ndarray]]:
    """The calibration data as an in-memory list of feed dicts (16 × [16,1,16,16])."""
    return [{"input": p["input"]} for p in load_npz_folder(digits_calib)]


def ort_session(model: onnx.ModelProto | str | os.PathLike, optimization: str = "all"):
    """A CPU ONNX Runtime session (real ORT, full optimizations by default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def top1_accuracy(model: onnx.ModelProto | str | os.PathLike, x: np.ndarray, y: np.ndarray, optimization: str = "all") -> float:
    """Top-1 accuracy of a digits-like model ([N,10] logits) evaluated with ONNX Runtime."""
    sess = ort_session(model, optimization)
    logits = np.concatenate([sess.run(None, {"input": x[i : i + 125]})[0] for i in range(0, len(x), 125)])
    assert logits.shape == (len(x), 10)
    assert np.all(np.isfinite(logits))
    return float(np.mean(logits.argmax(1) == y))


@pytest.fixture(scope="session")
def accuracy_of(digits_eval_arrays) -> Callable[..., float]:
    """``accuracy_of(model, optimization="all")``: top-1 accuracy on the digits eval split, in ORT."""

    def acc(model, optimization: str = "all") -> float:
        return top1_accuracy(model, *digits_eval_arrays, optimization=optimization)

    return acc


@pytest.fixture(scope="session")
def session_of() -> Callable[..., object]:
    """``session_of(model_or_path, optimization="all")``: a real CPU ONNX Runtime session."""
    return ort_session


@pytest.fixture(scope="session")
def digits_fp32_accuracy(digits_model: Path, digits_eval_arrays) -> float:
    acc = top1_accuracy(digits_model, *digits_eval_arrays)
    assert acc == pytest.approx(DIGITS_FP32_ACCURACY, abs=1e-9), "the bundled model's FP32 accuracy changed"
    return acc


# ---------------------------------------------------------------------------------------------
# A tiny conv model built with onnx.helper (fast tests)
# ---------------------------------------------------------------------------------------------

def make_tiny_conv_model(seed: int = 0) -> onnx.ModelProto:
    """x [N,1,8,8] → Conv3x3(1→4)+Relu → Conv3x3(4→4)+Relu → GlobalAveragePool → Flatten → y [N,4]."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b2")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["y"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w1, b1, w2, b2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxq-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def make_tiny_feeds(n_batches: int = 4, batch: int = 8, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0, 1, (batch, 1, 8, 8)).astype(np.float32)} for _ in range(n_batches)]


@pytest.fixture(scope="session")
def tiny_factory() -> Callable[..., onnx.ModelProto]:
    """``tiny_factory(seed=0)``: a fresh tiny conv model."""
    return make_tiny_conv_model


@pytest.fixture
def tiny_model() -> onnx.ModelProto:
    return make_tiny_conv_model()


@pytest.fixture
def tiny_feeds() -> list[dict[str, np.ndarray]]:
    return make_tiny_feeds()


@pytest.fixture
def tiny_model_path(tmp_path: Path, tiny_model: onnx.ModelProto) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save_model(tiny_model, str(path))
    return path


@pytest.fixture
def tiny_data_dir(tmp_path: Path, tiny_feeds) -> Path:
    folder = tmp_path / "tiny-data"
    folder.mkdir()
    for i, feeds in enumerate(tiny_feeds):
        np.savez(folder / f"part_{i:03d}.npz", **feeds)
    return folder


# ---------------------------------------------------------------------------------------------
# Running the CLI
# ---------------------------------------------------------------------------------------------

CliRunner = Callable[[Sequence[str]], tuple[int, str, str]]


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> CliRunner:
    """Run ``onnxq ARGV`` in-process through ``onnxq.cli.main.main``; returns (exit code, stdout, stderr)."""
    from onnxq.cli.main import main

    def run(argv: Sequence[str]) -> tuple[int, str, str]:
        capsys.readouterr()  # drop anything printed before
        # the CLI points the 'onnxq' logger at the current sys.stderr; put it back afterwards so
        # later tests do not log into this test's (closed) capture stream
        logger = logging.getLogger("onnxq")
        saved = (list(logger.handlers), logger.level, logger.propagate)
        try:
            main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:  # main() always exits; returning means a bug in the entry point
            raise AssertionError("onnxq.cli.main.main returned instead of exiting")
        finally:
            logger.handlers[:] = saved[0]
            logger.setLevel(saved[1])
            logger.propagate = saved[2]
        out, err = capsys.readouterr()
        return code, out, err

    return run


def onnxq_executable() -> str:
    """The ``onnxq`` console script of the interpreter running the tests."""
    beside = Path(sys.executable).parent / ("onnxq.exe" if os.name == "nt" else "onnxq")
    if beside.is_file():
        return str(beside)
    found = shutil.which("onnxq")
    if found is None:
        pytest.fail("the onnxq console script is not installed (pip install -e .)")
    return found


@pytest.fixture(scope="session")
def onnxq_exe() -> str:
    return onnxq_executable()


@pytest.fixture(scope="session")
def run_proc() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_proc(args, cwd=None, timeout=120)``: run a real subprocess (see :func:`run_subprocess`)."""
    return run_subprocess


def run_subprocess(args: Sequence[str], cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command with the test environment, capturing text output."""
    env = dict(os.environ)
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return subprocess.run([str(a) for a in args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def bench_module() -> Callable[[str], object]:
    """Import a module of benchmarks/ (or benchmarks/peers/) by name, the way the bench scripts import each other."""

    def load(name: str) -> object:
        for folder in (REPO / "benchmarks", REPO / "benchmarks" / "peers"):
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
        return importlib.import_module(name)

    return load


@pytest.fixture(scope="session")
def host_with() -> Callable[..., object]:
    """A host without entry points whose only methods are the given classes (registered as a plugin module would)."""
    from onnxq.hookspecs import hookimpl
    from onnxq.host import Host

    def make(*classes: type) -> Host:
        @hookimpl
        def register_methods(register):
            for cls in classes:
                register(cls)

        module = types.ModuleType("host_with_test_methods")
        module.register_methods = register_methods  # type: ignore[attr-defined]
        host = Host(load_entry_points=False)
        rec = host.register_module("host-with-test-methods", module)
        assert rec.ok, rec.error
        return host

    return make
