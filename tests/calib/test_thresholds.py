"""TensorRT entropy, percentile and MSE thresholds against docs/methods.md: Baseline calibrators and first principles."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.calib.statistics import TensorStats, bincount
from onnxq.calib.thresholds import entropy_divergences, entropy_threshold, mse_threshold, percentile_threshold
from onnxq.qparams import symmetric


def stats_of(x: np.ndarray, bins: int = 2048) -> TensorStats:
    amax = float(np.abs(x).max())
    return TensorStats(float(x.min()), float(x.max()), 1, bincount(x, amax, 2 * bins))


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


def test_outliers_are_clipped_between_p99_and_half_amax(rng):
    x = rng.standard_normal(10**6)
    x[rng.choice(x.size, 1000, replace=False)] *= 30
    s = stats_of(x)
    t = entropy_threshold(s, 128)
    assert np.percentile(np.abs(x), 99) < t < 0.5 * s.amax


def test_uniform_keeps_full_range(rng):
    s = stats_of(rng.uniform(-1, 1, 10**6))
    assert entropy_threshold(s, 128) / s.amax >= 0.95


def test_worked_merge_example_reproduces_q():
    # docs/methods.md: Baseline calibrators: H = [2,0,4,6,1,1,0,2], i = 8, L = 2 -> Q = [4,0,4,4,4/3,4/3,0,4/3]
    h = np.array([2, 0, 4, 6, 1, 1, 0, 2], float)
    i, levels = 8, 2
    lvl = (np.arange(i) * levels) // i
    tot = np.bincount(lvl, weights=h, minlength=levels)
    nz = np.bincount(lvl, weights=h > 0, minlength=levels)
    q = np.where(h > 0, tot[lvl] / nz[lvl], 0)
    np.testing.assert_allclose(q, [4, 0, 4, 4, 4 / 3, 4 / 3, 0, 4 / 3])
    # and the library computes the KL of exactly that P/Q pair
    d = entropy_divergences(h, levels, zero_bin="keep")
    p = h / h.sum()
    qn = q / q.sum()
    m = p > 0
    assert d[8] == pytest.approx(np.sum(p[m] * np.log(p[m] / qn[m])))


def test_kl_is_infinite_when_clipped_mass_lands_on_an_empty_bin():
    # bin i-1 = 3 is empty but there is mass beyond it: P[3] > 0, Q[3] = 0
    h = np.array([5, 3, 2, 0, 4, 1], float)
    d = entropy_divergences(h, 2, zero_bin="keep")
    assert np.isinf(d[4])
    assert np.isfinite(d[5])


def test_zero_bin_policy_changes_relu_threshold(rng):
    s = stats_of(np.maximum(rng.standard_normal(10**6), 0))
    t_copy = entropy_threshold(s, 128, zero_bin="copy_next")
    t_keep = entropy_threshold(s, 128, zero_bin="keep")
    assert t_copy > t_keep
    assert t_copy == pytest.approx(4.34, abs=0.15)
    assert t_keep == pytest.approx(2.05, abs=0.15)


def test_ties_take_the_largest_bin_count():
    h = np.zeros(256)
    h[:10] = 1.0  # everything in the first bins: every candidate >= 10 has KL 0
    s = TensorStats(0.0, 1.0, 1, np.concatenate([np.zeros(256), h]))
    assert entropy_threshold(s, 8) == pytest.approx(1.0)


def test_percentile_threshold(rng):
    x = rng.standard_normal(10**6)
    s = stats_of(x)
    t = percentile_threshold(s, 99.0)
    assert t == pytest.approx(np.percentile(np.abs(x), 99.0), rel=0.01)
    assert percentile_threshold(s, 100.0) == pytest.approx(s.amax)


def test_mse_threshold_beats_max_and_is_near_optimal(rng):
    x = rng.laplace(size=10**6).astype(np.float32)
    s = stats_of(x)

    t = mse_threshold(s, lambda ts: symmetric(ts, 4, narrow=True, axis=0))
    err = lambda th: float(np.mean((x - symmetric(th, 4, narrow=True).fake_quantize(x)) ** 2))  # noqa: E731
    assert t < 0.6 * s.amax
    assert err(t) < 0.5 * err(s.amax)
    brute = min(err(c) for c in np.linspace(0.02, 1, 200) * s.amax)
    assert err(t) <= brute * 1.05


@pytest.mark.parametrize("kl", ["trt", "cfws"])
@pytest.mark.parametrize("merge", ["even", "mxnet"])
@pytest.mark.parametrize("zero_bin", ["copy_next", "keep", "drop"])
def test_vectorised_divergences_equal_the_reference_loop(kl, merge, zero_bin):
    from onnxq.calib.thresholds import entropy_divergences_reference

    rng = np.random.default_rng(5)
    h = rng.poisson(rng.exponential(40, 2048)).astype(float)
    h[rng.random(2048) < 0.3] = 0
    fast = entropy_divergences(h, 128, zero_bin, kl, merge)
    ref = entropy_divergences_reference(h, 128, zero_bin, kl, merge)
    np.testing.assert_array_equal(np.isfinite(fast), np.isfinite(ref))
    ok = np.isfinite(ref)
    np.testing.assert_allclose(fast[ok], ref[ok], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("target", ["trt", "ort"])
def test_exact_method_is_tensorrts_algorithm(rng, target):
    # trt-entropy-exact (and trt-entropy -o tolerance inf) return entropy_threshold unchanged, on
    # every distribution, the spiky normalized-image one included (where trt-entropy itself differs)
    from types import SimpleNamespace

    from onnxq.graph.targets import get_profile
    from onnxq.options import parse_options
    from onnxq.plugins.trt_entropy import EntropyOptions, TrtEntropy, TrtEntropyExact

    ctx = SimpleNamespace(profile=get_profile(target))
    spike = np.where(rng.random(10**5) < 0.6, 0.0, rng.random(10**5))
    for x in (rng.standard_normal(10**5), np.maximum(rng.standard_normal(10**5), 0), (spike - 0.1307) / 0.3081):
        s = stats_of(x)
        levels = TrtEntropyExact().levels(s, ctx.profile)
        want = entropy_threshold(s, levels)
        assert TrtEntropyExact().threshold(s, ctx) == want
        assert TrtEntropy(parse_options(EntropyOptions, {"tolerance": "inf"}, "t")).threshold(s, ctx) == want


def _mse_errors_one_at_a_time(s: TensorStats, profile, candidates: int = 128, lowest: float = 0.02, subpoints: int = 4) -> list[float]:
    """The MSE search as first written: one grid built and scored per candidate."""
    hist = s.hist.astype(np.float64)
    w = s.bin_width
    edges = -s.amax + w * np.arange(len(hist))
    offsets = (np.arange(subpoints) + 0.5) / subpoints * w
    keep = hist > 0
    x = (edges[keep][:, None] + offsets[None, :]).astype(np.float32)
    weight = hist[keep][:, None] / subpoints
    errors = []
    for t in np.linspace(lowest, 1.0, candidates)[::-1] * s.amax:
        q = profile.activation_qparams(max(s.min, -float(t)), min(s.max, float(t)))
        errors.append(float(np.sum(weight * (x - q.fake_quantize(x)) ** 2)))
    return errors


@pytest.mark.parametrize("target,bits", [("trt", 8), ("trt", 7), ("ort", 8), ("ort", 7)])
def test_mse_search_over_all_candidates_at_once_gives_each_the_error_it_had_alone(target, bits):
    # bit-equal errors, so near-ties resolve as before; 8192 bins take several blocks of candidates
    from onnxq.calib.thresholds import mse_errors
    from onnxq.graph.targets import get_profile

    profile = get_profile(target, bits)
    rng = np.random.default_rng(11)
    draws = [rng.laplace(size=5000), np.maximum(rng.standard_normal(20_000), 0), rng.standard_normal(3000) * 0.01 + 2.5,
             np.concatenate([rng.standard_normal(50_000), [40.0]]), rng.integers(0, 4, 999).astype(float)]
    for x in draws:
        for bins, cands in ((2048, 128), (64, 128), (8192, 97)):
            s = stats_of(x, bins)
            grids = lambda ts: profile.activation_qparams(np.maximum(s.min, -ts), np.minimum(s.max, ts), axis=0)  # noqa: E731
            ref = _mse_errors_one_at_a_time(s, profile, cands)
            ts, errs = mse_errors(s, grids, cands)
            assert errs.tolist() == ref
            first_least = ts[ref.index(min(ref))]
            assert mse_threshold(s, grids, cands) == first_least


def test_remembered_divergences_follow_the_histogram_not_the_object(rng):
    """The divergences are remembered by histogram content (-p auto rebuilds a calibrator's candidates from the same
    statistics): a different histogram gets its own threshold, the same content the same, and the remembered array
    cannot be changed by a caller."""
    from onnxq.calib.thresholds import _divergences_of

    x = rng.standard_normal(10**5)
    x[:50] *= 40
    a, b = stats_of(x), stats_of(x)
    assert entropy_threshold(a, 128) == entropy_threshold(b, 128)
    np.testing.assert_array_equal(_divergences_of(a, 128, "copy_next", "trt", "even"), entropy_divergences(a.abs_hist(), 128))
    with pytest.raises(ValueError):
        _divergences_of(a, 128, "copy_next", "trt", "even")[200] = 0.0
    y = x.copy()
    y[50:] *= 3  # the same range (the outliers), the bulk three times wider: a higher clip point
    c = stats_of(y)
    assert c.amax == a.amax and entropy_threshold(c, 128) > 1.5 * entropy_threshold(a, 128)
    np.testing.assert_array_equal(_divergences_of(c, 128, "copy_next", "trt", "even"), entropy_divergences(c.abs_hist(), 128))
