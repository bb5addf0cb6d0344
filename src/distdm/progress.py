"""Optional progress display: a rich bar when asked for, nothing otherwise."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class _Silent:
    def advance(self, n: int = 1) -> None:
        """Do nothing."""


class _Bar:
    def __init__(self, progress: object, task: object):
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        """Move the bar by n units."""
        self._progress.advance(self._task, n)  # type: ignore[attr-defined]


@contextmanager
def progress_bar(total: int, description: str, enabled: bool) -> Iterator[_Silent | _Bar]:
    """A progress bar over `total` units when enabled, else a silent stand-in."""
    if not enabled:
        yield _Silent()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as p:
        yield _Bar(p, p.add_task(description, total=total))
