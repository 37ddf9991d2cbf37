"""Keep freed activation buffers from piling up in the C heap (glibc).

Calibration and the searches allocate and free many same-sized, multi-megabyte buffers (ONNX
Runtime outputs, numpy temporaries). glibc serves a freed block above its mmap threshold from
``mmap`` the first time, then *raises the threshold* to that size, so later blocks of that size
come from the heap, where a few small live allocations behind them keep the memory from ever
being returned: with one ONNX Runtime session per node (the search evaluator) the process grew
by ~12 MB per session on PP-OCR's recognizer (3.8 GB peak for EasyQuant). Fixing the threshold
at 1 MB sends every large buffer to ``mmap``, which returns it to the system on ``free``.

It costs page faults: the calibration passes (a few sessions, buffers reused) measured 1.3-2.2x
slower with it, so only the node-by-node evaluator sets it, when a search starts (it stays set
for the rest of the process).

A dropped ONNX Runtime session's weights are many blocks that glibc keeps for reuse;
:func:`return_freed_memory` hands them back (the host's checks call it after each session).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: glibc's mallopt parameter number for M_MMAP_THRESHOLD
_M_MMAP_THRESHOLD = -3
_done = False


@functools.cache
def _libc_function(name: str):
    """glibc's function ``name``, or None where there is none (macOS, Windows, musl without it).
    Looked up once per process: ``find_library`` runs ``ldconfig``, and checks call this after every session."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def cap_heap_retention(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold (once per process); a no-op returning False elsewhere."""
    global _done
    if _done:
        return True
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    return _done


def return_freed_memory() -> None:
    """Hand the heap pages that a dropped ONNX Runtime session freed back to the operating system.

    glibc keeps freed heap memory for reuse, and a session's weights are many blocks: after the
    host's check of a 2.2 GB model (a float session, then the rewritten model's) 1.8 GB stayed
    resident, and the sessions that followed grew the heap again past it (emb4bit on the large
    benchmark model: 1.52x its float32 bytes). Elsewhere (no glibc ``malloc_trim``): nothing.
    """
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)
