"""Unit tests of the pieces: block discovery, the ONNX→torch converter, AdaRound's variables."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxq_brecq", reason="onnxq-brecq is not installed (pip install -e plugins_contrib/onnxq-brecq)")

from onnxq.graph.edit import name_nodes  # noqa: E402
from onnxq.testing.models import residual_concat_model  # noqa: E402

from onnxq_brecq.blocks import find_blocks  # noqa: E402
from onnxq_brecq.grid import lp_steps, maxabs_steps  # noqa: E402


def _model(path=None) -> onnx.ModelProto:
    m = onnx.load(str(path)) if path else residual_concat_model()
    name_nodes(m)
    return m


def _weighted(m) -> set[str]:
    return {n.name for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}


def test_blocks_cut_at_articulation_tensors():
    m = _model()
    blocks = find_blocks(m, _weighted(m))
    assert [b.learnable for b in blocks] == [["conv1"], ["conv2"], ["conv3", "conv4"], ["conv5"], ["fc"]]  # the Concat output is a cut too
    assert blocks[1].inputs == ["a"] and blocks[1].outputs == ["r"]  # conv2 + the residual Add
    assert blocks[2].inputs == ["r"] and blocks[-1].outputs == ["logits"]
    assert sum(len(b.nodes) for b in blocks) == len(m.graph.node)


def test_layer_blocks_take_the_following_relu():
    m = _model()
    blocks = find_blocks(m, _weighted(m), "layer")
    assert [b.names for b in blocks][0] == ["conv1", "relu1"] and len(blocks) == 6


def test_fixture_blocks_are_the_residual_blocks(brecq_fixture):
    m = _model(brecq_fixture["model"])
    assert [len(b.learnable) for b in find_blocks(m, _weighted(m))] == [1, 2, 2, 2, 1]


def test_lp_init_never_worse_than_maxabs_in_lp():
    w = np.random.default_rng(0).standard_t(3, (6, 40)).astype(np.float64)
    lp, mx = lp_steps(w, 0, -7, 7).astype(np.float64), maxabs_steps(w, 0, 7).astype(np.float64)
    err = lambda s: (np.abs(np.clip(np.rint(w / s[:, None]), -7, 7) * s[:, None] - w) ** 2.4).sum(1)  # noqa: E731
    assert np.all(lp <= mx * (1 + 1e-6)) and np.all(err(lp) <= err(mx) * (1 + 1e-5)) and np.any(err(lp) < 0.99 * err(mx))


def test_torch_block_matches_onnxruntime_in_float():
    torch = pytest.importorskip("torch")
    from onnxq_brecq.torch_graph import TorchBlock

    m = _model()
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    tb = TorchBlock(list(m.graph.node), consts, {}, {}, {}, ["logits"])
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    import onnxruntime as ort

    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = tb({"x": torch.from_numpy(x)})[0].detach().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_adaround_starts_at_the_float_weight_and_hardens_to_floor_or_ceil():
    torch = pytest.importorskip("torch")
    from onnxq_brecq.grid import weight_qparams
    from onnxq_brecq.torch_graph import AdaRoundWeight

    w = np.random.default_rng(2).standard_normal((4, 9)).astype(np.float32)
    q = weight_qparams(maxabs_steps(w, 0, 7), 0, -7, 7)
    m = AdaRoundWeight(w, q)
    np.testing.assert_allclose(m().detach().numpy(), w, atol=2e-4 * float(q.scale.max()) * 10)
    with torch.no_grad():
        m.v.normal_(0, 3)
    ints = m.integers("hard")
    assert set(np.unique(m.h().detach().numpy() if m.mode == "hard" else (m.v >= 0).numpy().astype(float))) <= {0.0, 1.0}
    s = q.scale[:, None]
    assert np.all((ints == np.floor(w / s)) | (ints == np.floor(w / s) + 1) | (ints == -7) | (ints == 7))
    m.mode = "hard"
    assert set(np.unique(m.h().detach().numpy())) <= {0.0, 1.0}
    np.testing.assert_array_equal(m.integers("nearest"), q.quantize(w))


def test_without_torch_learned_rounding_names_the_extra(monkeypatch, brecq_fixture):
    import sys

    import onnxq
    from onnxq.errors import OnnxqError

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    f = brecq_fixture
    with pytest.raises(OnnxqError, match=r"onnxq-brecq\[torch\]"):
        onnxq.optimize(f["model"], method="brecq", data=f["calib"], show_progress=False, options={"weight_bits": 4})
    res = onnxq.optimize(f["model"], method="brecq", data=f["calib"], show_progress=False, options={"weight_bits": 4, "rounding": "nearest"})
    assert res.report.methods["brecq"]["rounding"] == "nearest"


def test_per_layer_mode_runs_and_reports_every_layer(brecq_fixture):
    pytest.importorskip("torch")
    import onnxq

    f = brecq_fixture
    res = onnxq.optimize(f["model"], method="brecq", data=f["calib"], show_progress=False,
                         options={"weight_bits": 4, "blocks": "layer", "iters": 20, "samples": 64})
    blocks = res.report.methods["brecq"]["blocks"]
    assert [len(b["layers"]) for b in blocks] == [1] * 8
    assert all(b["loss_learned"] <= b["loss_nearest"] for b in blocks)


def test_weight_only_bits_4_is_refused_with_the_working_alternative(brecq_fixture):
    import onnxq
    from onnxq.errors import OptionError

    f = brecq_fixture
    with pytest.raises(OptionError, match="-o weight_bits 4"):
        onnxq.optimize(f["model"], method="brecq", data=f["calib"], bits=4, show_progress=False)


def test_block_with_an_unknown_op_falls_back_to_layers(monkeypatch):
    pytest.importorskip("torch")
    import onnxq
    from onnxq_brecq import torch_graph

    monkeypatch.delitem(torch_graph.OPS, "Concat")  # the [conv3, conv4, concat] block cannot run in torch
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float32)}]
    res = onnxq.optimize(residual_concat_model(), method="brecq", data=data, show_progress=False, options={"iters": 10})
    blocks = res.report.methods["brecq"]["blocks"]
    fallback = [b for b in blocks if "fallback" in b]
    assert len(fallback) == 1 and fallback[0]["fallback"].startswith("per-layer (op Concat")
    learned = [l for b in blocks for l in b.get("layers", [])]
    assert {"conv3", "conv4"} <= set(learned) and len(learned) == 6
