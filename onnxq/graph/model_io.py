"""Load, check and save ONNX models safely.

* External-data paths that leave the model's folder are refused (a model file must not make onnxq
  read arbitrary files).
* Outputs are checked before any work (:func:`ensure_output_path`): never a file the input model
  reads (its ``.onnx`` and external-data files), never a folder, device, FIFO or socket, never an
  existing file without ``force``; the folder must take a new file and the disk must not be full.
* Saving is atomic (:func:`save_model_atomic`): fresh temporary files in the output folder, moved
  into place only when complete (exclusively without ``force``, so two runs racing for one output
  cannot both win); a failure or an interrupt removes them, and an OS error (disk full) is an
  :class:`OutputError`. Models over 2 GB (or ``ONNXQ_EXTERNAL_DATA_ABOVE`` bytes) keep their weights
  in ``<output>.data``; both files get the umask's permissions and reproducible bytes.
* Models whose external data exceeds :data:`LAZY_ABOVE` bytes are loaded *lazily*: their weights stay
  on disk and the in-memory ``ModelProto`` only refers to them (:func:`is_lazy`). Such a reference's
  location is the data file's real path relative to :data:`LAZY_ROOT` (the file system root), so a
  weight can be read from anywhere without knowing which model it came from: :func:`tensor_array`
  memory-maps it, ONNX Runtime sessions read it themselves (``onnxq.runtime.ort`` passes the root as
  the external-data folder), :func:`check_model` checks the graph with the weights stubbed, and
  :func:`save_model_atomic` copies them into the output's data file in chunks. New large weights that
  rewrites produce on a lazy model go to a scratch file as they are produced (:func:`spill`), so no
  step ever holds every weight in memory at once."""

from __future__ import annotations

import atexit
import logging
import mmap
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from onnxq.errors import ModelError, OutputError
from onnxq.runtime.ort import EXTERNAL_DATA_ROOT

log = logging.getLogger(__name__)

#: protobuf's hard limit; above it weights must live in external data files.
PROTOBUF_LIMIT = 2**31 - 1

#: external-data bytes above which :func:`load_model` keeps the weights on disk (lazy references)
#: instead of reading them into the ``ModelProto``. Reading them all is fine below protobuf's limit
#: and impossible above it (a ``ModelProto`` cannot serialize more than 2 GB); tests lower it
#: (``monkeypatch.setattr(model_io, "LAZY_ABOVE", 0)``) to run small models through the lazy path.
LAZY_ABOVE = PROTOBUF_LIMIT

#: in memory, lazy external-data locations are relative to this folder (the file system root), so
#: that ONNX's and ONNX Runtime's readers, which refuse absolute locations, find them from anywhere
LAZY_ROOT = EXTERNAL_DATA_ROOT

#: a new initializer at least this large, written into a lazy model by :func:`spill`, goes to the
#: scratch data file instead of the ``ModelProto``
SPILL_MIN_BYTES = 1 << 20


def _check_external_paths(model: onnx.ModelProto, folder: Path) -> None:
    root = folder.resolve()
    for tensor in _all_tensors(model):
        if not uses_external_data(tensor):
            continue
        try:  # onnx validates offset/length here (a negative offset is a ValueError: the file's fault, not ours)
            location = ExternalDataInfo(tensor).location
        except (ValueError, TypeError) as exc:
            raise ModelError(f"initializer '{tensor.name}' has invalid external-data fields: {exc}") from None
        target = (root / location).resolve()
        if os.path.isabs(location) or root not in target.parents:
            raise ModelError(
                f"initializer '{tensor.name}' points to external data '{location}' outside the model's folder; refusing to read it"
            )
        if not target.is_file():
            raise ModelError(f"external data file '{location}' of initializer '{tensor.name}' is missing")


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def load_model(path: str | os.PathLike[str], check: bool = True, lazy: bool | None = None) -> onnx.ModelProto:
    """Load an ONNX model (with its external data) and check it.

    ``lazy`` keeps external weights on disk as references (:func:`is_lazy`); ``None`` (default) does
    so when they exceed :data:`LAZY_ABOVE` bytes. A lazy model is checked on its path, where
    ``onnx.checker`` also sees the data files. Raises :class:`ModelError` with one clear line for a
    missing, truncated or invalid file.
    """
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file '{p}' does not exist")
    if not p.is_file():
        raise ModelError(f"'{p}' is not a file")
    if p.stat().st_size == 0:
        raise ModelError(f"'{p}' is empty, not an ONNX model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others
        raise ModelError(f"'{p}' is not a valid ONNX model (cannot parse: {type(exc).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"'{p}' is not a valid ONNX model (no graph)")
    _check_external_paths(model, p.parent)
    if lazy is None:
        lazy = external_data_bytes(model) > LAZY_ABOVE
    if lazy:
        if check:
            _check_path(p)
        _make_lazy(model, p.parent)
        return unique_node_names(model, p)
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
    except Exception as exc:
        raise ModelError(f"cannot read external data of '{p}': {exc}") from None
    if check:
        try:
            check_model(model, str(p))
        except ModelError as exc:
            if "topologically sorted" not in str(exc):
                raise
            # ONNX Runtime runs a graph whose nodes are listed out of order; sorting them changes nothing it computes
            from onnxq.graph.edit import toposort

            model = toposort(model)
            check_model(model, str(p))
            log.info("%s: its nodes were not in topological order; sorted", p)
    return unique_node_names(model, p)


def repeated_node_names(model: onnx.ModelProto) -> bool:
    """Whether two top-level nodes share a (non-empty) name: ONNX's checker lets it pass, ONNX Runtime refuses to load it."""
    names = [n.name for n in model.graph.node if n.name]
    return len(set(names)) != len(names)


def for_runtime(loaded: onnx.ModelProto, path: str | os.PathLike[str]) -> onnx.ModelProto | str | os.PathLike[str]:
    """What ONNX Runtime should load of a model :func:`load_model` read from ``path``: the model as loaded (its nodes
    sorted and their names made unique, where the file needed it: ONNX Runtime refuses such a file as it is), or the
    path where its weights stay on disk (:func:`is_lazy`)."""
    return path if is_lazy(loaded) else loaded


def unique_node_names(model: onnx.ModelProto, where: object = "the model") -> onnx.ModelProto:
    """``model``, or a copy whose repeated node names are made unique (``name``, ``name_7``...), as the written model
    has them: the FP32 reference that calibration, the fidelity check and the evaluation run must load in ONNX Runtime."""
    if not repeated_node_names(model):
        return model
    from onnxq.graph.edit import name_nodes

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    name_nodes(copy)
    log.info("%s: node names repeat (ONNX Runtime refuses such a model); they were made unique", where)
    return copy


def external_data_bytes(model: onnx.ModelProto) -> int:
    """Bytes the model's tensors keep in external data files (their declared lengths)."""
    total = 0
    for tensor in _all_tensors_deep(model):
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            total += info.length if info.length is not None else _nbytes(tensor)
    return total


def _nbytes(tensor: onnx.TensorProto) -> int:
    n = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1):
        return (n + 1) // 2
    return n * itemsize


def _check_path(p: Path) -> None:
    """``onnx.checker`` on the file: the way to check a model over 2 GB (it reads the graph, not the weights)."""
    try:
        onnx.checker.check_model(str(p))
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{p} fails the ONNX checker: {_one_line(exc)}") from None


def _set_location(tensor: onnx.TensorProto, location: str) -> None:
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location


def _make_lazy(model: onnx.ModelProto, folder: Path) -> None:
    """Point every external tensor at its data file's real path relative to :data:`LAZY_ROOT`."""
    root = Path(LAZY_ROOT)
    for tensor in _all_tensors_deep(model):
        if uses_external_data(tensor):
            real = (folder / ExternalDataInfo(tensor).location).resolve()
            _set_location(tensor, str(real.relative_to(root)))


def is_lazy(model_or_tensor: onnx.ModelProto | onnx.TensorProto) -> bool:
    """Whether a tensor (or any tensor of a model) is a lazy external-data reference."""
    if isinstance(model_or_tensor, onnx.TensorProto):
        return uses_external_data(model_or_tensor)
    return any(uses_external_data(t) for t in _all_tensors_deep(model_or_tensor))


def lazy_files(model: onnx.ModelProto) -> list[Path]:
    """The data files a lazy model's references read, in first-use order."""
    seen: dict[str, None] = {}
    for tensor in _all_tensors_deep(model):
        if uses_external_data(tensor):
            seen.setdefault(ExternalDataInfo(tensor).location, None)
    return [Path(LAZY_ROOT) / loc for loc in seen]


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The value of ``tensor`` as a numpy array; use it instead of ``numpy_helper.to_array``.

    A lazy external-data tensor is memory-mapped read-only (:func:`is_mapped`; its pages are read
    when touched, nothing is copied, and :func:`release` drops them again); 4-bit and other packed
    types are read (one tensor). In-memory tensors are ``numpy_helper.to_array``'s result.
    """
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    info = ExternalDataInfo(tensor)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(int(d) for d in tensor.dims)
    packed = tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1,
                                  onnx.TensorProto.INT2, onnx.TensorProto.UINT2, onnx.TensorProto.STRING)
    count = int(np.prod(shape, dtype=np.int64))
    if packed or count == 0 or dtype.kind not in "biuf" or sys.byteorder != "little":
        return numpy_helper.to_array(tensor, base_dir=LAZY_ROOT)
    offset = info.offset or 0
    start = offset - offset % mmap.ALLOCATIONGRANULARITY  # mappings start on the granularity
    with open(os.path.join(LAZY_ROOT, info.location), "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), offset - start + count * dtype.itemsize, access=mmap.ACCESS_READ, offset=start)
    # a read-only view whose base is the mapping: unmapped when the last view goes, see release()
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset - start).reshape(shape)


def _mapping(array: np.ndarray) -> mmap.mmap | None:
    base = array
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.obj if isinstance(base, memoryview) else base.base
    return base if isinstance(base, mmap.mmap) else None


def is_mapped(array: np.ndarray) -> bool:
    """Whether ``array`` is a memory-mapped weight from :func:`tensor_array` (or a view of one)."""
    return isinstance(array, np.ndarray) and _mapping(array) is not None


def release(array: np.ndarray) -> None:
    """Drop the pages of a memory-mapped weight from this process's memory now.

    Pages a weight's reader touched stay resident (and count in the process's RSS) as long as the
    mapping lives; a step that is done with a weight but still holds the array (a dictionary of
    all weights) releases it so that the weights it went through do not add up. The array stays
    valid: touched again, its pages are read back from the page cache. Other arrays: nothing.
    """
    mapped = _mapping(array) if isinstance(array, np.ndarray) else None
    if mapped is not None and hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_DONTNEED)


def external_chunks(tensor: onnx.TensorProto, chunk: int = 16 << 20):
    """The bytes of a lazy external-data tensor, read from its data file ``chunk`` bytes at a time
    (hashing or copying a 2 GB weight never holds it whole)."""
    info = ExternalDataInfo(tensor)
    left = info.length if info.length is not None else _nbytes(tensor)
    with open(os.path.join(LAZY_ROOT, info.location), "rb") as fh:
        fh.seek(info.offset or 0)
        while left > 0:
            data = fh.read(min(left, chunk))
            if not data:
                raise ModelError(f"external data of '{tensor.name}' ends early in '{info.location}'")
            left -= len(data)
            yield data


class _Scratch:
    """One append-only data file per process for the large tensors rewrites produce on lazy models."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.fh = None
        self.offset = 0

    def write(self, data: np.ndarray) -> tuple[str, int, int]:
        if self.fh is None:
            self.folder = Path(tempfile.mkdtemp(prefix="onnxq-spill-"))
            self.fh = open(self.folder / "weights.data", "w+b")
            atexit.register(self.close)
        pad = (-self.offset) % _EXTERNAL_ALIGN
        if pad:
            self.fh.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        buf = np.ascontiguousarray(data)
        self.fh.write(memoryview(buf).cast("B"))
        self.fh.flush()
        self.offset += buf.nbytes
        real = (self.folder / "weights.data").resolve()  # type: ignore[operator]
        return str(real.relative_to(Path(LAZY_ROOT))), start, buf.nbytes

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            shutil.rmtree(self.folder, ignore_errors=True)  # type: ignore[arg-type]
            self.fh = None


_scratch = _Scratch()


def spill(array: np.ndarray, name: str) -> onnx.TensorProto:
    """A lazy initializer ``name`` holding ``array``, written to this process's scratch data file now.

    How rewrites of a lazy model put large new weights in place without growing the ``ModelProto``
    (the file is removed at exit; saving copies the bytes into the output's data file). Packed types
    (4-bit) are written as ONNX packs them; small arrays, and non-numeric ones, become ordinary
    in-memory initializers.
    """
    a = np.asarray(array)
    if a.nbytes < SPILL_MIN_BYTES:
        return numpy_helper.from_array(a, name)
    if a.dtype.kind not in "biuf" or a.dtype.itemsize * 8 < 8:
        # 4-bit and other packed types: ONNX's own packing, then its bytes go to the file (the
        # 4-bit weights of a 2 GB model are 280 MB, and every copy of the model copied them)
        tensor = numpy_helper.from_array(a, name)
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < SPILL_MIN_BYTES:
            return tensor
        location, offset, length = _scratch.write(np.frombuffer(tensor.raw_data, np.uint8))
        tensor.ClearField("raw_data")
    else:
        location, offset, length = _scratch.write(a)
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(a.dtype)
        tensor.dims.extend(a.shape)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def new_initializer(model: onnx.ModelProto, array: np.ndarray, name: str) -> onnx.TensorProto:
    """An initializer ``name`` holding ``array``, for a rewrite of ``model`` to add: on a lazy model
    (:func:`is_lazy`) written to the scratch data file now (:func:`spill`), otherwise
    ``numpy_helper.from_array``'s in-memory tensor. How float rewrites (SmoothQuant's scaled
    weights) put new weights into a model over 2 GB without holding them all."""
    return spill(array, name) if is_lazy(model) else numpy_helper.from_array(np.asarray(array), name)


def total_bytes(model: onnx.ModelProto) -> int:
    """The model's size in bytes, its lazy weights' external data included (``ByteSize()`` fails
    over 2 GB and counts only the references of a lazy model)."""
    return serialized_size(model) + (external_data_bytes(model) if is_lazy(model) else 0)


def check_model(model: onnx.ModelProto, label: str = "model") -> None:
    """Run onnx.checker on an in-memory model.

    Lazy models (external references, :func:`is_lazy`) and models whose in-memory weights exceed
    protobuf's limit are checked with every large weight stubbed by a one-element tensor of its
    type: the structural check (nodes, opsets, names, types) does not read weights, and the stub
    keeps each tensor's single value field. The size is estimated per tensor: ``ByteSize()`` itself
    fails above 2 GB.
    """
    try:
        if is_lazy(model) or _in_memory_bytes(model) > PROTOBUF_LIMIT // 2:
            onnx.checker.check_model(_stubbed(model))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{label} fails the ONNX checker: {_one_line(exc)}") from None


def _one_line(exc: Exception) -> str:
    """The checker's message on one line: its first line alone cut "... input 'x' of node: " before the node's name."""
    return " ".join(str(exc).split()) or "validation failed"


def _in_memory_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in _all_tensors_deep(model) if t.HasField("raw_data"))


def _stubbed(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large or external tensors hold one zero element of their type.

    The copy is made without the weights' bytes: they are swapped out of the original while it is
    copied and put back after, so a 2 GB model is never held twice.
    """
    swapped: list[tuple[onnx.TensorProto, bytes | None, list[tuple[str, str]]]] = []
    for t in _all_tensors_deep(model):
        if uses_external_data(t) or (t.HasField("raw_data") and len(t.raw_data) >= _EXTERNAL_MIN_TENSOR):
            swapped.append((t, t.raw_data if t.HasField("raw_data") else None, [(e.key, e.value) for e in t.external_data]))
    try:
        for t, _, _ in swapped:
            t.ClearField("raw_data")
        stub = onnx.ModelProto()
        stub.CopyFrom(model)
    finally:
        for t, raw, _ in swapped:
            if raw is not None:
                t.raw_data = raw
    for t in _all_tensors_deep(stub):
        if uses_external_data(t) or (not t.HasField("raw_data") and t.dims and _has_no_values(t)):
            one = helper.make_tensor(t.name, t.data_type, [1], [0])
            t.CopyFrom(one)
    return stub


def _has_no_values(t: onnx.TensorProto) -> bool:
    return not any(len(getattr(t, f)) for f in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"))


def model_size_bytes(path: str | os.PathLike[str]) -> int:
    """Size on disk of a model file plus the external data files it references."""
    p = Path(path)
    total = p.stat().st_size
    model = onnx.load(str(p), load_external_data=False)
    seen = set()
    for tensor in _all_tensors(model):
        if uses_external_data(tensor):
            loc = ExternalDataInfo(tensor).location
            if loc not in seen:
                seen.add(loc)
                f = p.parent / loc
                if f.is_file():
                    total += f.stat().st_size
    return total


def model_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files an ONNX model reads: the ``.onnx`` itself and every external-data file it names.

    Unreadable or unparsable models give just their own path (the loader reports those).
    """
    p = Path(path)
    files = [p]
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # not a model: nothing else to protect
        return files
    seen: set[str] = set()
    for tensor in _all_tensors_deep(model):
        if not uses_external_data(tensor):
            continue
        try:
            location = ExternalDataInfo(tensor).location
        except (ValueError, TypeError):
            continue
        if location and location not in seen:
            seen.add(location)
            files.append(p.parent / location)
    return files


def _all_tensors_deep(model: onnx.ModelProto):
    """Every TensorProto of ``model``: initializers and tensor attributes, subgraphs included, in graph order."""
    def walk(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors
                elif attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g)
    yield from walk(model.graph)


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are the same existing file (symlinks and hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def data_file_of(output: str | os.PathLike[str]) -> Path:
    """The external-data file written beside ``output`` when the model is too large for one file."""
    out = Path(output)
    return out.with_name(out.name + ".data")


def _may_be_data_of(target: Path, model: Path) -> bool:
    """Cheap test before parsing ``model`` (which may be 2 GB): could ``target`` be one of its external-data files?

    Those lie inside the model's folder (:func:`load_model` refuses others) and the model's bytes name
    them; a file with several hard links could be one under another name.
    """
    try:
        real, folder = target.resolve(), model.resolve().parent
        if folder not in real.parents:
            return False
        if os.stat(target).st_nlink > 1:
            return True
        import mmap

        with open(model, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(real.name.encode()) >= 0
    except (OSError, ValueError):  # unreadable or empty model: let the full check decide
        return True


def _refuse_targets(targets: list[Path], inputs: list[str | os.PathLike[str]], force: bool) -> None:
    """Refuse output files that are a file an input model reads, a special file, a folder, or exist without ``force``."""
    import stat

    for target in targets:
        if not os.path.lexists(target):
            continue
        for inp in inputs:
            if _same_file(target, Path(inp)):
                raise OutputError(f"output '{target}' is the input model; choose another path")
            if _may_be_data_of(target, Path(inp)):
                for f in model_files(inp)[1:]:
                    if _same_file(target, f):
                        raise OutputError(f"output '{target}' is '{f}', external data of the input model '{inp}'; choose another path")
        try:
            mode = os.stat(target).st_mode
        except OSError:  # a dangling symlink: replacing the link itself is safe
            mode = stat.S_IFREG
        if stat.S_ISDIR(mode):
            raise OutputError(f"output '{target}' is a directory")
        if not stat.S_ISREG(mode):
            # a FIFO, device or socket: replacing it (as root, /dev/null) would do harm; --force does not apply
            raise OutputError(f"output '{target}' is not a regular file (a device, FIFO or socket); choose a file path")
        if not force:
            raise OutputError(f"output '{target}' already exists (use --force to replace it)")


def _check_folder(folder: Path) -> None:
    """The output folder (or its first existing ancestor, where the rest will be created) can take a new file now."""
    ancestor = folder
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"output folder '{folder}' cannot be created: '{ancestor}' is not a folder")
    try:  # permissions, read-only and pseudo file systems (/proc, /sys): only a real file creation tells
        with _signals_blocked():
            fd, probe = tempfile.mkstemp(prefix=".onnxq-probe.", dir=ancestor)
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot create files in output folder '{ancestor}': {exc.strerror}") from None
    try:
        st = os.statvfs(ancestor)
    except OSError:
        return
    if st.f_bavail * st.f_frsize < _MIN_FREE_BYTES:
        raise OutputError(f"no space left on the device of output folder '{ancestor}' ({st.f_bavail * st.f_frsize} bytes free)")


#: less free space than this at the start is a full disk: no model fits
_MIN_FREE_BYTES = 16 * 1024


def ensure_output_path(output: str | os.PathLike[str], inputs: list[str | os.PathLike[str]], force: bool) -> Path:
    """Check an output path at the start of a run, before any work.

    Refused (:class:`OutputError`), ``force`` or not: any file an input model reads (its ``.onnx`` and
    external-data files), also as the output's own external-data file; a folder, device, FIFO or
    socket; a folder that cannot take a new file (a file in the way, no permission, a pseudo file
    system such as /proc) or a full disk. Without ``force``, an existing output.
    """
    out = Path(output)
    for inp in inputs:  # also when the input does not exist yet (a clearer message than "exists")
        if os.path.abspath(out) == os.path.abspath(inp):
            raise OutputError(f"output '{out}' is the input model; choose another path")
    _refuse_targets([out], inputs, force)
    # the external-data file is written only for models over 2 GB, but it must never be an input's file
    data = data_file_of(out)
    if os.path.lexists(data):
        _refuse_targets([data], inputs, force=True)
    _check_folder(out.parent)
    return out


def external_data_threshold() -> int:
    """Serialized size above which a model is saved with its weights in one external-data file.

    The protobuf limit; ``ONNXQ_EXTERNAL_DATA_ABOVE`` (bytes) lowers it, e.g. for runtimes that want
    weights in a side file, and for tests of the external-data path on small models.
    """
    value = os.environ.get("ONNXQ_EXTERNAL_DATA_ABOVE", "").strip()
    if value:
        try:
            return min(int(value), PROTOBUF_LIMIT)
        except ValueError:
            raise OutputError(f"ONNXQ_EXTERNAL_DATA_ABOVE='{value}' is not a number of bytes") from None
    return PROTOBUF_LIMIT


def serialized_size(model: onnx.ModelProto) -> int:
    """The model's serialized size (its weights' bytes, estimated per tensor, when they are near or
    over protobuf's limit, where ``ByteSize()`` stops working)."""
    in_memory = _in_memory_bytes(model)
    return in_memory if in_memory > PROTOBUF_LIMIT // 2 else model.ByteSize()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide, racy with threads)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _signals_blocked:
    """Hold SIGINT/SIGTERM while a temporary file is created and recorded, so an interrupt never orphans it."""

    def __enter__(self) -> None:
        import signal

        self._old = None
        if hasattr(signal, "pthread_sigmask"):
            self._old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old)


#: tensors smaller than this stay inside the .onnx when saving with external data (as onnx does)
_EXTERNAL_MIN_TENSOR = 1024
#: external tensors start on this boundary (lets runtimes memory-map them)
_EXTERNAL_ALIGN = 4096


def _write_external(model: onnx.ModelProto, fh, location: str) -> list[tuple[onnx.TensorProto, int, int, list[tuple[str, str]] | None]]:
    """Move large raw tensors of ``model`` and every lazy one into ``fh`` (graph order: the bytes are
    reproducible); returns what moved, with each lazy tensor's previous external-data entries.

    Lazy tensors are copied from their data files in chunks (never a whole weight in memory)."""
    moved = []
    offset = 0
    for tensor in _all_tensors_deep(model):
        lazy = uses_external_data(tensor)
        if not lazy and (not tensor.HasField("raw_data") or len(tensor.raw_data) < _EXTERNAL_MIN_TENSOR):
            continue
        pad = (-offset) % _EXTERNAL_ALIGN
        if pad:
            fh.write(b"\0" * pad)
            offset += pad
        if lazy:
            before = [(e.key, e.value) for e in tensor.external_data]
            info = ExternalDataInfo(tensor)
            length = info.length if info.length is not None else _nbytes(tensor)
            for chunk in external_chunks(tensor, _COPY_CHUNK):
                fh.write(chunk)
        else:
            before = None
            raw = tensor.raw_data
            fh.write(raw)
            length = len(raw)
            tensor.ClearField("raw_data")
            del raw
        moved.append((tensor, offset, length, before))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        offset += length
    return moved


#: bytes copied at a time from a lazy weight's data file into the output's
_COPY_CHUNK = 16 << 20


def _restore_external(moved: list[tuple[onnx.TensorProto, int, int, list[tuple[str, str]] | None]], fh) -> None:
    """Put the moved tensors back as they were: lazy ones point at their data files again, in-memory
    ones get their bytes back (read from the data file: no second copy in memory)."""
    for tensor, offset, length, before in moved:
        del tensor.external_data[:]
        if before is not None:
            for key, value in before:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            continue
        fh.seek(offset)
        tensor.raw_data = fh.read(length)
        tensor.data_location = onnx.TensorProto.DEFAULT


def _place(tmp: Path, target: Path, force: bool) -> None:
    """Move a finished temporary file onto ``target``; without ``force`` only if ``target`` still does not exist."""
    if force:
        os.replace(tmp, target)
        return
    try:  # link() fails if target exists: two runs racing for one output cannot both win
        os.link(tmp, target)
    except FileExistsError:
        raise OutputError(f"output '{target}' was created by someone else while onnxq was working (use --force to replace it)") from None
    except OSError:  # a file system without hard links: check, then rename
        if os.path.lexists(target):
            raise OutputError(f"output '{target}' was created by someone else while onnxq was working (use --force to replace it)") from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def _pause_for_tests() -> None:
    """Test hook: with ``_ONNXQ_TEST_PAUSE_BEFORE_RENAME=FILE``, create FILE once the temporary files are
    written and wait (at most 30 s) until FILE is removed before moving them into place.

    Lets tests interrupt a save, or race two runs, deterministically; unset in normal use.
    """
    marker = os.environ.get("_ONNXQ_TEST_PAUSE_BEFORE_RENAME")
    if marker:
        import time

        Path(marker).touch()
        deadline = time.monotonic() + 30
        while os.path.lexists(marker) and time.monotonic() < deadline:
            time.sleep(0.02)


def save_model_atomic(model: onnx.ModelProto, output: str | os.PathLike[str], *, force: bool = False,
                      inputs: list[str | os.PathLike[str]] = ()) -> Path:  # type: ignore[assignment]
    """Write ``model`` to ``output`` atomically: fresh temporary files in the output folder, moved into place when complete.

    Models over :func:`external_data_threshold`, and lazy ones (their weights copied from their data
    files in chunks), get their weights in ``<output>.data``, also moved into
    place only when complete; ``model`` itself is left as it was. The output files never replace a
    file one of ``inputs`` reads, nor a device or FIFO; without ``force`` never an existing file,
    even one created by another process during the run. Both files get the permissions a plain
    ``open()`` gives (the umask's). On any failure or interrupt (SIGINT, SIGTERM) the temporary
    files are removed. Operating-system errors (disk full, permissions) are :class:`OutputError`.
    """
    out = Path(output)
    folder = out.parent
    data = data_file_of(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder '{folder}': {exc.strerror}") from None
    large = is_lazy(model) or serialized_size(model) > external_data_threshold()
    targets = [out, data] if large else [out]
    temps: list[Path] = []
    placed: list[Path] = []
    mode = 0o666 & ~_umask()

    def new_temp(name: str) -> Path:
        # always a new, empty, uniquely named file: a stale temp file from a killed run is never reused
        with _signals_blocked():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            temps.append(Path(tmp))
        os.close(fd)
        os.chmod(tmp, mode)  # mkstemp creates it owner-only
        return Path(tmp)

    try:
        _refuse_targets(targets, list(inputs), force)
        tmp = new_temp(out.name)
        if large:
            tmp_data = new_temp(data.name)
            with open(tmp_data, "w+b") as dfh:
                moved = _write_external(model, dfh, data.name)
                try:
                    payload = model.SerializeToString()
                finally:
                    dfh.flush()
                    _restore_external(moved, dfh)
                os.fsync(dfh.fileno())
        else:
            payload = model.SerializeToString()
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        del payload
        _pause_for_tests()
        _refuse_targets(targets, list(inputs), force=True)  # again: a device or input file may have appeared
        with _signals_blocked():  # an interrupt never separates a new data file from its model
            if large:
                _place(tmp_data, data, force)
                placed.append(data)
            _place(tmp, out, force)
    except BaseException as exc:
        for t in temps:
            t.unlink(missing_ok=True)
        if not force:  # a data file this run created exclusively, orphaned by a failure to place the model
            for p in placed:
                p.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # disk full, quota, permissions, I/O: the user's file system, not a bug
            raise OutputError(f"cannot write output '{out}': {exc.strerror or exc}") from None
        raise
    return out
