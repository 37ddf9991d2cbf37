"""Progress bars on stderr (tqdm), silent when not wanted or not on a terminal."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from collections.abc import Iterator


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


@contextmanager
def progress(desc: str, show: bool = True, total: int | None = None, unit: str = "sample") -> Iterator[object]:
    """A tqdm bar on stderr when ``show`` and stderr is a terminal, else a no-op object."""
    if not show or not sys.stderr.isatty():
        yield _Silent()
        return
    from tqdm import tqdm

    bar = tqdm(desc=desc, total=total, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
