#!/usr/bin/env python
"""NVIDIA Model Optimizer's ONNX post-training quantization (int8, on CPU) for the suite's peer rows.

    <modelopt venv>/bin/python benchmarks/peers/modelopt_quantize.py MODEL OUTPUT DATA_DIR {entropy,max} [MAX_SAMPLES] [--pad-seq]

Runs in ModelOpt's own environment (``peers/envs.py``: the ``[onnx]`` extra with the CPU build of
onnxruntime); ``bench.py`` runs it as a child process, so the wall time and peak RSS measured are
ModelOpt's alone. ``modelopt.onnx.quantization.quantize`` with ``quantize_mode="int8"`` and its
defaults, except what running on a CPU needs: ``calibration_eps=["cpu"]`` (its default list
starts with TensorRT and CUDA) and ``high_precision_dtype="fp32"`` (its default converts the
rest of the model to fp16, for TensorRT; the suite scores every row on ONNX Runtime's CPU
provider, whose fp16 kernels would measure something else). The calibration reader gives one
sample at a time, as ModelOpt's own data provider does for a model whose batch axis is dynamic;
``--pad-seq`` (MiniLM) pads the sequence axis to one length for ``entropy`` only, whose histogram
calibrator concatenates the samples; ``max`` needs no padding.
"""

from __future__ import annotations

import argparse
import sys

from npz_feeds import graph_inputs, load_batches, samples, script_main

RECIPES = {"entropy": "int8, entropy calibration (ModelOpt's default)", "max": "int8, max calibration"}


class SampleReader:
    """The calibration-reader protocol ModelOpt calls (ONNX Runtime's ``get_next`` and ``rewind``, plus
    ``get_first`` of ModelOpt's own ``CalibrationDataProvider``) over single samples."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items
        self.i = 0

    def get_next(self) -> dict | None:
        if self.i >= len(self.items):
            return None
        self.i += 1
        return self.items[self.i - 1]

    def get_first(self) -> dict:
        return self.items[0]

    def rewind(self) -> None:
        self.i = 0


def quantize(a: argparse.Namespace) -> dict:
    from importlib.metadata import version

    from modelopt.onnx.quantization import quantize as mo_quantize

    items = list(samples(load_batches(a.data_dir, graph_inputs(a.model), a.max_samples, pad_seq=a.pad_seq and a.recipe == "entropy")))
    mo_quantize(str(a.model), quantize_mode="int8", calibration_method=a.recipe, calibration_data_reader=SampleReader(items),
                calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=str(a.output))
    return {"samples": len(items), "nvidia-modelopt": version("nvidia-modelopt")}


if __name__ == "__main__":
    sys.exit(script_main(__doc__, RECIPES, quantize))
