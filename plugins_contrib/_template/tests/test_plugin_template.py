"""Tests of the template plugin: onnxq's method contract, plus what its one change does."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxq_plugin_template", reason="the template plugin is not installed (pip install -e plugins_contrib/_template)")

from onnxq.testing.contract import MethodContract  # noqa: E402


class TestPluginTemplateContract(MethodContract):
    method = "plugin-template"
    options = {"fraction": 0.9}


def test_fraction_scales_every_activation_threshold():
    import onnxq
    from onnxq.testing.models import conv_relu_model

    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((4, 2, 6, 6)).astype(np.float32)}]
    half = onnxq.optimize(conv_relu_model(), method="plugin-template", options={"fraction": 0.5}, data=data, target="trt", show_progress=False)
    full = onnxq.optimize(conv_relu_model(), method="plugin-template", options={"fraction": 1.0}, data=data, target="trt", show_progress=False)

    def act_scales(model):
        from onnx import numpy_helper

        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        return [float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"]

    a, b = act_scales(half.model), act_scales(full.model)
    assert a and len(a) == len(b)
    for x, y in zip(a, b):
        assert x == pytest.approx(0.5 * y, rel=1e-6)
