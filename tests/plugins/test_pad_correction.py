"""``-p pad-correction``: bias correction on the input's constant region (padding).

A model whose inputs are padded to a fixed width sees one constant per channel over the padding; the
rounding of those constants on each activation grid shifts what the quantized model computes there
(PP-OCR rec reads spaces into the padded margin). The method makes the quantized model match FP32 on the
padding, and leaves a model whose inputs have no constant region as it was, saying why.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq import optimize
from onnxq.calib.feeds import constant_region
from onnxq.runtime.ort import make_session
from onnxq.testing.contract import MethodContract

PAD = np.array([-0.6, 0.2, 0.9], np.float32)  # the padding value of each input channel (a normalized zero pixel)


def padded_model(seed: int = 0) -> onnx.ModelProto:
    """x [N, 3, 8, 24] -> Conv 3x3 (8) -> HardSwish -> depthwise 3x3 -> HardSwish -> Conv 1x1 (8 -> 6) -> y."""
    rng = np.random.default_rng(seed)
    f = lambda a, n: numpy_helper.from_array(np.asarray(a, np.float32), n)  # noqa: E731
    inits = [f(rng.standard_normal((8, 3, 3, 3)) * 0.5, "w0"), f(rng.standard_normal(8) * 0.5, "b0"),
             f(rng.standard_normal((8, 1, 3, 3)) * 0.6, "wd"), f(rng.standard_normal(8) * 0.3, "bd"),
             f(rng.standard_normal((6, 8, 1, 1)) * 0.5, "w2"), f(rng.standard_normal(6) * 0.1, "b2")]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("HardSwish", ["c0"], ["h0"], name="hs0"),
             helper.make_node("Conv", ["h0", "wd", "bd"], ["d"], pads=[1, 1, 1, 1], group=8, name="dwconv"),
             helper.make_node("HardSwish", ["d"], ["h1"], name="hs1"),
             helper.make_node("Conv", ["h1", "w2", "b2"], ["y"], name="conv2")]
    g = helper.make_graph(nodes, "padded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 24])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8, 24])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def padded_data(n: int, seed: int, pad: bool = True) -> list[dict[str, np.ndarray]]:
    """Content of random width (8-16 columns), the rest of the 24 columns the padding value."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 8, 24)).astype(np.float32)
    if pad:
        for i, w in enumerate(rng.integers(8, 17, n)):
            x[i, :, :, w:] = PAD[:, None, None]
    return [{"x": x[i:i + 16]} for i in range(0, n, 16)]


def _padding_error(model: onnx.ModelProto, ref: onnx.ModelProto, feeds) -> float:
    """Mean |quantized - FP32| over the output positions that see nothing but the padding value: columns >= 19 in every
    sample (the content ends by column 16, two 3x3 convs reach 2 further), 2 away from the image's borders (the convs'
    own zero padding)."""
    q, r = make_session(model, "all"), make_session(ref, "all")
    return float(np.mean([np.abs(q.run(None, f)[0] - r.run(None, f)[0])[..., 2:-2, 19:-2].mean() for f in feeds]))


def test_constant_region_finds_the_padding_value_and_refuses_where_there_is_none():
    sample, info = constant_region(padded_data(64, 1))
    assert sample is not None and sample["x"].shape == (1, 3, 8, 24)
    np.testing.assert_array_equal(sample["x"][0, :, 0, 0], PAD)
    assert info["inputs"]["x"]["share"] > 0.3
    none, why = constant_region(padded_data(64, 1, pad=False))
    assert none is None and "no constant region" in why["reason"]
    ints, why = constant_region([{"ids": np.zeros((4, 16), np.int64)}])
    assert ints is None and "not a float tensor" in why["reason"]


@pytest.mark.parametrize("target", ["ort", "trt"])
@pytest.mark.parametrize("calibrator", ["minmax", "mse"])
def test_pad_correction_matches_fp32_on_the_padding(target, calibrator):
    model, calib, held_out = padded_model(), padded_data(96, 1), padded_data(64, 2)
    plain = optimize(model, method=calibrator, data=calib, target=target, show_progress=False)
    fixed = optimize(model, method=[calibrator, "pad-correction"], data=calib, target=target, show_progress=False)
    e0, e1 = _padding_error(plain.model, model, held_out), _padding_error(fixed.model, model, held_out)
    assert e1 < e0 / 10, (e0, e1)
    rep = fixed.report.methods["pad-correction"]
    assert set(rep["corrected"]) == {"conv0", "dwconv", "conv2"}
    onnx.checker.check_model(fixed.model, full_check=True)
    biases = [numpy_helper.to_array(t) for t in fixed.model.graph.initializer if t.name.startswith("b")]
    assert biases and all(np.all(np.isfinite(b)) for b in biases)


def test_no_constant_region_leaves_the_model_and_says_why(caplog):
    model, calib = padded_model(), padded_data(64, 1, pad=False)
    plain = optimize(model, method="minmax", data=calib, show_progress=False)
    with caplog.at_level(logging.WARNING):
        same = optimize(model, method=["minmax", "pad-correction"], data=calib, show_progress=False)
    assert same.model.graph.SerializeToString() == plain.model.graph.SerializeToString()
    assert "no constant region" in same.report.methods["pad-correction"]["constant"]["reason"]
    assert any("pad-correction changed nothing" in r.getMessage() for r in caplog.records)


class TestPadCorrectionContract(MethodContract):
    method = "pad-correction"


def test_constant_region_reads_feeds_of_the_first_shape_only():
    """Dynamic sizes: feeds shaped unlike the first are left out instead of failing the concatenation."""
    feeds = padded_data(32, 1) + [{"x": np.zeros((4, 3, 8, 40), np.float32)}]
    sample, info = constant_region(feeds)
    assert sample is not None and sample["x"].shape == (1, 3, 8, 24)
