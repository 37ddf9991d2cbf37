"""Shared set-up of the onnxq-pdquant tests."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread, as the method itself uses by default (the CI machine is shared)."""
    try:
        import torch
    except ImportError:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _small_cnn(batchnorm: bool) -> onnx.ModelProto:
    """Conv-(BN-)Relu x2, global pooling, Gemm, random weights: with ``batchnorm`` unfolded BatchNorms whose statistics
    are not those of the data, else biased convs (what an exporter leaves of conv-BN-ReLU after folding)."""
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    chans = [3, 8, 8]
    for i in range(2):
        ci, co, p = chans[i], chans[i + 1], f"l{i}"
        inits.append(numpy_helper.from_array((rng.standard_normal((co, ci, 3, 3)) * 0.4).astype(np.float32), f"{p}_w"))
        if batchnorm:
            inits += [numpy_helper.from_array(rng.uniform(0.5, 1.5, co).astype(np.float32), f"{p}_g"),
                      numpy_helper.from_array((rng.standard_normal(co) * 0.2).astype(np.float32), f"{p}_b"),
                      numpy_helper.from_array((rng.standard_normal(co) * 0.3).astype(np.float32), f"{p}_m"),
                      numpy_helper.from_array(rng.uniform(0.5, 2.0, co).astype(np.float32), f"{p}_v")]
            nodes += [helper.make_node("Conv", [x, f"{p}_w"], [f"{p}_c"], name=f"{p}_conv", pads=[1, 1, 1, 1]),
                      helper.make_node("BatchNormalization", [f"{p}_c", f"{p}_g", f"{p}_b", f"{p}_m", f"{p}_v"], [f"{p}_bn"], name=f"{p}_bn"),
                      helper.make_node("Relu", [f"{p}_bn"], [f"{p}_r"], name=f"{p}_relu")]
        else:
            inits.append(numpy_helper.from_array((rng.standard_normal(co) * 0.2).astype(np.float32), f"{p}_b"))
            nodes += [helper.make_node("Conv", [x, f"{p}_w", f"{p}_b"], [f"{p}_c"], name=f"{p}_conv", pads=[1, 1, 1, 1]),
                      helper.make_node("Relu", [f"{p}_c"], [f"{p}_r"], name=f"{p}_relu")]
        x = f"{p}_r"
    inits += [numpy_helper.from_array((rng.standard_normal((8, 5)) * 0.5).astype(np.float32), "fc_w"),
              numpy_helper.from_array(np.zeros(5, np.float32), "fc_b")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc")]
    g = helper.make_graph(nodes, "bn_cnn" if batchnorm else "folded_cnn",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="session")
def small_cnn():
    """The builder of a small conv net, with or without unfolded BatchNorm (``small_cnn(batchnorm=True)``)."""
    return _small_cnn
