#!/usr/bin/env python
"""AMD Quark's ONNX quantizer with its U8S8 and A8W8 presets, for the suite's peer rows.

    <quark venv>/bin/python benchmarks/peers/quark_quantize.py MODEL OUTPUT DATA_DIR {u8s8,a8w8} [MAX_SAMPLES] [--pad-seq]

Runs in Quark's own environment (``peers/envs.py``); ``bench.py`` runs it as a child process, so
the wall time and peak RSS measured are Quark's alone. The presets are Quark's own, unchanged
(``QConfig.get_default_config``): ``U8S8_AAWS`` (QDQ, uint8 asymmetric activations, int8 symmetric
weights, ONNX Runtime's Percentile calibrator) and ``A8W8`` (int8 symmetric activations and
weights, MinMax calibration, Quark's ReLU folding and Concat alignment). The calibration reader
gives the ``.npz`` batches in order. ``--pad-seq`` (MiniLM) pads the sequence axis to one length
for U8S8 only: its histogram calibrator concatenates every batch; MinMax needs no padding.
"""

from __future__ import annotations

import argparse
import sys

from npz_feeds import graph_inputs, load_batches, script_main

RECIPES = {"u8s8": "Quark's U8S8_AAWS preset", "a8w8": "Quark's A8W8 preset"}
PRESETS = {"u8s8": "U8S8_AAWS", "a8w8": "A8W8"}


class BatchReader:
    """ONNX Runtime's calibration-reader protocol (``get_next``, ``rewind``) over a list of batches."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches
        self.i = 0

    def get_next(self) -> dict | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def rewind(self) -> None:
        self.i = 0

    def __len__(self) -> int:
        return len(self.batches)


def quantize(a: argparse.Namespace) -> dict:
    from importlib.metadata import version

    from quark.onnx import ModelQuantizer, QConfig

    batches = load_batches(a.data_dir, graph_inputs(a.model), a.max_samples, pad_seq=a.pad_seq and a.recipe == "u8s8")
    quantizer = ModelQuantizer(QConfig.get_default_config(PRESETS[a.recipe]))
    quantizer.quantize_model(str(a.model), str(a.output), BatchReader(batches))
    return {"preset": PRESETS[a.recipe], "batches": len(batches), "amd-quark": version("amd-quark")}


if __name__ == "__main__":
    sys.exit(script_main(__doc__, RECIPES, quantize))
