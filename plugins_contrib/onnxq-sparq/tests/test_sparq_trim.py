"""The trim function against a bit-by-bit reference on all 256 inputs, for every window option."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxq_sparq", reason="onnxq-sparq is not installed (pip install -e plugins_contrib/onnxq-sparq)")

from onnxq_sparq.trim import trim, trim_table, window_shifts  # noqa: E402

#: (window bits, placements) the paper names: 4-bit with 5, 3 or 2 options; 6-bit/3, 3-bit/6, 2-bit/7; plus 1 (uniform)
OPTIONS = [(4, 5), (4, 3), (4, 2), (6, 3), (3, 6), (2, 7), (4, 1)]


def reference(v: int, bits: int, placements: int, rounding: bool) -> int:
    """Written from the definition, one bit at a time: windows [hi:hi-bits+1] for the allowed tops
    hi; the window is the lowest that still contains the leading one; below it, round half to even."""
    digits = [(v >> b) & 1 for b in range(8)]  # digits[b] = bit b
    tops = sorted(s + bits - 1 for s in window_shifts(bits, placements))
    lead = max((b for b in range(8) if digits[b]), default=-1)
    hi = next(t for t in tops if t >= lead) if lead >= 0 else tops[0]
    lo = hi - bits + 1
    kept = [digits[b] if lo <= b <= hi else 0 for b in range(8)]
    value = sum(d << b for b, d in enumerate(kept))
    if rounding and lo > 0:
        guard = digits[lo - 1]
        sticky = any(digits[b] for b in range(lo - 1))
        lsb = digits[lo]
        if guard and (sticky or lsb):
            if all(kept[b] for b in range(lo, hi + 1)):
                return value  # rounding would overflow the window: it saturates at all-ones
            value += 1 << lo
    return value


@pytest.mark.parametrize("bits,placements", OPTIONS)
@pytest.mark.parametrize("rounding", [True, False])
def test_trim_equals_the_bitwise_reference_on_all_256_inputs(bits, placements, rounding):
    got = trim_table(bits, placements, rounding)
    want = [reference(v, bits, placements, rounding) for v in range(256)]
    assert got.tolist() == want


def test_window_placements():
    assert window_shifts(4, 5) == (4, 3, 2, 1, 0)
    assert window_shifts(4, 3) == (4, 2, 0)
    assert window_shifts(4, 2) == (4, 0)
    assert window_shifts(4, 1) == (4,)
    with pytest.raises(ValueError, match="evenly spaced"):
        window_shifts(4, 4)


def test_trim_keeps_small_values_and_bounds_the_relative_error():
    import numpy as np

    v = np.arange(256)
    t = trim(v, 4, 5, True)
    assert np.array_equal(t[:16], v[:16])  # values that fit the lowest window are exact
    nz = v > 0
    assert np.max(np.abs(t[nz] - v[nz]) / v[nz]) <= 1 / 16 + 1e-9  # a 4-bit mantissa: half an LSB of 8 at worst
    with pytest.raises(ValueError, match="unsigned 8-bit"):
        trim(np.array([256]))
