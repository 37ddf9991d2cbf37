"""What the statistics pass's min/max round costs on PP-OCR det, in its three forms, and what auto's pool pass bins.

    python benchmarks/range_round.py            # needs tasks.prepare_task('ppocr-det', ...) to have written .bench/

Each form is its own child process (``ru_maxrss`` is per process), over the 32 calibration pages, on the 253
tensors that feed a Conv, ConvTranspose, Add, Concat or Mul:

* ``model``: the bare model, no tensor exposed (what the round cannot beat);
* ``in-graph``: ReduceMin/ReduceMax after each tensor (``statistics._range_model``), without ONNX Runtime's arena
  as the passes run, and ``in-graph+arena`` with it;
* ``exposed``: the tensors made outputs, numpy's min and max (the round since commit 75aea38 where a
  histogram round follows).

Then ``collect_unions`` as ``-p auto``'s pool pass calls it (3 subsets of 24 pages, 8 held out; histograms of the
61 Conv/ConvTranspose inputs) with every group's own histograms and with the subsets' only (``own=``), counting
the values binned. Prints one line per measurement.
"""

from __future__ import annotations

import glob
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / ".bench" / "models" / "ppocr-det" / "fp32.onnx"
CALIB = ROOT / ".bench" / "data" / "ppocr-det" / "calib"
FORMS = ("model", "in-graph", "in-graph+arena", "exposed")


def _pages() -> list[dict[str, np.ndarray]]:
    return [dict(np.load(f)) for f in sorted(glob.glob(str(CALIB / "*.npz")))]


def _inputs_of(model: onnx.ModelProto, ops: tuple[str, ...]) -> list[str]:
    weights = {i.name for i in model.graph.initializer}
    return list(dict.fromkeys(i for n in model.graph.node if n.op_type in ops for i in n.input if i and i not in weights))


def one_form(form: str) -> None:
    """Time one form of the range round over every page and print its wall time and this process's peak RSS."""
    from onnxq.calib import statistics
    from onnxq.graph.edit import with_outputs
    from onnxq.runtime import ort as ort_backend

    model = onnx.load(str(MODEL))
    tensors = _inputs_of(model, ("Conv", "ConvTranspose", "Add", "Concat", "Mul"))
    if form == "model":
        aug, names = model, [o.name for o in model.graph.output]
    elif form == "exposed":
        aug, names = with_outputs(model, [(t, onnx.TensorProto.FLOAT) for t in tensors]), tensors
    else:
        aug, names = statistics._range_model(model, tensors)
    sess = ort_backend.make_session(aug, "basic", arena=form == "in-graph+arena")
    pages = _pages()
    t = time.perf_counter()
    for feeds in pages:
        outs = ort_backend.run(sess, feeds, names)
        if form == "exposed":
            [(x.min(), x.max()) for x in outs]
    wall = time.perf_counter() - t
    print(f"{form:15s} {len(tensors)} tensors, {len(pages)} pages: {wall:.2f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB", flush=True)


def binned() -> None:
    """Values ``collect_unions`` bins with every group's own histograms, and with the subsets' only."""
    from onnxq.calib import sharded, statistics
    from onnxq.calib.readers import Batch

    model = onnx.load(str(MODEL))
    pages = [Batch(p, None, f"page {k}") for k, p in enumerate(_pages())]
    held, pool = pages[0::4], [b for k, b in enumerate(pages) if k % 4]
    groups = [pool[k::3] for k in range(3)] + [held]
    tensors = _inputs_of(model, ("Conv", "ConvTranspose"))
    requests = [statistics.StatRequest(t, "histogram") for t in tensors]
    count = [0]
    real = sharded.bincount

    def counting(x: np.ndarray, amax: float, nbins2: int) -> np.ndarray:
        count[0] += np.size(x)
        return real(x, amax, nbins2)

    sharded.bincount = counting
    for own in (None, range(3)):
        count[0] = 0
        t = time.perf_counter()
        sharded.collect_unions(model, requests, groups, [range(3), range(4)], own=own)
        print(f"collect_unions, {len(tensors)} tensors, own={'every group' if own is None else 'the 3 subsets'}: "
              f"{count[0]:.3e} values binned, {time.perf_counter() - t:.1f} s", flush=True)


def main() -> None:
    if len(sys.argv) > 1:
        one_form(sys.argv[1])
        return
    if not MODEL.exists():
        raise SystemExit(f"{MODEL} is missing: run benchmarks/tasks.py's prepare_task for ppocr-det first")
    for form in FORMS:
        subprocess.run([sys.executable, __file__, form], check=True)
    binned()


if __name__ == "__main__":
    main()
