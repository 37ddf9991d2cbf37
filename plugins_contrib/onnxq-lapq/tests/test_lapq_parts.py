"""Unit tests: Lp clips, the scales-as-inputs loss model against the real QDQ model, the losses."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxq_lapq", reason="onnxq-lapq is not installed (pip install -e plugins_contrib/onnxq-lapq)")
pytest.importorskip("scipy", reason="lapq needs scipy")

from onnxq.calib.statistics import TensorStats  # noqa: E402
from onnxq.graph.targets import get_profile  # noqa: E402

from onnxq_lapq.clips import act_lp_clip, act_qparams, weight_lp_steps  # noqa: E402
from onnxq_lapq.loss_model import task_loss  # noqa: E402


def _stats(x: np.ndarray, bins: int = 512) -> TensorStats:
    amax = float(np.abs(x).max())
    hist, _ = np.histogram(x, bins=2 * bins, range=(-amax, amax))
    return TensorStats(float(x.min()), float(x.max()), x.size, hist)


def test_higher_p_clips_wider_on_heavy_tails():
    x = np.random.default_rng(0).standard_t(3, 20000).astype(np.float32)
    prof = get_profile("trt")
    a2, a4 = act_lp_clip(_stats(x), 2.0, prof, 4), act_lp_clip(_stats(x), 4.0, prof, 4)
    assert 0 < a2 < a4 < np.abs(x).max()


def test_act_qparams_keep_8bit_storage_below_the_target_bits():
    q = act_qparams(get_profile("ort"), 0.0, 6.0, 4)
    assert (q.dtype, q.qmin, q.qmax) == ("uint8", 0, 15) and q.narrowed
    q = act_qparams(get_profile("trt"), -3.0, 3.0, 4)
    assert (q.dtype, q.qmin, q.qmax) == ("int8", -7, 7)
    assert act_qparams(get_profile("trt"), -3.0, 3.0, 8) == get_profile("trt").activation_qparams(-3.0, 3.0)


def test_weight_lp_steps_beat_maxabs_in_lp():
    w = np.random.default_rng(1).standard_t(3, (5, 64))
    s = weight_lp_steps(w, 0, -7, 7, 2.0)
    mx = np.abs(w).max(1) / 7
    err = lambda st: ((np.clip(np.rint(w / st[:, None]), -7, 7) * st[:, None] - w) ** 2).sum(1)  # noqa: E731
    assert np.all(err(s) <= err(mx) * (1 + 1e-9)) and np.all(s <= mx * (1 + 1e-9))


def test_losses():
    ref = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    assert task_loss("kl", ref, ref, None) == pytest.approx(0.0, abs=1e-12)
    assert task_loss("kl", ref[::-1], ref, None) > 0
    assert task_loss("ce", ref, ref, np.array([0, 1])) < task_loss("ce", ref, ref, np.array([2, 0]))
    assert task_loss("mse", ref + 1, ref, None) == pytest.approx(1.0)
    assert task_loss("kl", ref * np.nan, ref, None) == float("inf")


def test_loss_model_computes_what_the_exported_qdq_model_computes(lapq_fixture):
    """The session with qparams as inputs gives the exported QDQ model's outputs for the same qparams."""
    import onnxruntime as ort

    import onnxq

    from onnxq_lapq.loss_model import LossModel

    f = lapq_fixture
    captured = {}

    class Capture(onnxq.method.QuantMethod):
        name = "capture"
        summary = "test: capture the final plan"

        def refine(self, ctx):
            captured["ctx"] = ctx

    from onnxq.host import Host

    host = Host()
    host.register_module("capture", type("M", (), {"register_methods": staticmethod(onnxq.hookspecs.hookimpl(lambda register: register(Capture)))}))
    composed = onnxq.optimize(f["model"], method=["lapq", "capture"], data=f["calib"], target="ort", show_progress=False, host=host,
                              options={"lapq.weight_bits": 4, "lapq.act_bits": 4, "lapq.p_points": 2, "lapq.max_evals": 40})
    assert composed.report.methods["lapq"]["powell_evaluations"] <= 40
    ctx = captured["ctx"]
    lm = LossModel(ctx.model, ctx.plan, [{"input": f["x"]}], None, "kl", int32_bias=ctx.profile.int32_bias)
    got = lm.output({t: s.qparams for t, s in ctx.plan.activations.items()}, {k: s.qparams for k, s in ctx.plan.weights.items()})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(composed.model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"input": f["x"]})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_weight_only_bits_4_is_refused_with_the_working_alternative(lapq_fixture):
    import onnxq
    from onnxq.errors import OptionError

    f = lapq_fixture
    with pytest.raises(OptionError, match="-o weight_bits 4"):
        onnxq.optimize(f["model"], method="lapq", data=f["calib"], bits=4, show_progress=False)
