"""The QDQ transformer: valid graphs, exact numerics, conflicts detected, inputs untouched."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxq.errors import PlanConflictError
from onnxq.graph.qdq import QuantizeActivation, QuantizeWeight, apply_commands
from onnxq.qparams import asymmetric, per_channel_absmax, symmetric

from onnxq.testing.models import residual_concat_model


def run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_weight_and_activation_commands_build_a_valid_runnable_graph():
    m = residual_concat_model()
    before = m.SerializeToString()
    w1 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w1"))
    cmds = [
        QuantizeActivation("x", symmetric(3.0, 8, narrow=False), (("conv1", 0),)),
        QuantizeWeight("w1", symmetric(per_channel_absmax(w1, 0), 8, True, 0), (("conv1", 1),)),
    ]
    q = apply_commands(m, cmds)
    assert m.SerializeToString() == before  # input model untouched
    onnx.checker.check_model(q, full_check=True)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2
    assert "w1" not in {t.name for t in q.graph.initializer}  # float weight dropped
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    y_fp, y_q = run(m, x), run(q, x)
    assert np.abs(y_fp - y_q).max() < 0.1 * np.abs(y_fp).max()


def test_int7_activation_gets_a_clip():
    m = residual_concat_model()
    q = apply_commands(m, [QuantizeActivation("x", symmetric(2.0, 7, narrow=True), (("conv1", 0),))])
    clip = next(n for n in q.graph.node if n.op_type == "Clip")
    lo = numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == clip.input[1]))
    assert float(lo) == pytest.approx(-2.0, rel=1e-6)
    x = np.full((1, 3, 8, 8), 100.0, np.float32)
    assert np.isfinite(run(q, x)).all()


def test_conflicting_commands_name_both_origins():
    m = residual_concat_model()
    a = QuantizeActivation("x", symmetric(3.0, 8, False), (("conv1", 0),), origin="one")
    b = QuantizeActivation("x", asymmetric(-3.0, 3.0, 8), (("conv1", 0),), origin="two")
    with pytest.raises(PlanConflictError, match="one.*two"):
        apply_commands(m, [a, b])


def test_identical_commands_merge():
    m = residual_concat_model()
    a = QuantizeActivation("a", symmetric(3.0, 8, False), (("conv2", 0),), origin="one")
    b = QuantizeActivation("a", symmetric(3.0, 8, False), (("add", 1),), origin="two")
    q = apply_commands(m, [a, b])
    assert [n.op_type for n in q.graph.node].count("QuantizeLinear") == 1
    add = next(n for n in q.graph.node if n.name == "add")
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    assert add.input[1] == conv2.input[0] != "a"


def test_graph_output_name_is_preserved():
    m = residual_concat_model()
    q = apply_commands(m, [QuantizeActivation("flat", symmetric(3.0, 8, False), (("fc", 0),))])
    assert [o.name for o in q.graph.output] == ["logits"]
    # topological order holds: every input is produced before use
    seen = {i.name for i in q.graph.input} | {t.name for t in q.graph.initializer}
    for n in q.graph.node:
        assert all(i in seen for i in n.input if i)
        seen.update(n.output)
