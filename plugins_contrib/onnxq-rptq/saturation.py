"""How far evaluation activations overshoot the calibrated ranges, per tensor and per RPTQ cluster (MiniLM).

    nice -n 5 python plugins_contrib/onnxq-rptq/saturation.py [--calib 32] [--sentences 128] [--clusters 1 4 8]

Min-max ranges from ``--calib`` calibration sentences clip whatever the evaluated sentences reach
beyond them. For every RPTQ site of all-MiniLM-L6-v2 and every cluster (k-means on the calibration
ranges, as ``-p rptq`` clusters), the overshoot is the span the cluster's evaluation values need
over the span of its calibrated grid (both holding zero; 1: nothing clipped). Printed per cluster
count: the share of clusters and of channels that overshoot by more than 5%, and the
channel-weighted mean and the largest overshoot. Narrow clusters have less headroom than one
per-tensor range set by an outlier channel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "benchmarks" / "minilm")]

import text_data  # noqa: E402
from embeddings import DEFAULT_MODEL  # noqa: E402

from onnxq.calib.readers import Batch  # noqa: E402
from onnxq.calib.statistics import ChannelRange, StatRequest, collect  # noqa: E402
from onnxq.graph.placement import build_plan  # noqa: E402
from onnxq.graph.targets import get_profile  # noqa: E402
from onnxq_rptq import cluster_ranges, find_sites  # noqa: E402


def ranges(model: onnx.ModelProto, tensors: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    reqs = {t: StatRequest(t, ChannelRange(-1)) for t in tensors}
    got = collect(model, list(reqs.values()), lambda: iter(Batch(f) for f in feeds), show_progress=False)
    return {t: np.asarray(got[r], np.float64) for t, r in reqs.items()}


def overshoot(calib: np.ndarray, ev: np.ndarray, members: np.ndarray) -> float:
    """The span the evaluation values of a cluster need over the span its calibrated grid covers
    (both holding zero, as onnxq's activation grids do): 1 when nothing is clipped."""
    hi, lo = max(calib[0][members].max(), 0.0), min(calib[1][members].min(), 0.0)
    need_hi, need_lo = max(ev[0][members].max(), hi), min(ev[1][members].min(), lo)
    return float((need_hi - need_lo) / (hi - lo)) if hi > lo else 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--sentences", type=int, default=128)
    ap.add_argument("--clusters", type=int, nargs="+", default=[1, 4, 8])
    args = ap.parse_args()
    model = onnx.load(str(args.model))
    sites = find_sites(model, build_plan(model, get_profile("ort")))
    tensors = [s.tensor for s in sites]
    cal = ranges(model, tensors, text_data.calibration(args.calib))
    ev = ranges(model, tensors, text_data.evaluation(args.sentences))
    for k in args.clusters:
        over, weights = [], []
        for t in tensors:
            cl = cluster_ranges(cal[t], k)
            for c in range(cl.count):
                m = cl.members(c)
                over.append(overshoot(cal[t], ev[t], m))
                weights.append(len(m))
        o, w = np.array(over), np.array(weights)
        print(json.dumps({"clusters": k, "groups": len(o), "share_over_5pct": round(float((o > 1.05).mean()), 3),
                          "channels_over_5pct": round(float(w[o > 1.05].sum() / w.sum()), 3),
                          "mean_overshoot": round(float((o * w).sum() / w.sum()), 3), "max_overshoot": round(float(o.max()), 2)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
