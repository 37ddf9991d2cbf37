"""Data readers that don't blow up (issue 16): lazy .npz/.npy reading, size limits, one-line errors."""

from __future__ import annotations

import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from onnxq.calib import readers
from onnxq.calib.feeds import model_inputs
from onnxq.calib.readers import NpzOptions, NpzReader
from onnxq.pipeline import batch_source

import importlib.util as _ilu

# the suite loads several conftest.py files as "conftest" (the contrib packages' too), so this
# module reads the helpers from tests/conftest.py by path
_spec = _ilu.spec_from_file_location("onnxq_tests_helpers", Path(__file__).resolve().parent / "conftest.py")
_helpers = _ilu.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)  # type: ignore[union-attr]
make_tiny_conv_model = _helpers.make_tiny_conv_model

SAMPLE = (1, 8, 8)  # one sample of the tiny conv model's input
SAMPLE_BYTES = 64 * 4


def _zeros_npz(path: Path, nbytes: int, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """An .npz whose one array 'x' is ``nbytes`` of float32 zeros, written in pieces (never held whole)."""
    rows = nbytes // SAMPLE_BYTES
    with zipfile.ZipFile(path, "w", compression=compression, compresslevel=1 if compression else None) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_2_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (rows, *SAMPLE)})
            piece = bytes(8 * 2**20)
            left = rows * SAMPLE_BYTES
            while left:
                n = min(left, len(piece))
                fh.write(piece[:n])
                left -= n
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """512 MB of zeros in a file of a few MB: the issue's 2 MB .npz holding 2 GB, scaled down."""
    return _zeros_npz(tmp_path_factory.mktemp("bomb") / "bomb.npz", 512 * 2**20)


def _reader(spec: Path, **options) -> NpzReader:
    return NpzReader(str(spec), NpzOptions(**options), model_inputs(make_tiny_conv_model()))


def test_decompression_bomb_is_refused_from_its_header(bomb, run_cli, tiny_model_path, tmp_path):
    assert bomb.stat().st_size < 16 * 2**20
    tracemalloc.start()
    try:
        code, _, err = run_cli(["optimize", tiny_model_path, "--data", bomb, "--output", tmp_path / "q.onnx", "--no-cache", "--quiet"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 1, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxq: error: array 'x' in data file"), err
    assert "512" in lines[0] and "max_array_mb" in lines[0]
    assert peak < 64 * 2**20, f"refusing the bomb allocated {peak / 2**20:.0f} MB"
    assert not (tmp_path / "q.onnx").exists()


def test_array_over_the_memory_limit_is_refused_with_the_limit_named(tmp_path, monkeypatch, run_cli, tiny_model_path):
    data = _zeros_npz(tmp_path / "big.npz", 80 * 2**20, compression=zipfile.ZIP_STORED)  # not compressed: no bomb
    monkeypatch.setattr(readers, "available_memory", lambda: 256 * 2**20)
    code, _, err = run_cli(["optimize", tiny_model_path, "--data", data, "--output", tmp_path / "q.onnx", "--no-cache", "--quiet"])
    assert code == 1, err
    (line,) = err.splitlines()
    assert "80.0 MB" in line and "limit of 64.0 MB" in line and "a quarter of the available memory (256.0 MB)" in line, line
    code, _, err = run_cli(["optimize", tiny_model_path, "--data", data, "--data-opt", "max_array_mb=10",
                            "--output", tmp_path / "q.onnx", "--no-cache", "--quiet"])
    assert code == 1 and "limit of 10.0 MB (max_array_mb=10)" in err, err


def test_max_samples_reads_only_the_first_slice_of_a_big_array(bomb):
    """With the limit raised the 512 MB array is read lazily: 64 samples cost one slice, not the array."""
    reader = _reader(bomb, max_array_mb=1024)
    src = batch_source(reader, reader.inputs, 16, limit=64)
    tracemalloc.start()
    try:
        batches = list(src())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(b.feeds["x"].shape[0] for b in batches) == 64
    assert peak < 4 * readers.CHUNK_BYTES, f"{peak / 2**20:.0f} MB for 64 samples"


def test_npy_is_memory_mapped(tmp_path):
    path = tmp_path / "big.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(2**20, *SAMPLE))  # 256 MB, sparse on disk
    mm[:3] = 1.5
    del mm
    reader = _reader(path)
    tracemalloc.start()
    try:
        first = next(iter(reader))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first.feeds["x"].shape[0] * SAMPLE_BYTES <= readers.CHUNK_BYTES
    assert (first.feeds["x"][:3] == 1.5).all() and (first.feeds["x"][3:] == 0).all()
    assert peak < 3 * readers.CHUNK_BYTES


@pytest.mark.parametrize("compressed", [True, False])
def test_sliced_reading_gives_exactly_the_arrays_np_load_gives(tmp_path, monkeypatch, compressed):
    monkeypatch.setattr(readers, "CHUNK_BYTES", 7 * (SAMPLE_BYTES + 8))  # slices of 7 samples (input and int64 label)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, *SAMPLE)).astype(np.float32)
    label = rng.integers(0, 10, 50)
    path = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=x, label=label)
    batches = list(_reader(path))
    assert len(batches) == 8  # 50 samples in slices of 7
    np.testing.assert_array_equal(np.concatenate([b.feeds["x"] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), label)
    # the statistics pass sees the same batches either way
    whole = [b.feeds["x"] for b in batch_source(_reader(path, max_array_mb=1), model_inputs(make_tiny_conv_model()), 16)()]
    np.testing.assert_array_equal(np.concatenate(whole), x)


def test_truncated_member_is_one_error_line(tmp_path, run_cli, tiny_model_path):
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("x.npy", "w") as fh:  # the header claims 100 samples, the data holds 10
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (100, *SAMPLE)})
            fh.write(np.zeros((10, *SAMPLE), np.float32).tobytes())
    code, _, err = run_cli(["optimize", tiny_model_path, "--data", path, "--output", tmp_path / "q.onnx", "--no-cache", "--quiet"])
    assert code == 1, err
    (line,) = err.splitlines()
    assert "short.npz" in line and "truncated" in line, line


def _image_folder(root: Path, side: int) -> Path:
    from PIL import Image

    root.mkdir()
    Image.fromarray(np.full((side, side), 128, np.uint8)).save(root / "a.png")
    return root


def test_pillow_decompression_bomb_warning_is_one_onnxq_line(tmp_path, run_cli, tiny_model_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 = 1600 pixels: over the limit, under twice it
    images = _image_folder(tmp_path / "img", 40)
    code, _, err = run_cli(["optimize", tiny_model_path, "--data", images, "--data-opt", "color=gray", "-p", "minmax",
                            "--output", tmp_path / "q.onnx", "--no-cache", "--quiet"])
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "fidelity check" not in ln]
    assert lines and all(ln.startswith("onnxq: warning: ") for ln in err.splitlines()), err
    assert any("a.png' is 40x40 pixels, over Pillow's decompression-bomb limit of 1000 pixels" in ln for ln in lines), err
    assert "DecompressionBombWarning" not in err


def test_pillow_decompression_bomb_error_is_one_error_line(tmp_path, run_cli, tiny_model_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 80x80: over twice the limit, Pillow refuses
    images = _image_folder(tmp_path / "img", 80)
    code, _, err = run_cli(["optimize", tiny_model_path, "--data", images, "--data-opt", "color=gray",
                            "--output", tmp_path / "q.onnx", "--no-cache", "--quiet"])
    assert code == 1, err
    (line,) = [ln for ln in err.splitlines() if not ln.startswith("onnxq: warning: ")]  # how the pixels are fed is said first
    assert line.startswith("onnxq: error: cannot read image") and "a.png" in line, line


def test_numpy_overflow_warning_is_one_onnxq_line(tmp_path, run_cli):
    """A RuntimeWarning raised anywhere under the CLI is an ``onnxq: warning:`` line, not Python's two-line format."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    model = tmp_path / "m.onnx"
    onnx.save_model(m, str(model))
    data = tmp_path / "d"
    data.mkdir()
    x = np.zeros((8, 1, 8, 8), np.float32)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 3e38, -3e38  # finite, but squares of errors overflow float32
    np.savez(data / "a.npz", x=x)
    code, _, err = run_cli(["optimize", model, "--data", data, "-p", "mse", "--output", tmp_path / "q.onnx", "--no-cache", "--quiet"])
    assert code == 0, err
    assert all(ln.startswith("onnxq: ") for ln in err.splitlines()), err
    assert "RuntimeWarning:" not in err and "  err = " not in err


def test_an_nhwc_one_channel_model_reads_an_image_folder_without_options(tmp_path, run_cli):
    """A TensorFlow model through tf2onnx takes [N, H, W, C]: the image reader read its H and W from axes 2 and 3
    ('has shape [16, 1, 32, 1], the model expects [unk__127, 32, 32, 1]') unless told layout=nhwc and color=gray. Both
    now default to what the model's input shape says; the evaluation data (an .npz) is read beside them, its reader
    leaving out the image options it does not take."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from PIL import Image

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Transpose", ["image"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["nchw", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["unk__1", 12, 12, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["unk__1", 4, 12, 12])], [w])
    model = tmp_path / "nhwc.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), model)
    images = tmp_path / "img"
    images.mkdir()
    for k in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 16), dtype=np.uint8)).save(images / f"{k}.png")
    evaluation = tmp_path / "eval.npz"
    np.savez(evaluation, image=rng.uniform(0, 1, (4, 12, 12, 1)).astype(np.float32))
    code, _, err = run_cli(["optimize", model, "--data", images, "--data-opt", "std=0.5", "--eval-data", evaluation, "-p", "minmax",
                            "--output", tmp_path / "q.onnx", "--no-cache", "--quiet"])
    assert code == 0, err


def _gradient_folder(root: Path, n: int = 3) -> Path:
    """``n`` 8x8 grayscale gradients (not constant: the constant-input rule leaves a constant input float)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.fromarray((np.add.outer(np.arange(8), np.arange(8)) * (8 + k)).astype(np.uint8)).save(root / f"g{k}.png")
    return root


def test_the_images_reader_skips_hidden_files_and_reads_16_bit_and_float_images(tmp_path):
    """A macOS "._x.png" aborted the run ("cannot identify image file") and Jupyter's .ipynb_checkpoints were calibrated
    on; a 16-bit PNG read as all white and a float TIFF as all black (Pillow's 8-bit conversion)."""
    from PIL import Image

    from onnxq.calib.readers import ImageFolderReader, ImageOptions, InputSpec

    root = _gradient_folder(tmp_path / "img")
    (root / "._g0.png").write_bytes(b"\x00\x05\x16\x07 not an image")
    _gradient_folder(root / ".ipynb_checkpoints", 1)
    ramp = np.add.outer(np.arange(8), np.arange(8)).astype(np.float64) / 14.0
    Image.fromarray((ramp * 60000).astype(np.uint16)).save(root / "deep.png")
    Image.fromarray(ramp.astype(np.float32), mode="F").save(root / "float.tif")
    reader = ImageFolderReader(str(root), ImageOptions(color="gray"), [InputSpec("x", np.dtype(np.float32), (None, 1, 8, 8), True)])
    assert [f.name for f in reader.files()] == ["deep.png", "float.tif", "g0.png", "g1.png", "g2.png"]
    (batch,) = list(reader)
    x = batch.feeds["x"]
    deep, flt = x[0, 0], x[1, 0]
    assert np.allclose(deep, ramp * 60000 / 65535, atol=0.01) and np.allclose(flt, ramp, atol=0.01)


@pytest.mark.parametrize("option,needle", [("mean=0.5,0.5", "mean has 2 values"), ("std=0.2,0.2", "std has 2 values"),
                                           ("size=100000x100000", "each side must be 1 to"), ("mean=nan", "finite")])
def test_image_options_that_cannot_apply_are_one_line(tmp_path, run_cli, tiny_model_path, option, needle):
    """Two means for one gray channel raised a numpy broadcast error (exit 4); an absurd size was killed for memory."""
    images = _gradient_folder(tmp_path / "img")
    code, _, err = run_cli(["optimize", tiny_model_path, "--data", images, "--data-opt", option, "-p", "minmax",
                            "--output", tmp_path / "q.onnx", "--no-cache", "--quiet"])
    errors = [ln for ln in err.splitlines() if ln.startswith("onnxq: error")]
    assert code == 1 and len(errors) == 1 and needle in errors[0], err
    assert not (tmp_path / "q.onnx").exists()


def test_images_without_mean_and_std_say_how_they_are_fed(tmp_path, run_cli, tiny_model_path):
    """[0, 1] pixels are right for some models and wrong for the many trained on normalized inputs: said, once a run."""
    images = _gradient_folder(tmp_path / "img")
    code, _, err = run_cli(["optimize", tiny_model_path, "--data", images, "-p", "minmax", "--output", tmp_path / "q.onnx",
                            "--no-cache", "--quiet"])
    assert code == 0, err
    assert sum("scaled to [0, 1] with no mean/std" in ln for ln in err.splitlines()) == 1, err
    code, _, err = run_cli(["optimize", tiny_model_path, "--data", images, "--data-opt", "mean=0.5", "--data-opt", "std=0.25",
                            "-p", "minmax", "--output", tmp_path / "q2.onnx", "--no-cache", "--quiet"])
    assert code == 0 and "no mean/std" not in err, err


def test_npz_calibration_and_image_evaluation_share_the_image_options(tmp_path, run_cli, tiny_model_path):
    """--data-opt applies to both data sets: mean/std for an image-folder --eval-data beside .npz calibration data was
    refused ("data reader 'npz' has no option 'mean'"), and without them the evaluation images were fed unnormalized."""
    images = _gradient_folder(tmp_path / "img")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(0, 1, (16, 1, 8, 8)).astype(np.float32))
    code, _, err = run_cli(["optimize", tiny_model_path, "--data", tmp_path / "calib.npz", "--eval-data", images,
                            "--data-opt", "mean=0.5", "--data-opt", "std=0.25", "-p", "minmax", "--output", tmp_path / "q.onnx",
                            "--no-cache", "--quiet"])
    assert code == 0 and "no mean/std" not in err, err
    code, _, err = run_cli(["optimize", tiny_model_path, "--data", tmp_path / "calib.npz", "--eval-data", images,
                            "--data-opt", "nonsense=1", "-p", "minmax", "--output", tmp_path / "q2.onnx", "--no-cache", "--quiet"])
    assert code == 1 and "no option 'nonsense'" in err, err  # an option neither reader takes is still an error


def test_sample_count_reads_the_inputs_that_hold_the_samples():
    """Inputs of different lengths on their batch axes are one sample (a graph network's atoms and edges, the edges
    indexing the atoms: cut, they pointed past them); an input of one (a speaker embedding broadcast to every sample)
    does not decide the count, whichever input comes first."""
    from onnxq.calib.readers import sample_count, samples_disagree

    x, spk = np.zeros((5, 3), np.float32), np.zeros((1, 4), np.float32)
    assert sample_count({"spk": spk, "x": x}) == sample_count({"x": x, "spk": spk}) == 5
    atoms, edges = np.zeros((30, 8), np.float32), np.zeros(80, np.int64)
    assert samples_disagree({"x": atoms, "edges": edges}) and sample_count({"x": atoms, "edges": edges}) == 1
    assert sample_count({"x": atoms, "edges": edges}, {"x": 0, "edges": None}) == 30  # the edges declared without one
