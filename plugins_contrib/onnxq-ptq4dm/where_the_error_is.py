"""Where along the chain each calibration choice leaves its error (the diagnostic behind the README's analysis).

    nice -n 5 python plugins_contrib/onnxq-ptq4dm/where_the_error_is.py [--config w6-lapq] [--draws 3]
        [--calib uniform normal]

For every calibration choice (``benchmark.py``'s ``--calib`` syntax) and draw, quantizes the denoiser
and measures the RMS error of its output against FP32's on the FP32 sampler's own ``x_t`` at every
timestep (teacher forcing, 1024 trajectories); prints the mean over draws in bands of timesteps
(t = T-1 is the noise end, t = 0 the data end).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import onnxq
from onnxq_ptq4dm.evaluate import eps_error_by_timestep

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_num_threads(1)
    from benchmark import CONFIGS, calib_options  # the sibling script: one list of configs

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=HERE / "tests" / "fixture" / "model.onnx")
    ap.add_argument("--config", default="w6-lapq", choices=sorted(CONFIGS))
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--calib", nargs="+", default=["uniform", "normal"])
    a = ap.parse_args(argv)
    name, method, opts = CONFIGS[a.config]
    bands = [(99, 80), (79, 60), (59, 40), (39, 20), (19, 10), (9, 0)]
    print(f"{name}: RMS output error vs FP32 by timestep band, mean over {a.draws} draws\n")
    print("| calibration | " + " | ".join(f"t {hi}-{lo}" for hi, lo in bands) + " |")
    print("| --- |" + " --- |" * len(bands))
    for item in a.calib:
        errs = []
        for seed in range(a.draws):
            res = onnxq.optimize(a.model, method=method, data=f"ptq4dm:{a.model}", target="ort", options=opts,
                                 data_options={"samples": a.samples, **calib_options(item), "seed": seed}, show_progress=False, check=False)
            errs.append(eps_error_by_timestep(res.model, a.model))
        e = np.mean(errs, 0)
        print(f"| {item} | " + " | ".join(f"{e[lo:hi + 1].mean():.4f}" for hi, lo in bands) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
