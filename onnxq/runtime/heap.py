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
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: glibc's mallopt parameter number for M_MMAP_THRESHOLD
_M_MMAP_THRESHOLD = -3
_done = False


def cap_heap_retention(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold (once per process); a no-op returning False elsewhere."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    return _done
