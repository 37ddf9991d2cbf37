"""Loading and saving: external data, refused paths, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.errors import ModelError, OutputError
from onnxq.graph.model_io import ensure_output_path, load_model, model_size_bytes, save_model_atomic


def small_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_external_data_roundtrip(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(small_model(), str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    m = load_model(path)
    assert numpy_helper.to_array(m.graph.initializer[0]).sum() == np.arange(4096).sum()
    assert model_size_bytes(path) > 4096 * 4


def test_external_data_outside_the_folder_is_refused(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    path = inner / "m.onnx"
    onnx.save_model(small_model(), str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    m = onnx.load(str(path), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "../secret.data"
    (tmp_path / "secret.data").write_bytes(b"\0" * 16384)
    with open(path, "wb") as fh:
        fh.write(m.SerializeToString())
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(path)


def test_missing_external_data_is_a_clear_error(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(small_model(), str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    os.unlink(tmp_path / "m.data")
    with pytest.raises(ModelError, match="missing"):
        load_model(path)


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all", None])
def test_bad_files(tmp_path, content):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError):
        load_model(path)


def test_atomic_save_leaves_no_temp_files(tmp_path):
    out = save_model_atomic(small_model(), tmp_path / "out.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    assert load_model(out).graph.node[0].op_type == "MatMul"


def test_output_path_rules(tmp_path):
    src = tmp_path / "in.onnx"
    src.write_bytes(b"x")
    with pytest.raises(OutputError, match="input"):
        ensure_output_path(src, [src], force=True)
    existing = tmp_path / "out.onnx"
    existing.write_bytes(b"y")
    with pytest.raises(OutputError, match="exists"):
        ensure_output_path(existing, [src], force=False)
    assert ensure_output_path(existing, [src], force=True) == existing
    # a missing output folder is created when the model is saved
    assert ensure_output_path(tmp_path / "new" / "o.onnx", [src], force=False).parent.name == "new"


def test_saved_model_gets_the_umask_permissions(tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        out = save_model_atomic(small_model(), tmp_path / "perm.onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
