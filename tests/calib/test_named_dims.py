"""Inputs whose declared shapes share a named dimension must agree on it in the data.

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
