"""PTQ4DM's calibration sets on the 8-Gaussians denoiser fixture: last timestep only, uniform, the paper's normal.

    nice -n 5 python plugins_contrib/onnxq-ptq4dm/benchmark.py [--draws 5] [--samples 1024] [--n 4096]
        [--configs w8-minmax w8-mse w6-lapq] [--calib last uniform normal normal,mean=0.5,std=0.3]

Every cell quantizes the denoiser (ort target) on ``--draws`` disjoint calibration sets (calibration
seeds 0, 1, ...; each draws its own timesteps, initial noise and per-step noise), then samples
``--n`` points with each quantized model and with the FP32 model from the SAME initial noise and
the SAME per-step noise (paired sampling: the difference is quantization error, not sampling
noise), and scores the endpoints by the sliced Wasserstein distance (SWD, 1024 fixed directions)
and the mean L2 drift of each endpoint from its FP32 partner. A cell is the mean ± the standard
deviation over the calibration draws; the last lines compare each calibration choice with
``uniform`` (difference of the means and its standard error, draws independent).

``--calib`` items: a ``timesteps`` choice followed by ``,key=value`` reader options (``mean``,
``std``, ``samples``, ``pairing``). Configs: ``w8-minmax`` and ``w8-mse`` (W8A8 ``-p minmax`` /
``-p mse``), ``w6-mse`` (W6A6 ``-p mse``), ``w6-lapq`` (W6A6, onnxq-lapq's Lp(2) clips, ``-p lapq -o
weight_bits 6 -o act_bits 6 -o maxiter 0``; needs onnxq-lapq). One thread for torch and ONNX Runtime.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import onnxq
from onnxq_ptq4dm.evaluate import generated, paired_score

HERE = Path(__file__).resolve().parent

CONFIGS: dict[str, tuple[str, str, dict]] = {
    "w8-minmax": ("W8A8 minmax", "minmax", {}),
    "w8-mse": ("W8A8 mse", "mse", {}),
    "w6-mse": ("W6A6 mse", "mse", {"weight_bits": 6, "act_bits": 6}),
    "w6-lapq": ("W6A6 lapq Lp2", "lapq", {"weight_bits": 6, "act_bits": 6, "maxiter": 0, "p_points": 1, "p_min": 2.0, "p_max": 2.0}),
}


def calib_options(item: str) -> dict:
    """``normal,mean=0.5,std=0.3`` -> the reader's data options."""
    choice, *rest = item.split(",")
    opts: dict = {"timesteps": choice}
    for kv in rest:
        k, v = kv.split("=", 1)
        opts[k] = int(v) if k in ("samples", "chunk") else v if k == "pairing" else float(v)
    return opts


def cell(model: Path, method: str, opts: dict, data: dict, draws: int, samples: int, fp32: np.ndarray, n: int) -> np.ndarray:
    """``[draws, 2]``: (SWD, mean drift) of each calibration draw's quantized model."""
    out = []
    for seed in range(draws):
        res = onnxq.optimize(model, method=method, data=f"ptq4dm:{model}", target="ort", options=opts,
                             data_options={"samples": samples, **data, "seed": seed}, show_progress=False, check=False)
        s = paired_score(generated(res.model, model, n=n, seed=123), fp32)
        out.append((s.swd, s.drift))
    return np.array(out)


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=HERE / "tests" / "fixture" / "model.onnx")
    ap.add_argument("--samples", type=int, default=1024, help="calibration samples per draw")
    ap.add_argument("--draws", type=int, default=5, help="disjoint calibration draws per cell")
    ap.add_argument("--n", type=int, default=4096, help="generated points per model (paired)")
    ap.add_argument("--configs", nargs="+", default=["w8-minmax", "w8-mse", "w6-lapq"], choices=sorted(CONFIGS))
    ap.add_argument("--calib", nargs="+", default=["last", "uniform", "normal"])
    a = ap.parse_args(argv)
    fp32 = generated(a.model, a.model, n=a.n, seed=123)
    other = generated(a.model, a.model, n=a.n, seed=456)
    print(f"FP32 vs FP32 from other noise (unpaired: the scale of sampling noise, which paired scores exclude): "
          f"SWD {paired_score(other, fp32).swd:.4f}\n")
    print(f"{a.draws} calibration draws x {a.samples} samples (unless a --calib item sets samples); "
          f"{a.n} paired points; mean ± std over the draws\n")
    print("| config | calibration | SWD to FP32 | mean L2 drift |")
    print("| --- | --- | --- | --- |")
    results: dict[tuple[str, str], np.ndarray] = {}
    for key in a.configs:
        name, method, opts = CONFIGS[key]
        for item in a.calib:
            r = cell(a.model, method, opts, calib_options(item), a.draws, a.samples, fp32, a.n)
            results[key, item] = r
            m, s = r.mean(0), r.std(0, ddof=1) if len(r) > 1 else np.zeros(2)
            print(f"| {name} | {item} | {m[0]:.4f} ± {s[0]:.4f} | {m[1]:.4f} ± {s[1]:.4f} |", flush=True)
    if "uniform" in a.calib and a.draws > 1:
        print("\nagainst uniform: difference of the means (negative = better than uniform) ± its standard error")
        for key in a.configs:
            u = results[key, "uniform"]
            for item in a.calib:
                if item == "uniform":
                    continue
                r = results[key, item]
                d = r.mean(0) - u.mean(0)
                se = np.sqrt(r.var(0, ddof=1) / len(r) + u.var(0, ddof=1) / len(u))
                print(f"  {CONFIGS[key][0]} {item}: SWD {d[0]:+.4f} ± {se[0]:.4f}, drift {d[1]:+.4f} ± {se[1]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
