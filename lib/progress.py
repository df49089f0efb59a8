"""Progress bars. A long loop in ``lib`` takes ``progress`` as a flag (true: its own tqdm bar on stderr; false or
None: none) or as the caller's bar (anything with ``update``, e.g. one tqdm bar over several calls), which it advances
and leaves open."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterable, Iterator


@contextmanager
def progress_bar(progress: Any, total: int | None, desc: str, unit: str = "it", **tqdm_kwargs) -> Iterator[Any]:
    """The bar a loop advances: the caller's ``progress`` when it has ``update``, a new tqdm bar of ``total`` (closed
    on exit) when ``progress`` is true, else None."""
    if hasattr(progress, "update"):
        yield progress
    elif progress:
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, **tqdm_kwargs) as bar:
            yield bar
    else:
        yield None


def track(items: Iterable, progress: Any, desc: str, total: int | None = None, **tqdm_kwargs) -> Iterator:
    """``items``, advancing the bar of :func:`progress_bar` by one after each (``total``: ``len(items)`` when it has
    one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with progress_bar(progress, total, desc, **tqdm_kwargs) as bar:
        for item in items:
            yield item
            if bar is not None:
                bar.update(1)
