"""Data readers: where calibration and evaluation feeds come from.

A reader yields :class:`Batch` objects: a dict of model inputs (each array with the batch on
axis 0) and optional labels. Built-in readers (registered through the ``register_data_readers``
hook like any plugin's):

* ``npz``    — a folder of ``.npz``/``.npy`` files or one such file; keys are input names, a key
  named ``label``/``labels`` that is not a model input holds labels; a ``.npy`` file feeds a
  single-input model;
* ``images`` — a folder of images (subfolders named by class index give labels), with resize,
  mean/std, layout and colour options;
* ``python`` — ``module:function`` (or ``path/file.py:function``) returning an iterable of feed
  dicts (or of ``(feeds, labels)`` pairs);
* ``random`` — random feeds for smoke runs only (warns: scales from random data are meaningless).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import math
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from onnxq.errors import DataError
from onnxq.options import NoOptions, option

log = logging.getLogger(__name__)

LABEL_KEYS = ("label", "labels")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class Batch:
    """Model inputs (batch on axis 0) and optional integer labels, with where they came from."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""

    @property
    def size(self) -> int:
        """How many samples the batch holds (:func:`sample_count`)."""
        return sample_count(self.feeds)

    def rows(self, start: int, stop: int | None = None) -> Batch:
        """Samples ``start:stop`` (:func:`sample_rows`), labels kept aligned."""
        return Batch(sample_rows(self.feeds, start, stop), None if self.labels is None else np.asarray(self.labels)[start:stop],
                     self.source)


def sample_count(feeds: Mapping[str, np.ndarray], axes: Mapping[str, int | None] | None = None) -> int:
    """How many samples a batch holds: the size of its inputs' batch axis (1 when no input has one, or when the inputs
    hold different lengths on it: :func:`samples_disagree`, one sample that must not be cut)."""
    lengths = _axis_lengths(feeds, axes)
    return lengths.pop() if len(lengths) == 1 else 1


def _axis_lengths(feeds: Mapping[str, np.ndarray], axes: Mapping[str, int | None] | None) -> set[int]:
    """The lengths of the inputs' batch axes; an input of one along it (a speaker embedding broadcast to every sample)
    counts only when every input is one."""
    out = set()
    for name, value in feeds.items():
        axis = axes.get(name, 0) if axes is not None else 0
        if axis is not None and np.ndim(value) > axis:
            out.add(int(np.shape(value)[axis]))
    return out - {1} if len(out) > 1 else out


def has_sample_axis(value: np.ndarray, samples: int, axis: int | None = 0) -> bool:
    """Whether ``value`` holds the batch's ``samples`` on ``axis`` (None: it has no batch axis; a scalar sample rate has
    none either): the inputs a cut into samples cuts, the others go whole into every part."""
    return axis is not None and np.ndim(value) > axis and np.shape(value)[axis] == samples


def samples_disagree(feeds: Mapping[str, np.ndarray], axes: Mapping[str, int | None] | None = None) -> bool:
    """Whether inputs with a sample axis hold different lengths along it: then the axis is not the samples' (a graph
    network's one graph per run: ``x [num_atoms, F]`` and ``edge_index [2, num_edges]``, whose indices point into
    ``x``), and the batch must not be cut (cut to one atom, the edges pointed past it and the evaluation failed)."""
    return len(_axis_lengths(feeds, axes)) > 1


def sample_rows(feeds: Mapping[str, np.ndarray], start: int, stop: int | None = None) -> dict[str, np.ndarray]:
    """Samples ``start:stop`` of a feed dict (views). An input without the samples on its leading axis (a scalar sample
    rate or flag, a fixed-shape state) goes whole into every part, as the model reads it with each sample."""
    n = sample_count(feeds)
    return {k: v[start:stop] if has_sample_axis(v, n) else v for k, v in feeds.items()}


@dataclass(frozen=True)
class InputSpec:
    """What the model expects for one input."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    #: the model declares the shape (False: unknown, ``shape`` is empty); with an empty ``shape``, a scalar input
    rank_declared: bool = False
    #: an integer input the model uses as indices into a constant table (token ids, token types): the table's size
    #: (random data stays below it: BERT's 2-entry token_type_ids got 0-99 and ONNX Runtime failed)
    index_limit: int | None = None


class DataReader:
    """Base class of data readers. Subclasses set ``name``, ``summary`` and ``Options``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, spec: str, options: Any, inputs: list[InputSpec]) -> None:
        self.spec = spec
        self.options = options
        self.inputs = inputs

    @classmethod
    def accepts(cls, spec: str) -> bool:
        """True if this reader understands ``spec`` (used when no reader is named)."""
        return False

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError

    def fingerprint(self) -> str | None:
        """A string that changes whenever the data changes (for the statistics cache), or None."""
        return None


def _files_fingerprint(files: list[Path], extra: str = "", root: Path | None = None) -> str:
    """SHA-256 of the files' names (relative order matters to sample requests) and their bytes,
    read in chunks: a file rewritten with the same size and mtime (``cp -p``, ``rsync -a``) still
    changes it, and a copy of the same data elsewhere still matches."""
    h = hashlib.sha256(extra.encode())
    for f in files:
        rel = f.relative_to(root) if root is not None and f.is_relative_to(root) else Path(f.name)
        h.update(f"{rel.as_posix()}\n".encode())
        try:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        except OSError as exc:
            raise DataError(f"cannot read data file '{f}': {exc.strerror or exc}") from None
        h.update(b"\0")
    return h.hexdigest()


def _split_labels(arrays: Mapping[str, np.ndarray], input_names: set[str]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    feeds, labels = {}, None
    for k, v in arrays.items():
        if k in input_names:
            feeds[k] = v
        elif k in LABEL_KEYS:
            labels = np.asarray(v).reshape(-1)
        else:
            feeds[k] = v  # left for validation to report as an unknown input
    return feeds, labels


#: read arrays in slices of about this many bytes (a slice holds whole samples, at least one)
CHUNK_BYTES = 16 * 2**20


#: an .npz array over BOMB_MIN_BYTES that decompresses more than BOMB_RATIO times is refused
#: (real activations compress a few times at most; a file of compressed zeros claims gigabytes)
BOMB_MIN_BYTES = 256 * 2**20
BOMB_RATIO = 100


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable; physical memory as a fallback)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 8 * 2**30


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


@dataclass(frozen=True)
class NpzOptions:
    """Options of the npz reader."""

    max_array_mb: int = option(0, "refuse a single .npz array larger than this many MB once decompressed "
                                  "(0: a quarter of the available memory)")

    def validate(self) -> None:
        if self.max_array_mb < 0:
            raise ValueError("max_array_mb must be 0 or positive")


class _NpzMember:
    """One array of an ``.npz`` file, known from its header alone and read in row slices."""

    def __init__(self, zf: zipfile.ZipFile, member: str) -> None:
        self.zf, self.member = zf, member
        with zf.open(member) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version} in member '{member}'")
        if dtype.hasobject:
            raise ValueError(f"array '{member[:-4]}' holds Python objects, which are not read (allow_pickle=False)")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype: np.dtype = dtype
        self.fortran = bool(fortran)
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0

    def _open(self):
        fh = self.zf.open(self.member)
        version = np.lib.format.read_magic(fh)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(fh)
        return fh

    def _fill(self, fh, out: np.ndarray) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        while got < len(view):
            n = fh.readinto(view[got:])
            if not n:
                raise ValueError(f"array '{self.member[:-4]}' is truncated ({got} of {len(view)} bytes)")
            got += n

    def read_all(self) -> np.ndarray:
        out = np.empty(self.shape[::-1] if self.fortran else self.shape, self.dtype)
        with self._open() as fh:
            self._fill(fh, out)
        return out.T if self.fortran else out

    def slices(self, step: int) -> Iterator[np.ndarray]:
        """Consecutive row slices of ``step`` rows (the last may be shorter), read as they are asked for."""
        with self._open() as fh:
            for start in range(0, self.rows, step):
                out = np.empty((min(step, self.rows - start), *self.shape[1:]), self.dtype)
                self._fill(fh, out)
                yield out


class NpzReader(DataReader):
    """Folder of .npz/.npy files (sorted by name) or a single file, read lazily.

    ``.npy`` files are memory-mapped; ``.npz`` members are known from their headers (shape and
    dtype) before any data is read, refused above a size limit (``max_array_mb``, by default a
    quarter of the available memory: a 2 MB file of compressed zeros can claim gigabytes), and
    read in slices of whole samples, so ``--max-samples`` stops reading where it stops.
    """

    name = "npz"
    summary = "folder of .npz/.npy feeds keyed by input name (a 'label' key holds labels)"
    Options = NpzOptions

    @classmethod
    def accepts(cls, spec: str) -> bool:
        p = Path(spec)
        if p.is_file():
            return p.suffix in (".npz", ".npy")
        return p.is_dir() and any(f.suffix in (".npz", ".npy") for f in p.iterdir())

    def files(self) -> list[Path]:
        p = Path(self.spec)
        if not p.exists():
            raise DataError(f"data path '{p}' does not exist")
        files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".npz", ".npy"))
        if not files:
            raise DataError(f"no .npz or .npy files in '{p}'")
        return files

    def max_array_bytes(self) -> tuple[int, str]:
        """The size limit of one decompressed array and how it was set (for the error line)."""
        mb = getattr(self.options, "max_array_mb", 0) or 0
        if mb:
            return mb * 2**20, f"max_array_mb={mb}"
        avail = available_memory()
        return max(avail // 4, 64 * 2**20), f"a quarter of the available memory ({_gb(avail)}); raise it with --data-opt max_array_mb=N"

    def _step(self, row_bytes: int) -> int:
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        static = [s.shape[0] for s in self.inputs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0]
        if static:  # keep slices a multiple of a static batch, which the re-batching splits exactly
            b = static[0]
            step = max(b, step // b * b)
        return step

    def _arrays(self, f: Path) -> Iterator[dict[str, np.ndarray]]:
        if f.suffix == ".npy":
            if len(self.inputs) != 1:
                raise DataError(f"'{f.name}' is a .npy file but the model has {len(self.inputs)} inputs; use .npz keyed by input name")
            arr = np.load(f, mmap_mode="r", allow_pickle=False)
            if arr.ndim == 0:
                yield {self.inputs[0].name: np.asarray(arr)}
                return
            step = self._step(arr.nbytes // max(arr.shape[0], 1))
            for start in range(0, max(arr.shape[0], 1), step):
                yield {self.inputs[0].name: np.array(arr[start : start + step])}
            return
        limit, why = self.max_array_bytes()
        explicit = bool(getattr(self.options, "max_array_mb", 0))
        with zipfile.ZipFile(f) as zf:
            members: dict[str, _NpzMember] = {}
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    raise ValueError(f"member '{name}' is not a .npy array")
                m = _NpzMember(zf, name)
                packed = zf.getinfo(name).compress_size
                if not explicit and m.nbytes > BOMB_MIN_BYTES and m.nbytes > BOMB_RATIO * max(packed, 1):
                    raise DataError(f"array '{name[:-4]}' in data file '{f}' is {_gb(m.nbytes)} once decompressed from {_gb(packed)} "
                                    f"(over {BOMB_RATIO}:1, not real calibration data); refusing it "
                                    f"(--data-opt max_array_mb=N reads arrays up to N MB whatever their compression)")
                if m.nbytes > limit:
                    raise DataError(f"array '{name[:-4]}' in data file '{f}' is {_gb(m.nbytes)} once decompressed "
                                    f"(shape {list(m.shape)}, {m.dtype}), over the limit of {_gb(limit)} ({why}); split it into smaller files")
                members[name[:-4]] = m
            if not members:
                yield {}
                return
            rows = {m.rows for m in members.values()}
            big = sum(m.nbytes for m in members.values()) > CHUNK_BYTES
            if not big or len(rows) != 1 or any(m.fortran or not m.shape for m in members.values()):
                yield {k: m.read_all() for k, m in members.items()}
                return
            step = self._step(sum(m.row_bytes() for m in members.values()))
            streams = {k: m.slices(step) for k, m in members.items()}
            for _ in range(0, rows.pop(), step):
                yield {k: next(s) for k, s in streams.items()}

    def __iter__(self) -> Iterator[Batch]:
        names = {i.name for i in self.inputs}
        for f in self.files():
            chunks = self._arrays(f)
            while True:
                try:
                    arrays = next(chunks)
                except StopIteration:
                    break
                except DataError:
                    raise
                except Exception as exc:
                    raise DataError(f"cannot read data file '{f}': {type(exc).__name__}: {exc}") from None
                feeds, labels = _split_labels(arrays, names)
                yield Batch(feeds, labels, source=f.name)

    def fingerprint(self) -> str | None:
        return _files_fingerprint(self.files(), "npz")


@dataclass(frozen=True)
class ImageOptions:
    """Preprocessing for the images reader."""

    size: str = option("", "resize to HxW (e.g. 224x224); default: the model's static input size")
    mean: tuple[float, ...] = option((0.0,), "per-channel mean subtracted after scaling to [0,1] (one value or one per channel)")
    std: tuple[float, ...] = option((1.0,), "per-channel std divided by after the mean")
    layout: Literal["auto", "nchw", "nhwc"] = option("auto", "input layout (auto: nhwc when the model's input is [N, H, W, 1 or 3], "
                                                              "as TensorFlow's are, else nchw)")
    color: Literal["auto", "rgb", "bgr", "gray"] = option("auto", "colour order (gray: one channel; auto: gray when the model takes "
                                                                    "one channel, else rgb)")
    batch: int = option(16, "images per batch")

    def validate(self) -> None:
        if self.batch < 1:
            raise ValueError("batch must be at least 1")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ValueError("mean and std must be finite numbers")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")


#: the largest image side the images reader resizes to (a typo'd size=100000x100000 was killed by the kernel for memory)
MAX_IMAGE_SIDE = 16384


def _pixels(im, color: str, size: tuple[int, int]) -> np.ndarray:
    """An image as float32 [H, W, C] in [0, 1], resized to ``size`` (W, H), by its own bit depth: Pillow's 8-bit
    conversion saturates a 16-bit PNG to white and truncates a float TIFF to black (a constant calibration set)."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float32)
        peak = float(a.max(initial=0.0))
        if im.mode == "F" and peak <= 1.0:
            top = 1.0  # a float image already in [0, 1]
        elif im.mode.startswith("I;16") or peak > 255.0:
            top = 65535.0
        else:
            top = 255.0
        g = Image.fromarray(np.clip(a / top, 0.0, 1.0), mode="F").resize(size, Image.BILINEAR)
        a = np.asarray(g, dtype=np.float32)
        return a if color == "gray" else np.repeat(a[:, :, None], 3, axis=2)
    im = im.convert("L" if color == "gray" else "RGB").resize(size, Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255.0


class ImageFolderReader(DataReader):
    """Folder of images; subfolders named by integer class give labels."""

    name = "images"
    summary = "folder of images (class subfolders give labels) with resize/mean/std/layout options"
    Options = ImageOptions

    @classmethod
    def accepts(cls, spec: str) -> bool:
        p = Path(spec)
        return p.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.rglob("*"))

    def files(self) -> list[Path]:
        p = Path(self.spec)
        if not p.is_dir():
            raise DataError(f"image folder '{p}' does not exist")
        # hidden files and folders are never data: macOS's "._x.png" resource forks, Jupyter's .ipynb_checkpoints
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise DataError(f"no images in '{p}'")
        return files

    def _size(self) -> tuple[int, int]:
        o = self.options
        if o.size:
            try:
                h, w = (int(v) for v in o.size.lower().split("x"))
            except ValueError:
                raise DataError(f"image size '{o.size}' is not HxW") from None
            if not (0 < h <= MAX_IMAGE_SIDE and 0 < w <= MAX_IMAGE_SIDE):
                raise DataError(f"image size '{o.size}': each side must be 1 to {MAX_IMAGE_SIDE} pixels")
            return h, w
        shape = self.inputs[0].shape
        hw = shape[2:4] if self._layout() == "nchw" else shape[1:3]
        if len(hw) == 2 and all(isinstance(d, int) for d in hw):
            return int(hw[0]), int(hw[1])
        raise DataError("the model's image size is dynamic; give it with --data-opt size=HxW")

    def _layout(self) -> str:
        """The option, or with ``auto`` what the model's declared input shape says (channels are 1 or 3 and come first
        in PyTorch's [N, C, H, W], last in TensorFlow's [N, H, W, C]: tf2onnx keeps TensorFlow's)."""
        if self.options.layout != "auto":
            return self.options.layout
        shape = self.inputs[0].shape
        channels = (1, 3)
        if len(shape) == 4 and shape[3] in channels and shape[1] not in channels:
            return "nhwc"
        return "nchw"

    def _color(self) -> str:
        if self.options.color != "auto":
            return self.options.color
        shape = self.inputs[0].shape
        channels = shape[1 if self._layout() == "nchw" else 3] if len(shape) == 4 else None
        return "gray" if channels == 1 else "rgb"

    def __iter__(self) -> Iterator[Batch]:
        from PIL import Image

        if len(self.inputs) != 1:
            raise DataError(f"the images reader feeds single-input models; this model has {len(self.inputs)} inputs")
        o = self.options
        h, w = self._size()
        layout, color = self._layout(), self._color()
        channels = 1 if color == "gray" else 3
        for what, values in (("mean", o.mean), ("std", o.std)):
            if len(values) not in (1, channels):
                raise DataError(f"--data-opt {what} has {len(values)} values; the model's {color} images have {channels} "
                                f"channel(s): give one value or {channels}")
        files = self.files()
        if o.mean == (0.0,) and o.std == (1.0,) and not getattr(self, "_said_scaling", False):
            # the images reader cannot know how the model was trained; calibrating a normalized-input model on [0, 1]
            # pixels kept the in-sample check at cosine 1.0 while held-out accuracy fell from 99.5 % to 73 %
            self._said_scaling = True
            log.warning("images in '%s' are fed as %s pixels scaled to [0, 1] with no mean/std: a model trained on normalized "
                        "inputs needs its own, e.g. --data-opt mean=0.485,0.456,0.406 --data-opt std=0.229,0.224,0.225 (ImageNet's)",
                        self.spec, color.upper())
        root = Path(self.spec)
        for start in range(0, len(files), o.batch):
            chunk = files[start : start + o.batch]
            arrays, labels = [], []
            for f in chunk:
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", Image.DecompressionBombWarning)
                        with Image.open(f) as im:
                            size = im.size
                            a = _pixels(im, color, (w, h))
                except Exception as exc:
                    raise DataError(f"cannot read image '{f}': {exc}") from None
                for warned in caught:  # Pillow's raw warning becomes one onnxq line; others pass on unchanged
                    if issubclass(warned.category, Image.DecompressionBombWarning):
                        log.warning("image '%s' is %dx%d pixels, over Pillow's decompression-bomb limit of %d pixels; read anyway",
                                    f, size[0], size[1], Image.MAX_IMAGE_PIXELS)
                    else:
                        warnings.warn_explicit(warned.message, warned.category, warned.filename, warned.lineno)
                if a.ndim == 2:
                    a = a[:, :, None]
                if color == "bgr":
                    a = a[:, :, ::-1]
                a = (a - np.asarray(o.mean, np.float32)) / np.asarray(o.std, np.float32)
                arrays.append(a.transpose(2, 0, 1) if layout == "nchw" else a)
                rel = f.relative_to(root).parts
                labels.append(int(rel[0]) if len(rel) > 1 and rel[0].isdigit() else -1)
            lab = np.asarray(labels, np.int64)
            batch = np.stack(arrays).astype(self.inputs[0].dtype)
            yield Batch({self.inputs[0].name: batch}, lab if (lab >= 0).all() else None, source=chunk[0].name)

    def fingerprint(self) -> str | None:
        return _files_fingerprint(self.files(), f"images:{self.options}", Path(self.spec))


class PythonReader(DataReader):
    """``module:function`` or ``file.py:function`` returning an iterable of feeds."""

    name = "python"
    summary = "module:function (or file.py:function) yielding feed dicts or (feeds, labels) pairs"

    @classmethod
    def accepts(cls, spec: str) -> bool:
        if ":" not in spec or Path(spec).exists():
            return False
        mod, _, func = spec.rpartition(":")
        return bool(mod) and func.isidentifier()

    def _function(self):
        mod_name, _, func_name = self.spec.rpartition(":")
        try:
            if mod_name.endswith(".py"):
                path = Path(mod_name)
                if not path.is_file():
                    raise DataError(f"data script '{path}' does not exist")
                spec = importlib.util.spec_from_file_location(f"onnxq_data_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            else:
                if os.getcwd() not in sys.path:
                    sys.path.insert(0, os.getcwd())
                module = importlib.import_module(mod_name)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot import data module '{mod_name}': {type(exc).__name__}: {exc}") from None
        func = getattr(module, func_name, None)
        if not callable(func):
            raise DataError(f"'{mod_name}' has no function '{func_name}'")
        return func

    def __iter__(self) -> Iterator[Batch]:
        names = {i.name for i in self.inputs}
        try:
            items = iter(self._function()())
        except DataError:
            raise
        except (Exception, SystemExit) as exc:  # sys.exit() in a data function ended the run with exit 0 and nothing written
            raise DataError(f"data function '{self.spec}' failed: {_what_failed(exc)}") from None
        k = 0
        while True:
            # a generator that raises part-way is the data's fault: one line naming the spec and the batch
            try:
                item = next(items)
            except StopIteration:
                return
            except DataError:
                raise
            except (Exception, SystemExit) as exc:
                raise DataError(f"data function '{self.spec}' failed at batch {k}: {_what_failed(exc)}") from None
            labels = None
            if isinstance(item, tuple) and len(item) == 2:
                item, labels = item
            if not isinstance(item, Mapping):
                raise DataError(f"data function '{self.spec}' yielded a {type(item).__name__} at item {k}; expected a dict of input "
                                "arrays" + (" (a pair is read as (feeds, labels))" if labels is not None else ""))
            try:
                arrays = {n: np.asarray(v) for n, v in item.items()}
                labels = np.asarray(labels).reshape(-1) if labels is not None else None
            except Exception as exc:  # a tensor that requires grad, a ragged list: what numpy cannot take as an array
                raise DataError(f"data function '{self.spec}' item {k}: a value is not an array numpy can read: "
                                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
            feeds, extra = _split_labels(arrays, names)
            yield Batch(feeds, labels if labels is not None else extra, source=f"item {k}")
            k += 1


def _what_failed(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class RandomOptions:
    """Options of the random reader."""

    samples: int = option(32, "number of random samples")
    seed: int = option(0, "random seed")
    batch: int = option(8, "samples per batch")
    warn: bool = option(True, "warn that random data gives meaningless activation scales")


class RandomReader(DataReader):
    """Random normal float inputs / small integers; for smoke runs only."""

    name = "random"
    summary = "random feeds for smoke runs only (scales from random data are not meaningful)"
    Options = RandomOptions

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return spec == "random" or spec.startswith("random:")

    _warned = False

    def __iter__(self) -> Iterator[Batch]:
        o = self.options
        if o.warn and not self._warned:  # a run iterates the data several times (passes); say it once
            self._warned = True
            log.warning("calibrating on random data: the scales will not suit real inputs (smoke runs only)")
        n = o.samples
        if self.spec.startswith("random:"):
            try:
                n = int(self.spec.split(":", 1)[1])
            except ValueError:
                raise DataError(f"'{self.spec}': expected random:N") from None
        rng = np.random.default_rng(o.seed)
        for start in range(0, n, o.batch):
            b = min(o.batch, n - start)
            feeds = {}
            for spec in self.inputs:
                shape = [b] + [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape[1:]]
                if spec.dtype.kind == "f":
                    feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
                elif spec.dtype.kind == "b":
                    feeds[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
                else:
                    feeds[spec.name] = rng.integers(0, min(100, spec.index_limit or 100), shape).astype(spec.dtype)
            yield Batch(feeds, None, source=f"random batch {start // o.batch}")

    def fingerprint(self) -> str | None:
        return f"random:{self.spec}:{self.options}"


BUILTIN_READERS: tuple[type[DataReader], ...] = (NpzReader, ImageFolderReader, PythonReader, RandomReader)
