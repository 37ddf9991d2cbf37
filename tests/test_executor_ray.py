"""Executors: the statistics pass split by batches and GPTQ's per-layer work, serial or as Ray tasks.

The shard-and-merge path runs without Ray too (``SerialExecutor(shards=N)``). The Ray tests start one
local cluster for the module (``ray.init(num_cpus=2)``, slow to start) and are skipped when Ray is
not installed (``pip install 'onnxq[ray]'``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.calib.readers import Batch
from onnxq.calib.statistics import StatRequest, collect
from onnxq.errors import OptionError
from onnxq.runtime import executor as ex

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (pip install 'onnxq[ray]'): the distributed tests need a local Ray cluster")


def mlp(seed: int = 0, width: int = 48, layers: int = 3) -> onnx.ModelProto:
    """A small MLP with LayerNorms and an outlier channel: MatMuls to quantize, activations to calibrate."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        g = np.ones(width, np.float32)
        g[3] = 25.0  # an outlier channel, as in transformers
        inits += [numpy_helper.from_array(g, f"g{i}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}"),
                  numpy_helper.from_array((rng.normal(0, 1, (width, 2 * width)) / np.sqrt(width)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((rng.normal(0, 1, (2 * width, width)) / np.sqrt(2 * width)).astype(np.float32), f"v{i}")]
        nodes += [helper.make_node("LayerNormalization", [x, f"g{i}", f"b{i}"], [f"n{i}"], name=f"ln{i}", axis=-1),
                  helper.make_node("MatMul", [f"n{i}", f"w{i}"], [f"u{i}"], name=f"up{i}"),
                  helper.make_node("Relu", [f"u{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("MatMul", [f"r{i}", f"v{i}"], [f"d{i}"], name=f"down{i}"),
                  helper.make_node("Add", [x, f"d{i}"], [f"h{i}"], name=f"res{i}")]
        x = f"h{i}"
    graph = helper.make_graph(nodes, "main_graph", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", 8, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def batches(n: int = 7, seed: int = 1) -> list[Batch]:
    rng = np.random.default_rng(seed)
    return [Batch({"x": rng.standard_normal((3, 8, 48)).astype(np.float32)}, None, f"b{i}") for i in range(n)]


def requests(model: onnx.ModelProto) -> list[StatRequest]:
    tensors = [o for n in model.graph.node for o in n.output]
    return [StatRequest(t, "histogram") for t in tensors[::2]] + [StatRequest(t, "minmax") for t in tensors[1::2]]


def assert_same_stats(a, b) -> None:
    assert set(a) == set(b) and a
    for t in a:
        assert (a[t].min, a[t].max, a[t].count) == (b[t].min, b[t].max, b[t].count), t
        assert (a[t].hist is None) == (b[t].hist is None)
        if a[t].hist is not None:
            assert a[t].hist.dtype == b[t].hist.dtype and np.array_equal(a[t].hist, b[t].hist), t


def serial_stats(model):
    data = batches()
    return collect(model, requests(model), lambda: iter(data), batch_size=2, show_progress=False)


def test_sharded_statistics_equal_serial_exactly_without_ray() -> None:
    model = mlp()
    want = serial_stats(model)
    data = batches()
    for shards in (2, 3):
        with ex.using(ex.SerialExecutor(shards=shards)):
            got = collect(model, requests(model), lambda: iter(data), batch_size=2, show_progress=False)
        assert_same_stats(got, want)
    assert any(s.hist is not None and s.hist.sum() > 0 for s in want.values())


def test_executor_spec_and_missing_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(ex.from_spec("local"), ex.SerialExecutor) and ex.from_spec("local:3").shards == 3
    with pytest.raises(OptionError, match="unknown executor"):
        ex.from_spec("dask")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(OptionError, match=r"onnxq\[ray\]"):
        ex.from_spec("ray")
    assert isinstance(ex.current(), ex.SerialExecutor) and ex.current().shards == 1  # the default is untouched


def test_cli_without_ray_is_one_line_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), str(path))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code, out, err = run_cli(["optimize", str(path), "--data", "random", "--executor", "ray", "--output", str(tmp_path / "q.onnx")])
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "onnxq[ray]" in lines[0]
    assert not (tmp_path / "q.onnx").exists()


# ------------------------------------------------------------------------------------- with Ray


@pytest.fixture(scope="module")
def ray_cluster():
    if not HAVE_RAY:
        pytest.skip("Ray is not installed (pip install 'onnxq[ray]')")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    yield ex.RayExecutor(shards=2, max_retries=3)
    ray.shutdown()


@needs_ray
def test_ray_statistics_equal_serial_exactly(ray_cluster) -> None:
    model = mlp()
    want = serial_stats(model)
    data = batches()
    with ex.using(ray_cluster):
        got = collect(model, requests(model), lambda: iter(data), batch_size=2, show_progress=False)
    assert_same_stats(got, want)


def _gptq_model(tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(seed=3, width=64), str(path))
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(2).standard_normal((12, 8, 64)).astype(np.float32))
    return path, tmp_path / "calib.npz"


@needs_ray
def test_ray_gptq_is_bit_identical_to_serial(ray_cluster, tmp_path: Path) -> None:
    path, data = _gptq_model(tmp_path)
    onnxq.optimize(path, tmp_path / "serial.onnx", method="gptq", bits=4, data=data, show_progress=False, check=False)
    with ex.using(ray_cluster):
        onnxq.optimize(path, tmp_path / "ray.onnx", method="gptq", bits=4, data=data, show_progress=False, check=False)
    a, b = onnx.load(str(tmp_path / "serial.onnx")), onnx.load(str(tmp_path / "ray.onnx"))
    assert {n.op_type for n in a.graph.node} >= {"MatMulNBits"}
    assert [t.SerializeToString() for t in a.graph.initializer] == [t.SerializeToString() for t in b.graph.initializer]


def _dies_once(marker: str, w: np.ndarray, h: np.ndarray, *rest):
    """GPTQ of one layer whose worker process dies the first time it runs (Ray runs it again)."""
    from onnxq.plugins.gptq import _quantize_layer

    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)  # the worker process is gone mid-run, as with a lost node
    return _quantize_layer(w, h, *rest)


@needs_ray
def test_ray_retries_a_killed_worker_without_changing_the_result(ray_cluster, tmp_path: Path) -> None:
    from onnxq.plugins.gptq import _quantize_layer

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    h = (x.T @ x).astype(np.float64)  # shared by every call: put into the object store once
    calls = [(rng.standard_normal((64, 32)).astype(np.float32), h, 32, 4, False, 0.01, True, (1.0, 0.9), 128) for _ in range(3)]
    want = [_quantize_layer(*c) for c in calls]
    marker = str(tmp_path / "killed-once")
    got = ray_cluster.map(_dies_once, [(marker, *c) for c in calls])
    assert os.path.exists(marker)  # a worker really died
    for a, b in zip(got, want):
        assert np.array_equal(a.w_hat, b.w_hat) and np.array_equal(a.ints, b.ints)


def qkv_model(seed: int = 4, width: int = 32) -> onnx.ModelProto:
    """Two attention-like blocks: a LayerNorm read by three MatMuls (Q, K, V: EasyQuant's weight
    searches that can run in parallel), their product and an output projection."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for i in range(2):
        g = np.ones(width, np.float32)
        g[5] = 12.0
        inits += [numpy_helper.from_array(g, f"g{i}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        nodes.append(helper.make_node("LayerNormalization", [x, f"g{i}", f"b{i}"], [f"n{i}"], name=f"ln{i}", axis=-1))
        for p in ("q", "k", "v", "o"):
            inits.append(numpy_helper.from_array((rng.normal(0, 1, (width, width)) / np.sqrt(width)).astype(np.float32), f"w{p}{i}"))
        nodes += [helper.make_node("MatMul", [f"n{i}", f"w{p}{i}"], [f"{p}{i}"], name=f"{p}{i}") for p in ("q", "k", "v")]
        nodes += [helper.make_node("Mul", [f"q{i}", f"k{i}"], [f"qk{i}"], name=f"qk{i}"),
                  helper.make_node("Add", [f"qk{i}", f"v{i}"], [f"a{i}"], name=f"a{i}"),
                  helper.make_node("MatMul", [f"a{i}", f"wo{i}"], [f"o{i}"], name=f"o{i}"),
                  helper.make_node("Add", [x, f"o{i}"], [f"h{i}"], name=f"res{i}")]
        x = f"h{i}"
    graph = helper.make_graph(nodes, "main_graph", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", 8, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@needs_ray
def test_ray_easyquant_is_bit_identical_to_serial(ray_cluster, tmp_path: Path) -> None:
    """EasyQuant's weight searches of Q, K and V run as Ray tasks (the model shared once per pass)
    and choose exactly the scales the serial search chooses."""
    path = tmp_path / "qkv.onnx"
    onnx.save(qkv_model(), str(path))
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(6).standard_normal((16, 8, 32)).astype(np.float32))
    opts = {"samples": 16, "rounds": 1}
    onnxq.optimize(path, tmp_path / "serial.onnx", method="easyquant", options=opts, data=data, show_progress=False, check=False)
    maps: list[tuple[str, int]] = []

    class Spy:  # the Ray executor, recording what it was given
        shards = ray_cluster.shards

        def map(self, fn, calls):
            maps.append((fn.__name__, len(calls)))
            return ray_cluster.map(fn, calls)

        def share(self, value):
            return ray_cluster.share(value)

    with ex.using(Spy()):
        onnxq.optimize(path, tmp_path / "ray.onnx", method="easyquant", options=opts, data=data, show_progress=False, check=False)
    assert maps.count(("_weight_search_task", 3)) == 2  # Q, K and V of both blocks, as parallel tasks
    a, b = onnx.load(str(tmp_path / "serial.onnx")), onnx.load(str(tmp_path / "ray.onnx"))
    assert {n.op_type for n in a.graph.node} >= {"DequantizeLinear", "QuantizeLinear"}
    assert [t.SerializeToString() for t in a.graph.initializer] == [t.SerializeToString() for t in b.graph.initializer]
    # and the search did move scales away from the calibrator's start (else the test proves little)
    start = onnx.load(str(onnxq.optimize(path, tmp_path / "minmax.onnx", method="minmax", data=data, show_progress=False, check=False).path))
    scales = lambda m: {t.name: t.SerializeToString() for t in m.graph.initializer if "scale" in t.name}  # noqa: E731
    assert scales(start) != scales(a)


def _big_result(n: int) -> dict[str, np.ndarray]:
    return {"big": np.full((n, 64), 1.5, np.float32), "small": np.arange(4, dtype=np.float32)}


@needs_ray
def test_ray_results_do_not_stay_pinned_in_the_object_store(ray_cluster) -> None:
    """Results are the driver's own arrays (writeable, not views of the store's read-only objects):
    keeping a small part of a result must not keep its large parts in the object store."""
    got = ray_cluster.map(_big_result, [(4096,), (2048,)])
    assert [r["big"].shape[0] for r in got] == [4096, 2048] and float(got[0]["big"].sum()) == 1.5 * 4096 * 64
    assert all(r["big"].flags.writeable and r["small"].flags.writeable for r in got)


@needs_ray
def test_ray_auto_sensitivity_runs_as_tasks_and_chooses_as_serial(ray_cluster) -> None:
    """``-p auto``'s sensitivity analysis (each layer float alone, scored on the held-out data) runs as Ray
    tasks and chooses the same float layers and the same model as the local run (test_auto's mixed-precision
    case: no full-integer recipe reaches the target)."""
    from test_auto import FAST, feeds, mlp_model

    model, opts = mlp_model(), {**FAST, "min_cosine": 0.9997}
    local = onnxq.optimize(model, method="auto", data=feeds([32]), options=opts, show_progress=False, check=False)
    with ex.using(ray_cluster):
        dist = onnxq.optimize(model, method="auto", data=feeds([32]), options=opts, show_progress=False, check=False)
    a, b = local.report.auto, dist.report.auto
    assert a.met and a.float_layers, "precondition: the target needs mixed precision"
    assert all(r.gain is not None for r in a.sensitivity) and len(a.sensitivity) == 3
    assert [(r.node, r.score_float, r.gain) for r in b.sensitivity] == [(r.node, r.score_float, r.gain) for r in a.sensitivity]
    # the same recipe and float layers; the name's " #n" counts the same-size sets measured on the way, and the order
    # in which layers are tried back follows each run's own (noisy) latency measurements
    recipe = lambda c: c.split(" #")[0]  # noqa: E731
    assert (recipe(b.chosen), sorted(b.float_layers), b.met) == (recipe(a.chosen), sorted(a.float_layers), a.met)
    assert [t.SerializeToString() for t in dist.model.graph.initializer] == [t.SerializeToString() for t in local.model.graph.initializer]
    # where they ran: every evaluation was a task, in Ray's worker processes (the local run says nothing of the kind)
    notes = [n for n in b.notes if "evaluations ran as tasks" in n]
    assert len(notes) == 1 and not any("evaluations ran as tasks" in n for n in a.notes), b.notes
    ran = re.search(r"(\d+) evaluations ran as tasks on RayExecutor\(.*\), in (\d+) worker", notes[0])
    assert ran and int(ran[1]) == len(a.sensitivity) and int(ran[2]) >= 1, notes[0]
