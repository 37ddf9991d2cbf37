"""How far a correct float rewrite moves PP-OCR det's outputs, against the model's own float32 noise
floor and against small deliberate bugs (the figures behind ``NOISE_FLOOR_FACTOR`` in
onnxq/pipeline/checks.py; benchmarks/README.md, "Robustness").

    nice -n 5 python benchmarks/float_rewrite_noise.py            # ~2 min on a busy 2-core machine

For each float rewrite of ``-p cfws`` and ``-p equalize -p mse`` (INT8, ort) it prints the rewrite's
relative output error, the noise floor (ONNX Runtime with graph optimizations on vs off, on the
model before the rewrite), and for the first rewrite the error of output channel 0 of the first,
middle and last conv scaled by 1 + 1e-3 and 1 + 1e-2.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx  # noqa: E402
from configs import SIZES  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from tasks import prepare_task  # noqa: E402

import onnxq.pipeline.stages as stages  # noqa: E402
from onnxq import optimize  # noqa: E402
from onnxq.pipeline.checks import check_float_rewrite, float_noise_floor, outputs_error  # noqa: E402


def scaled_channel(model: onnx.ModelProto, which: int, rel: float) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    t = inits[[n for n in out.graph.node if n.op_type == "Conv"][which].input[1]]
    w = numpy_helper.to_array(t).copy()
    w[0] *= 1 + rel
    t.CopyFrom(numpy_helper.from_array(w, t.name))
    return out


def main() -> None:
    first = []

    def measuring(who, before, after, batch):
        err = outputs_error(before, after, batch)
        print(f"{who}: relative error {err:.3e}, noise floor {float_noise_floor(before, batch):.3e}", flush=True)
        if not first:
            first.append(who)
            n = sum(x.op_type == "Conv" for x in after.graph.node)
            for which in (0, n // 2, n - 1):
                for rel in (1e-3, 1e-2):
                    bug = outputs_error(before, scaled_channel(after, which, rel), batch)
                    print(f"  conv {which} of {n}, channel 0 x (1 + {rel:g}): relative error {bug:.3e}", flush=True)
        check_float_rewrite(who, before, after, batch)  # the run goes on as it would

    stages.check_float_rewrite = measuring  # the stage's own call: no public hook sees both models
    work = Path(tempfile.mkdtemp(prefix="onnxq-rewrite-noise-"))
    task = prepare_task("ppocr-det", work, SIZES["quick"], cjk=False, as_shipped=False)
    for methods in (["cfws"], ["equalize", "mse"]):
        optimize(str(task.model), str(work / "out.onnx"), method=methods, data=str(task.calib), target="ort", show_progress=False, force=True)


if __name__ == "__main__":
    main()
