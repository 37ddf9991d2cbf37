"""The pieces: BatchNorm statistics read through folding, distribution correction, the PD loss, the converter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

pytest.importorskip("onnxq_pdquant", reason="onnxq-pdquant is not installed (pip install -e plugins_contrib/onnxq-pdquant)")
torch = pytest.importorskip("torch", reason="pdquant learns with PyTorch (pip install 'onnxq-pdquant[torch]')")

from onnxq.graph.folding import fold_affine  # noqa: E402

ZOO = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "zoo"

from onnxq_pdquant.bn_stats import BNStat, batchnorm_stats  # noqa: E402
from onnxq_pdquant.net import Net  # noqa: E402
from onnxq_pdquant.reconstruct import bn_loss, distribution_correction, pd_kl  # noqa: E402


def _conv_bn_model(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> Conv -> BatchNormalization -> Relu, BatchNorm with non-trivial running statistics."""
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "mu"),
             numpy_helper.from_array(rng.uniform(0.5, 3, 4).astype(np.float32), "var")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mu", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_folded_batchnorm_statistics_map_back_to_the_pre_batchnorm_tensor():
    rng = np.random.default_rng(0)
    m = _conv_bn_model(rng)
    folded, names = fold_affine(m)
    assert names == ["bn"] and not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    stats = batchnorm_stats(m, folded)
    assert list(stats) == ["bn"]  # the folded conv now writes the BatchNorm's output
    s = stats["bn"]
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    inits = {t.name: numpy_helper.to_array(t).copy() for t in m.graph.initializer}
    conv = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(inits["w"]), torch.from_numpy(inits["b"]), padding=1)
    net = Net(list(folded.graph.node)[:1], {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}, [folded.graph.node[0].output[0]])
    y = net({"x": torch.from_numpy(x)})[0][0]
    back = (y - torch.from_numpy(s.shift).float().reshape(1, -1, 1, 1)) * torch.from_numpy(s.gain).float().reshape(1, -1, 1, 1) \
        + torch.from_numpy(s.offset).float().reshape(1, -1, 1, 1)
    np.testing.assert_allclose(back.detach().numpy(), conv.numpy(), rtol=1e-4, atol=1e-4)  # the conv output BatchNorm saw
    np.testing.assert_allclose(s.mean, inits["mu"], rtol=1e-6)
    np.testing.assert_allclose(s.std, np.sqrt(inits["var"]), rtol=1e-6)
    assert batchnorm_stats(m, m)["c"].gain.tolist() == [1.0] * 4  # unfolded: the statistics of its input, as they are


def test_zoo_fixtures_carry_batchnorm_the_working_model_has_folded():
    for name, count in (("mobilenetv3_hswish", 11), ("mnist_norm_resnet", 6)):
        path = ZOO / name / "model.onnx"
        if not path.exists():
            pytest.skip(f"{path} missing")
        m = onnx.load(str(path))
        from onnxq.graph.prepare import constants_to_initializers

        constants_to_initializers(m)
        folded, names = fold_affine(m)
        assert len(batchnorm_stats(m, folded)) == count and len(names) >= count


def test_distribution_correction_moves_block_input_statistics_toward_batchnorm():
    rng = np.random.default_rng(1)
    w = (np.eye(3, dtype=np.float32) * 1.0).reshape(3, 3, 1, 1)
    node = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
    net = Net([node], {"w": w}, ["c"])
    target_mean, target_std = np.array([0.0, 1.0, -1.0]), np.array([1.0, 0.5, 2.0])
    stat = BNStat("bn", "c", target_mean, target_std, np.ones(3), np.zeros(3), np.zeros(3))
    # the "quantized" input: shifted and rescaled away from the statistics BatchNorm expects
    x = torch.from_numpy((rng.standard_normal((64, 3, 6, 6)) * 1.5 + 0.4).astype(np.float32))
    corrected, rep = distribution_correction(net, {"x": x}, [stat], iters=100, lr=2e-2, lambda_c=0.1, batch=32)
    loose, rep_loose = distribution_correction(net, {"x": x}, [stat], iters=100, lr=2e-2, lambda_c=3.0, batch=32)
    # the BatchNorm term goes down; a larger lambda_c (a weaker pull back to x) lets it go down further
    assert rep["bn_loss_after"] < 0.9 * rep["bn_loss_before"], rep
    assert rep_loose["bn_loss_after"] < 0.25 * rep_loose["bn_loss_before"] and rep_loose["bn_loss_after"] < rep["bn_loss_after"], rep_loose
    assert float(bn_loss({"c": corrected["x"]}, [stat])) == pytest.approx(rep["bn_loss_after"], rel=1e-4)
    # the ||x' - x||^2 / lambda_c term keeps the corrected input close to the one it corrects
    assert float((corrected["x"] - x).pow(2).mean()) < float((loose["x"] - x).pow(2).mean())


def test_pd_kl_is_zero_for_equal_logits_and_positive_otherwise():
    z = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    assert float(pd_kl(z, z, 4.0)) == pytest.approx(0.0, abs=1e-6)
    other = z + torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    assert float(pd_kl(z, other, 4.0)) > 1e-4
    assert float(pd_kl(z, other, 1.0)) > float(pd_kl(z, other, 4.0))  # a higher temperature softens the difference


def test_converter_runs_the_mobilenet_fixture_like_onnxruntime():
    import onnxruntime as ort
    from onnxq.graph.prepare import constants_to_initializers

    path = ZOO / "mobilenetv3_hswish" / "model.onnx"
    if not path.exists():
        pytest.skip(f"{path} missing")
    m = onnx.load(str(path))
    constants_to_initializers(m)
    x = np.load(ZOO / "mobilenetv3_hswish" / "calib.npz")["input"][:4]
    consts = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    net = Net([n for n in m.graph.node if n.op_type != "Constant"], consts, [m.graph.output[0].name])
    got = net({"input": torch.from_numpy(x)})[0][0].detach().numpy()
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
