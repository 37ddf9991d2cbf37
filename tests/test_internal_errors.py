"""A model onnxq (or a method plugin) built that does not load or run is a bug: exit code 4, never the user's exit 1.

The float model loaded and ran before quantization, so when the quantized one does not, the input
was not at fault: a deployment script reading exit 1 ("fix your model or data") would look in the
wrong place. The broken models here are real ONNX that ONNX Runtime refuses at load: an int16 ``Relu``,
which the ONNX checker accepts and ONNX Runtime has no CPU kernel for.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

import onnxq
from onnxq.errors import InternalError, OnnxqError
from onnxq.method import RangeMethod
from onnxq.pipeline import stages


def _with_int16_relu(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its output passed through Cast(int16) → Relu → Cast(float): valid ONNX that ONNX Runtime cannot load."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    g = broken.graph
    out = g.output[0].name
    for n in g.node:
        for i, name in enumerate(n.output):
            if name == out:
                n.output[i] = "pre_out"
    g.node.extend([
        helper.make_node("Cast", ["pre_out"], ["as_i16"], to=TensorProto.INT16),
        helper.make_node("Relu", ["as_i16"], ["relu_i16"]),
        helper.make_node("Cast", ["relu_i16"], [out], to=TensorProto.FLOAT),
    ])
    onnx.checker.check_model(broken)  # the checker accepts it: only ONNX Runtime refuses it
    return broken


class BrokenRewrite(RangeMethod):
    """A method whose qdq_rewrite returns a model ONNX Runtime cannot load (a plugin's bug)."""

    name = "broken-rewrite"
    summary = "test plugin: a qdq_rewrite that breaks the model"
    needs_histogram = False

    def threshold(self, stats, ctx) -> float:
        return stats.amax

    def qdq_rewrite(self, ctx, model):
        return _with_int16_relu(model)


def test_a_methods_broken_rewrite_is_an_internal_error_naming_the_method(tiny_model, tiny_feeds, host_with):
    with pytest.raises(InternalError) as info:
        onnxq.optimize(tiny_model, method="broken-rewrite", data=tiny_feeds, host=host_with(BrokenRewrite),
                       show_progress=False, cache_dir=None)
    assert not isinstance(info.value, OnnxqError)  # not reported as the user's error
    assert "method 'broken-rewrite'" in str(info.value) and "\n" not in str(info.value)


def test_a_quantized_model_that_does_not_load_fails_validation_as_internal(tiny_model, tiny_feeds):
    run = types.SimpleNamespace(quantized=_with_int16_relu(tiny_model), first=types.SimpleNamespace(feeds=tiny_feeds[0]),
                                inputs=[])
    with pytest.raises(InternalError) as info:
        stages.validate(run)
    assert "the quantized model onnxq built" in str(info.value)
    stages.validate(types.SimpleNamespace(quantized=tiny_model, first=run.first, inputs=[]))  # a loadable model passes


def test_the_command_exits_4_with_one_line_for_an_internal_error(tmp_path, tiny_model_path, tiny_data_dir):
    """The CLI's mapping, through a real `onnxq optimize` with the broken method registered in-process."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import types
        import onnxq.host
        from onnxq.hookspecs import hookimpl
        from test_internal_errors import BrokenRewrite

        @hookimpl
        def register_methods(register):
            register(BrokenRewrite)

        module = types.ModuleType("broken_rewrite_plugin")
        module.register_methods = register_methods
        onnxq.host.get_host().register_module("broken-rewrite", module)
        from onnxq.cli.main import main
        main()
    """))
    r = subprocess.run([sys.executable, str(script), "optimize", str(tiny_model_path), "-p", "broken-rewrite",
                        "--data", str(tiny_data_dir), "--output", str(tmp_path / "q.onnx")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 4, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("onnxq: internal error:") and "broken-rewrite" in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "q.onnx").exists()
