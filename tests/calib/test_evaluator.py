"""GraphRunner: running stretches of nodes as one session gives the node-by-node values exactly."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.calib.evaluator import GraphRunner
from onnxq.calib.samples import take_samples
from onnxq.plugins.minmax import MinMax

DIGITS = "examples/digits/model.onnx"
CALIB = "examples/digits/calib"


@pytest.fixture(scope="module", params=[("ort", 8), ("trt", 7)], ids=["ort-int8", "trt-int7"])
def captured(request):
    """The RunContext of a real minmax run (plan with calibrated qparams), captured in refine."""
    from onnxq.pipeline import optimize

    target, bits = request.param
    seen = {}
    mp = pytest.MonkeyPatch()
    mp.setattr(MinMax, "refine", lambda self, ctx: seen.setdefault("ctx", ctx), raising=False)
    try:
        optimize(DIGITS, method="minmax", data=CALIB, target=target, bits=bits, show_progress=False)
    finally:
        mp.undo()
    return seen["ctx"]


def _all_values(ctx, segments: bool, plan: bool) -> dict[str, np.ndarray]:
    chunks = take_samples(ctx, 24)
    run = GraphRunner(ctx.model, chunks, ctx.plan if plan else None)
    if not segments:
        run._in_segment = lambda node: node.name in run._const_nodes  # the node-by-node path
    out = {}
    last = len(run.nodes) - 1
    for i in [*range(2, last, 3), last]:  # stretches of three nodes; values are read in between
        run.run_to(i)
        out.update({k: np.concatenate(v) for k, v in run.values.items()})
    assert any(isinstance(k, tuple) for k in run.sessions) == segments  # which path really ran
    return out


@pytest.mark.parametrize("plan", [True, False], ids=["quantized", "float"])
def test_segments_match_node_by_node(captured, plan):
    ref = _all_values(captured, segments=False, plan=plan)
    got = _all_values(captured, segments=True, plan=plan)
    common = set(ref) & set(got)
    assert len(common) >= 5
    for name in common:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    # the fake quantization is really applied: the quantized run differs from the float one
    if plan:
        flt = _all_values(captured, segments=True, plan=False)
        out = captured.model.graph.output[0].name
        assert not np.array_equal(got[out], flt[out])
