"""TensorRT calibration caches: format, round trips, the ``trt-cache`` method and ``onnxq export-cache``."""

from __future__ import annotations

import functools
import os
import struct
import tempfile

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxq.calib import trt_cache as tc
from onnxq.errors import DataError, OutputError
from onnxq.testing.contract import MethodContract

# A cache written the way TensorRT writes one (TensorRT 8.6.1, entropy calibrator 2): header, then
# "name: hex" with the big-endian float32 bits unpadded; names may hold spaces, brackets and ": ".
HAND_WRITTEN = """TRT-8601-EntropyCalibration2
input: 3c010a14
/stem/Conv_output_0: 3d8f5c29
(Unnamed Layer* 12) [Shuffle]_output: 0
weird: name: 3f800000
"""


def test_parses_tensorrt_format_exactly():
    cache = tc.parse_cache(HAND_WRITTEN)
    assert cache.header == "TRT-8601-EntropyCalibration2"
    assert cache.algorithm == "EntropyCalibration2" and cache.version_code == 8601
    assert cache.scales["input"] == struct.unpack(">f", bytes.fromhex("3c010a14"))[0]
    assert cache.scales["input"] == pytest.approx(0.0078760, rel=1e-4)  # ~ 1/127: range 1.0
    assert cache.scales["/stem/Conv_output_0"] == pytest.approx(0.07, rel=1e-6)
    assert cache.scales["(Unnamed Layer* 12) [Shuffle]_output"] == 0.0
    assert cache.scales["weird: name"] == 1.0  # the value follows the last ": "
    assert cache.thresholds()["weird: name"] == 127.0


def test_hex_matches_tensorrt_spelling():
    assert tc.scale_to_hex(1.0) == "3f800000"
    assert tc.scale_to_hex(0.0) == "0"  # TensorRT does not pad
    assert tc.hex_to_scale("0") == 0.0
    assert tc.hex_to_scale("3C010A14") == tc.hex_to_scale("3c010a14")
    for v in (1e-8, 0.0078125, 3.5, 123.456):
        assert tc.hex_to_scale(tc.scale_to_hex(v)) == np.float32(v)


@pytest.mark.parametrize("version,code", [("10.16.1", 101601), ("10.14.1.48", 101401), ("8.6.1", 8601), ("8.4.1", 8401), ("11.1", 110100)])
def test_header_version_code(version, code):
    assert tc.version_code(version) == code
    assert tc.make_header(version) == f"TRT-{code}-EntropyCalibration2"
    assert tc.make_header(version, "MinMaxCalibration").endswith("-MinMaxCalibration")


def test_round_trip_text_and_file(tmp_path):
    rng = np.random.default_rng(0)
    scales = {f"t{i}": float(np.float32(s)) for i, s in enumerate(rng.uniform(1e-4, 2.0, 20))}
    scales["(Unnamed Layer* 3) [Convolution]_output"] = 0.5
    text = tc.format_cache(scales, tc.make_header("10.1.0"))
    assert text.splitlines()[0] == "TRT-100100-EntropyCalibration2"
    assert tc.parse_cache(text).scales == scales
    path = tc.write_cache(tmp_path / "a.cache", scales)
    assert tc.read_cache(path).scales == scales
    with pytest.raises(OutputError, match="already exists"):
        tc.write_cache(path, scales)
    tc.write_cache(path, {"x": 1.0}, force=True)
    assert tc.read_cache(path).scales == {"x": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["a.cache"]  # no temporary left behind


@pytest.mark.parametrize("text,match", [
    ("", "empty"),
    ("input: 3c010a14\n", "header"),
    ("TRT-8601-EntropyCalibration2\ninput 3c010a14\n", "line 2"),
    ("TRT-8601-EntropyCalibration2\ninput: zz\n", "hexadecimal"),
    ("TRT-8601-EntropyCalibration2\ninput: 1234567890\n", "hexadecimal"),
])
def test_malformed_caches_are_one_line_errors(text, match):
    with pytest.raises(DataError, match=match):
        tc.parse_cache(text)


def test_read_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        tc.read_cache(tmp_path / "none.cache")


def test_format_refuses_bad_values():
    with pytest.raises(ValueError):
        tc.format_cache({"x": float("nan")})
    with pytest.raises(ValueError):
        tc.format_cache({"a\nb": 1.0})


def test_trt_scale_conventions():
    # symmetric INT8: TensorRT's scale is the step itself
    assert tc.trt_scale(0.02, -128, 127) == np.float32(0.02)
    # INT7 in int8: range 63 steps
    assert tc.trt_scale(0.02, -63, 63) == pytest.approx(0.02 * 63 / 127, rel=1e-6)
    # asymmetric uint8 (zero point 10): the larger end
    assert tc.trt_scale(0.01, 0, 255, 10) == pytest.approx(0.01 * 245 / 127, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# QDQ models and plans
# ---------------------------------------------------------------------------------------------

def _q_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Activation tensor -> step of its QuantizeLinear (through an INT7 Clip)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            src = n.input[0]
            if src in producer and producer[src].op_type == "Clip":
                src = producer[src].input[0]
            out[src] = float(inits[n.input[1]])
    return out


@pytest.fixture(scope="module")
def digits_trt_int8(digits_model, digits_calib_feeds):
    from onnxq.pipeline import optimize

    return optimize(digits_model, method="trt-entropy", target="trt", data=digits_calib_feeds, show_progress=False)


def test_scales_from_qdq_model_and_plan_agree(digits_trt_int8):
    extracted = tc.scales_from_qdq_model(digits_trt_int8.model)
    assert not extracted.skipped
    steps = _q_scales(digits_trt_int8.model)
    assert set(extracted.scales) == set(steps) and "input" in steps
    for name, step in steps.items():
        assert extracted.scales[name] == np.float32(step)  # INT8: TensorRT's scale is the step


def test_int7_scales_are_written_as_tensorrt_ranges(digits_model, digits_calib_feeds):
    from onnxq.pipeline import optimize

    q = optimize(digits_model, method="minmax", target="trt", bits=7, data=digits_calib_feeds, show_progress=False).model
    steps = _q_scales(q)
    scales = tc.scales_from_qdq_model(q).scales
    assert set(scales) == set(steps)
    for name, step in steps.items():
        assert scales[name] == pytest.approx(step * 63 / 127, rel=1e-6)


def test_scales_from_plan():
    from onnxq.graph.plan import ActivationSite, QuantPlan
    from onnxq.graph.targets import get_profile
    from onnxq.qparams import symmetric

    plan = QuantPlan(get_profile("trt", 7))
    plan.activations["a"] = ActivationSite("a", [], "test", (-6.3, 6.3), symmetric(6.3, 7, narrow=True))
    plan.activations["b"] = ActivationSite("b", [], "test", (-1.0, 1.0), symmetric(1.0, 8, narrow=False))
    plan.activations["c"] = ActivationSite("c", [], "test")  # no qparams yet: skipped
    scales = tc.scales_from_plan(plan)
    assert scales == {"a": pytest.approx(6.3 / 127, rel=1e-6), "b": pytest.approx(1.0 / 127, rel=1e-6)}


# ---------------------------------------------------------------------------------------------
# the trt-cache method
# ---------------------------------------------------------------------------------------------

def test_trt_cache_method_reproduces_scales(digits_model, digits_calib_feeds, digits_trt_int8, tmp_path):
    from onnxq.pipeline import optimize

    path = tc.write_cache(tmp_path / "digits.cache", tc.scales_from_qdq_model(digits_trt_int8.model).scales)
    res = optimize(digits_model, method="trt-cache", options={"path": str(path)}, target="trt", data=digits_calib_feeds, show_progress=False)
    assert _q_scales(res.model) == pytest.approx(_q_scales(digits_trt_int8.model), rel=1e-6)
    rep = res.report.methods["trt-cache"]
    assert rep["activations_from_cache"] == len(_q_scales(res.model)) and rep["activations_max_abs_fallback"] == []


def test_trt_cache_missing_tensors_fall_back_with_warning(digits_model, digits_calib_feeds, tmp_path, caplog):
    from onnxq.pipeline import optimize

    path = tc.write_cache(tmp_path / "partial.cache", {"input": 1.0 / 127, "not_in_model": 0.5, "/stem/stem.2/Relu_output_0": 0.0})
    with caplog.at_level("WARNING", logger="onnxq"):
        res = optimize(digits_model, method="trt-cache", options={"path": str(path)}, target="trt", data=digits_calib_feeds, show_progress=False)
    scales = _q_scales(res.model)
    assert scales["input"] == pytest.approx(1.0 / 127, rel=1e-6)
    rep = res.report.methods["trt-cache"]
    n = len(scales)
    assert rep["activations_from_cache"] == 1 and len(rep["activations_max_abs_fallback"]) == n - 1  # the zero scale falls back too
    assert rep["cache_tensors_unused"] == 1
    assert any(f"{n - 1} of {n} quantized activations are not in" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match=f"{n - 1} of {n} quantized activations"):
        optimize(digits_model, method="trt-cache", options={"path": str(path), "on_missing": "error"}, target="trt", data=digits_calib_feeds, show_progress=False)


def test_trt_cache_needs_a_path(digits_model, digits_calib_feeds, tmp_path):
    from onnxq.errors import OptionError
    from onnxq.pipeline import optimize

    with pytest.raises(OptionError, match="-o path"):
        optimize(digits_model, method="trt-cache", target="trt", data=digits_calib_feeds, show_progress=False)
    with pytest.raises(DataError, match="does not exist"):
        optimize(digits_model, method="trt-cache", options={"path": str(tmp_path / "x.cache")}, target="trt", data=digits_calib_feeds, show_progress=False)


def test_trt_cache_on_ort_target_keeps_observed_sign_range(tiny_model, tiny_feeds, tmp_path):
    from onnxq.pipeline import optimize

    # the tiny model's input is in [0, 1]: an asymmetric (uint8) grid keeps [0, T]
    path = tc.write_cache(tmp_path / "t.cache", {"x": 0.5 / 127})
    res = optimize(tiny_model, method="trt-cache", options={"path": str(path)}, target="ort", data=tiny_feeds, show_progress=False)
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    q = next(n for n in res.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert float(inits[q.input[1]]) == pytest.approx(0.5 / 255, rel=1e-5) and int(inits[q.input[2]]) == 0


# ---------------------------------------------------------------------------------------------
# CLI: export-cache -> optimize -p trt-cache -> lint
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", ["8", "7"])
def test_cli_export_then_reimport_round_trip(run_cli, digits_model, digits_calib, tmp_path, bits):
    a, cache, b, cache_b = tmp_path / "a.onnx", tmp_path / "a.cache", tmp_path / "b.onnx", tmp_path / "b.cache"
    code, _, err = run_cli(["optimize", digits_model, "-p", "trt-entropy", "--target", "trt", "--bits", bits, "--data", digits_calib,
                            "--output", a, "--quiet", "--no-cache"])
    assert code == 0, err
    code, out, err = run_cli(["export-cache", a, cache])
    assert code == 0, err
    assert "activation scales" in out and cache.read_text().startswith("TRT-")
    parsed = tc.read_cache(cache)
    assert "input" in parsed.scales
    code, _, err = run_cli(["optimize", digits_model, "-p", "trt-cache", "-o", "path", cache, "--target", "trt", "--bits", bits,
                            "--data", digits_calib, "--output", b, "--quiet", "--no-cache"])
    assert code == 0, err
    assert "not in" not in err  # every activation came from the cache
    qa, qb = onnx.load(str(a)), onnx.load(str(b))
    sa, sb = _q_scales(qa), _q_scales(qb)
    assert set(sa) == set(sb)
    for k in sa:
        assert sb[k] == pytest.approx(sa[k], rel=2e-7, abs=0), k  # equal within float32 rounding
    code, out, err = run_cli(["lint", b])
    assert code == 0 and "no TensorRT Q/DQ rule findings" in out
    code, _, err = run_cli(["export-cache", b, cache_b])
    assert code == 0, err
    assert tc.read_cache(cache_b).scales == pytest.approx(parsed.scales, rel=2e-7)


def test_cli_export_cache_refuses_clobber_and_bad_input(run_cli, digits_model, tmp_path, digits_trt_int8):
    q = tmp_path / "q.onnx"
    onnx.save_model(digits_trt_int8.model, str(q))
    out = tmp_path / "q.cache"
    out.write_text("keep me")
    code, _, err = run_cli(["export-cache", q, out])
    assert code == 1 and "already exists" in err and out.read_text() == "keep me"
    code, stdout, err = run_cli(["export-cache", q, out, "--force", "--trt-version", "10.8.0", "--algorithm", "MinMaxCalibration", "--json"])
    assert code == 0, err
    assert '"header": "TRT-100800-MinMaxCalibration"' in stdout
    assert out.read_text().splitlines()[0] == "TRT-100800-MinMaxCalibration"
    code, _, err = run_cli(["export-cache", digits_model, tmp_path / "fp32.cache"])
    assert code == 1 and "quantizes no activation" in err and not (tmp_path / "fp32.cache").exists()
    code, _, err = run_cli(["export-cache", q, q])
    assert code == 1 and "is the input model" in err


# ---------------------------------------------------------------------------------------------
# the method contract every built-in passes
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _contract_cache() -> str:
    """A cache for the contract model, exported from a minmax trt model (some tensors left out on purpose)."""
    from onnxq.pipeline import optimize
    from onnxq.testing.contract import _calibration
    from onnxq.testing.models import residual_concat_model

    q = optimize(residual_concat_model(), method="minmax", target="trt", data=_calibration(), show_progress=False).model
    scales = tc.scales_from_qdq_model(q).scales
    scales.pop(sorted(scales)[0])  # one tensor falls back to max-abs
    folder = tempfile.mkdtemp(prefix="onnxq-contract-")
    return str(tc.write_cache(os.path.join(folder, "contract.cache"), scales))


class TestTrtCacheContract(MethodContract):
    method = "trt-cache"

    @property
    def options(self):  # type: ignore[override]
        return {"path": _contract_cache()}
