"""A model another tool already quantized is refused in one line; a float32 model with a float16 island names it.

ONNX Runtime's ``quantize_static`` model was quantized again on top of its own Q/DQ pairs (every activation twice, a
``--target trt`` output that failed ``onnxq lint``), and its ``quantize_dynamic`` and operator-form models were written
back unchanged with "the output is the float model". Integer weights behind a DequantizeLinear (TFLite's int8 weights)
are still quantized around.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.errors import ModelError


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (32, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(0, 1, (8, 16)).astype(np.float32)} for _ in range(4)]


@pytest.mark.parametrize("how", ["static_qdq", "static_qoperator", "dynamic"])
def test_a_model_onnx_runtime_quantized_is_refused_in_one_line(how: str, tmp_path: Path, run_cli) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

    src, dst = tmp_path / "float.onnx", tmp_path / "ort.onnx"
    onnx.save(_mlp(), src)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(_data())

        def get_next(self):
            return next(self.it, None)

    if how == "dynamic":
        quantize_dynamic(str(src), str(dst))
    else:
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ if how == "static_qdq" else QuantFormat.QOperator)
    before = dst.read_bytes()
    with pytest.raises(ModelError, match="already quantized"):
        onnxq.optimize(dst, method="minmax", data=_data(), show_progress=False)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.concatenate([d["x"] for d in _data()]))
    code, _, err = run_cli(["optimize", dst, "--data", data, "--output", tmp_path / "q.onnx", "--no-cache", "--quiet"])
    assert code == 1 and len(err.splitlines()) == 1 and "already quantized" in err, err
    assert dst.read_bytes() == before and not (tmp_path / "q.onnx").exists()


def test_integer_weights_behind_a_dequantize_are_not_an_already_quantized_model() -> None:
    model = _mlp()
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    scale = np.float32(np.abs(w1).max() / 127)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.round(w1 / scale).astype(np.int8), "w1_q"))
    model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), "w1_s")])
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["w1_q", "w1_s"], ["w1"], name="w1_dq"))
    res = onnxq.optimize(model, method="minmax", data=_data(), show_progress=False)
    assert res.report.quantized_activations > 0


@pytest.mark.parametrize("kind", ["int4", "int4 blocks of 8", "float8e4m3fn"])
@pytest.mark.parametrize("method", ["easyquant", "gptq"])
def test_four_bit_and_float8_weights_behind_a_dequantize_run_and_are_named(kind: str, method: str) -> None:
    """A layer whose weight the model holds as int4 (block-wise) or float8 is kept as the model has it, with the reason;
    easyquant and gptq, which run parts of the graph with the constants as feeds, stopped on it ("Numpy_type 273
    can't be converted to MLDataType"). gptq's ONNX Runtime output turned the model's own blocks of 8 into a
    MatMulNBits, whose kernel takes blocks of 16 or more: the session failed to load."""
    import ml_dtypes
    import onnxruntime as ort

    model = _mlp()
    w1 = numpy_helper.to_array(model.graph.initializer[0])  # [16, 32]: blocks along the input axis
    if kind.startswith("int4"):
        block = 8 if "8" in kind else 16
        scale = (np.abs(w1).reshape(16 // block, block, 32).max(1) / 7).astype(np.float32)
        q = np.clip(np.round(w1 / np.repeat(scale, block, 0)), -8, 7).astype(ml_dtypes.int4)
        dq = helper.make_node("DequantizeLinear", ["w1_q", "w1_s"], ["w1"], name="w1_dq", axis=0, block_size=block)
    else:
        scale = np.array(np.abs(w1).max() / 448, np.float32)
        q = (w1 / scale).astype(ml_dtypes.float8_e4m3fn)
        dq = helper.make_node("DequantizeLinear", ["w1_q", "w1_s"], ["w1"], name="w1_dq")
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(q, "w1_q"))
    model.graph.initializer.append(numpy_helper.from_array(scale, "w1_s"))
    model.graph.node.insert(0, dq)
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 21))
    x = _data()[0]["x"]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    res = onnxq.optimize(model, method=method, data=_data(), bits=4 if method == "gptq" else 8, show_progress=False)
    assert res.report.quantized_weights == 1  # fc2's
    if method == "easyquant":
        reason = next((f.reason for f in res.report.left_in_float if f.node == "fc1"), "")
        assert kind.split()[0] in reason and "DequantizeLinear 'w1_dq'" in reason, res.report.left_in_float
    got = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert float(np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.99


def test_a_float16_island_in_a_float32_model_names_its_layers() -> None:
    model = _mlp()
    w2 = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float16)
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(w2, "w2"))
    fc2 = model.graph.node[2]
    fc2.input[0] = "r16"
    fc2.output[0] = "y16"
    model.graph.node.insert(2, helper.make_node("Cast", ["r"], ["r16"], to=TensorProto.FLOAT16, name="to16"))
    model.graph.node.append(helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT, name="to32"))
    with pytest.raises(ModelError, match="--exclude fc2") as err:
        onnxq.optimize(model, method="minmax", data=_data(), show_progress=False)
    assert "float16 models are not supported" not in str(err.value)
    excluded = [n for n in str(err.value).split("--exclude ")[1:]]
    names = [e.split()[0] for e in excluded]
    res = onnxq.optimize(model, method="minmax", data=_data(), show_progress=False, exclude=names)
    assert res.report.quantized_weights >= 1
