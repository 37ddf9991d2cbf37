#!/usr/bin/env python
"""ONNX Runtime's ``quantize_static`` (QDQ, per-channel, U8S8) on a folder of ``.npz`` feeds: the suite's baseline.

    python benchmarks/ort_quantize.py MODEL OUTPUT DATA_DIR {minmax,percentile,entropy} [MAX_SAMPLES] [--pad-seq]

``bench.py`` runs this file as a child process (one per quantization) so that the wall time and
peak RSS it measures are ONNX Runtime's alone. That is also why it imports nothing from onnxq:
``onnxq.backends.ort_quantizer`` does the same call inside onnxq, but importing it would add
onnxq's start-up to the baseline's figures, and it silences ORT's warnings, which the suite's
"as shipped" table counts.

Feeds are read one file at a time, keyed by the model's input names; ORT's defaults otherwise
(no ``quant_pre_process``, ``ActivationSymmetric=False``). ``--pad-seq`` zero-pads axis 1 of every
feed to the longest in DATA_DIR: ORT's histogram calibrators concatenate each tensor over all
batches, so files of different sequence lengths make them fail (zero ``input_ids`` /
``attention_mask`` / ``token_type_ids`` are masked padding). Prints ``{"seconds": ...}``.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime import quantization as oq

METHODS = {"minmax": oq.CalibrationMethod.MinMax, "percentile": oq.CalibrationMethod.Percentile, "entropy": oq.CalibrationMethod.Entropy}


def graph_inputs(model: str | Path) -> list[str]:
    """The model's real inputs (graph inputs that are not initializers), read without the weights."""
    m = onnx.load(str(model), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


class NpzReader(oq.CalibrationDataReader):
    """ORT calibration reader over ``DATA_DIR/*.npz``: one file per batch, at most ``limit`` samples.

    ``pad_seq``: zero-pad axis 1 of every feed to the longest in the folder (see the module docstring).
    """

    def __init__(self, data_dir: str | Path, names: list[str], limit: int | None = None, pad_seq: bool = False) -> None:
        self.files = sorted(glob.glob(str(data_dir) + "/*.npz"))
        self.names = names
        self.limit = limit
        self.longest = 0
        if pad_seq:
            for f in self.files:
                with np.load(f) as z:
                    self.longest = max([self.longest] + [z[k].shape[1] for k in names if z[k].ndim >= 2])
        self.pad = pad_seq
        self.rewind()

    def rewind(self) -> None:
        self.i, self.seen = 0, 0

    def _padded(self, v: np.ndarray) -> np.ndarray:
        if v.ndim < 2:
            return v
        return np.pad(v, [(0, 0), (0, self.longest - v.shape[1])] + [(0, 0)] * (v.ndim - 2))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.files) or (self.limit is not None and self.seen >= self.limit):
            return None
        with np.load(self.files[self.i]) as z:
            feed = {k: np.ascontiguousarray(z[k]) for k in self.names}
        if self.pad:
            feed = {k: self._padded(v) for k, v in feed.items()}
        self.i += 1
        n = next(iter(feed.values())).shape[0]
        if self.limit is not None and self.seen + n > self.limit:
            feed = {k: v[: self.limit - self.seen] for k, v in feed.items()}
            n = self.limit - self.seen
        self.seen += n
        return feed


def quantize(model: str | Path, output: str | Path, data_dir: str | Path, method: str, max_samples: int | None = None,
             pad_seq: bool = False) -> float:
    """Quantize ``model`` to ``output`` with ORT's ``method`` calibrator; returns ORT's own seconds."""
    reader = NpzReader(data_dir, graph_inputs(model), max_samples, pad_seq)
    t = time.perf_counter()
    oq.quantize_static(
        str(model), str(output), reader, quant_format=oq.QuantFormat.QDQ, per_channel=True,
        activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8, calibrate_method=METHODS[method],
        extra_options={"ActivationSymmetric": False},
    )
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("data_dir", type=Path, help="folder of .npz feeds keyed by input name")
    ap.add_argument("method", choices=sorted(METHODS))
    ap.add_argument("max_samples", type=int, nargs="?", default=None, help="calibrate on at most this many samples")
    ap.add_argument("--pad-seq", action="store_true", help="zero-pad axis 1 of every feed to the longest in DATA_DIR")
    a = ap.parse_args(argv)
    seconds = quantize(a.model, a.output, a.data_dir, a.method, a.max_samples, a.pad_seq)
    print(json.dumps({"seconds": round(seconds, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
