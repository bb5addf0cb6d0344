"""A Task bundles what every attribution method needs: the model, the data, the units, the
training schedule and the target model's trajectory."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from .clusters import Clusters
from .data import TensorData
from .engine import (
    LossFn,
    Schedule,
    State,
    model_state,
    predict,
    select,
    stack_states,
    train_variants,
    variants_per_chunk,
)
from .errors import DistdmError
from .store import RunStore


@dataclasses.dataclass
class Task:
    """The trained target model and its context; `trajectory[0]` is theta_0, `[-1]` theta_tau."""

    model: nn.Module
    data: TensorData
    clusters: Clusters
    schedule: Schedule
    trajectory: list[State]
    loss: str | LossFn = "ce"
    reduction: str = "mean"
    strategy: str = "auto"
    store: RunStore | None = None  # where attributors cache expensive work (retrains), if given
    # how training jobs run (results do not depend on them): the default executor (distdm.executors;
    # None: in-process) and memory budget in bytes of every retrain, further training and fine-tune
    executor: Any = None
    memory_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        if len(self.clusters.assignment) != self.data.n_train:
            raise DistdmError(
                f"clusters cover {len(self.clusters.assignment)} samples, the training set has "
                f"{self.data.n_train}: were they made for another dataset?"
            )
        if not self.trajectory:
            raise DistdmError("the trajectory is empty: train the target model first")
        check_memory_budget(self.memory_budget_bytes)

    @property
    def init(self) -> State:
        """theta_0, the initial state."""
        return self.trajectory[0]

    @property
    def final(self) -> State:
        """theta_tau, the trained target model's state."""
        return self.trajectory[-1]

    def outputs(self, x: torch.Tensor, state: State | None = None) -> torch.Tensor:
        """Outputs (n, O) of one state (default: the target model) on x."""
        s = state if state is not None else self.final
        return predict(self.model, {k: v.unsqueeze(0) for k, v in s.items()}, x, strategy=self.strategy)[0]

    def retrain(
        self,
        keep: torch.Tensor,
        *,
        seed: int | None = None,
        unit: str = "cluster",
        progress: bool = False,
        chunk_size: int | None = None,
        executor: object = None,
        memory_budget_bytes: int | None = None,
    ) -> State:
        """Retrain from theta_0 with the target's schedule, once per row of `keep` (V, units):
        same data order, dropped units masked out of every batch. Returns stacked final states.
        `seed` changes both the initialisation and the shuffle order (None: the target's own).
        chunk_size: variants trained at once (default all), lowered to fit memory_budget_bytes;
        executor and memory_budget_bytes default to the task's own (results do not depend on them)."""
        keep = torch.as_tensor(keep, dtype=torch.float32)
        weights = self.clusters.keep_weights(keep) if unit == "cluster" else keep
        schedule, init = self.schedule, self.init
        if seed is not None and seed != self.schedule.seed:
            schedule = dataclasses.replace(self.schedule, seed=seed)
            init = reinitialise(self.model, seed)
        size = self.variants_per_chunk(weights.shape[0], schedule, chunk_size, memory_budget_bytes)
        return train_variants(
            self.model, self.data.x_train, self.data.y_train, schedule,
            weights=weights, init=init, loss=self.loss, reduction=self.reduction,
            strategy=self.strategy, chunk_size=size,
            executor=self.executor if executor is None else executor, progress=progress,
        ).states  # fmt: skip

    def variants_per_chunk(
        self,
        n_variants: int,
        schedule: Schedule | None = None,
        chunk_size: int | None = None,
        memory_budget_bytes: int | None = None,
        *,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        loss: str | LossFn | None = None,
    ) -> int:
        """Variants per engine call on the training data (or x, y): chunk_size (default all), lowered
        to fit memory_budget_bytes (default the task's)."""
        budget = self.memory_budget_bytes if memory_budget_bytes is None else memory_budget_bytes
        check_memory_budget(budget)
        return variants_per_chunk(
            self.model, self.data.x_train if x is None else x, self.data.y_train if y is None else y,
            schedule or self.schedule, n_variants, chunk_size=chunk_size, memory_budget_bytes=budget,
            loss=self.loss if loss is None else loss,
        )  # fmt: skip


def check_memory_budget(budget: int | None) -> None:
    """Raise a DistdmError unless the memory budget is None or a positive integer number of bytes."""
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise DistdmError(f"memory_budget_bytes must be a positive integer or None, got {budget!r}")


def reinitialise(model: nn.Module, seed: int) -> State:
    """A fresh initial state of the model's architecture drawn from `seed` (its reset_parameters)."""
    import copy

    m = copy.deepcopy(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for mod in m.modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
    return model_state(m)


def train_target(
    model: nn.Module,
    data: TensorData,
    schedule: Schedule,
    clusters: Clusters | None = None,
    *,
    loss: str | LossFn = "ce",
    strategy: str = "auto",
    progress: bool = False,
) -> Task:
    """Train the target model from its current state, recording one checkpoint per epoch."""
    check_model(model, data)
    res = train_variants(
        model, data.x_train, data.y_train, schedule, loss=loss, record=True,
        strategy=strategy, progress=progress,
    )  # fmt: skip
    traj = [select(s, 0) for s in res.trajectory or []]
    if clusters is None:
        from .clusters import classwise

        clusters = classwise(data.y_train) if not data.is_regression else _singletons(data)
    return Task(model, data, clusters, schedule, traj, loss=loss, strategy=strategy)


def _singletons(data: TensorData) -> Clusters:
    n = data.n_train
    return Clusters(np.arange(n), -np.ones(n, dtype=np.int64), "sample")


def check_model(model: nn.Module, data: TensorData) -> None:
    """Raise a clear error if the model cannot take the data's inputs or has the wrong output size."""
    want = data.num_classes if data.num_classes > 0 else 1
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            out = model(data.x_train[:2])
            model.train(was)
    except Exception as e:  # noqa: BLE001 - any failure here is a model/data mismatch
        raise DistdmError(f"the model fails on inputs of shape {tuple(data.x_train.shape[1:])}: {e}") from e
    if out.ndim != 2 or out.shape[1] != want:
        raise DistdmError(
            f"the model outputs shape {tuple(out.shape[1:])} per sample but the data has {want} "
            f"{'classes' if data.num_classes else 'target'}: make its last layer output {want}"
        )


def stack(states: list[State]) -> State:
    """Stack single states (re-exported for attributors)."""
    return stack_states(states)
