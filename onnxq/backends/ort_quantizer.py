"""ONNX Runtime's own static quantizer, run on the same model and data, as a comparison baseline."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import numpy as np

from onnxq.calib.readers import Batch

OrtCalibration = Literal["minmax", "entropy", "percentile"]


def quantize_with_ort(model_path: str | os.PathLike[str], output: str | os.PathLike[str], batches: Callable[[], Iterable[Batch]],
                      calibration: OrtCalibration = "minmax", per_channel: bool = True, symmetric_activations: bool = False,
                      activation_type: Literal["uint8", "int8"] = "uint8") -> Path:
    """Run ``onnxruntime.quantization.quantize_static`` (QDQ) with ORT's documented defaults otherwise.

    Data comes from the same batch source onnxq calibrates with. ORT's pre-processing
    (``quant_pre_process``) is not run: it fails on many real models.
    """
    from onnxruntime import quantization as oq

    class Reader(oq.CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches())

        def get_next(self):
            b = next(self._it, None)
            return None if b is None else {k: np.ascontiguousarray(v) for k, v in b.feeds.items()}

        def rewind(self) -> None:
            self._it = iter(batches())

    method = {"minmax": oq.CalibrationMethod.MinMax, "entropy": oq.CalibrationMethod.Entropy, "percentile": oq.CalibrationMethod.Percentile}[calibration]
    qtype = oq.QuantType.QUInt8 if activation_type == "uint8" else oq.QuantType.QInt8
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT logs pre-processing advice on the root logger
    try:
        with tempfile.TemporaryDirectory(prefix="onnxq-ortq-") as tmp:
            tmp_out = Path(tmp) / "model.onnx"
            oq.quantize_static(
                str(model_path), str(tmp_out), Reader(), quant_format=oq.QuantFormat.QDQ, per_channel=per_channel,
                activation_type=qtype, weight_type=oq.QuantType.QInt8, calibrate_method=method,
                extra_options={"ActivationSymmetric": symmetric_activations},
            )
            os.replace(tmp_out, output)
    finally:
        root.setLevel(level)
    return Path(output)
