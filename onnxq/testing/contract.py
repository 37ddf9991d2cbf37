"""Contract tests every quantization method passes, built-in or third-party.

A plugin package subclasses :class:`MethodContract` in its own tests::

    from onnxq.testing.contract import MethodContract

    class TestMyMethod(MethodContract):
        method = "my-method"
        options = {"my_option": 3}

The tests quantize small models built in code for every target and bit width and check what a
user relies on: the method is registered with a summary and documented options, the output passes
the ONNX checker and runs in ONNX Runtime with full optimizations, every scale is finite and
positive, ``--target trt`` output breaks no TensorRT Q/DQ rule, and outputs stay close to FP32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxq.testing.models import residual_concat_model


def _calibration(n: int = 24, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((4, 3, 8, 8)) * (1 + k % 3)).astype(np.float32)} for k in range(n // 4)]


def scales_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every scale initializer read by a QuantizeLinear/DequantizeLinear node."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in inits:
            out[n.input[1]] = numpy_helper.to_array(inits[n.input[1]])
    return out


class MethodContract:
    """Subclass and set ``method`` (and ``options``) to run the contract on a method."""

    method: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    #: minimum mean cosine between FP32 and INT8 outputs on the contract model
    min_cosine_int8: ClassVar[float] = 0.95
    #: the targets the method supports; on the others it must refuse with one clear error (an OnnxqError)
    targets: ClassVar[tuple[str, ...]] = ("ort", "trt")

    def _host(self):
        from onnxq.host import get_host

        return get_host()

    def _optimize(self, target: str, bits: int):
        from onnxq.pipeline import optimize

        return optimize(residual_concat_model(), method=self.method, options=self.options, data=_calibration(), target=target, bits=bits, show_progress=False)

    def test_registered_with_summary_and_documented_options(self):
        cls = self._host().method(self.method)
        assert cls.summary.strip(), "a method needs a one-line summary"
        if cls.Options is not None and dataclasses.is_dataclass(cls.Options):
            for f in dataclasses.fields(cls.Options):
                assert f.metadata.get("help"), f"option '{f.name}' has no help text"

    @pytest.mark.parametrize("target,bits", [("ort", 8), ("trt", 8), ("trt", 7)])
    def test_output_is_valid_runnable_and_close(self, target: str, bits: int):
        from onnxq.evaluate.metrics import cosine
        from onnxq.runtime.ort import make_session

        if target not in self.targets:
            self._expect_refusal(target, bits)
            return
        result = self._optimize(target, bits)
        onnx.checker.check_model(result.model, full_check=True)
        scales = scales_of(result.model)
        assert scales, "no Q/DQ was inserted"
        for name, s in scales.items():
            assert np.all(np.isfinite(s)) and np.all(s > 0), f"scale {name} is not finite and positive"
        x = _calibration(8, seed=7)[0]
        ref = make_session(residual_concat_model(), "all").run(None, x)[0]
        got = make_session(result.model, "all").run(None, x)[0]
        assert cosine(ref, got) >= (self.min_cosine_int8 if bits == 8 else self.min_cosine_int8 - 0.05)

    def _expect_refusal(self, target: str, bits: int) -> None:
        from onnxq.errors import OnnxqError

        with pytest.raises(OnnxqError) as exc:
            self._optimize(target, bits)
        assert "\n" not in str(exc.value).strip(), "a refusal is one line"

    def test_trt_output_obeys_tensorrt_rules(self):
        from onnxq.graph.trt_rules import check_trt_rules, format_findings

        if "trt" not in self.targets:
            self._expect_refusal("trt", 8)
            return
        findings = [f for f in check_trt_rules(self._optimize("trt", 8).model) if f.severity == "error"]
        assert not findings, format_findings(findings)

    def test_input_model_is_not_modified(self):
        from onnxq.pipeline import optimize

        model = residual_concat_model()
        before = model.SerializeToString()
        optimize(model, method=self.method, options=self.options, data=_calibration(), target="ort", show_progress=False)
        assert model.SerializeToString() == before
