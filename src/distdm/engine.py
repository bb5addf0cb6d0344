"""The one training engine: many variants of one model, each from its own start on its own sample
weights, trained with one schedule and one shuffle order; batched with torch.func where possible.

Every method in distdm (target training, exact retraining, DDM fine-tunes, further training, retrain
after removal) is a call of `train_variants`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from .errors import DistdmError
from .progress import progress_bar

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]  # parameters and buffers by name; stacked states have a leading V
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> per-sample


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One training schedule shared by all variants."""

    epochs: int = 30
    lr: float = 0.1
    batch_size: int | None = 64  # None: full batch
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0  # shuffle order
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0 or (self.batch_size is not None and self.batch_size <= 0):
            raise DistdmError(f"invalid schedule: epochs {self.epochs}, batch {self.batch_size}")
        if not self.lr > 0:
            raise DistdmError(f"learning rate must be > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise DistdmError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")


@dataclasses.dataclass
class TrainResult:
    """Final states (stacked over variants) and, if recorded, one stacked state per epoch."""

    states: State
    trajectory: list[State] | None = None  # epoch 0 (the start) .. epochs

    @property
    def n_variants(self) -> int:
        """Number of variants trained."""
        return int(next(iter(self.states.values())).shape[0])


def model_state(model: nn.Module) -> State:
    """The model's parameters and buffers as a detached state dict (one variant, unstacked)."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def param_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in model order."""
    return [k for k, p in model.named_parameters() if p.requires_grad]


def stack_states(states: Sequence[State]) -> State:
    """Stack single-variant states into one with a leading variant dimension."""
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def repeat_state(state: State, n: int) -> State:
    """A stacked state of n copies of one state."""
    return {k: v.unsqueeze(0).expand(n, *v.shape).clone() for k, v in state.items()}


def select(state: State, i: int | slice | torch.Tensor) -> State:
    """Variant(s) i of a stacked state."""
    return {k: v[i] for k, v in state.items()}


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor, loss: str | LossFn) -> torch.Tensor:
    """Per-sample loss: 'ce' (hard class ids or soft label vectors), 'mse', or a user function."""
    if callable(loss):
        return loss(outputs, targets)
    if loss == "ce":
        logp = F.log_softmax(outputs, dim=-1)
        if targets.dtype.is_floating_point:
            return -(targets * logp).sum(-1)
        return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if loss == "mse":
        out = outputs.squeeze(-1) if outputs.shape[-1] == 1 and targets.ndim < outputs.ndim else outputs
        return ((out - targets) ** 2).reshape(*out.shape[: targets.ndim], -1).sum(-1)
    raise DistdmError(f"loss must be 'ce', 'mse' or a callable, got {loss!r}")


def _has_running_buffers(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules()
    )


def choose_strategy(model: nn.Module, device: torch.device | str = "cpu") -> str:
    """'vmap' or 'loop' for this model and device, by a rule measured on CPU (DESIGN.md):
    convolutions are compute-bound on a CPU and train slower under vmap; batch norm in
    training mode cannot be vmapped."""
    if _has_running_buffers(model):
        return "loop"
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    if has_conv and torch.device(device).type == "cpu":
        return "loop"
    return "vmap"


def _optimizer(params: list[torch.Tensor], s: Schedule) -> torch.optim.Optimizer:
    # SGD and Adam are elementwise, so one optimizer over stacked parameters is exactly one
    # optimizer per variant.
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def _reduce(losses: torch.Tensor, w: torch.Tensor, reduction: str) -> torch.Tensor:
    wl = (losses * w).sum(-1)
    if reduction == "mean":
        return wl / w.sum(-1).clamp_min(1e-12)
    if reduction == "sum":
        return wl
    if reduction == "fixed":
        return wl / w.shape[-1]
    raise DistdmError(f"reduction must be 'mean', 'sum' or 'fixed', got {reduction!r}")


def batch_order(n: int, schedule: Schedule) -> list[list[torch.Tensor]]:
    """The index batches of every epoch: one shuffle order shared by all variants."""
    g = torch.Generator().manual_seed(schedule.seed)
    bs = schedule.batch_size or n
    epochs = []
    for _ in range(schedule.epochs):
        perm = torch.randperm(n, generator=g) if schedule.shuffle else torch.arange(n)
        epochs.append(list(perm.split(bs)))
    return epochs


def _train_chunk(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    init: State,
    schedule: Schedule,
    loss: str | LossFn,
    reduction: str,
    record: bool,
    strategy: str,
    on_epoch: Callable[[], None],
) -> TrainResult:
    names = param_names(model)
    params = {k: init[k].detach().clone().requires_grad_(True) for k in names}
    fixed = {k: v.detach() for k, v in init.items() if k not in params}
    opt = _optimizer(list(params.values()), schedule)
    was_training = model.training
    model.train()

    if strategy == "vmap":

        def outputs_of(xb: torch.Tensor) -> torch.Tensor:
            return vmap(lambda p, b: functional_call(model, p, (xb,)), in_dims=(0, 0))(params, fixed)
    else:
        # one module copy per variant, so that running buffers (batch norm) stay per variant
        copies = []
        for v in range(weights.shape[0]):
            m = copy.deepcopy(model)
            m.load_state_dict({k: t[v] for k, t in init.items()})
            copies.append(m)

        def outputs_of(xb: torch.Tensor) -> torch.Tensor:
            outs = []
            for v, m in enumerate(copies):
                p = {k: params[k][v] for k in names}
                b = {k: buf for k, buf in m.named_buffers()}
                outs.append(functional_call(m, {**p, **b}, (xb,)))
            return torch.stack(outs)

    def snapshot() -> State:
        s = {k: v.detach().clone() for k, v in params.items()}
        if strategy == "vmap":
            s.update({k: v.clone() for k, v in fixed.items()})
        else:
            s.update(stack_states([dict(m.named_buffers()) for m in copies]) if fixed else {})
        return {k: s[k] for k in init}

    trajectory = [snapshot()] if record else None
    try:
        for batches in batch_order(x.shape[0], schedule):
            for idx in batches:
                w = weights[:, idx]
                if not bool((w != 0).any()):
                    continue
                out = outputs_of(x[idx])
                per = per_sample_loss(out, y[idx].unsqueeze(0).expand(w.shape[0], *y[idx].shape), loss)
                total = _reduce(per, w, reduction).sum()
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
            if trajectory is not None:
                trajectory.append(snapshot())
            on_epoch()
    finally:
        model.train(was_training)
    return TrainResult(snapshot(), trajectory)


def train_variants(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    schedule: Schedule,
    *,
    weights: torch.Tensor | None = None,
    init: State | None = None,
    loss: str | LossFn = "ce",
    reduction: str = "mean",
    record: bool = False,
    strategy: str = "auto",
    chunk_size: int | None = None,
    executor: Any = None,
    progress: bool = False,
) -> TrainResult:
    """Train V variants of `model` at once: variant v weights sample i by weights[v, i] (0 drops it).

    init: a single state (shared start) or a stacked one (one start per variant); default the
    model's current state. reduction: 'mean' (batch loss = weighted mean over kept samples),
    'sum' (weighted sum; effects of samples add), 'fixed' (weighted sum / full batch size).
    Results do not depend on strategy, chunking or executor (up to float round-off).
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise DistdmError(f"{n} inputs but {y.shape[0]} targets")
    if weights is None:
        weights = torch.ones(1, n)
    weights = torch.as_tensor(weights, dtype=x.dtype)
    if weights.ndim != 2 or weights.shape[1] != n:
        raise DistdmError(f"weights must have shape (variants, {n}), got {tuple(weights.shape)}")
    if (weights < 0).any() or not torch.isfinite(weights).all():
        raise DistdmError("sample weights must be finite and >= 0")
    n_var = weights.shape[0]
    start = init if init is not None else model_state(model)
    missing = set(model.state_dict()) - set(start)
    if missing:
        raise DistdmError(f"init state lacks {sorted(missing)[:3]}: it is not a state of this model")
    ref = model.state_dict()
    stacked = all(start[k].ndim == ref[k].ndim + 1 for k in ref)
    if not stacked:
        start = repeat_state(start, n_var)
    elif next(iter(start.values())).shape[0] != n_var:
        raise DistdmError(f"stacked init has {next(iter(start.values())).shape[0]} variants, weights {n_var}")
    if strategy == "auto":
        strategy = choose_strategy(model, x.device)
    if strategy not in ("vmap", "loop"):
        raise DistdmError(f"strategy must be 'auto', 'vmap' or 'loop', got {strategy!r}")

    size = chunk_size or n_var
    chunks = [slice(i, min(i + size, n_var)) for i in range(0, n_var, size)]
    with progress_bar(len(chunks) * schedule.epochs, "training", progress) as bar:

        def run(sl: slice, strat: str) -> TrainResult:
            return _train_chunk(
                model, x, y, weights[sl], select(start, sl), schedule, loss, reduction, record,
                strat, bar.advance,
            )  # fmt: skip

        def run_with_fallback(sl: slice) -> TrainResult:
            if strategy == "loop":
                return run(sl, "loop")
            try:
                return run(sl, "vmap")
            except (RuntimeError, NotImplementedError) as e:
                log.info("model cannot be trained under vmap (%s); training variants in a loop", e)
                return run(sl, "loop")

        if executor is None:
            results = [run_with_fallback(sl) for sl in chunks]
        else:
            results = executor.map(run_with_fallback, chunks)
    return _concat(results)


def _concat(results: Sequence[TrainResult]) -> TrainResult:
    if len(results) == 1:
        return results[0]
    states = {k: torch.cat([r.states[k] for r in results]) for k in results[0].states}
    traj = None
    if results[0].trajectory is not None:
        traj = [
            {k: torch.cat([r.trajectory[e][k] for r in results]) for k in results[0].states}  # type: ignore[index]
            for e in range(len(results[0].trajectory))
        ]
    return TrainResult(states, traj)


@torch.no_grad()
def predict(
    model: nn.Module,
    states: State,
    x: torch.Tensor,
    *,
    strategy: str = "auto",
    chunk: int = 4096,
) -> torch.Tensor:
    """Outputs of every variant on x: shape (variants, n, outputs), computed in eval mode."""
    was_training = model.training
    model.eval()
    try:
        if strategy == "auto":
            strategy = choose_strategy(model, x.device)
        outs = []
        for xb in x.split(chunk):
            if strategy == "vmap":
                outs.append(vmap(lambda s, b=xb: functional_call(model, s, (b,)))(states))
            else:
                n_var = next(iter(states.values())).shape[0]
                outs.append(
                    torch.stack([functional_call(model, select(states, v), (xb,)) for v in range(n_var)])
                )
        return torch.cat(outs, dim=1)
    finally:
        model.train(was_training)
