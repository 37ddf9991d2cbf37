"""Inputs without a sample axis (a voice-activity model's scalar sample rate ``sr``, a gain): every method that keeps
calibration samples cuts the data's batches into samples, and such an input goes whole with each part."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.calib.readers import Batch, sample_rows
from onnxq.runtime.ort import make_session


def gain_model() -> onnx.ModelProto:
    """x -> Conv -> Relu -> * gain -> Conv, ``gain`` a scalar input read with every sample."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.2, (4, 8, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "gain"], ["g"], name="gain_mul"),
             helper.make_node("Conv", ["g", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "gain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8]),
                                              helper.make_tensor_value_info("gain", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32), "gain": np.array(1.5, np.float32)} for _ in range(n)]


def test_a_part_of_a_batch_keeps_the_scalar_input_whole():
    b = Batch({"x": np.zeros((4, 3)), "gain": np.array(2.0)}, np.arange(4))
    part = b.rows(1, 3)
    assert b.size == 4 and part.feeds["x"].shape == (2, 3) and part.feeds["gain"].shape == () and list(part.labels) == [1, 2]
    assert sample_rows({"gain": np.array(2.0)}, 0, 1)["gain"].shape == ()


@pytest.mark.parametrize("methods", [["minmax", "bias-correction"], ["easyquant"], ["minmax", "pad-correction"], "auto"])
def test_methods_that_keep_samples_run_on_a_model_with_a_scalar_input(methods):
    """They raised IndexError (a 0-d array cut along a sample axis it does not have)."""
    model = gain_model()
    opts = {"resamples": 2, "easyquant": False, "time_budget": 600} if methods == "auto" else None
    res = onnxq.optimize(model, method=methods, data=feeds(8, 1), options=opts, show_progress=False)
    ref, got = make_session(model), make_session(res.model)
    for f in feeds(2, 2):
        y_f, y_q = ref.run(None, f)[0], got.run(None, f)[0]
        assert np.linalg.norm(y_q - y_f) / np.linalg.norm(y_f) < 0.05


def test_one_value_per_sample_for_a_scalar_input_is_a_data_error(tmp_path, run_cli):
    """A scalar input given one value per sample ([N] in the .npz) went whole with every batch, and ONNX Runtime failed
    inside the graph ("broadcast ... 10 by 64"); it is the data's error, said in one line, before any run."""
    path = tmp_path / "gain.onnx"
    onnx.save_model(gain_model(), str(path))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32), gain=np.full(8, 1.5, np.float32))
    code, _, err = run_cli(["optimize", path, "-p", "minmax", "--data", tmp_path / "calib.npz", "--output", tmp_path / "q.onnx"])
    assert code == 1 and err.strip().count("\n") == 0, (code, err)
    assert "input 'gain'" in err and "rank 0" in err and "scalar" in err
    assert not (tmp_path / "q.onnx").exists()
