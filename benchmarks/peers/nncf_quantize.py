#!/usr/bin/env python
"""NNCF post-training quantization (``nncf.quantize`` on the ONNX model) for the suite's peer rows.

    <nncf venv>/bin/python benchmarks/peers/nncf_quantize.py MODEL OUTPUT DATA_DIR {default,transformer} [MAX_SAMPLES]

Runs in NNCF's own environment (``peers/envs.py``); ``bench.py`` runs it as a child process, so
the wall time and peak RSS measured are NNCF's alone. NNCF's defaults (``target_device=ANY``, the
``performance`` preset, fast bias correction) except two things every peer row shares: every
calibration sample is used (``subset_size`` = their count; NNCF's default is 300) and samples are
fed one at a time, so NNCF's statistics never see padding (MiniLM's sentences differ in length).
``transformer`` adds ``model_type=nncf.ModelType.TRANSFORMER`` (NNCF's attention patterns and,
by its own default for that type, the ``mixed`` preset: asymmetric activations).
"""

from __future__ import annotations

import argparse
import sys

import onnx

from npz_feeds import graph_inputs, load_batches, samples, script_main

RECIPES = {"default": "nncf.quantize with its defaults", "transformer": "model_type=nncf.ModelType.TRANSFORMER"}


def quantize(a: argparse.Namespace) -> dict:
    import nncf

    items = list(samples(load_batches(a.data_dir, graph_inputs(a.model), a.max_samples)))
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if a.recipe == "transformer" else {}
    q = nncf.quantize(onnx.load(str(a.model)), nncf.Dataset(items), subset_size=len(items), **kwargs)
    onnx.save(q, str(a.output))
    return {"samples": len(items), "nncf": nncf.__version__}


if __name__ == "__main__":
    sys.exit(script_main(__doc__, RECIPES, quantize))
