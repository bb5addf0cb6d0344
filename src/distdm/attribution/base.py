"""The shared attributor interface and the registry of methods by name."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, TypeVar

import torch

from ..data import check_queries
from ..errors import DistdmError
from ..objectives import Objective
from ..scores import Scores
from ..task import Task

A = TypeVar("A", bound="Attributor")


class Attributor(ABC):
    """Configured in __init__, fitted once with `fit(task)`, then asked many times with `scores`.

    Fitted state lives in attributes ending in '_'. Scores follow one sign convention: positive
    means removing the unit increases the objective.
    """

    name: ClassVar[str] = "base"
    unit: ClassVar[str] = "cluster"

    def fit(self: A, task: Task) -> A:
        """Do the method's offline work for this task; returns self."""
        t = time.perf_counter()
        self.task_ = task
        self._fit(task)
        self.offline_seconds_ = time.perf_counter() - t
        return self

    def _fit(self, task: Task) -> None:  # noqa: B027 - optional hook
        """Offline work; most methods need none beyond keeping the task."""

    def scores(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        objective: str | Objective = "margin",
    ) -> Scores:
        """Scores (units x queries) of each unit for the objective on queries (x, y)."""
        if not hasattr(self, "task_"):
            raise DistdmError(f"{self.name}: call fit(task) before scores(...)")
        x, y = check_queries(x, y, self.task_.data)
        x, y = x.to(self.task_.device), y.to(self.task_.device)  # the method computes on the task's device
        t = time.perf_counter()
        s = self._scores(x, y, objective)
        s.seconds = time.perf_counter() - t
        data = self.task_.data  # so that top(k) can name each unit's class and size
        return s.attach_units(self.task_.clusters, None if data.is_regression else data.y_train)

    @abstractmethod
    def _scores(self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective) -> Scores:
        """Compute the scores (the timing and input checks are done by `scores`)."""


ATTRIBUTORS: dict[str, type[Attributor]] = {}


def register(name: str) -> Callable[[type[A]], type[A]]:
    """Class decorator: make an attributor available by name."""

    def deco(cls: type[A]) -> type[A]:
        cls.name = name
        ATTRIBUTORS[name] = cls
        return cls

    return deco


def accepts(name: str, setting: str) -> bool:
    """Whether the registered method `name` takes the setting (e.g. 'progress') in its constructor."""
    import inspect

    cls = ATTRIBUTORS.get(name)
    return cls is not None and setting in inspect.signature(cls).parameters


def make_attributor(name: str, **settings: object) -> Attributor:
    """An attributor by registered name, configured with settings."""
    if name not in ATTRIBUTORS:
        raise DistdmError(f"unknown method {name!r}; available: {sorted(ATTRIBUTORS)}")
    import inspect

    try:
        inspect.signature(ATTRIBUTORS[name]).bind(**settings)
    except TypeError as e:
        raise DistdmError(f"method {name!r} does not take the settings {sorted(settings)} ({e})") from e
    return ATTRIBUTORS[name](**settings)
