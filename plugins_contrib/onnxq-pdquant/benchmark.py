"""The README's tables: Lp(2) init, BRECQ and PD-Quant (with both ablations) on one zoo fixture.

    python plugins_contrib/onnxq-pdquant/benchmark.py {mobilenetv3_hswish,imagenet_norm_cnn,mnist_norm_resnet} 4 4 [--seeds 0 1 2] [--split test|val]
        [--samples 128] [--iters 200] [--dc-iters 50] [--only pdquant brecq] [--pd key=value ...]
        [--brecq key=value ...] [--jsonl out.jsonl] [--calib-measures]

Every column of one seed is calibrated on the same ``--samples`` N images (default 128) of the
fixture's training split (seed 0 at N = 128: the fixture's ``calib.npz``; seed s > 0: another draw of
N from the same training images) with target ``ort``, and scored on images disjoint from every
calibration set. A larger N holds the smaller one of the same seed (the draws are nested). The
training splits hold: mobilenetv3_hswish and imagenet_norm_cnn 2,000 shapes each (the images they were
trained on: ``colour_shapes`` generator seed 1 for both), so N <= 2,000;
mnist_norm_resnet 1,297 digits, of which the 8 calibration seeds' 128-image draws cover 739 and the
other 558 are the ``val`` split, so N <= 739 there (larger draws come from those 739 only, which
keeps ``val`` the same digits at every N).

* ``test`` (the figures): the fixture's ``eval.npz`` plus more of the same distribution, 4,000 images
  in all (mobilenetv3_hswish and imagenet_norm_cnn: 3,600 more synthetic shapes, generator seed 3, after
  the fixture's 400 of seed 2; mnist_norm_resnet: the 500
  held-out digits and each shifted by one pixel in 7 directions, as the model's training shifted them);
* ``val`` (for choosing settings, never the test images): mobilenetv3_hswish and imagenet_norm_cnn 2,000
  synthetic shapes of generator seed 4; mnist_norm_resnet the training digits outside every calibration set used;
* ``val-shifted`` (mnist_norm_resnet): those validation digits and each shifted as in ``test`` (4,464 images).

Three measures per run: top-1 against the labels, top-1 agreement with the FP32 model, and the mean
``KL(softmax(z_fp) || softmax(z_q))`` of the logits (finer than accuracy when the fixture is easy).
Then one summary line per column: mean ± standard deviation over the seeds. Wall seconds are printed
but noisy on a shared machine. One torch thread, one ONNX Runtime thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxq

ZOO = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "zoo"
CALIB = 128
SEEDS_USED = range(8)  # calibration seeds a val split must avoid (mnist_norm_resnet)


def _zoo_common():
    sys.path.insert(0, str(ZOO))
    import _common  # the fixtures' own data generators (tests/fixtures/zoo/_common.py)

    return _common


def _shifted(x: np.ndarray, dy: int, dx: int, fill: float) -> np.ndarray:
    out = np.full_like(x, fill)
    h, w = x.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out


def _nested_draw(n_total: int, n: int, seed: int, pool: np.ndarray | None = None) -> np.ndarray:
    """``n`` indices of ``calib_subset``'s permutation for ``seed`` (restricted to ``pool``), sorted:
    the first ``n`` of one permutation, so a draw of 128 is ``calib_subset(n_total, 128, seed)`` and a
    larger draw of the same seed contains it."""
    order = np.random.default_rng(seed).permutation(n_total)
    if pool is not None:
        order = order[np.isin(order, pool)]
    if n > len(order):
        raise SystemExit(f"--samples {n}: the training split has only {len(order)} images to calibrate on")
    return np.sort(order[:n])


def load_data(fixture: str, split: str, seeds: list[int], n: int = CALIB) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """(``n`` calibration images per seed, evaluation images, labels) for ``fixture``."""
    c = _zoo_common()
    d = ZOO / fixture
    fixture_calib = np.load(d / "calib.npz")["input"]
    ev = np.load(d / "eval.npz")
    if fixture in ("mobilenetv3_hswish", "imagenet_norm_cnn"):
        # both fixtures' build.py: training images colour_shapes(2000, seed=1), eval.npz seed 2
        x_tr = c.imagenet_normalize(c.colour_shapes(2000, seed=1)[0])
        assert np.array_equal(x_tr[:CALIB], fixture_calib), "fixture calib.npz is no longer the first 128 training images"
        if n > len(x_tr):
            raise SystemExit(f"--samples {n}: the training split has only {len(x_tr)} images to calibrate on")
        picks = {s: np.arange(n) if s == 0 else _nested_draw(len(x_tr), n, s) for s in seeds}
        if split == "test":
            more, y_more = c.colour_shapes(3600, seed=3)
            x_ev, y_ev = np.concatenate([ev["input"], c.imagenet_normalize(more)]), np.concatenate([ev["label"], y_more])
        else:
            xv, y_ev = c.colour_shapes(2000, seed=4)
            x_ev = c.imagenet_normalize(xv)
    elif fixture == "mnist_norm_resnet":
        x_tr, y_tr, _, _ = c.digits_split(28)
        x_tr, y_tr = c.mnist_normalize(x_tr).numpy(), np.asarray(y_tr)
        assert np.array_equal(x_tr[c.calib_subset(len(x_tr), CALIB, 0)], fixture_calib), "fixture calib.npz is no longer calib_subset(seed 0)"
        used = np.unique(np.concatenate([c.calib_subset(len(x_tr), CALIB, seed=s) for s in set(SEEDS_USED) | set(seeds)]))
        picks = {s: _nested_draw(len(x_tr), n, s, used) for s in seeds}
        bg = float(c.mnist_normalize(np.zeros(1, np.float32))[0])
        shifts = [(-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (1, 1), (-1, 1)]
        if split == "test":
            x_ev = np.concatenate([ev["input"]] + [_shifted(ev["input"], dy, dx, bg) for dy, dx in shifts])
            y_ev = np.tile(ev["label"], 1 + len(shifts))
        else:
            keep = np.setdiff1d(np.arange(len(x_tr)), used)  # every calibration draw lies inside ``used``
            x_ev, y_ev = x_tr[keep], y_tr[keep]
            if split == "val-shifted":  # the test split's one-pixel shifts, on the validation digits
                x_ev = np.concatenate([x_ev] + [_shifted(x_ev, dy, dx, bg) for dy, dx in shifts])
                y_ev = np.tile(y_ev, 1 + len(shifts))
    else:
        raise SystemExit(f"benchmark.py knows mobilenetv3_hswish, imagenet_norm_cnn and mnist_norm_resnet, not {fixture}")
    return {s: np.ascontiguousarray(x_tr[p], dtype=np.float32) for s, p in picks.items()}, np.ascontiguousarray(x_ev, dtype=np.float32), y_ev


def logits(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i : i + 500]})[0] for i in range(0, len(x), 500)])


def measures(z_q: np.ndarray, z_fp: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """top-1, top-1 agreement with FP32, mean KL(softmax(z_fp) || softmax(z_q))."""

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64) - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lp, lq = log_softmax(z_fp), log_softmax(z_q)
    return {"top1": float(np.mean(z_q.argmax(1) == y)), "agree": float(np.mean(z_q.argmax(1) == z_fp.argmax(1))),
            "kl": float(np.mean((np.exp(lp) * (lp - lq)).sum(1)))}


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fixture")
    ap.add_argument("wbits", type=int)
    ap.add_argument("abits", type=int)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--split", choices=["test", "val", "val-shifted"], default="test")
    ap.add_argument("--samples", type=int, default=CALIB, help="calibration images per seed (every column of a seed the same)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--dc-iters", type=int, default=50)
    ap.add_argument("--only", nargs="*", default=None, help="column names to run (default: all)")
    ap.add_argument("--pd", nargs="*", default=[], metavar="KEY=VALUE", help="extra pdquant options (all pdquant columns)")
    ap.add_argument("--brecq", nargs="*", default=[], metavar="KEY=VALUE", help="extra onnxq-brecq options of the brecq column, e.g. blocks=layer")
    ap.add_argument("--jsonl", type=Path, default=None, help="append one JSON line per run")
    ap.add_argument("--calib-measures", action="store_true",
                    help="also score every run on its own calibration images (a fit-vs-generalisation diagnostic; "
                         "the JSON line then holds them as calib_* and pdquant's per-block report)")
    a = ap.parse_args()
    fixture = Path(a.fixture).name
    d = ZOO / fixture
    calib, x_ev, y_ev = load_data(fixture, a.split, a.seeds, a.samples)
    z_fp = logits(d / "model.onnx", x_ev)
    print(f"{fixture}: {len(x_ev)} {a.split} images, FP32 top-1 {np.mean(z_fp.argmax(1) == y_ev):.4f}; calibration {a.samples} images, seeds {a.seeds}", flush=True)
    bits = {"weight_bits": a.wbits, "act_bits": a.abits}
    lp = {**bits, "maxiter": 0, "p_points": 1, "p_min": 2, "p_max": 2}
    pd = {**bits, "iters": a.iters, "dc_iters": a.dc_iters, "samples": a.samples, **{k: _value(v) for k, v in (kv.split("=", 1) for kv in a.pd)}}
    columns = {
        "lp-init": ("lapq", lp),
        "brecq": (["lapq", "brecq"], [lp, {"weight_bits": a.wbits, "keep_first_last": False, "iters": a.iters, "samples": a.samples,
                                           **{k: _value(v) for k, v in (kv.split("=", 1) for kv in a.brecq)}}]),
        "pdquant": ("pdquant", pd),
        "pdquant-no-pd": ("pdquant", {**pd, "pd_loss": False}),
        "pdquant-no-dc": ("pdquant", {**pd, "dc": False}),
        "pdquant-dc": ("pdquant", {**pd, "dc": True}),  # the DC ablation at 8-bit activations, where DC is off by default
    }
    results: dict[str, list[dict[str, float]]] = {}
    for seed in a.seeds:
        data = [{"input": calib[seed][i : i + 64]} for i in range(0, a.samples, 64)]
        for name, (method, options) in columns.items():
            if (a.only and name not in a.only) or (not a.only and name == "pdquant-dc" and a.abits < 8) or (not a.only and name == "pdquant-no-dc" and a.abits >= 8):
                continue  # by default only the DC column that differs from the defaults at these bits
            t0 = time.perf_counter()
            r = onnxq.optimize(d / "model.onnx", method=method, options=options, data=data, target="ort", show_progress=False, check=False)
            m = measures(logits(r.model, x_ev), z_fp, y_ev)
            results.setdefault(name, []).append(m)
            extra: dict = {}
            if a.calib_measures:  # the calibration images carry no labels here: agreement and KL only
                mc = measures(logits(r.model, calib[seed]), logits(d / "model.onnx", calib[seed]), np.full(len(calib[seed]), -1))
                extra = {"calib_agree": mc["agree"], "calib_kl": mc["kl"], "blocks": r.report.methods.get("pdquant", {}).get("blocks")}
            print(f"{fixture} W{a.wbits}A{a.abits} seed {seed} {name}: top-1 {m['top1']:.4f}  agree {m['agree']:.4f}  KL {m['kl']:.4f}  "
                  + (f"[calibration images: agree {extra['calib_agree']:.4f}  KL {extra['calib_kl']:.4f}]  " if extra else "")
                  + f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if a.jsonl:
                with a.jsonl.open("a") as f:
                    f.write(json.dumps({"fixture": fixture, "wbits": a.wbits, "abits": a.abits, "split": a.split, "seed": seed, "samples": a.samples, "column": name,
                                        "options": options, **m, **extra}, default=str) + "\n")
    print(f"summary {fixture} W{a.wbits}A{a.abits} ({a.split}, {len(x_ev)} images, {a.samples} calibration images, mean ± sd over seeds {a.seeds}):")
    for name, ms in results.items():
        cells = "  ".join(f"{k} {np.mean([m[k] for m in ms]) * (100 if k != 'kl' else 1):.{2 if k != 'kl' else 4}f} ± "
                          f"{np.std([m[k] for m in ms]) * (100 if k != 'kl' else 1):.{2 if k != 'kl' else 4}f}" for k in ("top1", "agree", "kl"))
        print(f"  {name:14s} {cells}", flush=True)


if __name__ == "__main__":
    main()
