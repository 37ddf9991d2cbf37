"""PD-Quant on a model whose BatchNorms the exporter already folded (as tests/fixtures/zoo/imagenet_norm_cnn):
there are no BatchNorm statistics, so distribution correction does not apply. The run must work, say so in
the report and the log, and give exactly the ``-o dc false`` result (DC must not do anything else)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("onnxq_pdquant", reason="onnxq-pdquant is not installed (pip install -e plugins_contrib/onnxq-pdquant)")
pytest.importorskip("torch", reason="pdquant learns with PyTorch (pip install 'onnxq-pdquant[torch]')")

import onnxq  # noqa: E402

W4A4 = {"weight_bits": 4, "act_bits": 4, "iters": 30, "dc_iters": 20, "samples": 64}


def test_dc_is_reported_not_applicable_and_changes_nothing_without_batchnorm(caplog, small_cnn):
    import onnxruntime as ort

    model = small_cnn(batchnorm=False)
    data = [{"x": np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)}]
    with caplog.at_level(logging.WARNING, logger="onnxq_pdquant"):
        on = onnxq.optimize(model, method="pdquant", data=data, show_progress=False, options=W4A4)  # DC on by default at A4
    off = onnxq.optimize(model, method="pdquant", data=data, show_progress=False, options={**W4A4, "dc": False})

    rep = on.report.methods["pdquant"]
    assert rep["dc"] is True and rep["batchnorm_stats"] == 0 and rep["dc_applies"] is False
    assert "not applicable" in rep["dc_note"]
    assert any("not applicable" in r.getMessage() for r in caplog.records if r.name == "onnxq_pdquant")
    assert "dc_note" not in off.report.methods["pdquant"]  # -o dc false asked for nothing that cannot apply
    assert rep["blocks"] and not any("bn_loss_before" in b or "dc_used" in b for b in rep["blocks"])
    assert any(b["kept"] == "learned" for b in rep["blocks"])  # the reconstruction itself still ran

    # no hidden effect: the same seeds give exactly the -o dc false model
    a = {t.name: numpy_helper.to_array(t) for t in on.model.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in off.model.graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    x = np.random.default_rng(2).standard_normal((16, 3, 8, 8)).astype(np.float32)
    z = ort.InferenceSession(on.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    z_fp = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert z.shape == (16, 5) and np.all(np.isfinite(z))
    ints = [numpy_helper.to_array(t) for t in on.model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert ints and all(int(np.abs(q).max()) <= 7 for q in ints)  # 4-bit weights in int8 storage
    # a W4A4 copy of the network, not noise: most top-1 decisions kept on these random inputs
    assert np.mean(z.argmax(1) == z_fp.argmax(1)) >= 0.6
