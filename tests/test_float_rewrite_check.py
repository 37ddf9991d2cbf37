"""The host's float-rewrite check tolerates float32 rounding (scaled by the model's own noise floor)
but still stops a method whose float rewrite is wrong, even slightly (issue 15 follow-up)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxq
from onnxq.calib.readers import Batch
from onnxq.errors import ModelError
from onnxq.host import get_host
from onnxq.method import QuantMethod, RunContext
from onnxq.pipeline.checks import FLOAT_REWRITE_CEILING, check_float_rewrite, float_noise_floor

ZOO = Path(__file__).resolve().parent / "fixtures" / "zoo"
sys.path.insert(0, str(ZOO))
import zoo  # noqa: E402


def _scaled_channel(model: onnx.ModelProto, which: float, factor: float) -> onnx.ModelProto:
    """``model`` with output channel 0 of one conv (``which``: 0 first ... 1 last) scaled by ``factor``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    convs = [n for n in out.graph.node if n.op_type == "Conv" and n.input[1] in inits]
    t = inits[convs[round(which * (len(convs) - 1))].input[1]]
    w = numpy_helper.to_array(t).copy()
    w[0] *= np.float32(factor)
    t.CopyFrom(numpy_helper.from_array(w, t.name))
    return out


class WrongChannelScale(QuantMethod):
    """Test method: a 'float rewrite' that is wrong by 0.1% on one channel of a middle conv."""

    name = "wrong-channel-scale"
    summary = "test: a slightly wrong float rewrite"

    def float_rewrite(self, ctx: RunContext) -> onnx.ModelProto:
        return _scaled_channel(ctx.model, 0.5, 1.001)



def test_a_slightly_wrong_float_rewrite_stops_the_run(host_with) -> None:
    fx = zoo.FIXTURES["mnist_norm_resnet"]
    host = host_with(WrongChannelScale, get_host().method("minmax"))
    feeds = [{k: v[:16] for k, v in zoo.load_npz(fx.calib).items()}]
    with pytest.raises(ModelError, match=r"method 'wrong-channel-scale' changed the float model's outputs .*this is a bug"):
        onnxq.optimize(str(fx.model), method=["minmax", "wrong-channel-scale"], data=feeds,
                       host=host, show_progress=False, cache_dir=None)


@pytest.mark.parametrize("which", [0.0, 0.5, 1.0])
def test_the_noise_floor_stays_far_below_small_bugs(which: float) -> None:
    """On a real fixture the float32 noise floor is small and a 0.1% change of one channel is
    caught wherever it is, with the tolerance the check would use; the model itself passes."""
    fx = zoo.FIXTURES["mnist_norm_resnet"]
    model = onnx.load(str(fx.model))
    feeds = {k: v[:16] for k, v in zoo.load_npz(fx.calib).items()}
    batch = Batch(feeds=feeds)
    noise = float_noise_floor(model, batch)
    assert 0.0 <= noise < FLOAT_REWRITE_CEILING / 100
    check_float_rewrite("identity", model, model, batch)  # no change: passes
    with pytest.raises(ModelError, match="this is a bug"):
        check_float_rewrite("bug", model, _scaled_channel(model, which, 1.001), batch)
