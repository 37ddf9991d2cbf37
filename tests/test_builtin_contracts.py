"""Every built-in method passes the same contract as third-party plugins."""

from __future__ import annotations

from onnxq.testing.contract import MethodContract


class TestMinMax(MethodContract):
    method = "minmax"


class TestPercentile(MethodContract):
    method = "percentile"


class TestMse(MethodContract):
    method = "mse"


class TestTrtEntropy(MethodContract):
    method = "trt-entropy"


class TestTrtEntropyExact(MethodContract):
    method = "trt-entropy-exact"
