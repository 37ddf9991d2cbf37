"""Calibration data for a run: a data spec turned into a reader, and a re-iterable batch source."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.calib.feeds import rebatch
from onnxq.calib.readers import Batch, DataReader
from onnxq.errors import DataError, OptionError
from onnxq.host import Host
from onnxq.options import parse_options

DataSpec = str | os.PathLike[str] | Iterable[Mapping[str, np.ndarray]] | DataReader


def make_reader(data: DataSpec, inputs, host: Host, data_options: Mapping[str, Any] | None = None, reader: str | None = None,
                evaluation: bool = False, shared_with: DataSpec | None = None) -> DataReader:
    """Turn a data spec (path, ``module:function``, ``random``, iterable of feeds, or reader) into a reader.

    ``evaluation``: the evaluation data, read with the calibration data's options; those its reader does not take are
    left out (an image folder's ``color=gray`` when the evaluation data is an .npz file), not an error. ``shared_with``:
    for the calibration data, the evaluation data that shares its options; an option only that data's reader takes is
    left out here in turn (an image folder's ``mean`` beside .npz calibration data was "npz has no option 'mean'")."""
    if isinstance(data, DataReader):
        return data
    if isinstance(data, (str, os.PathLike)):
        spec = os.fspath(data)
        cls = _reader_class(host, reader, spec)
        if cls.name == "npz" and not Path(spec).exists():
            raise DataError(f"data path '{spec}' does not exist")
        if evaluation and data_options:
            data_options = {k: v for k, v in data_options.items() if _takes(cls, k)}
        elif data_options and shared_with is not None:
            data_options = calibration_options(data, data_options, host, reader, shared_with)
        opts = parse_options(cls.Options, data_options, f"data reader '{cls.name}'")
        return cls(spec, opts, inputs)
    if data_options:
        raise OptionError("data options apply only to a data spec string")
    return _IterableReader(data, inputs)


def _reader_class(host: Host, reader: str | None, spec: str | os.PathLike[str]) -> type[DataReader]:
    """The reader named by ``--reader``, else the one that accepts ``spec``."""
    return host.reader(reader) if reader else host.reader_for(os.fspath(spec))


def _takes(cls: type[DataReader], option: str) -> bool:
    """Whether reader ``cls`` has the option ``option`` (``a-b`` and ``a_b`` alike)."""
    return option.replace("-", "_") in {f.name for f in dataclasses.fields(cls.Options)}


def calibration_options(data: DataSpec, data_options: Mapping[str, Any], host: Host, reader: str | None,
                        shared_with: DataSpec | None) -> dict[str, Any]:
    """The options of ``data`` (the calibration data) when ``shared_with`` (the evaluation data) shares them: an option
    only the evaluation data's reader takes is left out (an image folder's ``mean`` beside .npz calibration data);
    one neither takes stays, for the calibration reader to refuse."""
    if not isinstance(data, (str, os.PathLike)) or not isinstance(shared_with, (str, os.PathLike)):
        return dict(data_options)
    ours, theirs = _reader_class(host, reader, data), _reader_class(host, reader, shared_with)
    return {k: v for k, v in data_options.items() if _takes(ours, k) or not _takes(theirs, k)}


class _IterableReader(DataReader):
    name = "iterable"

    def __init__(self, items: Iterable[Mapping[str, np.ndarray]], inputs) -> None:
        super().__init__("<iterable>", None, inputs)
        self._items = items if isinstance(items, (list, tuple)) else list(items)

    def __iter__(self):
        names = {i.name for i in self.inputs}
        for k, item in enumerate(self._items):
            labels = None
            if isinstance(item, tuple):
                item, labels = item
            feeds = {n: np.asarray(v) for n, v in item.items() if n in names or n not in ("label", "labels")}
            if labels is None:
                labels = next((np.asarray(v) for n, v in item.items() if n in ("label", "labels") and n not in names), None)
            yield Batch(feeds, labels, source=f"item {k}")


def batch_source(reader: DataReader, inputs, batch_size: int, limit: int | None = None):
    """A re-iterable source of validated, re-batched calibration batches.

    A run reads its data several times (statistics, searches, the fidelity check), and each pass must see the same
    batches: the first batch's bytes and the number of batches of a pass read to its end are compared with the first
    such pass. A data function returning fresh random data on each call made the check compare FP32 on one draw with
    the quantized model on another ("collapsed" on a good model), and one returning the same generator every time gave
    its batches once and nothing after (the check silently did not run); both are a DataError now.
    """
    first: dict[str, object] = {}

    def source() -> Iterable[Batch]:
        seen = 0
        count = 0
        for b in rebatch(reader, inputs, batch_size):
            if limit is not None:
                n = b.size
                if seen >= limit:
                    break
                if seen + n > limit:
                    keep = limit - seen
                    b = b.rows(0, keep)
                    n = keep
                seen += n
            if count == 0:
                _same_first_batch(first, b, reader)
            count += 1
            yield b
        # read to its end (or its limit): as many batches as the first such pass
        if first.setdefault("count", count) != count:
            raise DataError(f"the data gave {first['count']} batch(es) on one pass and {count} on another ({_source_of(reader)}): "
                            "a data function must give the same batches each time it is called (not one generator it "
                            "returns again: it is read once)")

    return source


def _source_of(reader: DataReader) -> str:
    return f"'{reader.spec}'" if getattr(reader, "spec", None) else "the data"


def _same_first_batch(first: dict[str, object], batch: Batch, reader: DataReader) -> None:
    """Remember the first pass's first batch (a digest of its bytes); raise if a later pass starts with another one."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(batch.feeds):
        arr = np.ascontiguousarray(batch.feeds[name])
        digest.update(name.encode() + str(arr.dtype).encode() + str(arr.shape).encode())
        digest.update(arr.tobytes())
    value = digest.hexdigest()
    if first.setdefault("digest", value) != value:
        raise DataError(f"the data changed between passes over it ({_source_of(reader)}: its first batch differs): a data "
                        "function must give the same batches each time it is called (seed its random generator)")
