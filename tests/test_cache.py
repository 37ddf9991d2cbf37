"""The statistics cache is never trusted blindly (issue 16).

Its key comes from content (the model's weights' bytes, the data files' bytes, the requests, the
onnxq version); a loaded entry is validated and discarded with a warning when it does not hold
what the key promises; a cache that cannot be written is a warning, not a failed run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxq.calib import statistics
from onnxq.calib.feeds import model_inputs
from onnxq.calib.readers import NpzReader
from onnxq.host import get_host
from onnxq.pipeline import batch_source, make_reader

import importlib.util as _ilu

# the suite loads several conftest.py files as "conftest" (the contrib packages' too), so this
# module reads the helpers from tests/conftest.py by path
_spec = _ilu.spec_from_file_location("onnxq_tests_helpers", Path(__file__).resolve().parent / "conftest.py")
_helpers = _ilu.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)  # type: ignore[union-attr]
make_tiny_conv_model = _helpers.make_tiny_conv_model
make_tiny_feeds = _helpers.make_tiny_feeds
top1_accuracy = _helpers.top1_accuracy

REQS = [statistics.StatRequest(t, "histogram") for t in ("x", "c1", "r2")]


def _collect(model, items, cache_dir, fp="fp"):
    inputs = model_inputs(model)
    src = batch_source(make_reader(items, inputs, get_host()), inputs, 8)
    return statistics.collect(model, REQS, src, batch_size=8, cache_dir=cache_dir, data_fingerprint=fp, show_progress=False)


def _entry(folder: Path) -> Path:
    (entry,) = folder.glob("*.npz")
    return entry


def _rewrite_entry(entry: Path, change) -> None:
    with np.load(entry, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    with open(entry, "wb") as fh:
        np.savez(fh, **arrays)


def _ten_bins(hist: np.ndarray) -> np.ndarray:
    """The signed histogram re-binned to 10 bins of |x| (20 signed bins), counts kept."""
    return np.add.reduceat(hist, np.linspace(0, len(hist), 21).astype(int)[:-1])


def _same(a, b) -> None:
    assert set(a) == set(b)
    for t in a:
        assert (a[t].min, a[t].max) == (b[t].min, b[t].max)
        np.testing.assert_array_equal(a[t].hist, b[t].hist)


def test_entry_with_histograms_cut_to_10_bins_is_discarded_with_a_warning(tmp_path, caplog):
    model, items = make_tiny_conv_model(), make_tiny_feeds()
    fresh = _collect(model, items, tmp_path)

    def cut(arrays):
        for k in [k for k in arrays if k.startswith("h")]:
            arrays[k] = _ten_bins(arrays[k])  # well-formed, just coarse

    _rewrite_entry(_entry(tmp_path), cut)
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        again = _collect(model, items, tmp_path)
    assert any("10 bins" in r.getMessage() for r in caplog.records), caplog.text
    _same(again, fresh)
    # and the entry was rewritten with the good statistics
    _same(_collect(model, items, tmp_path), fresh)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_entry_with_non_finite_ranges_is_discarded_with_a_warning(tmp_path, caplog, bad):
    model, items = make_tiny_conv_model(), make_tiny_feeds()
    fresh = _collect(model, items, tmp_path)
    _rewrite_entry(_entry(tmp_path), lambda arrays: arrays.__setitem__("r0", np.array([bad, bad, 3.0])))
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        again = _collect(model, items, tmp_path)
    assert any("invalid range" in r.getMessage() for r in caplog.records), caplog.text
    _same(again, fresh)


def test_entry_with_negative_counts_or_missing_tensor_is_discarded(tmp_path, caplog):
    model, items = make_tiny_conv_model(), make_tiny_feeds()
    fresh = _collect(model, items, tmp_path)
    _rewrite_entry(_entry(tmp_path), lambda a: a.__setitem__("h1", -a["h1"]))
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        _same(_collect(model, items, tmp_path), fresh)
    assert "malformed histogram" in caplog.text
    caplog.clear()
    _rewrite_entry(_entry(tmp_path), lambda a: a.__setitem__("__names__", np.array(["x", "zz", "r2"])))
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        _same(_collect(model, items, tmp_path), fresh)
    assert "missing" in caplog.text


def test_key_follows_weights_bytes_not_graph_name():
    a, b = make_tiny_conv_model(seed=0), make_tiny_conv_model(seed=0)
    assert a.graph.name == b.graph.name == "tiny"
    assert statistics.cache_key(a, REQS, "fp") == statistics.cache_key(b, REQS, "fp")
    w = numpy_helper.to_array(b.graph.initializer[0]).copy()
    w[0, 0, 0, 0] += 1.0
    b.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, b.graph.initializer[0].name))
    assert statistics.cache_key(a, REQS, "fp") != statistics.cache_key(b, REQS, "fp")
    # the requests and the onnxq version are part of the key too
    assert statistics.cache_key(a, REQS[:2], "fp") != statistics.cache_key(a, REQS, "fp")
    assert statistics.cache_key(a, REQS, "fp") != statistics.cache_key(a, REQS, "fp2")


def test_key_changes_with_the_onnxq_version(monkeypatch):
    model = make_tiny_conv_model()
    before = statistics.cache_key(model, REQS, "fp")
    monkeypatch.setattr(statistics, "_onnxq_version", lambda: "999.0")
    assert statistics.cache_key(model, REQS, "fp") != before


def _npz_folder(folder: Path, scale: float) -> Path:
    folder.mkdir(exist_ok=True)
    for i, f in enumerate(make_tiny_feeds()):
        np.savez(folder / f"part_{i:03d}.npz", x=f["x"] * np.float32(scale))
    return folder


def test_fingerprint_sees_a_rewrite_with_the_same_size_and_mtime(tmp_path):
    data = _npz_folder(tmp_path / "d", 1.0)
    inputs = model_inputs(make_tiny_conv_model())
    before = NpzReader(str(data), None, inputs).fingerprint()
    stamps = {f: os.stat(f) for f in data.iterdir()}
    _npz_folder(data, 50.0)  # same shapes and dtype: same sizes
    for f, st in stamps.items():
        assert f.stat().st_size == st.st_size
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p / rsync -a leave them
    assert NpzReader(str(data), None, inputs).fingerprint() != before
    # a copy of the same bytes elsewhere is the same data
    copy = _npz_folder(tmp_path / "copy", 50.0)
    assert NpzReader(str(copy), None, inputs).fingerprint() == NpzReader(str(data), None, inputs).fingerprint()


def _input_scale(path: Path) -> float:
    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    (q,) = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x"]
    return float(inits[q.input[1]])


def test_cli_rewritten_data_same_size_and_mtime_gets_fresh_statistics(run_cli, tiny_model_path, tmp_path):
    data = _npz_folder(tmp_path / "d", 1.0)
    cache = tmp_path / "cache"
    code, _, err = run_cli(["optimize", tiny_model_path, "--data", data, "--output", tmp_path / "a.onnx", "--cache-dir", cache, "--quiet"])
    assert code == 0, err
    stamps = {f: os.stat(f) for f in data.iterdir()}
    _npz_folder(data, 50.0)
    for f, st in stamps.items():
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, _, err = run_cli(["optimize", tiny_model_path, "--data", data, "--output", tmp_path / "b.onnx", "--cache-dir", cache, "--quiet"])
    assert code == 0, err
    code, _, err = run_cli(["optimize", tiny_model_path, "--data", data, "--output", tmp_path / "c.onnx", "--no-cache", "--quiet"])
    assert code == 0, err
    fresh = _input_scale(tmp_path / "c.onnx")
    assert _input_scale(tmp_path / "b.onnx") == pytest.approx(fresh, rel=1e-6)
    assert _input_scale(tmp_path / "a.onnx") < fresh / 10  # the first data really was different


def test_cli_unwritable_cache_is_a_warning_and_the_run_succeeds(run_cli, tiny_model_path, tiny_data_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # mkdir under a file fails even as root
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(["optimize", tiny_model_path, "--data", tiny_data_dir, "--output", out, "--quiet"])
    assert code == 0, err
    assert out.is_file()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxq: warning: cannot write the statistics cache"), err


def test_cli_tampered_10_bin_cache_keeps_digits_accuracy(run_cli, digits_model, digits_calib, digits_eval_arrays, tmp_path):
    """The issue's case: a well-formed 10-bin entry made percentile keep 9.6% accuracy."""
    cache = tmp_path / "cache"
    args = ["optimize", digits_model, "--data", digits_calib, "-p", "percentile", "--cache-dir", cache, "--quiet"]
    code, _, err = run_cli([*args, "--output", tmp_path / "a.onnx"])
    assert code == 0, err

    def cut(arrays):
        for k in [k for k in arrays if k.startswith("h")]:
            arrays[k] = _ten_bins(arrays[k])

    _rewrite_entry(_entry(cache), cut)
    code, _, err = run_cli([*args, "--output", tmp_path / "b.onnx"])
    assert code == 0, err
    assert "ignoring the statistics cache entry" in err and "10 bins" in err
    x, y = digits_eval_arrays
    assert top1_accuracy(tmp_path / "b.onnx", x, y) >= top1_accuracy(digits_model, x, y) - 0.03


def test_full_disk_while_writing_the_cache_is_a_warning_and_leaves_no_temp_file(tmp_path, caplog, monkeypatch):
    import errno

    model, items = make_tiny_conv_model(), make_tiny_feeds()
    fresh = _collect(model, items, None)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(statistics.np, "savez", full)
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        stats = _collect(model, items, tmp_path)
    _same(stats, fresh)
    assert "cannot write the statistics cache" in caplog.text and "No space left on device" in caplog.text
    assert list(tmp_path.iterdir()) == []  # the partial temp file went too
