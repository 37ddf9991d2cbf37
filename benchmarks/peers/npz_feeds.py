"""The suite's calibration folder (``*.npz``, one batch per file, keyed by input name) as the peers read it.

Imported by the peer scripts next to it, which run in the peers' own virtual environments: it
needs numpy and onnx only (both in every peer's environment), nothing from onnxq or the rest of
benchmarks/. Every peer gets the same samples in the same order; ``pad_seq`` zero-pads axis 1
(the sequence axis of MiniLM's ``input_ids`` / ``attention_mask`` / ``token_type_ids``: padding
is masked) to the longest in the folder, for the peers that stack all batches into one array or
concatenate them (ModelOpt, the histogram calibrators).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np


def graph_inputs(model: str | Path) -> list[str]:
    """The model's real inputs (graph inputs that are not initializers), read without the weights."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


def load_batches(data_dir: str | Path, names: list[str], limit: int | None = None, pad_seq: bool = False) -> list[dict[str, np.ndarray]]:
    """Every ``.npz`` of ``data_dir`` in name order, the arrays named ``names`` only, at most ``limit`` samples."""
    out: list[dict[str, np.ndarray]] = []
    seen = 0
    for f in sorted(glob.glob(str(Path(data_dir) / "*.npz"))):
        if limit is not None and seen >= limit:
            break
        with np.load(f) as z:
            missing = [k for k in names if k not in z.files]
            if missing:
                raise ValueError(f"{f} has no array named {missing[0]!r} (it has {', '.join(z.files)})")
            feed = {k: np.ascontiguousarray(z[k]) for k in names}
        n = next(iter(feed.values())).shape[0]
        if limit is not None and seen + n > limit:
            feed = {k: v[: limit - seen] for k, v in feed.items()}
            n = limit - seen
        out.append(feed)
        seen += n
    if not out:
        raise ValueError(f"no .npz files in {data_dir}")
    if pad_seq:
        longest = max(v.shape[1] for b in out for v in b.values() if v.ndim >= 2)
        out = [{k: _pad_axis1(v, longest) for k, v in b.items()} for b in out]
    return out


def _pad_axis1(v: np.ndarray, length: int) -> np.ndarray:
    if v.ndim < 2 or v.shape[1] == length:
        return v
    return np.pad(v, [(0, 0), (0, length - v.shape[1])] + [(0, 0)] * (v.ndim - 2))


def stacked(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """All batches as one array per input (batches must agree on every axis but the first)."""
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def samples(batches: list[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """The batches cut into single samples (batch dimension 1), in order."""
    for b in batches:
        n = next(iter(b.values())).shape[0]
        for i in range(n):
            yield {k: v[i: i + 1] for k, v in b.items()}


def script_main(doc: str, recipes: dict[str, str], quantize: Callable[[argparse.Namespace], dict]) -> int:
    """The command line every peer script shares: ``MODEL OUTPUT DATA_DIR RECIPE [MAX_SAMPLES] [--pad-seq]``.

    ``quantize(args)`` writes ``args.output`` and returns facts for the JSON line printed last
    (``seconds`` is added: the peer's own time, start-up and imports excluded)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("data_dir", type=Path, help="folder of .npz feeds keyed by input name")
    ap.add_argument("recipe", choices=sorted(recipes), help="; ".join(f"{k}: {v}" for k, v in recipes.items()))
    ap.add_argument("max_samples", type=int, nargs="?", default=None, help="calibrate on at most this many samples")
    ap.add_argument("--pad-seq", action="store_true", help="zero-pad axis 1 of every feed to the longest in DATA_DIR")
    a = ap.parse_args()
    a.output.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    facts = quantize(a)
    facts = {"seconds": round(time.perf_counter() - t, 3), **facts}
    if not a.output.exists():
        print(f"error: the peer wrote no model to {a.output}", file=sys.stderr)
        return 1
    print(json.dumps(facts))
    return 0
