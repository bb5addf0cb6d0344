"""A Task bundles what every attribution method needs: the model, the data, the units, the
training schedule and the target model's trajectory."""

from __future__ import annotations

import dataclasses
import math
import warnings
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
    per_sample_loss,
    predict,
    resolve_device,
    select,
    stack_states,
    state_to,
    train_variants,
    variants_per_chunk,
)
from .errors import DistdmError
from .progress import Progress
from .runtime import UNSET, Runtime, RuntimeEntries, check_memory_budget, runtime_of
from .store import RunStore


@dataclasses.dataclass(init=False)
class Task(RuntimeEntries):
    """The trained target model and its context; `trajectory[0]` is theta_0, `[-1]` theta_tau.

    `model` gives the architecture only: every method evaluates the states of `trajectory`, never the
    module's own weights. A trajectory holds one state per epoch (schedule.epochs + 1 states) or just
    the endpoints [theta_0, theta_tau]; any other length is refused, as are states whose parameter
    names or shapes are not the model's. States given as numpy arrays are converted to tensors. If
    the module's own weights are neither theta_0 nor theta_tau, a UserWarning says that the answers
    are about trajectory[-1] (they may not be the model you trained).

    `store` is deprecated: the run store is not part of the problem. Pass it where work is cached
    (`ExactRetrain(store=...)`, `retrain_masks(..., store=...)`, `verify(..., store=...)`; a
    distdm.Run does so itself). A task given one warns (DeprecationWarning), and code that is given no
    store still reads it, so that older code keeps its caches.

    `runtime` (a distdm.Runtime: device, executor, memory budget, progress) says how the work runs;
    results do not depend on it. The keywords executor, memory_budget_bytes and device set those
    entries of it (over the given runtime's), and `task.device` etc. read them. The runtime's device
    is where every method computes: the model is moved there (in place), and the Task holds copies of
    the data and the trajectory there; tensors reach the CPU only where scores and stored results are
    made."""

    model: nn.Module
    data: TensorData
    clusters: Clusters
    schedule: Schedule
    trajectory: list[State]
    loss: str | LossFn = "ce"
    reduction: str = "mean"
    strategy: str = "auto"
    # deprecated: the caching code takes its store explicitly and reads this one only when given none
    store: RunStore | None = None
    runtime: Runtime = Runtime()

    def __init__(
        self,
        model: nn.Module,
        data: TensorData,
        clusters: Clusters,
        schedule: Schedule,
        trajectory: list[State],
        loss: str | LossFn = "ce",
        reduction: str = "mean",
        strategy: str = "auto",
        store: RunStore | None = None,
        *,
        runtime: Runtime | None = None,
        executor: Any = UNSET,
        memory_budget_bytes: int | None = UNSET,
        device: str | torch.device = UNSET,
    ) -> None:
        # dataclasses.replace(task, device=...) passes the task's runtime and the changed keyword
        self.runtime = runtime_of(
            runtime, executor=executor, memory_budget_bytes=memory_budget_bytes, device=device
        )
        self.model, self.data, self.clusters, self.schedule = model, data, clusters, schedule
        self.trajectory, self.loss, self.reduction, self.strategy, self.store = (
            trajectory, loss, reduction, strategy, store
        )  # fmt: skip
        if store is not None:
            warnings.warn(
                "Task(store=...) is deprecated: pass the store to what caches work instead "
                "(e.g. ExactRetrain(store=run.store), retrain_masks(task, keep, store=...), "
                "verify(task, scores, x, y, store=...)), or use distdm.Run, which does",
                DeprecationWarning,
                stacklevel=2,
            )
        self.__post_init__()

    def __post_init__(self) -> None:
        if not isinstance(self.clusters, Clusters):
            raise DistdmError(
                f"clusters must be a Clusters (e.g. distdm.kmeans_per_class), "
                f"got {type(self.clusters).__name__}"
            )
        if not isinstance(self.model, nn.Module):
            raise DistdmError(f"model must be an nn.Module, got {type(self.model).__name__}")
        if not isinstance(self.schedule, Schedule):
            raise DistdmError(
                f"schedule must be a distdm.Schedule (or TrainConfig), got {type(self.schedule).__name__}"
            )
        if self.data.is_regression and self.loss == "ce":
            raise DistdmError(
                "regression targets need loss='mse' (or a callable loss), not cross-entropy 'ce'"
            )
        self.trajectory = _check_trajectory(self.trajectory, self.model, self.schedule)
        # on the CPU each of these is the same object again: no copy, no cost
        self.model.to(self.device)
        self.data = data_to(self.data, self.device)
        self.trajectory = [state_to(s, self.device) for s in self.trajectory]
        if len(self.clusters.assignment) != self.data.n_train:
            raise DistdmError(
                f"clusters cover {len(self.clusters.assignment)} samples, the training set has "
                f"{self.data.n_train}: were they made for another dataset?"
            )
        own = model_state(self.model)
        if not (_same_state(own, self.trajectory[0]) or _same_state(own, self.trajectory[-1])):
            warnings.warn(
                "the model's own weights are neither trajectory[0] (theta_0) nor trajectory[-1] (theta_tau): "
                "attributions explain the model whose final state is trajectory[-1]",
                UserWarning,
                stacklevel=3,
            )

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
        x = x.to(self.device)
        return predict(self.model, {k: v.unsqueeze(0) for k, v in s.items()}, x, strategy=self.strategy)[0]

    def retrain(
        self,
        keep: torch.Tensor,
        *,
        seed: int | None = None,
        unit: str = "cluster",
        progress: Progress = None,
        chunk_size: int | None = None,
        executor: object = None,
        memory_budget_bytes: int | None = None,
    ) -> State:
        """Retrain from theta_0 with the target's schedule, once per row of `keep` (V, units):
        same data order, dropped units masked out of every batch. Returns stacked final states.
        `seed` changes both the initialisation and the shuffle order (None: the target's own).
        chunk_size: variants trained at once (default all), lowered to fit memory_budget_bytes;
        executor, memory_budget_bytes and progress (None) default to the task's runtime (results do not
        depend on them)."""
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
            executor=self.executor if executor is None else executor,
            progress=self.runtime.progress if progress is None else progress,
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


def store_of(task: Task, store: RunStore | None = None) -> RunStore | None:
    """The run store to cache work in: the one given, else the task's deprecated `store` (None: none)."""
    return store if store is not None else task.store


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


def _check_trajectory(trajectory: Any, model: nn.Module, schedule: Schedule) -> list[State]:
    """The trajectory as a list of tensor states of this model, or a DistdmError saying what is wrong."""
    if isinstance(trajectory, dict) or not isinstance(trajectory, (list, tuple)):
        raise DistdmError(
            f"the trajectory must be a list of states (dicts of parameter name -> tensor, like "
            f"model.state_dict()), got {type(trajectory).__name__}"
        )
    if not trajectory:
        raise DistdmError("the trajectory is empty: train the target model first")
    ref = model.state_dict()
    out: list[State] = []
    for e, state in enumerate(trajectory):
        if not isinstance(state, dict):
            raise DistdmError(
                f"trajectory[{e}] is a {type(state).__name__}, not a state: each entry must be a dict of "
                f"parameter name -> tensor, like model.state_dict()"
            )
        missing, extra = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
        if missing or extra:
            raise DistdmError(
                f"trajectory[{e}] is not a state of this model: it lacks {missing[:3]} and has extra "
                f"{extra[:3]}"
            )
        conv: State = {}
        for k, v in state.items():
            try:
                t = v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v))
            except (TypeError, ValueError, RuntimeError) as err:
                raise DistdmError(f"trajectory[{e}][{k!r}] is not an array of numbers ({err})") from err
            if tuple(t.shape) != tuple(ref[k].shape):
                raise DistdmError(
                    f"trajectory[{e}][{k!r}] has shape {tuple(t.shape)}, the model's {tuple(ref[k].shape)}"
                )
            conv[k] = t.to(ref[k].dtype) if t.dtype != ref[k].dtype and ref[k].is_floating_point() else t
        out.append(conv)
    if len(out) not in (schedule.epochs + 1, 2):
        raise DistdmError(
            f"the trajectory has {len(out)} states but the schedule trains {schedule.epochs} epochs: give "
            f"one state per epoch plus theta_0 ({schedule.epochs + 1}), or just [theta_0, theta_tau]"
        )
    return out


def _same_state(a: State, b: State) -> bool:
    return set(a) == set(b) and all(
        a[k].shape == b[k].shape and torch.equal(a[k], b[k].to(a[k].device, a[k].dtype)) for k in a
    )


def data_to(data: TensorData, device: torch.device | str) -> TensorData:
    """The dataset with its four tensors on `device` (the same object if they are there already)."""
    tensors = ("x_train", "y_train", "x_test", "y_test")
    if all(getattr(data, k).device == torch.device(device) for k in tensors):
        return data
    return dataclasses.replace(data, **{k: getattr(data, k).to(device) for k in tensors})


def module_device(model: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (the CPU for a module without any)."""
    t = next(iter(model.parameters()), None)
    if t is None:
        t = next(iter(model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def check_training_data(data: TensorData) -> None:
    """Raise a DistdmError if the data cannot train a target model (a classifier needs two classes)."""
    if data.is_regression:
        return
    classes = torch.unique(data.y_train)
    if classes.numel() < 2:
        raise DistdmError(
            f"the training data has one class only (class {int(classes[0])}, {data.n_train} samples): "
            f"a classifier needs at least two classes"
        )


def _train_loss(model: nn.Module, data: TensorData, state: State, loss: str | LossFn, strategy: str) -> float:
    out = predict(model, {k: v.unsqueeze(0) for k, v in state.items()}, data.x_train, strategy=strategy)[0]
    return float(per_sample_loss(out, data.y_train, loss).mean())


def _finite(state: State) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def check_converged(
    model: nn.Module,
    data: TensorData,
    schedule: Schedule,
    trajectory: list[State],
    loss: str | LossFn = "ce",
    strategy: str = "auto",
) -> None:
    """Raise a DistdmError naming the epoch and the lr to lower if training diverged (NaN/inf weights
    or training loss anywhere along the trajectory)."""
    bad = next((e for e, s in enumerate(trajectory) if not _finite(s)), None)
    if bad is None:
        if math.isfinite(_train_loss(model, data, trajectory[-1], loss, strategy)):
            return
        # finite weights, but the loss overflowed: find where it first did
        losses = (_train_loss(model, data, s, loss, strategy) for s in trajectory)
        bad = next(e for e, v in enumerate(losses) if not math.isfinite(v))
    value = _train_loss(model, data, trajectory[bad], loss, strategy)
    if bad == 0:
        raise DistdmError(
            f"the model's initial weights give a training loss of {value:.4g} (NaN/inf weights or outputs): "
            f"check its initialisation"
        )
    raise DistdmError(
        f"training diverged at epoch {bad} (loss {value:.4g}): lower the lr below {schedule.lr:g}"
    )


def train_target(
    model: nn.Module,
    data: TensorData,
    schedule: Schedule,
    clusters: Clusters | None = None,
    *,
    loss: str | LossFn | None = None,
    strategy: str = "auto",
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> Task:
    """Train the target model from its current state, recording one checkpoint per epoch; refuses
    single-class data and training that diverged. loss: 'ce' for classes, 'mse' for regression
    (default by the data), or a callable. device: where to train (see Task); the model is moved there."""
    dev = resolve_device(device)
    model.to(dev)
    data = data_to(data, dev)
    check_model(model, data)
    check_training_data(data)
    if loss is None:
        loss = "mse" if data.is_regression else "ce"
    res = train_variants(
        model, data.x_train, data.y_train, schedule, loss=loss, record=True,
        strategy=strategy, progress=progress,
    )  # fmt: skip
    traj = [select(s, 0) for s in res.trajectory or []]
    check_converged(model, data, schedule, traj, loss, strategy)
    if clusters is None:
        from .clusters import classwise

        clusters = classwise(data.y_train) if not data.is_regression else _singletons(data)
    return Task(model, data, clusters, schedule, traj, loss=loss, strategy=strategy, device=dev)


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
            out = model(data.x_train[:2].to(module_device(model)))
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
