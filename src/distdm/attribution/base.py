"""The shared attributor interface, the typed settings every method keeps, and the registry of
methods by name.

A method's settings are one frozen dataclass (`Settings`, one subclass per family: the method's
`Args`), checked when the method is made and kept unchanged in `method.args`; they read as
attributes (`method.damping`), round-trip through JSON (`to_dict` / `from_dict`) and are what a run
records beside a method's results. How and where a method runs (progress, executor, memory budget,
device) are not settings: they come with the task or are named in the class's `execution`.
Capabilities are class attributes (`trains_models`, `linear_in_queries`, `units`), never lookups
by name.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from ..data import check_queries
from ..errors import DistdmError
from ..objectives import Objective, objective_name
from ..scores import Scores
from ..task import Task

A = TypeVar("A", bound="Attributor")
S = TypeVar("S", bound="Settings")
UNITS = ("cluster", "sample")


def frozen_value(value: Any) -> Any:
    """A setting in its canonical, immutable form: sequences as tuples, NumPy scalars as Python ones."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple, range)):
        return tuple(frozen_value(v) for v in value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _plain(value: Any) -> Any:
    """A setting as JSON has it: tuples as lists, configs as dicts."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    return value


@dataclasses.dataclass(frozen=True)
class Settings:
    """A method's settings: frozen, checked when made (DistdmError naming the setting), JSON round-trip."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, frozen_value(getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Raise DistdmError, naming the setting, on a nonsense value."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings' names."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def make(cls: type[S], method: str, settings: Mapping[str, Any]) -> S:
        """The settings of `method` from keywords, refusing unknown names with the known ones."""
        unknown = sorted(set(settings) - set(cls.names()))
        if unknown:
            raise DistdmError(
                f"method {method!r} does not take the settings {unknown}; its settings: {sorted(cls.names())}"
            )
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[S], d: Mapping[str, Any], method: str = "") -> S:
        """Settings from `to_dict`'s dict (lists back to tuples; checked again)."""
        if not isinstance(d, Mapping):
            raise DistdmError(f"{method or cls.__name__} settings must be a dict, got {type(d).__name__}")
        return cls.make(method or cls.__name__, d)


# checks shared by the families' settings: each names the setting it refuses ----------------------


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Refuse a value that is not one of `choices`."""
    if not isinstance(value, (str, bool, type(None))) or value not in choices:
        raise DistdmError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_int(name: str, value: object, low: int = 0, *, none: bool = False) -> None:
    """Refuse a value that is not an integer >= low (or None where `none`)."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = f"an integer >= {low}" + (" or None" if none else "")
        raise DistdmError(f"{name} must be {what}, got {value!r}")


def check_number(
    name: str, value: object, low: float = 0.0, *, strict: bool = False, none: bool = False
) -> None:
    """Refuse a value that is not a finite number >= low (> low where `strict`; or None where `none`)."""
    if value is None and none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):  # type: ignore[operator]
        what = f"a finite number {'>' if strict else '>='} {low:g}" + (" or None" if none else "")
        raise DistdmError(f"{name} must be {what}, got {value!r}")


def check_unit(value: object) -> None:
    """Refuse a unit other than 'cluster' or 'sample'."""
    if value not in UNITS:
        raise DistdmError(f"unit must be 'cluster' or 'sample', got {value!r}")


class Attributor(ABC):
    """Configured in __init__, fitted once with `fit(task)`, then asked many times with `scores`.

    Settings live in `args` (frozen; `Args` is the class's settings dataclass) and read as
    attributes; fitted state lives in attributes ending in '_'. Scores follow one sign convention:
    positive means removing the unit increases the objective.
    """

    name: ClassVar[str] = "base"
    Args: ClassVar[type[Settings]] = Settings
    # constructor keywords that are not settings (how it runs, or a ready input): not in to_dict
    execution: ClassVar[tuple[str, ...]] = ()
    # capabilities: whether fit trains models (so executors and memory budgets apply); whether the
    # score of the queries' mean objective is the mean of their scores (`mean_scores` answers a
    # validation set in one solve); the units its scores can come in (the `unit` setting)
    trains_models: ClassVar[bool] = False
    linear_in_queries: ClassVar[bool] = False
    units: ClassVar[tuple[str, ...]] = ("cluster",)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # the generic constructor takes exactly the settings: say so to inspect.signature and help()
        if cls.__init__ is Attributor.__init__:
            cls.__signature__ = cls._signature()  # type: ignore[attr-defined]
        else:
            cls.__signature__ = None  # type: ignore[attr-defined]  # the class's own __init__ says

    @classmethod
    def _signature(cls) -> inspect.Signature:
        kw = inspect.Parameter.KEYWORD_ONLY
        params = [
            inspect.Parameter(f.name, kw, default=f.default, annotation=f.type)
            for f in dataclasses.fields(cls.Args)
        ]
        return inspect.Signature(params)

    def __init__(self, **settings: Any) -> None:
        self.args = self.Args.make(self.name, settings)

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: a setting, read from the one record of them
        args = self.__dict__.get("args")
        if args is not None and name in type(args).__dataclass_fields__:
            return getattr(args, name)
        if name == "args":
            raise AttributeError(
                f"{type(self).__name__} has no settings record: its __init__ must call "
                f"super().__init__(**settings) with the fields of its Args dataclass"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        # setting a setting replaces the record (checked again), so `args` and to_dict stay true
        args = self.__dict__.get("args")
        if args is not None and name in type(args).__dataclass_fields__:
            name, value = "args", dataclasses.replace(args, **{name: value})
        super().__setattr__(name, value)

    @property
    def unit(self) -> str:
        """The unit the scores come in: the `unit` setting where the method has one, else its only unit."""
        return getattr(self.__dict__.get("args"), "unit", self.units[0])

    @classmethod
    def keywords(cls) -> tuple[str, ...]:
        """Every keyword the constructor takes: the settings and the execution keywords."""
        return cls.Args.names() + cls.execution

    # settings round-trip -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """{'method': name, 'settings': {...}}, JSON-serialisable; `from_dict` makes the method again."""
        return {"method": self.name, "settings": self.args.to_dict()}

    def __eq__(self, other: object) -> bool:
        """Two attributors are equal when they are the same method with the same settings (`to_dict`):
        fitted state and execution keywords (progress, executor, ...) do not count. One that has no
        settings dict (a ddm given a ready synset, which is data) equals only itself."""
        if not isinstance(other, Attributor):
            return NotImplemented
        if self is other:
            return True
        if type(self) is not type(other):
            return False
        try:
            return self.to_dict() == other.to_dict()
        except DistdmError:
            return False

    # settings can be changed after construction (attributor.damping = ...), so a hash of them would
    # change while the attributor sits in a set or dict: equal by value, attributors are unhashable
    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Attributor:
        """A new, unfitted attributor with the settings of `to_dict`'s dict (execution keywords at
        their defaults)."""
        if not isinstance(d, Mapping) or set(d) != {"method", "settings"}:
            raise DistdmError(f"an attributor's dict has the keys 'method' and 'settings', got {d!r}")
        name = d["method"]
        if name not in ATTRIBUTORS:
            raise DistdmError(f"unknown method {name!r}; available: {sorted(ATTRIBUTORS)}")
        target = ATTRIBUTORS[name]
        if not issubclass(target, cls):
            raise DistdmError(f"{name!r} is a {target.__name__}, not a {cls.__name__}")
        args = target.Args.from_dict(d["settings"], name)
        return target(**{k: getattr(args, k) for k in args.names()})

    # fit and scores ------------------------------------------------------------------------------
    def fit(self: A, task: Task) -> A:
        """Do the method's offline work for this task; returns self."""
        t = time.perf_counter()
        self.task_ = task
        self._fit(task)
        self.offline_seconds_ = time.perf_counter() - t
        return self

    def _fit(self, task: Task) -> None:  # noqa: B027 - optional hook
        """Offline work; most methods need none beyond keeping the task."""

    def _checked(self, x: torch.Tensor, y: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(self, "task_"):
            raise DistdmError(f"{self.name}: call fit(task) before {what}(...)")
        x, y = check_queries(x, y, self.task_.data)
        return x.to(self.task_.device), y.to(self.task_.device)  # the method computes on the task's device

    def _finish(self, s: Scores, t: float) -> Scores:
        s.seconds = time.perf_counter() - t
        data = self.task_.data  # so that top(k) can name each unit's class and size
        return s.attach_units(self.task_.clusters, None if data.is_regression else data.y_train)

    def scores(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        objective: str | Objective = "margin",
    ) -> Scores:
        """Scores (units x queries) of each unit for the objective on queries (x, y)."""
        x, y = self._checked(x, y, "scores")
        t = time.perf_counter()
        return self._finish(self._scores(x, y, objective), t)

    def mean_scores(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        objective: str | Objective = "margin",
    ) -> Scores:
        """Scores (units x 1) of each unit for the mean of the objective over queries (x, y), e.g. a
        validation set's mean loss; one solve for methods that are `linear_in_queries`."""
        x, y = self._checked(x, y, "mean_scores")
        t = time.perf_counter()
        return self._finish(self._mean_scores(x, y, objective), t)

    @abstractmethod
    def _scores(self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective) -> Scores:
        """Compute the scores (the timing and input checks are done by `scores`)."""

    def _mean_scores(self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective) -> Scores:
        """The mean over queries of `_scores` (methods with a one-solve path override this)."""
        s = self._scores(x, y, objective)
        return Scores(s.values.mean(1, keepdims=True), s.unit, objective_name(objective), s.method)


ATTRIBUTORS: dict[str, type[Attributor]] = {}


def register(name: str) -> Callable[[type[A]], type[A]]:
    """Class decorator: make an attributor available by name."""

    def deco(cls: type[A]) -> type[A]:
        cls.name = name
        ATTRIBUTORS[name] = cls
        return cls

    return deco


def accepts(name: str, setting: str) -> bool:
    """Whether the registered method `name` takes the keyword (a setting, or e.g. 'progress')."""
    cls = ATTRIBUTORS.get(name)
    return cls is not None and setting in cls.keywords()


def make_attributor(name: str, **settings: object) -> Attributor:
    """An attributor by registered name, configured with settings."""
    if name not in ATTRIBUTORS:
        raise DistdmError(f"unknown method {name!r}; available: {sorted(ATTRIBUTORS)}")
    cls = ATTRIBUTORS[name]
    unknown = sorted(set(settings) - set(cls.keywords()))
    if unknown:
        raise DistdmError(
            f"method {name!r} does not take the settings {unknown}; it takes: {sorted(cls.keywords())}"
        )
    return cls(**settings)


def attributor_from_dict(d: Mapping[str, Any]) -> Attributor:
    """The unfitted attributor that `Attributor.to_dict` described."""
    return Attributor.from_dict(d)
