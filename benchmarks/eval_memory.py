"""Peak memory of ``onnxq optimize`` with and without ``--eval-data`` on a 640x480 detector-shaped model.

Builds a small conv net with a 640x480 input and a full-resolution output map (the shape of a
text detector's evaluation load), 16 calibration and 32 evaluation images, then runs
``onnxq optimize`` three ways under ``/usr/bin/time`` and prints the peak RSS of each:
quantization alone (``--no-check``), with the in-sample fidelity check, and with ``--eval-data``.
Usage (CPU, about 3 minutes): ``python benchmarks/eval_memory.py``
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(folder: Path) -> None:
    rng = np.random.default_rng(0)

    def w(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * (2.0 / np.prod(shape[1:])) ** 0.5).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="c1"), helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="c2"), helper.make_node("Relu", ["c2"], ["r2"], name="r2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], pads=[1, 1, 1, 1], name="c3"), helper.make_node("Relu", ["c3"], ["r3"], name="r3"),
        helper.make_node("Conv", ["r3", "w4"], ["c4"], name="c4"),
        helper.make_node("Resize", ["c4", "", "scales"], ["up"], mode="nearest", name="up"),
        helper.make_node("Sigmoid", ["up"], ["maps"], name="sig"),
    ]
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 480, 640])],
                              [helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["N", 1, 480, 640])],
                              [w("w1", (16, 3, 3, 3)), w("w2", (32, 16, 3, 3)), w("w3", (32, 32, 3, 3)), w("w4", (1, 32, 1, 1)),
                               numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), folder / "det.onnx")
    for name, files in (("calib", 2), ("eval", 4)):
        (folder / name).mkdir()
        for i in range(files):
            np.savez(folder / name / f"{i}.npz", x=rng.random((8, 3, 480, 640), dtype=np.float32))


def peak_mb(args: list[str], cwd: Path) -> tuple[float, float]:
    proc = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M wall=%e", sys.executable, "-m", "onnxq", *args], cwd=cwd,
                          capture_output=True, text=True, check=True)
    m = re.search(r"maxrss_kb=(\d+) wall=([\d.]+)", proc.stderr)
    return int(m.group(1)) / 1024, float(m.group(2))


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="onnxq-evalmem-") as tmp:
        folder = Path(tmp)
        build(folder)
        base = ["optimize", "det.onnx", "-p", "minmax", "--data", "calib", "--output", "q.onnx", "--force", "--no-cache", "--quiet"]
        for label, extra in (("quantization only (--no-check)", ["--no-check"]), ("with the in-sample fidelity check", []),
                             ("with --eval-data (32 images)", ["--eval-data", "eval"])):
            mb, wall = peak_mb(base + extra, folder)
            print(f"{label:40s} peak RSS {mb:7.0f} MB  wall {wall:6.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
