"""Progress bars. A long loop in ``lib`` takes ``progress`` as a flag (true: its own tqdm bar on stderr; false or
None: none) or as the caller's bar (anything with ``update``, e.g. one tqdm bar over several calls), which it advances
and leaves open."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator


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
