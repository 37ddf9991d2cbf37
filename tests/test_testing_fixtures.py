"""onnxq.testing.fixtures: the labelled classifier fixtures the CNN benchmarks share."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.errors import DataError
from onnxq.runtime.ort import make_session
from onnxq.testing.fixtures import classifier_fixture, output_scores


@pytest.mark.parametrize("name", ["digits", "mnist_norm_resnet"])
def test_fixture_feeds_labels_and_scores(name):
    fx = classifier_fixture(name)
    ref = make_session(str(fx.model), "all", threads=1).run(None, fx.feeds)[0]
    assert len(ref) == len(fx.labels) > 50
    top1, cos, sqnr = output_scores(fx.model, fx, ref)
    assert top1 > 0.9  # trained classifiers: FP32 accuracy on the held-out labels
    assert cos == pytest.approx(1.0) and sqnr > 100  # the model against its own outputs
    noisy = output_scores(fx.model, fx, ref + np.random.default_rng(0).standard_normal(ref.shape).astype(ref.dtype) * ref.std())
    assert noisy[1] < 0.99 and noisy[2] < 10


def test_missing_fixture_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        classifier_fixture("mnist_norm_resnet", root=tmp_path)
    with pytest.raises(DataError, match="digits"):
        classifier_fixture("digits", root=tmp_path)
