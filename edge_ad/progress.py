"""Rich progress bars for long work, behind a plain ``callback(done, total)``.

Library functions take an optional ``progress`` callback and know nothing about terminals; the
CLI wraps them with :func:`progress_callback`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

ProgressFn = Callable[[int, int], None]


def make_progress() -> Progress:
    """The project's standard bar: description, bar, n/total, elapsed, remaining."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )


@contextmanager
def progress_callback(description: str) -> Iterator[ProgressFn]:
    """Yield ``callback(done, total)`` that drives one progress bar."""
    with make_progress() as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update
