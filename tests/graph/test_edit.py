"""The graph-editing layer (onnxq.graph.edit): cleanup, toposort, export fidelity, Namer, type map."""

from __future__ import annotations

import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.graph import edit
from onnxq.graph.edit import QDTYPE, Namer


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _f32(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _vi(name: str, shape=None, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _if_model(ir_version: int = 8, list_initializers: bool = False) -> onnx.ModelProto:
    """y = x @ W; z = If(c, x + S, x); k = K (an initializer that is itself a graph output); U unread."""
    inits = [_f32("W", np.eye(2) * 2), _f32("S", [1.0, 2.0]), _f32("K", [7.0]), _f32("U", np.ones((3, 3)))]
    then = helper.make_graph([helper.make_node("Add", ["x", "S"], ["t"], name="then_add")], "then_body", [], [_vi("t")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="else_id")], "else_body", [], [_vi("e")])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("If", ["c"], ["z"], name="if", then_branch=then, else_branch=other)]
    inputs = [_vi("x", [2, 2]), _vi("c", [], TensorProto.BOOL), _vi("unused_input", [1])]
    if list_initializers:
        inputs += [_vi(t.name, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "g", inputs, [_vi("y", [2, 2]), _vi("z"), _vi("K", [1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="test", doc_string="a model")
    model.ir_version = ir_version
    helper.set_model_props(model, {"author": "onnxq"})
    return model


FEEDS = {"x": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "c": np.array(True), "unused_input": np.zeros(1, np.float32)}


def test_cleanup_keeps_reads_by_subgraphs_and_graph_outputs_and_drops_the_rest():
    model = _if_model()
    out = edit.cleanup(model)
    names = {t.name for t in out.graph.initializer}
    assert names == {"W", "S", "K"}  # S is read only inside the If's then-branch, K only as a graph output
    for a in out.graph.node[[n.name for n in out.graph.node].index("if")].attribute:
        assert not a.g.initializer, "S stays a top-level initializer, not a copy inside the body"
    assert [i.name for i in out.graph.input] == ["x", "c", "unused_input"]  # the interface stays
    for got, want in zip(_run(out, FEEDS), _run(model, FEEDS)):
        np.testing.assert_array_equal(got, want)


def test_cleanup_drops_an_initializer_and_its_graph_input_entry():
    model = _if_model(list_initializers=True)
    out = edit.cleanup(model)
    assert {t.name for t in out.graph.initializer} == {"W", "S", "K"}
    # IR >= 4: initializers are constants, none is an input any more (U was dropped altogether)
    assert [i.name for i in out.graph.input] == ["x", "c", "unused_input"]
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    assert {i.name for i in sess.get_inputs()} == {"x", "c", "unused_input"}
    for got, want in zip(sess.run(None, FEEDS), _run(model, FEEDS)):
        np.testing.assert_array_equal(got, want)


def test_cleanup_keeps_the_input_listing_ir3_requires_for_surviving_initializers():
    model = _if_model(ir_version=3, list_initializers=True)
    out = edit.cleanup(model)
    assert [i.name for i in out.graph.input] == ["x", "c", "unused_input", "W", "S", "K"]  # U is gone with its entry
    assert out.ir_version == 3


def test_export_keeps_model_level_fields():
    model = _if_model()
    fn = helper.make_function("local", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 13)])
    model.functions.append(fn)
    model.opset_import.append(helper.make_opsetid("local", 1))
    out = edit.export_model(edit.import_graph(model), model)
    for field in ("ir_version", "producer_name", "doc_string"):
        assert getattr(out, field) == getattr(model, field)
    assert list(out.opset_import) == list(model.opset_import)
    assert list(out.metadata_props) == list(model.metadata_props)
    assert [f.name for f in out.functions] == ["Twice"]


def test_cleanup_keeps_node_and_graph_annotations():
    model = _if_model()
    mm = model.graph.node[0]
    mm.doc_string = "weights from layer 3"
    mm.metadata_props.add(key="origin", value="fc3")
    model.graph.metadata_props.add(key="stage", value="float")
    out = edit.cleanup(model)
    node = next(n for n in out.graph.node if n.name == "mm")
    assert node.doc_string == "weights from layer 3"
    assert [(p.key, p.value) for p in node.metadata_props] == [("origin", "fc3")]
    assert [(p.key, p.value) for p in out.graph.metadata_props] == [("stage", "float")]


def test_toposort_orders_a_shuffled_graph():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="n0")]
    for i in range(1, 12):
        nodes.append(helper.make_node("Add", [nodes[-1].output[0], "x" if i % 3 else nodes[max(0, i - 3)].output[0]], [f"t{i}"], name=f"n{i}"))
    graph = helper.make_graph(nodes, "g", [_vi("x", [4])], [_vi(nodes[-1].output[0], [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(model)
    order = list(shuffled.graph.node)
    random.Random(0).shuffle(order)
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(order)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(shuffled)
    for out in (edit.toposort(shuffled), edit.cleanup(shuffled)):
        onnx.checker.check_model(out)
        seen = {"x"}
        for n in out.graph.node:
            assert set(n.input) <= seen, f"{n.name} before its inputs"
            seen.update(n.output)
        feed = {"x": np.arange(4, dtype=np.float32) - 1.5}
        np.testing.assert_array_equal(_run(out, feed)[0], _run(model, feed)[0])


def test_cleanup_sort_false_keeps_the_node_order():
    model = _if_model()
    model.graph.node.append(helper.make_node("Neg", ["x"], ["dead"], name="dead"))  # nobody reads it
    out = edit.cleanup(model, sort=False)
    assert [n.name for n in out.graph.node] == ["mm", "if"]
    kept = edit.cleanup(model, sort=False, keep_nodes=True)
    assert [n.name for n in kept.graph.node] == ["mm", "if", "dead"]


def test_namer_is_seeded_from_every_name_and_never_repeats():
    model = _if_model()
    namer = Namer.of(model)
    for taken in ("x", "W", "y", "mm", "if", "t", "then_add", "unused_input"):  # tensors, nodes, body names
        assert taken in namer
        assert namer.fresh(taken) != taken
    assert namer.fresh("W") == "W_2"  # W_1 was handed out above
    assert namer.fresh("new") == "new"
    many = [namer.fresh("new") for _ in range(50)]
    assert len(set(many)) == 50 and "new" not in many
    assert Namer({"a", "a_1"}).fresh("a") == "a_2"


def test_name_nodes_gives_unique_non_empty_names():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"], name="r"),
             helper.make_node("Relu", ["b"], ["c"], name="r")]
    model = helper.make_model(helper.make_graph(nodes, "g", [_vi("x", [1])], [_vi("c", [1])]))
    edit.name_nodes(model)
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == 3


def test_element_type_map_is_onnx_own():
    assert edit.onnx_dtype(np.float32) == TensorProto.FLOAT
    assert edit.onnx_dtype(np.dtype(np.int8)) == TensorProto.INT8
    assert edit.onnx_dtype("float16") == TensorProto.FLOAT16
    assert edit.numpy_dtype(TensorProto.INT64) == np.int64
    assert QDTYPE == {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "int4": TensorProto.INT4, "uint4": TensorProto.UINT4}


def test_outer_scope_reads_follow_nested_bodies():
    model = _if_model()
    if_node = next(n for n in model.graph.node if n.op_type == "If")
    assert edit.outer_scope_reads(if_node) == {"x", "S"}
    assert edit.subgraphs(model.graph.node[0]) == []
