"""Executors run the engine's chunks of variants: in this process (the default) or as Ray tasks.

An executor is any object with `map(fn, items) -> list` that returns fn(item) for every item, in
order. The engine passes a picklable job (`fn`: the model, the data, the schedule) and one item per
chunk (that chunk's sample weights and start states); results come back to the driver, which keeps
every artifact (nothing is written by a worker). Results do not depend on the executor.

    from distdm.executors import get_executor
    ex = get_executor("ray", address="auto")          # or RayExecutor(num_cpus=8); None -> local
    task.retrain(keep, chunk_size=25, executor=ex)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch

from .errors import DistdmError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    """What the engine needs of an executor."""

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """fn(item) for every item, in the order of items."""
        ...


class LocalExecutor:
    """Runs the chunks one after another in this process (the default)."""

    in_process = True  # the engine may pass callbacks (progress) that cannot leave the process

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """fn(item) for every item, in order."""
        return [fn(item) for item in items]

    def __repr__(self) -> str:
        return "LocalExecutor()"


def _run_remote(fn: Callable[[Any], Any], item: Any, threads: int) -> Any:
    """Body of one Ray task: run fn on the item with the task's CPU share as torch threads."""
    torch.set_num_threads(max(1, threads))
    return fn(item)


class RayExecutor:
    """Sends each chunk to a Ray task and gathers the results in order.

    address None starts a local Ray instance (with num_cpus CPUs; None: all); an address such as
    'auto' or 'ray://host:10001' connects to a running cluster, whose workers must be able to import
    distdm (install it there, or pass runtime_env). If Ray is already initialised in this process,
    that session is used as is. Each task asks for cpus_per_task CPUs and trains with that many torch
    threads. The function and the chunks travel by Ray's own serialisation (cloudpickle and its
    object store); nothing is pickled to the run directory.
    """

    in_process = False

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        *,
        cpus_per_task: int = 1,
        runtime_env: dict[str, Any] | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ):
        if num_cpus is not None and num_cpus < 1:
            raise DistdmError(f"num_cpus must be >= 1 or None, got {num_cpus}")
        if cpus_per_task < 1:
            raise DistdmError(f"cpus_per_task must be >= 1, got {cpus_per_task}")
        if address is not None and num_cpus is not None:
            raise DistdmError("num_cpus only applies to a local Ray instance: leave it out with an address")
        self.address = address
        self.num_cpus = num_cpus
        self.cpus_per_task = cpus_per_task
        self.runtime_env = runtime_env
        self.init_kwargs = dict(init_kwargs or {})
        self._started = False
        self._remote: Any = None

    def _ray(self) -> Any:
        ray = import_ray()
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, **self.init_kwargs}
            if self.runtime_env is not None:
                kwargs["runtime_env"] = self.runtime_env
            if self.address is None:
                kwargs["num_cpus"] = self.num_cpus
            else:
                kwargs["address"] = self.address
            try:
                ray.init(**kwargs)
            except ConnectionError as e:
                raise DistdmError(f"cannot connect to the Ray cluster at {self.address!r}: {e}") from e
            self._started = True
            log.info("started Ray: %s", ray.cluster_resources())
        if self._remote is None:
            self._remote = ray.remote(num_cpus=self.cpus_per_task)(_run_remote)
        return ray

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """fn(item) for every item as Ray tasks; results in the order of items."""
        items = list(items)
        if not items:
            return []
        ray = self._ray()
        fn_ref = ray.put(fn)  # shipped to the object store once, shared by every task
        refs = [self._remote.remote(fn_ref, item, self.cpus_per_task) for item in items]
        return list(ray.get(refs))

    def shutdown(self) -> None:
        """Stop the Ray instance if this executor started it."""
        if self._started:
            import_ray().shutdown()
            self._started = False
            self._remote = None

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, num_cpus={self.num_cpus!r})"


def import_ray() -> Any:
    """The ray module, or a DistdmError that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise DistdmError(
            "the Ray executor needs the 'ray' package: pip install 'distdm[ray]' (or pip install ray)"
        ) from e
    return ray


def get_executor(name: str | None = None, address: str | None = None) -> LocalExecutor | RayExecutor:
    """The executor for a name from the API or CLI: None or 'local' (in-process), or 'ray' (a local
    Ray instance, or the cluster at `address`)."""
    if name is None or name == "local":
        if address is not None:
            raise DistdmError("--address applies to the Ray executor only: add --executor ray")
        return LocalExecutor()
    if name == "ray":
        import_ray()  # fail early, with the install hint
        return RayExecutor(address=address)
    raise DistdmError(f"unknown executor {name!r}; choose one of {list(EXECUTORS)}")
