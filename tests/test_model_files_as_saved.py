"""Model files as tools save them: ONNX Runtime's optimized graphs, stale intermediate shapes, nodes out of order.

Each was valid for ONNX Runtime and went wrong in onnxq: a model saved at ORT_ENABLE_EXTENDED had 4 of its 5 layers
left float (FusedConv, FusedGemm) with nothing said; one saved at ORT_ENABLE_ALL crashed easyquant; a stale
``value_info`` made onnxq's own copy unloadable ("ONNX Runtime cannot load the model"); nodes out of topological order
were refused with the checker's message cut before the node's name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.errors import ModelError


def _cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8), "w2": rng.normal(0, 0.2, (8, 8, 3, 3)),
             "b2": rng.normal(0, 0.1, 8), "w3": rng.normal(0, 0.1, (32, 8 * 8 * 8)), "b3": rng.normal(0, 0.1, 32),
             "w4": rng.normal(0, 0.2, (10, 32)), "b4": rng.normal(0, 0.1, 10)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4, name="conv1"), helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4, name="conv2"), helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["g"], transB=1, name="fc1"), helper.make_node("Relu", ["g"], ["r3"], name="relu3"),
             helper.make_node("Gemm", ["r3", "w4", "b4"], ["y"], transB=1, name="fc2")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(n: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def _saved_by_ort(tmp_path: Path, level: ort.GraphOptimizationLevel) -> Path:
    src, dst = tmp_path / "float.onnx", tmp_path / f"ort-{int(level)}.onnx"
    onnx.save(_cnn(), src)
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return dst


def _outputs(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_onnx_runtimes_fused_conv_and_gemm_are_quantized(tmp_path: Path) -> None:
    path = _saved_by_ort(tmp_path, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    fused = [n.op_type for n in onnx.load(str(path)).graph.node if n.op_type.startswith("Fused")]
    assert fused, "precondition: ONNX Runtime fused the convs and the Gemm"
    res = onnxq.optimize(path, method="minmax", data=_data(), show_progress=False)
    assert res.report.quantized_weights == 4 and not res.report.left_in_float
    assert not any(n.op_type.startswith("Fused") for n in res.model.graph.node)
    x = _data(1, 7)[0]["x"]
    ref, got = _outputs(_cnn(), x), _outputs(res.model, x)
    assert float(np.mean(np.sum(ref * got, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1))) > 0.999


def test_onnx_runtimes_nchwc_layout_is_refused_in_one_line(tmp_path: Path) -> None:
    path = _saved_by_ort(tmp_path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if not any(n.domain == "com.microsoft.nchwc" for n in onnx.load(str(path)).graph.node):
        pytest.skip("this CPU's ONNX Runtime writes no NCHWc layout (it needs AVX2 or NEON)")
    with pytest.raises(ModelError, match="ORT_ENABLE_ALL"):
        onnxq.optimize(path, method="easyquant", data=_data(), show_progress=False)


def test_a_stale_intermediate_shape_is_inferred_again(tmp_path: Path) -> None:
    model = _cnn()
    model.graph.value_info.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, ["N", 64]))  # fc1 gives 32
    path = tmp_path / "stale.onnx"
    onnx.save(model, path)
    x = _data(1, 7)[0]["x"]
    assert _outputs(path, x).shape == (8, 10), "precondition: ONNX Runtime runs the file"
    res = onnxq.optimize(path, method="minmax", data=_data(), show_progress=False)
    assert res.report.quantized_weights == 4 and not res.report.fidelity.failed()


def test_nodes_out_of_topological_order_are_sorted(tmp_path: Path) -> None:
    model = _cnn()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    path = tmp_path / "reversed.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    res = onnxq.optimize(path, method="minmax", data=_data(), show_progress=False)
    assert res.report.quantized_weights == 4 and not res.report.fidelity.failed()
    assert path.read_bytes() == before


def test_repeated_node_names_are_made_unique_for_the_check_and_the_evaluation(tmp_path: Path, run_cli) -> None:
    """ONNX's checker passes a graph whose nodes share a name; ONNX Runtime refuses it. The written model had its nodes
    renamed, but the fidelity check and the --eval-data table ran the file as it was: "the fidelity check could not run",
    exit 0, no table; `onnxq compare` exited 1. Both run the FP32 model with the written model's names now."""
    model = _cnn()
    for n in model.graph.node:
        n.name = "layer"
    path, calib, held = tmp_path / "same-names.onnx", tmp_path / "calib.npz", tmp_path / "eval.npz"
    onnx.save(model, path)
    np.savez(calib, x=np.concatenate([d["x"] for d in _data()]))
    np.savez(held, x=np.concatenate([d["x"] for d in _data(2, 5)]))
    before = path.read_bytes()
    with pytest.raises(Exception, match="same node name"):
        _outputs(path, _data(1)[0]["x"])  # precondition: ONNX Runtime refuses the file
    res = onnxq.optimize(onnx.load(path), method="minmax", data=_data(), show_progress=False)
    assert res.report.quantized_weights == 4 and res.report.fidelity.error is None and not res.report.fidelity.failed()
    out = tmp_path / "q.onnx"
    code, stdout, stderr = run_cli(["optimize", str(path), "-p", "minmax", "--data", str(calib), "--eval-data", str(held),
                                    "--output", str(out), "--quiet", "--json"])
    doc = json.loads(stdout)
    assert code == 0 and doc["report"]["fidelity"]["error"] is None and doc["report"]["fidelity"]["samples"] == 16, stderr
    assert [e["name"] for e in doc["evaluation"]][:2] == ["fp32", "onnxq ort int8"], stderr
    code, _, stderr = run_cli(["compare", str(path), str(out), "--data", str(held)])
    assert code == 0, stderr
    assert path.read_bytes() == before


def test_easyquant_searches_around_a_gemm_that_reads_its_input_transposed() -> None:
    """A Gemm with transA=1 has its samples on axis 1: easyquant stacked candidate inputs on axis 0 and ONNX Runtime's
    "GEMM: Dimension mismatch" ended the run as the user's error. The transposed reader's input keeps its calibrated
    range; the rest is searched."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (32, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0], name="t"),
             helper.make_node("Gemm", ["xt", "w1"], ["h"], transA=1, name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "transA", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = [{"x": rng.normal(0, 1, (16, 16)).astype(np.float32)} for _ in range(4)]
    res = onnxq.optimize(model, method="easyquant", data=data, show_progress=False)
    assert res.report.quantized_weights == 2 and not res.report.fidelity.failed()
    layers = res.report.methods["easyquant"]["layers"]
    assert "transposed" in layers["fc1"]["activation_search"] and "activation_multiplier" in layers["fc2"]


def test_a_sparse_initializer_is_quantized_as_a_weight(tmp_path: Path) -> None:
    """A weight stored as a sparse_initializer was quantized at run time as an activation (one range over all of it),
    counted as no weight and written back float; it is a weight like the others."""
    model = _cnn()
    w3 = next(t for t in model.graph.initializer if t.name == "w3")
    dense = numpy_helper.to_array(w3).copy()
    dense[np.abs(dense) < 0.1] = 0.0  # pruned
    flat = np.flatnonzero(dense)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(dense.reshape(-1)[flat], "w3"),
                                       numpy_helper.from_array(flat.astype(np.int64), "w3_indices"), list(dense.shape))
    model.graph.initializer.remove(w3)
    model.graph.sparse_initializer.append(sparse)
    x = _data(1, 7)[0]["x"]
    ref = _outputs(model, x)
    res = onnxq.optimize(model, method="minmax", data=_data(), show_progress=False)
    assert res.report.quantized_weights == 4 and not res.report.left_in_float
    got = _outputs(res.model, x)
    assert float(np.mean(np.sum(ref * got, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1))) > 0.999


def _with_local_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each Conv+Relu pair called as one model-local function, as exporters write modules as functions."""
    body = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1] * 4), helper.make_node("Relu", ["c"], ["y"])]
    func = helper.make_function("blocks", "ConvRelu", ["x", "w", "b"], ["y"], body, [helper.make_opsetid("", 17)])
    nodes = []
    for n in model.graph.node:
        if n.op_type == "Conv":
            nodes.append(helper.make_node("ConvRelu", list(n.input), [n.output[0].replace("c", "r")], domain="blocks", name=f"block_{n.name}"))
        elif n.op_type != "Relu" or n.name not in ("relu1", "relu2"):
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.functions.append(func)
    model.opset_import.append(helper.make_opsetid("blocks", 1))
    return model


@pytest.mark.parametrize("method", ["minmax", "easyquant"])
def test_layers_inside_model_local_functions_are_quantized(tmp_path: Path, method: str) -> None:
    path = tmp_path / "functions.onnx"
    onnx.save(_with_local_function(_cnn()), path)
    before = path.read_bytes()
    x = _data(1, 7)[0]["x"]
    np.testing.assert_allclose(_outputs(path, x), _outputs(_cnn(), x), rtol=1e-5, atol=1e-5, err_msg="precondition")
    res = onnxq.optimize(path, method=method, data=_data(), show_progress=False)
    assert res.report.quantized_weights == 4 and not res.report.left_in_float
    assert not res.model.functions and not any(n.domain == "blocks" for n in res.model.graph.node)
    ref, got = _outputs(_cnn(), x), _outputs(res.model, x)
    assert float(np.mean(np.sum(ref * got, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1))) > 0.999
    assert path.read_bytes() == before
