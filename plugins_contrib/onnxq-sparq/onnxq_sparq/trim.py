"""The SPARQ trim of one 8-bit activation value: keep an ``n``-bit window placed at its leading one.

bSPARQ (Shomron et al., arXiv 2105.11010) replaces an unsigned 8-bit activation ``v`` by the
``n``-bit slice of its binary representation that starts at the highest set bit, chosen from a
fixed set of window placements (the hardware's multiplexer options), with the bits below the
window rounded half to even and the window saturated at all-ones if rounding overflows it. As a
function of ``v`` alone it is a 256-entry table, which is how the ONNX emulation applies it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

VALUE_BITS = 8


def window_shifts(bits: int, options: int) -> tuple[int, ...]:
    """The right shifts of the window placements, largest first.

    ``options`` placements evenly spaced from the top window (shift ``8 - bits``) down to the low
    one (shift 0): for 4-bit windows 5 options are every placement (bits 7:4, 6:3, 5:2, 4:1, 3:0),
    3 are [7:4], [5:2], [3:0] and 2 are [7:4], [3:0]. One option is the top window alone, which is
    plain ``bits``-bit uniform quantization over the same 8-bit range (the comparison baseline).
    """
    if not 1 <= bits < VALUE_BITS:
        raise ValueError(f"window bits must be between 1 and {VALUE_BITS - 1}, got {bits}")
    top = VALUE_BITS - bits
    if options == 1:
        return (top,)
    if not 2 <= options <= top + 1 or top % (options - 1):
        valid = [k for k in range(1, top + 2) if k == 1 or top % (k - 1) == 0]
        raise ValueError(f"{bits}-bit windows can be placed in {valid} evenly spaced ways, not {options}")
    step = top // (options - 1)
    return tuple(range(top, -1, -step))


def trim(values: np.ndarray, bits: int = 4, options: int = 5, rounding: bool = True) -> np.ndarray:
    """Trim unsigned 8-bit ``values`` (any integer array in [0, 255]) to ``bits``-bit windows."""
    v = np.asarray(values).astype(np.int64)
    if v.size and (v.min() < 0 or v.max() >= 1 << VALUE_BITS):
        raise ValueError("SPARQ trims unsigned 8-bit values (0..255)")
    shifts = window_shifts(bits, options)
    # the lowest placement whose window still holds the leading one (the top one holds everything)
    shift = np.full(v.shape, shifts[0], np.int64)
    for s in shifts[1:]:
        shift = np.where(v < (1 << (s + bits)), s, shift)
    kept = v >> shift
    if rounding:
        rest = v - (kept << shift)
        half = (1 << shift) >> 1
        up = (shift > 0) & ((rest > half) | ((rest == half) & (kept % 2 == 1)))  # half to even
        kept = np.minimum(kept + up, (1 << bits) - 1)  # an overflow saturates the window
    return kept << shift


@lru_cache(maxsize=None)
def trim_table(bits: int = 4, options: int = 5, rounding: bool = True) -> np.ndarray:
    """``trim`` of every value 0..255, as int32 (the ONNX emulation gathers from it)."""
    table = trim(np.arange(1 << VALUE_BITS), bits, options, rounding).astype(np.int32)
    table.setflags(write=False)
    return table
