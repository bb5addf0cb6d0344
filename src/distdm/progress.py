"""Progress of long stages (training, retraining, distillation): silent, a bar, or a callback.

Every long-running entry point of distdm (`Run`, the attributors, `train_variants`, `distill`, ...)
takes `progress`, one of

- False or None: report nothing (the default);
- True: a rich progress bar on stderr, one line per stage, removed when the stage ends;
- a callable `progress(stage: str, done: int, total: int) -> None`: called with done=0 when a
  stage starts and again each time work is done; `done` grows monotonically up to `total`, in
  units that the stage names (training and retraining: variant-epochs; distillation: image
  updates). For example `lambda stage, done, total: print(f"{stage}: {done}/{total}")`;
- a `StageProgress` that an enclosing loop opened: work is counted on it instead of opening a
  stage of its own. A loop over chunks opens one stage whose total covers every chunk and passes
  it down, so that the user sees one bar for the whole stage, not one per chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Union

from .errors import DistdmError

ProgressCallback = Callable[[str, int, int], None]
# the argument every long-running function accepts (see the module docstring)
Progress = Union[bool, None, ProgressCallback, "StageProgress"]

_live: Any = None  # the rich display on screen, shared by stages that open while it is up


class StageProgress:
    """One stage's progress: `done` units of `total`; inner loops advance it rather than open their own."""

    def __init__(self, stage: str, total: int, report: Callable[[int], None] | None = None):
        self.stage, self.total, self.done = stage, int(total), 0
        self._report = report

    def advance(self, n: int = 1) -> None:
        """Count n more units of work done."""
        if n <= 0:
            return
        self.done += int(n)
        if self._report is not None:
            self._report(self.done)


def check_progress(progress: object) -> None:
    """Raise a DistdmError unless `progress` is False/None, True, a callable or a StageProgress."""
    if progress is None or isinstance(progress, (bool, StageProgress)) or callable(progress):
        return
    raise DistdmError(
        "progress must be False, True (a bar on stderr) or a callable (stage, done, total) -> None, "
        f"got {progress!r}"
    )


@contextmanager
def progress_bar(total: int, description: str, progress: Progress) -> Iterator[StageProgress]:
    """The progress of one stage of `total` units: reported as `progress` says (see the module
    docstring); an enclosing stage's StageProgress is handed back as it is."""
    check_progress(progress)
    if isinstance(progress, StageProgress):
        yield progress
        return
    if progress is None or progress is False:
        yield StageProgress(description, total)
        return
    if progress is True:
        with _rich_task(description, total) as stage:
            yield stage
        return
    callback: ProgressCallback = progress  # type: ignore[assignment]
    callback(description, 0, int(total))
    yield StageProgress(description, total, lambda done: callback(description, done, int(total)))


@contextmanager
def _rich_task(description: str, total: int) -> Iterator[StageProgress]:
    global _live
    if _live is not None:
        # rich allows one live display at a time: a stage opened inside another gets its own line
        # on the display that is already up
        p = _live
        task = p.add_task(description, total=total)
        try:
            yield StageProgress(description, total, lambda done: p.update(task, completed=done))
        finally:
            p.remove_task(task)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as p:
        task = p.add_task(description, total=total)
        _live = p
        try:
            yield StageProgress(description, total, lambda done: p.update(task, completed=done))
        finally:
            _live = None
