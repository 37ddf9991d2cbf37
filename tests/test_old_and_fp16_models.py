"""Models the prepare step used to mishandle (issue 16): old IR/opset files and fp16 models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import make_tiny_conv_model, make_tiny_feeds, ort_session
from onnxq.graph import prepare


def _opset7_ir3(path: Path) -> Path:
    """The tiny conv model as an IR 3 / opset 7 file (IR 3 lists every initializer as a graph input)."""
    m = make_tiny_conv_model()
    m.opset_import[0].version = 7
    m.ir_version = 3
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(m)
    onnx.save_model(m, str(path))
    return path


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_upgrade_opset_raises_the_ir_version_with_it(tmp_path):
    m = onnx.load(str(_opset7_ir3(tmp_path / "m.onnx")))
    up = prepare.upgrade_opset(m, 13)
    assert prepare.default_opset(up) == 13
    assert up.ir_version >= 7  # IR 7 is the first to know opset 13
    onnx.checker.check_model(up)


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_opset7_ir3_model_quantizes_for_both_targets(target, run_cli, tiny_data_dir, tmp_path):
    model = _opset7_ir3(tmp_path / "old.onnx")
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(["optimize", model, "--data", tiny_data_dir, "--target", target, "-p", "minmax",
                            "--output", out, "--no-cache", "--quiet"])
    assert code == 0, err
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    x = np.concatenate([f["x"] for f in make_tiny_feeds(seed=7)])
    ref = ort_session(model).run(None, {"x": x})[0]
    got = ort_session(out).run(None, {"x": x})[0]
    assert _cosine(ref, got) > 0.99
