"""benchmarks/ort_quantize.py: the suite's ONNX Runtime baseline, run as the harness runs it (a script in a child process)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
DIGITS = ROOT / "examples" / "digits"

pytest.importorskip("onnxruntime.quantization")


def _module():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("ort_quantize")


def test_script_quantizes_the_digits_example(tmp_path):
    out = tmp_path / "digits.ort.onnx"
    r = subprocess.run([sys.executable, str(BENCH / "ort_quantize.py"), str(DIGITS / "model.onnx"), str(out), str(DIGITS / "calib"), "minmax", "32"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["seconds"] >= 0
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_reader_stops_at_max_samples_and_pads_sequences(tmp_path):
    for i, seq in enumerate((5, 9)):
        np.savez(tmp_path / f"feed_{i}.npz", input_ids=np.ones((4, seq), np.int64), attention_mask=np.ones((4, seq), np.int64))
    m = _module()
    names = ["input_ids", "attention_mask"]

    plain = m.NpzReader(tmp_path, names, limit=6)
    got = [f for f in iter(plain.get_next, None)]
    assert [f["input_ids"].shape for f in got] == [(4, 5), (2, 9)]  # the second file is cut at 6 samples

    padded = m.NpzReader(tmp_path, names, pad_seq=True)
    got = [f for f in iter(padded.get_next, None)]
    assert [f["input_ids"].shape for f in got] == [(4, 9), (4, 9)]
    assert got[0]["attention_mask"][:, 5:].sum() == 0  # zero padding is masked
    padded.rewind()
    assert padded.get_next()["input_ids"].shape == (4, 9)
