"""Fuzz: random small valid graphs and random (often hostile) data never make onnxq exit 4.

A seeded generator (each case is reproducible from its seed: ``pytest tests/test_fuzz.py -k
'seed-17'``) builds a chain of Conv/MatMul/Gemm/Add/Relu/Concat/Reshape/... with random shapes
and initializers (float32, some in float16), writes random calibration data (NaN/Inf, extremes, tiny values around 1e-37,
constant and zero inputs, one to three samples per file), and runs the ``onnxq optimize`` command
in-process with a random method, target and bit width. Every run must end either with exit 0 and a
model that loads and runs in ONNX Runtime, or with exit 1 and one ``onnxq: error:`` line; exit 4
(an internal error) is a bug. Bounded: about a second per case.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

CASES = 128
#: the share of cases built in float16 (onnxq quantizes them or refuses them with one line)
FLOAT16_SHARE = 0.15
METHODS = ["minmax", "percentile", "mse", "trt-entropy", "easyquant"]
DATA_KINDS = ["normal", "nan", "inf", "extreme", "tiny", "constant", "zeros", "mixed-scale"]


class _Builder:
    """A random chain of ops over one running tensor (4-D NCHW, then 2-D after a flatten)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}{self.n}"

    def const(self, array: np.ndarray) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def weights(self, *shape: int) -> np.ndarray:
        scale = float(self.rng.choice([1e-3, 0.1, 1.0, 30.0]))
        w = self.rng.standard_normal(shape) * scale
        if self.rng.random() < 0.1:
            w[...] = 0.0  # an all-zero weight (a pruned layer)
        return w


def random_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    b = _Builder(rng)
    spatial = int(rng.choice([1, 3, 8]))
    channels = int(rng.integers(1, 5))
    four_d = rng.random() < 0.7
    shape: list = [1, channels, spatial, spatial] if four_d else [1, int(rng.integers(1, 65))]
    x = "x"
    history = [(x, tuple(shape))]
    for _ in range(int(rng.integers(1, 7))):
        if len(shape) == 4:
            op = rng.choice(["Conv", "Conv", "Relu", "Add", "AddSelf", "Concat", "MaxPool", "Sigmoid", "Flatten", "Reshape", "Mul",
                             "BatchNormalization", "ConvTranspose", "AveragePool", "GlobalAveragePool", "Clip", "LeakyRelu"])
        else:
            op = rng.choice(["MatMul", "MatMul", "Gemm", "Relu", "Add", "AddSelf", "Concat", "Sigmoid", "Mul", "Softmax", "Clip"])
        if op == "Conv":
            k = int(rng.choice([1, 3])) if shape[2] >= 3 else 1
            cout = int(rng.integers(1, 6))
            ins = [x, b.const(b.weights(cout, shape[1], k, k))]
            if rng.random() < 0.5:
                ins.append(b.const(b.weights(cout)))
            x = b.node("Conv", ins, pads=[k // 2] * 4)
            shape = [1, cout, shape[2], shape[3]]
        elif op == "ConvTranspose":
            cout = int(rng.integers(1, 5))
            x = b.node("ConvTranspose", [x, b.const(b.weights(shape[1], cout, 1, 1))])
            shape = [1, cout, shape[2], shape[3]]
        elif op == "BatchNormalization":
            c = shape[1]
            var = np.abs(b.weights(c)) + float(rng.choice([0.0, 1e-3, 1.0]))
            x = b.node("BatchNormalization", [x, b.const(b.weights(c)), b.const(b.weights(c)), b.const(b.weights(c)), b.const(var)])
        elif op == "AveragePool":
            x = b.node("AveragePool", [x], kernel_shape=[1, 1])
        elif op == "GlobalAveragePool":
            x = b.node("GlobalAveragePool", [x])
            shape = [1, shape[1], 1, 1]
        elif op == "Clip":
            x = b.node("Clip", [x, b.const(np.array(-1.0)), b.const(np.array(6.0))])
        elif op == "LeakyRelu":
            x = b.node("LeakyRelu", [x], alpha=0.1)
        elif op == "Softmax":
            x = b.node("Softmax", [x], axis=-1)
        elif op == "MatMul":
            k = int(rng.integers(1, 65))
            x = b.node("MatMul", [x, b.const(b.weights(shape[1], k))])
            shape = [1, k]
        elif op == "Gemm":
            k = int(rng.integers(1, 65))
            trans_b = int(rng.integers(0, 2))
            w = b.weights(k, shape[1]) if trans_b else b.weights(shape[1], k)
            alpha = float(rng.choice([1.0, 1.0, 0.5]))
            x = b.node("Gemm", [x, b.const(w), b.const(b.weights(k))], transB=trans_b, alpha=alpha)
            shape = [1, k]
        elif op in ("Relu", "Sigmoid"):
            x = b.node(op, [x])
        elif op in ("Add", "Mul"):
            x = b.node(op, [x, b.const(b.weights(*shape[1:]))])
        elif op == "AddSelf":
            same = [t for t, s in history if list(s) == shape]
            x = b.node("Add", [x, same[int(rng.integers(0, len(same)))]])
        elif op == "Concat":
            x = b.node("Concat", [x, x], axis=1)
            shape = [1, shape[1] * 2, *shape[2:]]
        elif op == "MaxPool":
            x = b.node("MaxPool", [x], kernel_shape=[1, 1])
        elif op in ("Flatten", "Reshape"):
            flat = int(np.prod(shape[1:]))
            if op == "Flatten":
                x = b.node("Flatten", [x], axis=1)
            else:
                shp = numpy_helper.from_array(np.array([-1, flat], np.int64), b.name("shape"))
                b.inits.append(shp)
                x = b.node("Reshape", [x, shp.name])
            shape = [1, flat]
        history.append((x, tuple(shape)))
    b.nodes.append(helper.make_node("Identity", [x], ["y"], name="out_node"))
    in_shape = list(history[0][1])
    graph = helper.make_graph(b.nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape[1:]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *shape[1:]])], initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", int(rng.choice([13, 17])))])
    model.ir_version = 8
    if rng.random() < FLOAT16_SHARE:
        _to_float16(model)
    onnx.checker.check_model(model, full_check=True)
    return model, tuple(in_shape[1:])


def _to_float16(model: onnx.ModelProto) -> None:
    """The same graph in float16 (inputs, outputs, initializers): how GPU deployments ship models."""
    for i, t in enumerate(model.graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16


def random_data(rng: np.random.Generator, sample_shape: tuple[int, ...], kind: str) -> list[np.ndarray]:
    """A few batches of calibration inputs of one hostile kind."""
    batches = []
    for _ in range(int(rng.integers(1, 4))):
        x = rng.standard_normal((int(rng.integers(1, 4)), *sample_shape)).astype(np.float32)
        if kind == "nan":
            x.flat[int(rng.integers(0, x.size))] = np.nan
        elif kind == "inf":
            x.flat[int(rng.integers(0, x.size))] = rng.choice([np.inf, -np.inf])
        elif kind == "extreme":
            x *= np.float32(1e30)
        elif kind == "tiny":
            x *= np.float32(1e-37)
        elif kind == "constant":
            x[...] = np.float32(rng.choice([-3.0, 0.5, 7.0]))
        elif kind == "zeros":
            x[...] = 0.0
        elif kind == "mixed-scale":
            x.flat[0] = np.float32(3e38)
        batches.append(x)
    return batches


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed-{s}") for s in range(CASES)])
def test_random_graph_and_data_never_exit_4(seed, tmp_path, run_cli):
    rng = np.random.default_rng(1000 + seed)
    model, sample_shape = random_model(rng)
    model_path = tmp_path / "m.onnx"
    onnx.save_model(model, str(model_path))
    kind = DATA_KINDS[seed % len(DATA_KINDS)]
    data = tmp_path / "data"
    data.mkdir()
    dtype = np.float16 if model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16 else np.float32
    with np.errstate(over="ignore"):  # 1e30 in float16 is inf, as a user's cast would make it
        for i, x in enumerate(random_data(rng, sample_shape, kind)):
            np.savez(data / f"{i:02d}.npz", x=x.astype(dtype))
    bits = str(rng.choice(["8", "8", "7", "4"]))
    args = ["optimize", model_path, "--data", data, "--bits", bits, "--target", str(rng.choice(["ort", "trt"])),
            "--output", tmp_path / "q.onnx", "--no-cache", "--quiet"]
    if bits != "4":
        args += ["-p", str(rng.choice(METHODS))]
    if rng.random() < 0.3:
        args += ["--batch-size", str(int(rng.integers(1, 5)))]
    if rng.random() < 0.2:
        args += ["--max-samples", str(int(rng.integers(1, 3)))]
    if rng.random() < 0.2:
        args += ["--exclude", str(rng.choice(["Conv", "MatMul", "Gemm", "*"]))]
    code, _, err = run_cli(args)
    assert code in (0, 1), f"seed {seed} ({kind} data, {args}): exit {code}\n{err}"
    if code == 1:
        lines = [line for line in err.splitlines() if not line.startswith("onnxq: warning:")]
        assert len(lines) == 1 and lines[0].startswith("onnxq: error: ") and "Traceback" not in err, err
        # a valid float model must never come back as a Q/DQ graph ONNX Runtime rejects: that is
        # onnxq's bug dressed as a user error
        assert "QuantizeLinear" not in lines[0] and "DequantizeLinear" not in lines[0], f"seed {seed}: onnxq built a Q/DQ graph ONNX Runtime rejects: {lines[0]}"
        return
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(seed).standard_normal((2, *sample_shape)).astype(dtype)
    (y,) = sess.run(None, {"x": x})
    assert y.shape[0] == 2
