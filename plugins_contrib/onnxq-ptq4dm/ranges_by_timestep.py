"""Which timesteps set the denoiser's activation ranges: the diagnostic behind benchmark.py's figures.

    nice -n 5 python plugins_contrib/onnxq-ptq4dm/ranges_by_timestep.py [--n 1024]

Runs the FP32 sampler on ``--n`` points, records every float activation's largest magnitude at
each timestep, and prints, per activation: the timestep where the range peaks, the range at the
noise end (t = T - 1) and at the data end (t = 0) relative to the peak, and the share of each
calibration choice's samples (last / uniform / normal) that come from timesteps where the
activation reaches at least 90 % of its peak (the samples that decide a min-max or MSE range).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx

from onnxq.graph.edit import with_outputs
from onnxq.runtime.ort import make_session
from onnxq_ptq4dm.sampler import sample, schedule_of
from onnxq_ptq4dm.timesteps import iterations, paired_timesteps

HERE = Path(__file__).resolve().parent


def profile(model_path: Path, n: int) -> tuple[list[str], np.ndarray]:
    """Activation names and ``[T, tensors]``: the largest magnitude of each activation at each timestep."""
    model = onnx.load(str(model_path))
    skip = {"Cast", "Constant", "Unsqueeze"}
    names = [o for node in model.graph.node if node.op_type not in skip for o in node.output]
    sess = make_session(with_outputs(model, [(nm, onnx.TensorProto.FLOAT) for nm in names]), "disable", threads=1)
    schedule = schedule_of(model_path)
    peak = np.zeros((schedule.steps, len(names)))

    def denoise(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        outs = sess.run(None, {"x": x, "t": t})
        peak[int(t[0])] = [float(np.max(np.abs(o))) for o in outs]
        return outs[names.index("eps")]

    sample(denoise, schedule, np.random.default_rng(7).standard_normal((n, 2)), seed=8)
    return names, peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=HERE / "tests" / "fixture" / "model.onnx")
    ap.add_argument("--n", type=int, default=1024)
    a = ap.parse_args(argv)
    names, peak = profile(a.model, a.n)
    steps = peak.shape[0]
    weights = {c: np.bincount(paired_timesteps(iterations(100000, steps, c, seed=0), steps), minlength=steps) / 100000
               for c in ("last", "uniform", "normal")}
    print("| activation | peak at t | t = T-1 / peak | t = 0 / peak | share of samples at >= 90 % of peak: last / uniform / normal |")
    print("| --- | --- | --- | --- | --- |")
    for j, nm in enumerate(names):
        p = peak[:, j]
        hot = p >= 0.9 * p.max()
        shares = " / ".join(f"{weights[c][hot].sum():.2f}" for c in ("last", "uniform", "normal"))
        print(f"| {nm} | {int(np.argmax(p))} | {p[-1] / p.max():.2f} | {p[0] / p.max():.2f} | {shares} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
