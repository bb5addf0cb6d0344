"""How work runs, as opposed to what it computes: the device, the executor of training chunks, the
memory budget and progress reporting. Results do not depend on any of these (up to float round-off),
so they are kept out of every settings dict and cache key.

    from distdm.runtime import Runtime
    task = Task(model, data, clusters, schedule, trajectory, runtime=Runtime(device="auto"))
    faster = dataclasses.replace(task, memory_budget_bytes=2**30)  # the same answers, in bigger chunks

There is no dtype here on purpose: the precision of the states is part of what is computed (float32
and float64 answers differ beyond round-off for ill-conditioned curvature solves), and it is already
carried by the model and trajectory themselves."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from .engine import resolve_device
from .errors import DistdmError
from .progress import Progress, check_progress


def check_memory_budget(budget: int | None) -> None:
    """Raise a DistdmError unless the memory budget is None or a positive integer number of bytes."""
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise DistdmError(f"memory_budget_bytes must be a positive integer or None, got {budget!r}")


def check_executor(executor: object) -> None:
    """Raise a DistdmError unless the executor is None (in-process) or has map(fn, items)."""
    if executor is not None and not callable(getattr(executor, "map", None)):
        raise DistdmError(
            f"executor must be None (in this process) or an object with map(fn, items), e.g. "
            f"distdm.executors.get_executor('ray'), got {executor!r}"
        )


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where and how a Task's work runs; none of it changes results.

    device: 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto' (cuda if available, else mps, else cpu), held as
    the torch.device it resolves to (a device this machine lacks is refused here, before anything moves);
    executor: what runs the engine's chunks of retrains, further training and fine-tunes (None: this
    process; see distdm.executors); memory_budget_bytes: the most memory one engine call may use (None:
    no limit), which sets how many variants train at once; progress: the default progress reporting of
    the task's own retrains (False, True for a bar, or a callable; see distdm.progress)."""

    device: str | torch.device = "cpu"
    executor: Any = None
    memory_budget_bytes: int | None = None
    progress: Progress = False

    def __post_init__(self) -> None:
        check_memory_budget(self.memory_budget_bytes)
        check_executor(self.executor)
        check_progress(self.progress)
        object.__setattr__(self, "device", resolve_device(self.device))
        if self.memory_budget_bytes is not None:
            object.__setattr__(self, "memory_budget_bytes", int(self.memory_budget_bytes))

    def replace(self, **changes: Any) -> Runtime:
        """A copy with some entries changed (validated again)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise DistdmError(f"Runtime: unknown entries {sorted(unknown)}; known: {sorted(names)}")
        return dataclasses.replace(self, **changes)


UNSET: Any = object()  # a Runtime entry not given as a keyword: the runtime's own is kept


def runtime_of(runtime: Runtime | None, **given: Any) -> Runtime:
    """`runtime` (default Runtime()) with the entries given as keywords changed (those left UNSET are
    kept): how Task and Run take both runtime=Runtime(...) and the separate keywords device,
    executor, memory_budget_bytes and progress."""
    if runtime is not None and not isinstance(runtime, Runtime):
        raise DistdmError(f"runtime must be a distdm.Runtime, got {type(runtime).__name__}")
    changes = {k: v for k, v in given.items() if v is not UNSET}
    base = runtime or Runtime()
    return base.replace(**changes) if changes else base


__all__ = ["UNSET", "Runtime", "check_executor", "check_memory_budget", "runtime_of"]


class RuntimeEntries:
    """Read-only views of a `runtime` attribute's entries, shared by Task and Run."""

    runtime: Runtime

    @property
    def device(self) -> torch.device:
        """Where every stage computes (the runtime's device)."""
        return self.runtime.device  # type: ignore[return-value]

    @property
    def executor(self) -> Any:
        """What runs retrains, further training and fine-tunes (the runtime's; None: in-process)."""
        return self.runtime.executor

    @property
    def memory_budget_bytes(self) -> int | None:
        """The most memory one engine call may use, in bytes (the runtime's; None: no limit)."""
        return self.runtime.memory_budget_bytes
