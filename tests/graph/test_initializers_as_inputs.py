"""Models whose weights are also listed in ``graph.input`` quantize and run with only the real inputs fed.

``torch.onnx.export(..., keep_initializers_as_inputs=True)`` (and every IR < 4 exporter) lists each
initializer as a graph input too. onnxq treats such an initializer as a constant: the quantized
weight replaces it, and the float original leaves both the initializer list and ``graph.input``
(:func:`onnxq.graph.edit.cleanup`), so ONNX Runtime never asks for it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.graph.prepare import initializers_as_constants

CASES = [("minmax", "ort", 8), ("minmax", "trt", 8), ("percentile", "ort", 8), ("minmax", "ort", 4)]


def _feeds(n: int, shape: tuple[int, ...], name: str, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _check(model: onnx.ModelProto, quantized: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    inits = {t.name for t in model.graph.initializer}
    listed = {i.name for i in model.graph.input}
    assert inits & listed, "the test model must list its initializers as inputs"
    real = listed - inits
    q_inputs = {i.name for i in quantized.graph.input}
    assert q_inputs == real, f"quantized model asks for {sorted(q_inputs - real)} besides its real inputs"
    sess = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    assert {i.name for i in sess.get_inputs()} == real
    (got,) = sess.run(None, feed)
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    assert got.shape == want.shape
    assert np.all(np.isfinite(got))
    # a quantized model, not a broken one: close to float on its own calibration data
    assert np.abs(got - want).max() <= 0.25 * np.abs(want).max() + 1e-3


def _helper_model() -> onnx.ModelProto:
    """Conv → Relu → Flatten → Gemm, every weight an initializer listed in graph.input."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "conv.weight")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32) * 0.1, "conv.bias")
    fw = numpy_helper.from_array(rng.standard_normal((5, 4 * 6 * 6)).astype(np.float32) * 0.1, "fc.weight")
    fb = numpy_helper.from_array(rng.standard_normal(5).astype(np.float32) * 0.1, "fc.bias")
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])]
    inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in (w, b, fw, fb)]
    graph = helper.make_graph(nodes, "net", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], [w, b, fw, fb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(("method", "target", "bits"), CASES)
def test_helper_model_with_initializers_as_inputs_quantizes(method: str, target: str, bits: int) -> None:
    model = _helper_model()
    data = _feeds(4, (1, 3, 6, 6), "x")
    result = onnxq.optimize(model, method=method, target=target, bits=bits, data=data, cache_dir=None, show_progress=False)
    _check(model, result.model, data[0])


@pytest.fixture(scope="module")
def torch_model(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    torch = pytest.importorskip("torch", reason="torch is not installed: the exported-model variant needs it")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 * 8 * 8, 6)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))

    torch.manual_seed(0)
    path = Path(tmp_path_factory.mktemp("torch_export")) / "net.onnx"
    # the TorchScript exporter is the one that writes keep_initializers_as_inputs
    kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Net().eval(), (torch.randn(1, 3, 8, 8),), str(path), input_names=["x"], output_names=["y"],
                          opset_version=13, keep_initializers_as_inputs=True, **kwargs)
    return onnx.load(str(path))


@pytest.mark.parametrize(("method", "target", "bits"), CASES[:2])
def test_torch_export_with_initializers_as_inputs_quantizes(torch_model: onnx.ModelProto, method: str, target: str, bits: int) -> None:
    data = _feeds(4, (1, 3, 8, 8), "x", seed=2)
    result = onnxq.optimize(torch_model, method=method, target=target, bits=bits, data=data, cache_dir=None, show_progress=False)
    _check(torch_model, result.model, data[0])


def test_prepare_unlists_initializers_except_where_ir3_requires_the_listing() -> None:
    model = _helper_model()
    assert initializers_as_constants(model) == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    assert [i.name for i in model.graph.input] == ["x"]
    old = _helper_model()
    old.ir_version = 3
    assert initializers_as_constants(old) == []
    assert len(old.graph.input) == 5
