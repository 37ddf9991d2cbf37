"""PTQ4DM's calibration sets on the 8-Gaussians denoiser fixture: last timestep only, uniform, the paper's normal.

    python plugins_contrib/onnxq-ptq4dm/benchmark.py [--model tests/fixture/model.onnx] [--samples 1024] [--seeds 3]

Each row quantizes the denoiser (ort target) with the calibration set drawn by ``--data
ptq4dm:MODEL --data-opt timesteps=...``, samples 2000 points with it from the same noise as the FP32
sampler, and reports the sliced Wasserstein distance (SWD, 256 directions) to the FP32 samples,
mean over ``--seeds`` calibration seeds (and the worst), and the paired RMS distance of each
sample to the FP32 sample from the same noise. W8A8: ``-p minmax`` and ``-p mse``; W6A6:
onnxq-lapq's Lp(2) clips at 6 bits (``-p lapq -o weight_bits 6 -o act_bits 6 -o maxiter 0``), when
installed. The FP32 sampler's own seed-to-seed SWD (two noise draws) is printed as the noise floor.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import onnxq
from onnxq_ptq4dm.evaluate import generated, paired_rms, swd_to_fp32
from onnxq_ptq4dm.metrics import sliced_wasserstein

HERE = Path(__file__).resolve().parent


def configs() -> list[tuple[str, str, dict]]:
    rows = [("W8A8 minmax", "minmax", {}), ("W8A8 mse", "mse", {})]
    try:
        import onnxq_lapq  # noqa: F401

        rows.append(("W6A6 (lapq Lp2 init)", "lapq", {"weight_bits": 6, "act_bits": 6, "maxiter": 0, "p_points": 1, "p_min": 2.0, "p_max": 2.0}))
    except ImportError:
        pass
    return rows


def run(model: Path, samples: int, seeds: int) -> list[tuple[str, str, float, float, float]]:
    """(config, timesteps, mean SWD, worst SWD, mean paired RMS) for every config and timestep choice."""
    out = []
    for name, method, opts in configs():
        for choice in ("last", "uniform", "normal"):
            swds, rms = [], []
            for seed in range(seeds):
                res = onnxq.optimize(model, method=method, data=f"ptq4dm:{model}", target="ort", options=opts,
                                     data_options={"timesteps": choice, "samples": samples, "seed": seed},
                                     show_progress=False, check=False)
                swds.append(swd_to_fp32(res.model, model))
                rms.append(paired_rms(res.model, model))
            out.append((name, choice, float(np.mean(swds)), float(np.max(swds)), float(np.mean(rms))))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=HERE / "tests" / "fixture" / "model.onnx")
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args(argv)
    floor = sliced_wasserstein(generated(a.model, a.model, seed=123), generated(a.model, a.model, seed=456))
    print(f"FP32 sampler, two noise draws: SWD {floor:.4f} (the noise floor)\n")
    print("| config | calibration timesteps | SWD to FP32 (mean) | worst | paired RMS to FP32 |")
    print("| --- | --- | --- | --- | --- |")
    for name, choice, mean, worst, rms in run(a.model, a.samples, a.seeds):
        print(f"| {name} | {choice} | {mean:.4f} | {worst:.4f} | {rms:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
