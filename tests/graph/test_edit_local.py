"""The graph layer's local edits: insertion after producers, node replacement, probe outputs,
written-back initializers, and a cleanup that keeps every node."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxq.graph import edit


def _chain() -> onnx.ModelProto:
    """x -> Relu(a) -> Neg(b) -> y, a Mul reading the initializer w that nothing else reads, and an unread initializer."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Neg", ["a"], ["b"], name="neg"),
        helper.make_node("Identity", ["b"], ["y"], name="out"),
        helper.make_node("Mul", ["x", "w"], ["dead"], name="dead_mul"),
    ]
    inits = [numpy_helper.from_array(np.full(3, 2, np.float32), "w"), numpy_helper.from_array(np.ones(3, np.float32), "unread")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_insert_after_producers_places_each_node_after_its_latest_input() -> None:
    m = _chain()
    probes = [
        helper.make_node("Abs", ["b"], ["b_abs"], name="p_b"),
        helper.make_node("Abs", ["x"], ["x_abs"], name="p_x"),  # graph input only: to the front
        helper.make_node("Abs", ["a"], ["a_abs"], name="p_a"),
        helper.make_node("Neg", ["a_abs"], ["a_neg"], name="p_a2"),  # reads an inserted node: right after it
    ]
    edit.insert_after_producers(m.graph, probes)
    assert [n.name for n in m.graph.node] == ["p_x", "relu", "p_a", "p_a2", "neg", "p_b", "out", "dead_mul"]


def test_replace_nodes_keeps_the_place() -> None:
    m = _chain()
    edit.replace_nodes(m.graph, {"neg": [helper.make_node("Neg", ["a"], ["n1"], name="n1"), helper.make_node("Identity", ["n1"], ["b"], name="n2")]})
    assert [n.name for n in m.graph.node] == ["relu", "n1", "n2", "out", "dead_mul"]


def test_with_outputs_exposes_tensors_on_a_copy() -> None:
    m = _chain()
    probe = edit.with_outputs(m, [("a", TensorProto.FLOAT), ("b", TensorProto.FLOAT)])
    assert [o.name for o in probe.graph.output] == ["a", "b"]
    assert [o.name for o in m.graph.output] == ["y"]


def test_with_initializers_writes_values_on_a_copy() -> None:
    m = _chain()
    out = edit.with_initializers(m, {"w": np.full(3, 5, np.float32)})
    values = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert [t.name for t in out.graph.initializer] == ["w", "unread"]
    assert values["w"].tolist() == [5, 5, 5]
    assert numpy_helper.to_array(m.graph.initializer[0]).tolist() == [2, 2, 2]


def test_cleanup_keep_nodes_drops_only_initializers() -> None:
    m = _chain()
    kept = edit.cleanup(m, sort=False, keep_nodes=True)
    assert [n.name for n in kept.graph.node] == ["relu", "neg", "out", "dead_mul"]
    assert [t.name for t in kept.graph.initializer] == ["w"]
    assert [o.name for o in kept.graph.output] == ["y"]
    full = edit.cleanup(m, sort=False)
    assert [n.name for n in full.graph.node] == ["relu", "neg", "out"]
    assert not full.graph.initializer
