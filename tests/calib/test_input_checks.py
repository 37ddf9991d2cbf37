"""What the data must agree with in the model's inputs: named dimensions alike, token ids inside their tables.

Inputs whose declared shapes share a named dimension must agree on it in the data.

A mask shorter than its token ids, or two inputs with different numbers of samples, failed inside ONNX Runtime with a
long coloured message naming neither input nor file; the batch is now refused in one line naming both.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.calib.feeds import validate_batch
from onnxq.calib.readers import Batch, InputSpec
from onnxq.errors import DataError

TEXT = [InputSpec("input_ids", np.dtype(np.int64), ("batch", "L"), True), InputSpec("attention_mask", np.dtype(np.int64), ("batch", "L"), True)]


def test_a_mask_shorter_than_its_ids_is_one_line_naming_both():
    batch = Batch({"input_ids": np.ones((4, 32), np.int64), "attention_mask": np.ones((4, 30), np.int64)}, source="text.npz")
    with pytest.raises(DataError) as info:
        validate_batch(batch, TEXT)
    msg = str(info.value)
    assert "'attention_mask' in text.npz has 30 on axis 1" in msg and "'input_ids' has 32" in msg and "'L'" in msg


def test_inputs_with_different_sample_counts_are_refused():
    batch = Batch({"input_ids": np.ones((4, 32), np.int64), "attention_mask": np.ones((3, 32), np.int64)})
    with pytest.raises(DataError, match="'batch'"):
        validate_batch(batch, TEXT)


def test_agreeing_named_dimensions_pass():
    batch = Batch({"input_ids": np.ones((4, 32), np.int64), "attention_mask": np.ones((4, 32), np.int64)})
    assert validate_batch(batch, TEXT) is batch


def test_random_token_types_stay_inside_their_table():
    """`--data random` fed 0-99 to a BERT model's token_type_ids, which index a 2-row table: ONNX Runtime failed, and the
    error blamed it. Integer inputs that index a constant table get random values below its size."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import onnxq
    from onnxq.calib.feeds import model_inputs

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (2, 8)).astype(np.float32), "types"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 4)).astype(np.float32), "w")]
    nodes = [helper.make_node("Cast", ["token_type_ids"], ["t64"], to=TensorProto.INT64),
             helper.make_node("Gather", ["types", "t64"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])]
    graph = helper.make_graph(nodes, "types", [helper.make_tensor_value_info("token_type_ids", TensorProto.INT32, ["batch", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    assert model_inputs(model)[0].index_limit == 2
    res = onnxq.optimize(model, method="minmax", data="random:16", show_progress=False)
    assert res.report.quantized_weights == 1
