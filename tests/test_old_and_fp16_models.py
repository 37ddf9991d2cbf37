"""Models the prepare step used to mishandle (issue 16): old IR/opset files and fp16 models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxq.graph import prepare
from onnxq.graph.trt_rules import check_trt_rules

import importlib.util as _ilu

# the suite loads several conftest.py files as "conftest" (the contrib packages' too), so this
# module reads the helpers from tests/conftest.py by path
_spec = _ilu.spec_from_file_location("onnxq_tests_helpers", Path(__file__).resolve().parent / "conftest.py")
_helpers = _ilu.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)  # type: ignore[union-attr]
make_tiny_conv_model = _helpers.make_tiny_conv_model
make_tiny_feeds = _helpers.make_tiny_feeds
ort_session = _helpers.ort_session


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


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with float16 weights, inputs and outputs (what fp16 GPU exports look like)."""
    from onnx import TensorProto, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in [*m.graph.input, *m.graph.output]:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    del m.graph.value_info[:]
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.fixture
def digits16(tmp_path, digits_model, digits_calib_feeds) -> tuple[Path, Path]:
    model = tmp_path / "digits16.onnx"
    onnx.save_model(_to_fp16(onnx.load(str(digits_model))), str(model))
    data = tmp_path / "calib16"
    data.mkdir()
    for i, f in enumerate(digits_calib_feeds):
        np.savez(data / f"c{i:03d}.npz", input=f["input"].astype(np.float16))
    return model, data


@pytest.mark.parametrize("method", ["minmax", "trt-entropy"])
def test_fp16_conv_model_quantizes_for_trt_and_keeps_accuracy(method, digits16, digits_eval_arrays, run_cli, tmp_path):
    """Issue 16: an fp16 model with fp16 data built an invalid QDQ graph (QuantizeLinear on float16)."""
    model, data = digits16
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(["optimize", model, "--data", data, "--target", "trt", "-p", method, "--output", out, "--no-cache", "--quiet"])
    assert code == 0, err
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    assert prepare.default_opset(q) >= 19  # float16 Q/DQ
    scales = {t.name: t.data_type for t in q.graph.initializer}
    qs = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) >= 4 and all(scales[n.input[1]] == onnx.TensorProto.FLOAT16 for n in qs)
    assert check_trt_rules(q) == []  # TensorRT's explicit-quantization rules hold for the float16 graph too
    x, y = digits_eval_arrays
    x16 = x.astype(np.float16)
    ref = ort_session(model).run(None, {"input": x16})[0].astype(np.float32)
    got = ort_session(out).run(None, {"input": x16})[0].astype(np.float32)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert _cosine(ref, got) > 0.99
    acc_fp16, acc_q = float((ref.argmax(1) == y).mean()), float((got.argmax(1) == y).mean())
    assert acc_q >= acc_fp16 - 0.02, (acc_q, acc_fp16)


@pytest.mark.parametrize("target", ["ort", "ort-s8"])
def test_fp16_model_for_ort_targets_is_one_clear_line(target, digits16, run_cli, tmp_path):
    model, data = digits16
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(["optimize", model, "--data", data, "--target", target, "--output", out, "--no-cache", "--quiet"])
    assert code == 1, err
    assert err.splitlines() == [f"onnxq: error: float16 models are not supported for --target {target} yet (ONNX Runtime's integer "
                                "kernels take float32 models): quantize the float32 model, or use --target trt"]
    assert not out.exists()
