"""PD-Quant end to end on a small conv net with unfolded BatchNorm: both ablation switches run, DC
moves the block inputs' statistics toward the BatchNorm statistics, the PD loss goes down."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("onnxq_pdquant", reason="onnxq-pdquant is not installed (pip install -e plugins_contrib/onnxq-pdquant)")
pytest.importorskip("torch", reason="pdquant learns with PyTorch (pip install 'onnxq-pdquant[torch]')")

import onnxq  # noqa: E402

W4A4 = {"weight_bits": 4, "act_bits": 4, "iters": 40, "dc_iters": 30, "samples": 64}


@pytest.fixture(scope="module")
def runs(small_cnn):
    model = small_cnn(batchnorm=True)
    data = [{"x": np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)}]
    out = {}
    for name, extra in (("full", {}), ("no_pd", {"pd_loss": False}), ("no_dc", {"dc": False}), ("no_qdrop", {"qdrop_prob": 1.0})):
        out[name] = onnxq.optimize(model, method="pdquant", data=data, show_progress=False, options={**W4A4, **extra})
    return out


def test_every_switch_runs_to_a_valid_w4a4_model(runs):
    import onnxruntime as ort

    x = np.random.default_rng(2).standard_normal((4, 3, 8, 8)).astype(np.float32)
    for name, r in runs.items():
        rep = r.report.methods["pdquant"]
        assert rep["weight_bits"] == 4 and rep["act_bits"] == 4 and rep["batchnorm_stats"] == 2, name
        assert rep["dc_applies"] is True and "dc_note" not in rep, name  # statistics there: no "not applicable"
        out = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert out.shape == (4, 5) and np.all(np.isfinite(out)), name
        ints = [numpy_helper.to_array(t) for t in r.model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
        assert ints and all(int(np.abs(q).max()) <= 7 for q in ints), name  # 4-bit weights in int8 storage
        assert not any(n.op_type == "BatchNormalization" for n in r.model.graph.node), name  # folded as usual


def test_dc_moves_block_input_statistics_toward_batchnorm(runs):
    blocks = [b for b in runs["full"].report.methods["pdquant"]["blocks"] if b["batchnorms"]]
    assert len(blocks) == 2
    for b in blocks:
        assert b["bn_loss_after"] < b["bn_loss_before"], b
    assert not any("bn_loss_before" in b for b in runs["no_dc"].report.methods["pdquant"]["blocks"])


def test_pd_loss_goes_down_and_the_switch_removes_it(runs):
    blocks = runs["full"].report.methods["pdquant"]["blocks"]
    kept = [b for b in blocks if b["kept"] == "learned"]
    assert kept, blocks
    assert sum(b["pd_learned"] for b in kept) < sum(b["pd_start"] for b in kept)
    assert all(b["pd_start"] > 0 for b in blocks)
    assert all(b["pd_start"] == 0 and b["pd_learned"] == 0 for b in runs["no_pd"].report.methods["pdquant"]["blocks"])


def test_bad_option_is_a_one_line_error(small_cnn):
    from onnxq.errors import OnnxqError

    with pytest.raises((OnnxqError, ValueError), match="lambda"):
        onnxq.optimize(small_cnn(batchnorm=True), method="pdquant", data=[{"x": np.zeros((2, 3, 8, 8), np.float32)}], show_progress=False, options={"lambda_r": 0})


def test_8bit_activation_defaults_and_the_dc_gate(runs, small_cnn):
    """At 8-bit activations: QDrop and DC off, p = 2.4 weight steps, blocks cut before a global
    pooling (README, differences from the paper); below 8 bits the paper's settings. The DC gate
    uses a block's DC target only where its prediction difference is within dc_gate x the start's."""
    model = small_cnn(batchnorm=True)
    data = [{"x": np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)}]
    a4 = runs["full"].report.methods["pdquant"]
    assert (a4["qdrop_prob"], a4["weight_init_p"], a4["dc"], a4["cut_pooling"]) == (0.5, 2.0, True, False)
    assert all(b["dc_used"] for b in a4["blocks"] if b["batchnorms"])
    assert a4["blocks"][-1]["block"][0] == "fc"  # the pooling stays in the block before the Gemm
    a8 = {**W4A4, "act_bits": 8, "iters": 20}
    rep = onnxq.optimize(model, method="pdquant", data=data, show_progress=False, options=a8).report.methods["pdquant"]
    assert (rep["qdrop_prob"], rep["weight_init_p"], rep["dc"], rep["cut_pooling"]) == (1.0, 2.4, False, True)
    assert not any("dc_used" in b for b in rep["blocks"])
    assert rep["blocks"][-1]["block"][:3] == ["gap", "flat", "fc"] and rep["blocks"][-2]["block"][-1] == "l1_relu"
    # explicit options win over the bits-dependent defaults; the gate's decision is the comparison it documents
    for gate in (1.0, 1e-9):
        r = onnxq.optimize(model, method="pdquant", data=data, show_progress=False, options={**a8, "dc": True, "dc_gate": gate}).report.methods["pdquant"]
        bn_blocks = [b for b in r["blocks"] if b["batchnorms"]]
        assert r["dc"] is True and len(bn_blocks) == 2
        for b in bn_blocks:
            assert b["kl_dc_target"] > 0 and b["kl_start"] > 0
            assert b["dc_used"] == (b["kl_dc_target"] <= gate * b["kl_start"]), b
        if gate < 1e-6:
            assert not any(b["dc_used"] for b in bn_blocks)


def test_activation_step_learning_rate_is_lower_below_8bit_activations(runs, small_cnn):
    """Below 8-bit activations the steps are learned at lr 3e-4 (README, "mnist_norm_resnet against
    BRECQ"), at 8 bits at 1e-3; explicit act_lr wins. The steps then move measurably less than
    at 1e-3 on the same data, and still move."""
    model = small_cnn(batchnorm=True)
    data = [{"x": np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)}]
    a4 = runs["full"].report.methods["pdquant"]
    assert a4["act_lr"] == pytest.approx(3e-4)
    fast = onnxq.optimize(model, method="pdquant", data=data, show_progress=False, options={**W4A4, "act_lr": 1e-3}).report.methods["pdquant"]
    assert fast["act_lr"] == pytest.approx(1e-3)

    def moved(rep) -> float:
        changes = [abs(np.log(c)) for b in rep["blocks"] for c in b.get("step_change", {}).values()]
        assert changes, "no block kept its learned steps"
        return max(changes)

    slow_move, fast_move = moved(a4), moved(fast)
    assert 0 < slow_move < 0.6 * fast_move, (slow_move, fast_move)
    a8 = onnxq.optimize(model, method="pdquant", data=data, show_progress=False, options={**W4A4, "act_bits": 8, "iters": 20}).report.methods["pdquant"]
    assert a8["act_lr"] == pytest.approx(1e-3)
