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

from edge_ad.d3ad.observer import FitObserver

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


class RichFitObserver(FitObserver):
    """A training observer that shows one progress bar per stage with the running loss.

    ``label`` prefixes each bar (the product, when several train at once). A stage that starts
    again (a Ray Train job resumed from a checkpoint) reuses its bar instead of adding one.
    """

    def __init__(self, progress: Progress, label: str = "") -> None:
        self.progress = progress
        self.prefix = f"{label} " if label else ""
        self.tasks: dict[str, int] = {}

    def stage_start(self, stage: str, total: int) -> None:
        if stage in self.tasks:
            self.progress.reset(self.tasks[stage], total=max(total, 1))
        else:
            self.tasks[stage] = self.progress.add_task(self.prefix + stage, total=max(total, 1))

    def advance(self, stage: str, n: int = 1, **metrics: float) -> None:
        text = self.prefix + stage + "".join(f" {k}={v:.4f}" for k, v in metrics.items())
        self.progress.update(self.tasks[stage], advance=n, description=text)

    def stage_end(self, stage: str, metrics: dict[str, float]) -> None:
        task = self.tasks[stage]
        total = self.progress.tasks[task].total
        self.progress.update(
            task, completed=total, description=f"{self.prefix}{stage} [green]done[/]"
        )
