"""The method contract as the host enforces it: returned model changes, capabilities, the typed report."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxq
from onnxq.errors import OnnxqError
from onnxq.host import get_host
from onnxq.method import QuantMethod, RunContext
from onnxq.pipeline import QuantizedRewrite, Report



class ScaleWeights(QuantMethod):
    """Test method: doubles the first weight initializer after the qparams are chosen."""

    name = "scale-weights"
    summary = "test: a quantized rewrite"

    def quantized_rewrite(self, ctx: RunContext) -> onnx.ModelProto:
        model = onnx.ModelProto()
        model.CopyFrom(ctx.model)
        site = next(iter(ctx.plan.weights.values()))
        t = next(t for t in model.graph.initializer if t.name == site.initializer)
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.01), t.name))
        return model


class AssignsModel(QuantMethod):
    """Test method: the old way, assigning ctx.model in refine."""

    name = "assigns-model"
    summary = "test: assigns ctx.model"

    def refine(self, ctx: RunContext) -> None:
        model = onnx.ModelProto()
        model.CopyFrom(ctx.model)
        ctx.model = model


def test_quantized_rewrite_is_installed_and_reported(tiny_model, tiny_feeds, host_with):
    host = host_with(ScaleWeights, get_host().method("minmax"))
    res = onnxq.optimize(tiny_model, method=["minmax", "scale-weights"], data=tiny_feeds, host=host, show_progress=False, cache_dir=None)
    (change,) = res.report.quantized_rewrites
    assert isinstance(change, QuantizedRewrite) and change.method == "scale-weights"
    assert len(change.initializers_changed) == 1 and not change.nodes_added and not change.initializers_added
    assert change.output_error is not None and 0 < change.output_error < 0.05
    plain = onnxq.optimize(tiny_model, method="minmax", data=tiny_feeds, host=host, show_progress=False, cache_dir=None)
    assert plain.report.quantized_rewrites == []
    # the rewrite reached the quantized model: some weight differs from the plain run
    a = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in plain.model.graph.initializer}
    assert a.keys() == b.keys() and any(not np.array_equal(a[k], b[k]) for k in a)


def test_assigning_ctx_model_is_refused(tiny_model, tiny_feeds, host_with):
    host = host_with(AssignsModel, get_host().method("minmax"))
    with pytest.raises(OnnxqError, match=r"^method 'assigns-model' assigned ctx.model in refine; return the changed model"):
        onnxq.optimize(tiny_model, method=["minmax", "assigns-model"], data=tiny_feeds, host=host, show_progress=False, cache_dir=None)


def test_capabilities_are_declared_on_the_base_class():
    """Every capability the host reads is a declared class attribute; built-ins only set declared ones."""
    declared = {"calibrates", "follows_calibrator", "calibrator_option", "replaces_default_calibrator", "needs_data"}
    assert declared <= set(vars(QuantMethod))
    methods = get_host().methods
    assert methods["emb4bit"].replaces_default_calibrator and not methods["emb4bit"].calibrates
    assert methods["gptq"].needs_data
    assert methods["cfws"].follows_calibrator and methods["cfws"].calibrator_option == "calibrator"
    assert methods["easyquant"].follows_calibrator and methods["easyquant"].calibrator_option == "act_init"
    assert not methods["minmax"].follows_calibrator


def test_report_schema_covers_every_field():
    from onnxq.report import report_schema

    schema = report_schema()
    assert list(schema["properties"]) == [f.name for f in dataclasses.fields(Report)]
    assert set(schema["required"]) == set(schema["properties"]) and schema["additionalProperties"] is False
    nested = schema["$defs"]
    # every dataclass reachable from Report's fields has a definition listing exactly its fields
    import typing

    reachable: dict[str, type] = {}

    def walk(tp) -> None:
        for arg in typing.get_args(tp):
            walk(arg)
        if dataclasses.is_dataclass(tp) and tp.__name__ not in reachable:
            reachable[tp.__name__] = tp
            for f in dataclasses.fields(tp):
                walk(typing.get_type_hints(tp)[f.name])

    for f in dataclasses.fields(Report):
        walk(typing.get_type_hints(Report)[f.name])
    assert {"QuantizedRewrite", "LeftInFloat", "Fidelity"} <= set(reachable)
    assert set(nested) == set(reachable)
    for name, cls in reachable.items():
        assert list(nested[name]["properties"]) == [f.name for f in dataclasses.fields(cls)]


def test_report_round_trips_to_json(tiny_model, tiny_feeds):
    import json

    res = onnxq.optimize(tiny_model, method="minmax", bits=7, data=tiny_feeds, show_progress=False, cache_dir=None)
    doc = json.loads(res.report.to_json())
    assert doc["method"] == ["minmax"] and doc["bits"] == 7 and doc["int7_note"] == res.report.int7_note
    assert doc["layers"] == res.report.layers and doc["extra"] == res.report.extra
