"""One progress bar for long work (kernel measurement, sparsifying), on stderr only.

stdout stays clean for what a command prints as its result (`sparsecomp compile --json > out`),
and the bar shows only when stderr is a terminal, so logs and CI output carry no control codes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(title: str, prefix: str = "") -> Iterator[Callable[[int, int, str], None] | None]:
    """Yields `update(done, total, what)` (the bar then reads `prefix + what`), or None when stderr
    is not a terminal; the bar disappears when the block ends."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task(title, total=None)

    def update(done: int, total: int, what: str) -> None:
        bar.update(task, completed=done, total=total, description=prefix + what)

    with bar:
        yield update
