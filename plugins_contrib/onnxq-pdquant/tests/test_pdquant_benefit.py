"""PD-Quant's benefit where it matters: W4A4 (emulated) on the MobileNetV3-style zoo fixture.

Baseline = the Lp(2) grids PD-Quant starts from (exactly onnxq-lapq's ``-o maxiter 0 -o p_points 1
-o p_min 2 -o p_max 2`` with the same bits): the gain is the reconstruction's. A short schedule
(64 samples, 40 iterations per block) keeps the test short; the README has the full-length figures.
Measured with this schedule: Lp(2) init 92.75 %, PD-Quant 97.50 % top-1 (400 images); asserted: a
margin of 3 points.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxq_pdquant", reason="onnxq-pdquant is not installed (pip install -e plugins_contrib/onnxq-pdquant)")
pytest.importorskip("torch", reason="pdquant learns with PyTorch (pip install 'onnxq-pdquant[torch]')")

import onnxq  # noqa: E402

ZOO = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "zoo"
MARGIN = 0.03
BITS = {"weight_bits": 4, "act_bits": 4}


def _top1(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float(np.mean(sess.run(None, {"input": x})[0].argmax(1) == y))


@pytest.mark.slow  # a whole MobileNet reconstruction: the package's longest test
def test_pdquant_beats_the_lp_init_at_w4a4_on_mobilenetv3():
    d = ZOO / "mobilenetv3_hswish"
    if not (d / "model.onnx").exists():
        pytest.skip(f"zoo fixture missing: {d}")
    calib = [{"input": np.load(d / "calib.npz")["input"][:64]}]
    ev = np.load(d / "eval.npz")
    lp = onnxq.optimize(d / "model.onnx", method="lapq", data=calib, show_progress=False, check=False,
                        options={**BITS, "maxiter": 0, "p_points": 1, "p_min": 2, "p_max": 2})
    pd = onnxq.optimize(d / "model.onnx", method="pdquant", data=calib, show_progress=False, check=False,
                        options={**BITS, "iters": 40, "dc_iters": 10, "samples": 64})
    acc_lp, acc_pd = _top1(lp.model, ev["input"], ev["label"]), _top1(pd.model, ev["input"], ev["label"])
    print(f"W4A4 top-1 on mobilenetv3_hswish: Lp(2) init {acc_lp:.4f}, pdquant {acc_pd:.4f}")
    assert acc_pd >= acc_lp + MARGIN, (acc_lp, acc_pd)
    rep = pd.report.methods["pdquant"]
    assert rep["batchnorm_stats"] == 11 and rep["float_model"]  # the DC reads the unfolded model's BatchNorms
