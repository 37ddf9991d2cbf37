"""Empirical bias correction (``-p bias-correction``): it removes the systematic output shift."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxq import optimize
from onnxq.runtime.ort import make_session
from onnxq.testing.contract import MethodContract
from tests.plugins.test_equalize import _data, bn_depthwise_model


def _shift_and_error(model: onnx.ModelProto, ref_model: onnx.ModelProto, feeds) -> tuple[float, float]:
    """(mean |per-channel output shift| / mean |output|, relative RMS error) on ``feeds``."""
    q, r = make_session(model, "all"), make_session(ref_model, "all")
    diff = np.concatenate([q.run(None, f)[0] - r.run(None, f)[0] for f in feeds])
    ref = np.concatenate([r.run(None, f)[0] for f in feeds])
    shift = float(np.abs(diff.mean(axis=(0, 2, 3))).mean() / np.abs(ref).mean())
    return shift, float(np.sqrt((diff**2).mean() / (ref**2).mean()))


@pytest.mark.parametrize("target,bits", [("trt", 7), ("ort", 8)])
def test_bias_correction_removes_the_output_shift(target, bits):
    model, calib, held_out = bn_depthwise_model(), _data(64, 1), _data(64, 2)
    plain = optimize(model, method="minmax", data=calib, target=target, bits=bits, show_progress=False)
    fixed = optimize(model, method=["minmax", "bias-correction"], data=calib, target=target, bits=bits, show_progress=False)
    shift0, err0 = _shift_and_error(plain.model, model, held_out)
    shift1, err1 = _shift_and_error(fixed.model, model, held_out)
    # measured on held-out data: trt INT7 shift 0.36 -> 0.04, error 0.42 -> 0.28; ort INT8 0.13 -> 0.012, 0.26 -> 0.24
    assert shift1 < shift0 / 3, (shift0, shift1)
    assert err1 < err0, (err0, err1)
    corrected = fixed.report.methods["bias-correction"]["corrected"]
    assert set(corrected) >= {"dwconv", "conv2", "conv3"}
    onnx.checker.check_model(fixed.model, full_check=True)
    biases = {t.name: numpy_helper.to_array(t) for t in fixed.model.graph.initializer if t.name.startswith("b")}
    assert all(np.all(np.isfinite(b)) for b in biases.values())


def test_input_model_biases_untouched():
    model = bn_depthwise_model()
    before = model.SerializeToString()
    optimize(model, method=["minmax", "bias-correction"], data=_data(32, 1), show_progress=False)
    assert model.SerializeToString() == before


class TestBiasCorrectionContract(MethodContract):
    method = "bias-correction"
