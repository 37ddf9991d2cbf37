"""Models over 2 GB: weights stay on disk (lazy external-data references) through load, check,
quantize (INT8 static, INT4 minmax and gptq) and save.

The default tests run small models through the large-model path by lowering
``model_io.LAZY_ABOVE`` (the external-data size above which weights are not read into memory) and
``model_io.SPILL_MIN_BYTES`` (the size above which new weights go to the scratch file), and check
that no step holds the weights: every weight read is a memory map, no initializer of the working
or quantized model carries its bytes, ``onnx.load_external_data_for_model`` is never called, and
the save copies one tensor at a time. The real thing, a model with a 2.2 GB embedding table, is
``@pytest.mark.slow``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

import onnxq
from onnxq.calib.statistics import model_digest
from onnxq.errors import ModelError
from onnxq.graph import model_io
from onnxq.graph.index import GraphIndex

VOCAB, WIDTH, LAYERS = 1000, 64, 3


def build_lm(folder: Path, seed: int = 0, name: str = "lm") -> Path:
    """A small decoder-style model (embedding, LayerNorm + MLP blocks, LM head), weights in external data."""
    rng = np.random.default_rng(seed)
    d = WIDTH
    inits = [numpy_helper.from_array(rng.normal(0, 1, (VOCAB, d)).astype(np.float32), "emb")]
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["h0"], name="embed")]
    x = "h0"
    for i in range(LAYERS):
        w1 = (rng.normal(0, 1, (d, 4 * d)) / np.sqrt(d)).astype(np.float32)
        w2 = (rng.normal(0, 1, (4 * d, d)) / np.sqrt(4 * d)).astype(np.float32)
        inits += [numpy_helper.from_array(np.ones(d, np.float32) + 0.1 * rng.normal(size=d).astype(np.float32), f"g{i}"),
                  numpy_helper.from_array(np.zeros(d, np.float32), f"b{i}"),
                  numpy_helper.from_array(w1, f"w1_{i}"), numpy_helper.from_array(w2, f"w2_{i}")]
        nodes += [helper.make_node("LayerNormalization", [x, f"g{i}", f"b{i}"], [f"n{i}"], name=f"ln{i}", axis=-1),
                  helper.make_node("MatMul", [f"n{i}", f"w1_{i}"], [f"u{i}"], name=f"up{i}"),
                  helper.make_node("Relu", [f"u{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("MatMul", [f"r{i}", f"w2_{i}"], [f"m{i}"], name=f"down{i}"),
                  helper.make_node("Add", [x, f"m{i}"], [f"h{i + 1}"], name=f"res{i}")]
        x = f"h{i + 1}"
    inits.append(numpy_helper.from_array((rng.normal(0, 1, (d, VOCAB)) / np.sqrt(d)).astype(np.float32), "head"))
    nodes.append(helper.make_node("MatMul", [x, "head"], ["logits"], name="lm_head"))
    graph = helper.make_graph(nodes, "main_graph", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", VOCAB])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location=f"{name}.onnx.data", size_threshold=1024)
    return path


@pytest.fixture
def large_path(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every model with external data takes the large-model path; new weights over 16 KiB are spilled.

    Returns the list of weights read in full from disk (``numpy_helper.to_array`` on an external
    float tensor, instead of the graph layer's memory map): it must stay empty.
    """
    monkeypatch.setattr(model_io, "LAZY_ABOVE", 0)
    monkeypatch.setattr(model_io, "SPILL_MIN_BYTES", 16 << 10)

    def refuse(*args, **kwargs):
        raise AssertionError("the large-model path read every external weight into memory")

    monkeypatch.setattr(onnx, "load_external_data_for_model", refuse)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", refuse)
    full_reads: list[str] = []
    real = numpy_helper.to_array

    def to_array(tensor, base_dir=""):
        if uses_external_data(tensor) and tensor.data_type == TensorProto.FLOAT:
            full_reads.append(tensor.name)
        return real(tensor, base_dir)

    monkeypatch.setattr(numpy_helper, "to_array", to_array)
    return full_reads


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lm")
    path = build_lm(folder)
    rng = np.random.default_rng(1)
    np.savez(folder / "calib.npz", ids=rng.integers(0, VOCAB, (16, 12)).astype(np.int64))
    np.save(folder / "heldout.npy", rng.integers(0, VOCAB, (4, 12)).astype(np.int64))
    return path


@pytest.fixture(scope="module")
def ref_weights(lm: Path) -> dict[str, np.ndarray]:
    """The weights as ONNX itself reads them (before any test patches its loader)."""
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(lm)).graph.initializer}


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def test_load_keeps_weights_on_disk_and_reads_them_as_memory_maps(lm: Path, ref_weights, large_path) -> None:
    model = model_io.load_model(lm)
    data = (lm.parent / "lm.onnx.data").stat().st_size
    assert model_io.is_lazy(model)
    assert model.ByteSize() < data / 50  # the graph only: the weights are references
    assert not any(t.HasField("raw_data") and len(t.raw_data) >= 1024 for t in model.graph.initializer)
    emb = GraphIndex(model).constant_value("emb")  # through the graph layer's reader
    assert model_io.is_mapped(emb) and not emb.flags.writeable
    assert np.array_equal(emb, ref_weights["emb"])
    model_io.check_model(model)  # the in-memory checker works on the references


def test_check_on_a_lazy_model_still_finds_errors(lm: Path, large_path, tmp_path: Path) -> None:
    model = model_io.load_model(lm)
    model.graph.node[1].input[1] = "no_such_tensor"
    with pytest.raises(ModelError, match="ONNX checker"):
        model_io.check_model(model)
    bad = onnx.load(str(lm), load_external_data=False)
    bad.graph.node[0].op_type = "NoSuchOp"
    onnx.save_model(bad, str(lm.parent / "bad.onnx"))
    with pytest.raises(ModelError, match="ONNX checker"):
        model_io.load_model(lm.parent / "bad.onnx")  # checked on the path, with its data files


def test_save_copies_lazy_weights_one_tensor_at_a_time(lm: Path, ref_weights, large_path, tmp_path: Path) -> None:
    model = model_io.load_model(lm)
    before = model.SerializeToString()
    tracemalloc.start()
    out = model_io.save_model_atomic(model, tmp_path / "copy.onnx")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert model.SerializeToString() == before  # the model still points at its own data
    total = model_io.external_data_bytes(onnx.load(str(lm), load_external_data=False))
    biggest_tensor = VOCAB * WIDTH * 4
    assert peak < 1.5 * biggest_tensor < total / 2  # one tensor at a time, never the weights together
    saved = onnx.load(str(out), load_external_data=False)  # an ordinary external-data model: relative locations
    assert {t.name: numpy_helper.to_array(t, str(tmp_path)).tobytes() for t in saved.graph.initializer} == \
           {name: value.tobytes() for name, value in ref_weights.items()}
    assert (tmp_path / "copy.onnx.data").is_file()


@pytest.mark.parametrize(("bits", "method", "min_cos"), [(8, "trt-entropy", 0.995), (4, "minmax", 0.97), (4, "gptq", 0.97)])
def test_quantize_lazy_model_end_to_end(lm: Path, large_path, tmp_path: Path, bits: int, method: str, min_cos: float) -> None:
    out = tmp_path / f"q{bits}.onnx"
    report = onnxq.optimize(lm, out, method=method, bits=bits, data=lm.parent / "calib.npz", show_progress=False, cache_dir=tmp_path / "cache")
    assert report is not None
    assert large_path == []  # every float weight the run read was memory-mapped, never read whole
    assert (tmp_path / f"q{bits}.onnx.data").is_file()  # the weights sit beside the output
    onnx.checker.check_model(str(out))
    ids = np.load(lm.parent / "heldout.npy")
    want = ort.InferenceSession(str(lm)).run(None, {"ids": ids})[0].ravel()
    got = ort.InferenceSession(str(out)).run(None, {"ids": ids})[0].ravel()
    cos = float(np.dot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want)))
    assert cos > min_cos
    quantized = onnx.load(str(out), load_external_data=False)
    ops = {n.op_type for n in quantized.graph.node}
    assert ("MatMulNBits" in ops) if bits == 4 else ("DequantizeLinear" in ops)


def test_quantized_weights_are_written_out_as_produced(lm: Path, large_path) -> None:
    """The Q/DQ rewrite of a lazy model spills its int8 weights: the quantized proto stays graph-sized."""
    from onnxq.graph.qdq import QuantizeWeight, apply_commands
    from onnxq.qparams import QParams

    model = model_io.load_model(lm)
    w = model_io.tensor_array(next(t for t in model.graph.initializer if t.name == "w1_0"))
    scale = np.abs(w).max(axis=0) / 127
    q = QParams(scale=scale.astype(np.float32), zero_point=np.zeros(scale.shape, np.int8), dtype="int8", qmin=-127, qmax=127, axis=1)
    out = apply_commands(model, [QuantizeWeight(initializer="w1_0", qparams=q, consumers=(("up0", 1),))])
    quantized = next(t for t in out.graph.initializer if t.name.startswith("w1_0_quantized"))
    assert model_io.is_lazy(quantized) and weight_bytes(out) < 64 * 1024
    assert np.array_equal(model_io.tensor_array(quantized), q.quantize(np.asarray(w)))


def test_cache_key_hashes_the_weights_not_the_names(tmp_path: Path, large_path) -> None:
    a = model_io.load_model(build_lm(tmp_path / "a", seed=0))
    same = model_io.load_model(build_lm(tmp_path / "b", seed=0))
    tuned = model_io.load_model(build_lm(tmp_path / "c", seed=1))  # same graph, names and file names
    assert model_digest(a) == model_digest(same)
    assert model_digest(a) != model_digest(tuned)


def _write_big_model(folder: Path, rows: int, width: int = 1024) -> Path:
    """Gather over a float table of ``rows x width`` (written in chunks, never in memory) plus one MatMul."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(folder / "big.onnx.data", "wb") as fh:
        for start in range(0, rows, 65536):
            fh.write(rng.standard_normal((min(65536, rows - start), width), dtype=np.float32).tobytes())
    table = onnx.TensorProto()
    table.name, table.data_type = "table", TensorProto.FLOAT
    table.dims.extend([rows, width])
    table.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "big.onnx.data"), ("offset", "0"), ("length", str(rows * width * 4))):
        e = table.external_data.add()
        e.key, e.value = k, v
    w = numpy_helper.from_array((rng.normal(0, 1, (width, 64)) / np.sqrt(width)).astype(np.float32), "proj")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="gather"),
             helper.make_node("MatMul", ["e", "proj"], ["y"], name="proj_mm")]
    graph = helper.make_graph(nodes, "main_graph", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8, 64])], [table, w])
    path = folder / "big.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    np.savez(folder / "calib.npz", ids=rng.integers(0, rows, (8, 8)).astype(np.int64))
    return path


@pytest.mark.slow
def test_real_model_over_2gb_quantizes_through_the_cli(tmp_path: Path) -> None:
    """The failure the issue reports (a 2.03 GiB embedding table plus one MatMul: exit 4), end to end at its real size."""
    path = _write_big_model(tmp_path / "m", rows=540_000)  # 2.21 GB of float32
    assert (tmp_path / "m" / "big.onnx.data").stat().st_size > model_io.PROTOBUF_LIMIT
    out = tmp_path / "big.int8.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxq", "optimize", str(path), "--data", str(tmp_path / "m" / "calib.npz"),
                           "--output", str(out), "--no-cache", "--quiet"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "big.int8.onnx.data").stat().st_size > model_io.PROTOBUF_LIMIT  # the table, copied beside it
    onnx.checker.check_model(str(out))
    ids = np.random.default_rng(5).integers(0, 540_000, (2, 8))
    want = ort.InferenceSession(str(path)).run(None, {"ids": ids})[0].ravel()
    got = ort.InferenceSession(str(out)).run(None, {"ids": ids})[0].ravel()
    assert float(np.dot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want))) > 0.99
    for f in list(tmp_path.rglob("*.data")):
        os.unlink(f)


def build_conv(folder: Path, seed: int = 0) -> Path:
    """Conv (3x3, centre-heavy: CFWS splits it) -> BatchNormalization (channels of very different
    scale: equalize balances them) -> depthwise Conv -> Relu -> 1x1 Conv, weights in external data."""
    rng = np.random.default_rng(seed)
    c = 16
    w1 = (rng.normal(0, 0.05, (c, c, 3, 3))).astype(np.float32)
    w1[:, :, 1, 1] += rng.normal(0, 1, (c, c)).astype(np.float32)
    spread = np.geomspace(0.01, 4, c).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "b1"),
             numpy_helper.from_array(spread, "bn_g"), numpy_helper.from_array(np.zeros(c, np.float32), "bn_b"),
             numpy_helper.from_array(np.zeros(c, np.float32), "bn_m"), numpy_helper.from_array(np.ones(c, np.float32), "bn_v"),
             numpy_helper.from_array(rng.normal(0, 0.5, (c, 1, 3, 3)).astype(np.float32), "wd"),
             numpy_helper.from_array(rng.normal(0, 0.3, (c, c, 1, 1)).astype(np.float32), "w3"),
             numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "b3")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "bn_g", "bn_b", "bn_m", "bn_v"], ["n1"], name="bn1"),
             helper.make_node("Conv", ["n1", "wd"], ["c2"], name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=c),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="pw", kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "main_graph", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", c, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", c, 8, 8])], inits)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "conv.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
                    save_as_external_data=True, location="conv.onnx.data", size_threshold=0)
    np.savez(folder / "calib.npz", x=rng.normal(0, 1, (16, c, 8, 8)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def conv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_conv(tmp_path_factory.mktemp("conv"))


def _quantized_weights(path: Path) -> dict[str, bytes]:
    return {t.name: numpy_helper.to_array(t, str(path.parent)).tobytes() for t in onnx.load(str(path), load_external_data=False).graph.initializer}


@pytest.mark.parametrize(("method", "model", "changed"), [
    ("smoothquant", "lm", "_smooth"), ("emb4bit", "lm", "emb"),  # both apply to decoder LMs (the benchmark model)
    ("equalize", "conv", "wd"), ("cfws", "conv", "cfws"), (["minmax", "bias-correction"], "conv", "b3")])
def test_float_rewrites_on_a_lazy_model_match_the_in_memory_run(method, model: str, changed: str, request, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The methods that rewrite weights (SmoothQuant's scaling, equalization, CFWS's split, bias
    correction, 4-bit tables) read them as memory maps on a model over 2 GB and spill what they
    write, and give the same quantized model as on the weights read into memory."""
    path: Path = request.getfixturevalue(model)
    data = path.parent / "calib.npz"
    eager = tmp_path / "eager.onnx"
    onnxq.optimize(path, eager, method=method, data=data, show_progress=False, check=False)
    full_reads = request.getfixturevalue("large_path")  # from here on: the large-model path
    monkeypatch.setattr(model_io, "SPILL_MIN_BYTES", 1024)
    lazy = tmp_path / "lazy.onnx"
    onnxq.optimize(path, lazy, method=method, data=data, show_progress=False, check=False)
    assert full_reads == []  # no weight was read whole from disk
    assert (tmp_path / "lazy.onnx.data").is_file()
    want, got = _quantized_weights(eager), _quantized_weights(lazy)
    assert got == want  # the same model, bit for bit
    original = {t.name: numpy_helper.to_array(t, str(path.parent)).tobytes() for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    # the method did rewrite something: a new or changed weight whose name says which
    assert any(changed in name and original.get(name) != value for name, value in got.items())
    feeds = dict(np.load(data))
    feeds = {k: v[:2] for k, v in feeds.items()}
    np.testing.assert_array_equal(ort.InferenceSession(str(lazy)).run(None, feeds)[0], ort.InferenceSession(str(eager)).run(None, feeds)[0])


def test_gptq_works_on_column_slices_with_the_same_result_in_bounded_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPTQ of a wide weight (an LM head: K x 50k) goes through its output columns in slices: the
    result is the one-slice result bit for bit, and the memory held stays near the result's own
    (integers and dequantized weight) instead of several float64 copies of the whole weight."""
    from onnxq.plugins import gptq

    rng = np.random.default_rng(0)
    k, n = 64, 20000
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((256, k))
    x[:, 5] = 0.0  # a dead input row too
    h = x.T @ x
    whole = gptq.gptq_quantize(w, h, 32, bits=4, shrink=(1.0, 0.9), lazy=16)
    monkeypatch.setattr(gptq, "CHUNK_BYTES", 8 * k * 1500)  # slices of 1500 columns (the last one shorter)
    tracemalloc.start()
    sliced = gptq.gptq_quantize(w, h, 32, bits=4, shrink=(1.0, 0.9), lazy=16)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    for field in ("ints", "w_hat", "scale", "zero_point"):
        assert np.array_equal(getattr(sliced, field), getattr(whole, field)), field
    assert sliced.rel_error == pytest.approx(whole.rel_error, rel=1e-9) and 0 < sliced.rel_error < 0.05
    result = sliced.ints.nbytes + sliced.w_hat.nbytes + sliced.scale.nbytes + sliced.zero_point.nbytes
    assert peak < result + 8 * 8 * k * 1500  # the result plus a few float64 slices (the whole weight in float64 alone: 10 MB)


def test_emb4bit_encodes_a_large_table_chunk_by_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """emb4bit's codes and per-row errors come chunk by chunk: the same table (codes, fp16 scale and
    bias, every per-row statistic) as in one piece, without float64 copies of the whole table."""
    from onnxq.plugins import emb4bit

    rng = np.random.default_rng(0)
    table = rng.standard_normal((24000, 256)).astype(np.float32)
    table[:, 3] *= 8.0  # an outlier channel, as in LLM embeddings
    monkeypatch.setattr(emb4bit, "_CHUNK_ELEMS", table.size)  # one chunk: the reference
    whole = emb4bit.quantize_table(table, search="minmax")
    monkeypatch.setattr(emb4bit, "_CHUNK_ELEMS", 1 << 18)  # 1024 rows at a time
    tracemalloc.start()
    chunked = emb4bit.quantize_table(table, search="minmax")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert np.array_equal(chunked.packed, whole.packed) and np.array_equal(chunked.scale, whole.scale) and np.array_equal(chunked.bias, whole.bias)
    assert set(chunked.stats) == set(whole.stats) and all(np.array_equal(chunked.stats[k], whole.stats[k]) for k in whole.stats)
    assert 0 < float(np.mean(chunked.stats["row_l2"])) < float(np.mean(np.linalg.norm(table, axis=1)))  # a real encoding
    assert peak < table.nbytes  # codes (1 byte per value) and chunk temporaries; the whole table in float64 is 2x its size


def test_spill_writes_4bit_weights_packed_to_the_scratch_file(large_path) -> None:
    """INT4 weights of a lazy model go to the scratch file too (two per byte, as ONNX packs them),
    so copies of the quantized model stay graph-sized; ONNX's reader gets the same values back."""
    int4 = helper.tensor_dtype_to_np_dtype(TensorProto.INT4)
    values = np.random.default_rng(0).integers(-8, 8, (256, 192)).astype(int4)
    tensor = model_io.spill(values, "w_q")
    assert model_io.is_lazy(tensor) and not tensor.HasField("raw_data") and tensor.data_type == TensorProto.INT4
    assert int(next(e.value for e in tensor.external_data if e.key == "length")) == values.size // 2
    assert np.array_equal(model_io.tensor_array(tensor).astype(np.int8), values.astype(np.int8))
