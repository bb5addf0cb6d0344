"""The one training engine: many variants of one model, each from its own start on its own sample
weights, trained with one schedule and one shuffle order; batched with torch.func where possible.

Every method in distdm (target training, exact retraining, DDM fine-tunes, further training, retrain
after removal) is a call of `train_variants`.

How a chunk of V variants is trained (`_train_chunk`):
- parameters live stacked, shape (V, *shape), and are updated in place by one functional optimizer
  (`_Optimizer`: SGD with momentum / weight decay, or Adam, written with foreach ops so that one update
  covers every variant); the formulas are torch.optim's, so one variant trains as with torch.optim;
- strategy 'vmap': one `vmap(grad(loss))` function built once per chunk computes every variant's
  gradient; inputs and labels of a batch are shared, not expanded per variant; a batch size used in
  many steps is traced once into a graph of aten ops (make_fx) and replayed without Python overhead;
- strategy 'loop': one module copy per variant whose parameters are views into the stacked storage,
  trained with a plain forward and backward (models with running buffers, convolutions on a CPU,
  and any chunk of one variant under 'auto', where vmap only adds overhead);
- a variant whose weights are all zero in a batch skips that batch: no gradient, no optimizer step, no
  momentum or Adam state change. So results depend neither on the strategy nor on how variants are
  chunked or which executor runs the chunks (up to float round-off).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .config import Schedule
from .errors import DistdmError
from .progress import Progress, progress_bar

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]  # parameters and buffers by name; stacked states have a leading V
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> per-sample

# A batch size that occurs in at least this many steps of a chunk has its batched gradient traced
# into one graph and replayed (None: never). A trace costs about 100-200 eager steps' Python
# overhead (and about 2 s once per process), and saves most of that overhead on every step.
TRACE_MIN_STEPS: int | None = 200
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


# --- devices -------------------------------------------------------------------------------------

DEVICE_KINDS = ("cpu", "cuda", "mps", "auto")


def available_devices() -> list[str]:
    """The devices this machine can compute on, e.g. ['cpu', 'cuda:0', 'cuda:1']."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def resolve_device(device: str | torch.device | None = "cpu") -> torch.device:
    """The torch.device for 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto' (cuda if available, else mps,
    else cpu); None means 'cpu'. A device this machine lacks is refused, naming the ones it has."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str) and device.strip().lower() == "auto":
        have = available_devices()
        pick = next((d for d in have if d.startswith("cuda")), "mps" if "mps" in have else "cpu")
        return torch.device(pick)
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as e:
        raise DistdmError(f"device must be one of {', '.join(DEVICE_KINDS)} or cuda:N, got {device!r}") from e
    have = available_devices()
    if dev.type == "cpu":
        return torch.device("cpu")  # 'cpu:0' is the same CPU
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistdmError(
                f"device {device!r} is not available on this machine (torch {torch.__version__} sees no "
                f"CUDA GPU): use one of {have}, or 'auto'"
            )
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise DistdmError(
                f"device {device!r} is not available: this machine has {torch.cuda.device_count()} CUDA "
                f"GPU(s), use one of {have}"
            )
        return torch.device("cuda", index)
    if dev.type == "mps":
        if "mps" not in have:
            raise DistdmError(f"device {device!r} (Apple MPS) is not available here: use one of {have}")
        return torch.device("mps")
    raise DistdmError(
        f"device {device!r} is not supported: use one of {', '.join(DEVICE_KINDS)} or cuda:N "
        f"(available here: {have})"
    )


def state_to(state: State, device: torch.device | str) -> State:
    """The state with every tensor on `device` (the same tensors where they are there already)."""
    return {k: v.to(device) for k, v in state.items()}


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


# --- the optimizer ----------------------------------------------------------------------------


class _Optimizer:
    """SGD (momentum, weight decay) or Adam over stacked parameters, in place, with foreach ops.

    Elementwise, so one update of stacked tensors is one update per variant. `active` (V,) bool marks
    the variants that take this step; the others keep parameters, momentum, moments and step count.
    Formulas follow torch.optim.SGD (dampening 0, no Nesterov) and torch.optim.Adam (L2 decay)."""

    def __init__(self, params: list[torch.Tensor], schedule: Schedule, n_variants: int):
        self.params, self.s = params, schedule
        self.state: list[list[torch.Tensor]] = []
        if schedule.optimizer == "adam":
            self.state = [[torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]]
            self.steps = torch.zeros(n_variants, dtype=torch.float64)
        elif schedule.momentum:
            self.state = [[torch.zeros_like(p) for p in params]]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], active: torch.Tensor | None = None) -> None:
        """One step; `active` is a CPU bool mask over variants, None when every variant steps."""
        s, params = self.s, self.params
        mask = None if active is None else active.to(params[0].device)
        if s.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=s.weight_decay)
        if s.optimizer == "adam":
            self._adam(grads, active, mask)
            return
        if s.momentum:  # buf = momentum * buf + g; buf starts at 0, so its first value is g
            bufs = self.state[0]
            if mask is None:
                torch._foreach_mul_(bufs, s.momentum)
                torch._foreach_add_(bufs, grads)
                grads = bufs
            else:
                new = torch._foreach_mul(bufs, s.momentum)
                torch._foreach_add_(new, grads)
                _assign(bufs, new, mask)
                grads = new
        if mask is None:
            torch._foreach_add_(params, grads, alpha=-s.lr)
        else:
            _assign(params, torch._foreach_add(params, grads, alpha=-s.lr), mask)

    def _adam(
        self, grads: list[torch.Tensor], active: torch.Tensor | None, mask: torch.Tensor | None
    ) -> None:
        (b1, b2), s, params = _ADAM_BETAS, self.s, self.params
        m, v = self.state
        m_new = torch._foreach_lerp(m, grads, 1 - b1)
        v_new = torch._foreach_mul(v, b2)
        torch._foreach_addcmul_(v_new, grads, grads, value=1 - b2)
        self.steps += 1 if active is None else active.double()
        stepping = self.steps if active is None else self.steps[active]
        if bool((stepping == stepping[0]).all()):
            # every stepping variant at the same step: exactly torch.optim.Adam's arithmetic
            t = float(stepping[0])
            step_size = s.lr / (1 - b1**t)
            denom = torch._foreach_sqrt(v_new)
            torch._foreach_div_(denom, math.sqrt(1 - b2**t))
            torch._foreach_add_(denom, _ADAM_EPS)
            upd = torch._foreach_addcdiv(params, m_new, denom, value=-step_size)
        else:  # variants at different steps (some skipped batches): per-variant bias corrections
            steps = self.steps.clamp_min(1)
            sizes = (s.lr / (1 - b1**steps)).to(params[0].device)
            bc2_sqrt = torch.sqrt(1 - b2**steps).to(params[0].device)
            upd = []
            for p, mm, vv in zip(params, m_new, v_new, strict=True):
                shape = (-1,) + (1,) * (p.ndim - 1)
                denom = (vv.sqrt() / bc2_sqrt.view(shape).to(p.dtype)).add_(_ADAM_EPS)
                upd.append(p - sizes.view(shape).to(p.dtype) * (mm / denom))
        _assign(m, m_new, mask)
        _assign(v, v_new, mask)
        _assign(params, upd, mask)


def _assign(dst: list[torch.Tensor], src: list[torch.Tensor], active: torch.Tensor | None) -> None:
    """dst[i] <- src[i] for the active variants (all if active is None), in place."""
    if active is None:
        torch._foreach_copy_(dst, src)
        return
    for d, t in zip(dst, src, strict=True):
        mask = active.view((-1,) + (1,) * (d.ndim - 1))
        d.copy_(torch.where(mask, t, d))


# --- one chunk of variants --------------------------------------------------------------------


@dataclasses.dataclass
class _Chunk:
    """The per-chunk inputs of a training job: sample weights (V, n) and stacked start states."""

    weights: torch.Tensor
    init: State
    strategy: str  # 'vmap' or 'loop'


@dataclasses.dataclass
class _ChunkJob:
    """What every chunk shares; callable on a `_Chunk`, and picklable (for Ray) without its callback."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    schedule: Schedule
    loss: str | LossFn
    reduction: str
    record: bool
    on_epoch: Callable[[int], None] | None = None  # called with the chunk's variant count per epoch

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["on_epoch"] = None  # a progress bar stays with the driver
        return d

    def __call__(self, chunk: _Chunk) -> TrainResult:
        """Train the chunk with its strategy, falling back to a loop if vmap cannot run it."""
        if chunk.strategy == "loop":
            return _train_chunk(self, chunk, "loop")
        try:
            return _train_chunk(self, chunk, "vmap")
        except (RuntimeError, NotImplementedError) as e:
            raise_if_out_of_memory(e, "training a chunk of variants")
            log.info("model cannot be trained under vmap (%s); training variants in a loop", e)
            return _train_chunk(self, chunk, "loop")


_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate")


def raise_if_out_of_memory(error: BaseException, doing: str) -> None:
    """Re-raise an out-of-memory error as a DistdmError that says what to lower: the vmap fallback
    must not swallow it (a loop would only fail later, or crawl)."""
    oom = isinstance(error, torch.OutOfMemoryError) or any(m in str(error).lower() for m in _OOM_MESSAGES)
    if oom:
        raise DistdmError(
            f"out of memory while {doing}: lower the task's memory_budget_bytes (fewer variants per "
            f"chunk), the batch size, or the number of variants; or use a device with more memory"
        ) from error


def _vmap_grads(
    job: _ChunkJob, names: list[str], params: State, buffers: State, trace_sizes: set[int]
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], list[torch.Tensor]]:
    """Gradient of every variant's batch loss at once: one vmap(grad) function per chunk."""
    model, loss, reduction = job.model, job.loss, job.reduction

    def batch_loss(p: State, b: State, xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, b), (xb,))
        return _reduce(per_sample_loss(out, yb, loss), wb, reduction)

    fn = vmap(grad(batch_loss), in_dims=(0, 0, None, None, 0))
    graphs: dict[int, Callable[..., State]] = {}

    def grads(
        xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor, active: torch.Tensor
    ) -> list[torch.Tensor]:
        f = graphs.get(xb.shape[0], fn)
        if f is fn and xb.shape[0] in trace_sizes:
            graphs[xb.shape[0]] = f = _trace(fn, (params, buffers, xb, yb, wb))
        g = f(params, buffers, xb, yb, wb)
        return [g[k] for k in names]

    return grads


def _trace(fn: Callable[..., State], args: tuple[Any, ...]) -> Callable[..., State]:
    """fn recorded once as a graph of aten ops (make_fx), so that replaying it skips vmap's and
    autograd's Python work; fn itself if it cannot be recorded."""
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        return make_fx(fn)(*args)
    except Exception as e:  # noqa: BLE001 - any failure just means: keep running it eagerly
        log.debug("could not trace the batched gradient (%s); running it eagerly", e)
        return fn


def _loop_grads(
    job: _ChunkJob, names: list[str], params: State, buffers: State, trace_sizes: set[int]
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], list[torch.Tensor]]:
    """Gradient of each variant in turn, on a module copy whose tensors are views into the stacks."""
    n_var = next(iter(params.values())).shape[0]
    copies: list[tuple[nn.Module, list[nn.Parameter]]] = []
    for v in range(n_var):
        m = copy.deepcopy(job.model)
        m.train()
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            src = params.get(name, buffers.get(name))
            if src is None:
                continue
            if isinstance(t, nn.Parameter):
                t.data = src[v]
            else:
                owner, attr = _owner(m, name)
                owner._buffers[attr] = src[v]
        own = dict(m.named_parameters())
        copies.append((m, [own[k] for k in names]))
    out = [torch.zeros_like(params[k]) for k in names]
    loss, reduction = job.loss, job.reduction

    def grads(
        xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor, active: torch.Tensor
    ) -> list[torch.Tensor]:
        for v, (m, ps) in enumerate(copies):
            if not active[v]:
                continue
            total = _reduce(per_sample_loss(m(xb), yb, loss), wb[v], reduction)
            gs = torch.autograd.grad(total, ps, allow_unused=True)
            for o, g in zip(out, gs, strict=True):
                if g is None:
                    o[v].zero_()
                else:
                    o[v].copy_(g)
        return out

    return grads


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _train_chunk(job: _ChunkJob, chunk: _Chunk, strategy: str) -> TrainResult:
    x, y, schedule = job.x, job.y, job.schedule
    device = x.device
    names = param_names(job.model)
    params = {k: chunk.init[k].detach().to(device).clone() for k in names}
    buffers = {k: v.detach().to(device).clone() for k, v in chunk.init.items() if k not in params}
    weights = chunk.weights.to(device)
    kept = (chunk.weights != 0).cpu()  # activity per batch is decided on the CPU: no device syncs
    n_var = weights.shape[0]
    opt = _Optimizer([params[k] for k in names], schedule, n_var)
    make = _vmap_grads if strategy == "vmap" else _loop_grads
    was_training = job.model.training
    job.model.train()

    def snapshot() -> State:
        s = {**params, **buffers}
        return {k: s[k].detach().clone() for k in chunk.init}

    trajectory = [snapshot()] if job.record else None
    try:
        order = batch_order(x.shape[0], schedule)
        sizes = Counter(len(idx) for batches in order for idx in batches)
        trace = {n for n, c in sizes.items() if TRACE_MIN_STEPS is not None and c >= TRACE_MIN_STEPS}
        grads = make(job, names, params, buffers, trace)
        for batches in order:
            for idx in batches:
                active = kept[:, idx].any(1)
                n_active = int(active.sum())
                if n_active == 0:
                    continue
                idx_d = idx.to(device)
                g = grads(x[idx_d], y[idx_d], weights[:, idx_d], active)
                opt.step(g, None if n_active == n_var else active)
            if trajectory is not None:
                trajectory.append(snapshot())
            if job.on_epoch is not None:
                job.on_epoch(n_var)
    finally:
        job.model.train(was_training)
    return TrainResult(snapshot(), trajectory)


# --- memory --------------------------------------------------------------------------------------


def saved_tensor_bytes(roots: Iterable[torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd keeps saved for the backward pass of the graph behind `roots`, each storage
    once; storages of `exclude` (e.g. the parameters) are not counted. Read from the graph's nodes
    (their `_saved_*` tensors) after it is built: a saved-tensors hook that returns the tensor would
    tie every graph into a reference cycle that is never freed (10 MB per HVP on the
    instance-norm ConvNet, 23 GB over one robustness-suite process)."""
    own = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}
    visited: set[int] = set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if id(fn) in visited:
            continue
        visited.add(id(fn))
        for name in dir(fn):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(fn, name)
            except RuntimeError:  # already freed by a backward pass without retain_graph
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in own:
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    return sum(seen.values())


def estimate_variant_bytes(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    schedule: Schedule,
    *,
    loss: str | LossFn = "ce",
    record: bool = False,
) -> int:
    """Estimated working memory of one variant in a batched run, in bytes: its state, gradient and
    optimizer state, the tensors one training batch keeps for the backward pass (measured by running
    one), and its recorded trajectory if asked for."""
    state = model.state_dict()
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    par_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    opt_copies = 2 if schedule.optimizer == "adam" else (1 if schedule.momentum else 0)
    bs = min(schedule.batch_size or x.shape[0], x.shape[0])
    m = copy.deepcopy(model).to(x.device).train()
    with torch.enable_grad():
        out = m(x[:bs])
        total_loss = per_sample_loss(out, y[:bs], loss).sum()
    # the state is counted above
    act_bytes = saved_tensor_bytes([total_loss], m.state_dict().values()) + out.numel() * out.element_size()
    # a batched step also holds the variant's gradient, new parameters and optimizer temporaries
    total = state_bytes + par_bytes * (2 + 2 * opt_copies) + 2 * act_bytes
    if record:
        total += state_bytes * (schedule.epochs + 1)
    return int(total)


def chunk_for_budget(per_variant_bytes: int, budget_bytes: int, n_variants: int) -> int:
    """Variants per chunk so that a chunk's estimated memory stays within the budget."""
    if budget_bytes < per_variant_bytes:
        raise DistdmError(
            f"memory_budget_bytes={budget_bytes} is below the estimated {per_variant_bytes} bytes that one "
            f"variant needs: raise the budget to at least {per_variant_bytes} (or pass chunk_size=1)"
        )
    return max(1, min(n_variants, budget_bytes // per_variant_bytes))


def variants_per_chunk(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    schedule: Schedule,
    n_variants: int,
    *,
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
    loss: str | LossFn = "ce",
    record: bool = False,
) -> int:
    """Variants trained at once: chunk_size (default all), lowered so a chunk fits the memory budget."""
    if chunk_size is not None and chunk_size < 1:
        raise DistdmError(f"chunk_size must be >= 1, got {chunk_size}")
    size = max(1, n_variants if chunk_size is None else min(chunk_size, n_variants))
    if memory_budget_bytes is not None:
        per = estimate_variant_bytes(model, x, y, schedule, loss=loss, record=record)
        size = min(size, chunk_for_budget(per, int(memory_budget_bytes), n_variants))
        log.info(
            "memory budget %d bytes, about %d per variant: %d variants per chunk",
            memory_budget_bytes,
            per,
            size,
        )
    return size


# --- the public entry points -------------------------------------------------------------------------


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
    memory_budget_bytes: int | None = None,
    executor: Any = None,
    progress: Progress = False,
) -> TrainResult:
    """Train V variants of `model` at once: variant v weights sample i by weights[v, i] (0 drops it).

    init: a single state (shared start) or a stacked one (one start per variant); default the
    model's current state. reduction: 'mean' (batch loss = weighted mean over kept samples),
    'sum' (weighted sum; effects of samples add), 'fixed' (weighted sum / full batch size).
    A variant with no kept sample in a batch skips that batch. chunk_size: variants trained at once
    (default all); memory_budget_bytes instead picks it from `estimate_variant_bytes`. executor: an
    object whose map(fn, chunks) runs the chunks (see distdm.executors; default in-process).
    Results do not depend on strategy, chunking or executor (up to float round-off).
    progress: False, True (a bar on stderr), a callable (stage, done, total) or an enclosing stage's
    StageProgress (see distdm.progress), counted in variant-epochs.
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise DistdmError(f"{n} inputs but {y.shape[0]} targets")
    if reduction not in ("mean", "sum", "fixed"):
        raise DistdmError(f"reduction must be 'mean', 'sum' or 'fixed', got {reduction!r}")
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
    auto = strategy == "auto"
    if auto:
        strategy = choose_strategy(model, x.device)
    if strategy not in ("vmap", "loop"):
        raise DistdmError(f"strategy must be 'auto', 'vmap' or 'loop', got {strategy!r}")
    if chunk_size is not None and memory_budget_bytes is not None:
        raise DistdmError("pass chunk_size or memory_budget_bytes, not both")
    size = variants_per_chunk(
        model, x, y, schedule, n_var, chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes,
        loss=loss, record=record,
    )  # fmt: skip

    slices = [slice(i, min(i + size, n_var)) for i in range(0, n_var, size)]
    # 'auto' trains a lone variant in the loop: a plain forward and backward beats vmap's overhead
    chunks = [
        _Chunk(weights[sl], select(start, sl), "loop" if auto and sl.stop - sl.start == 1 else strategy)
        for sl in slices
    ]
    # counted in variant-epochs, so that the total does not depend on how the variants are chunked
    # and an enclosing stage (progress a StageProgress) can add up the work of all its calls
    with progress_bar(n_var * schedule.epochs, "training", progress) as bar:
        local = executor is None or getattr(executor, "in_process", False)
        job = _ChunkJob(model, x, y, schedule, loss, reduction, record, bar.advance if local else None)
        if executor is None:
            results = [job(c) for c in chunks]
        else:
            results = list(executor.map(job, chunks))
            if not local:
                bar.advance(n_var * schedule.epochs)
    if len(results) != len(chunks):
        raise DistdmError(f"the executor returned {len(results)} results for {len(chunks)} chunks")
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
    """Outputs of every variant on x: shape (variants, n, outputs), computed in eval mode on x's
    device (the states are moved there if they are elsewhere)."""
    states = state_to(states, x.device)
    was_training = model.training
    model.eval()
    try:
        if strategy == "auto":
            strategy = choose_strategy(model, x.device)
        if strategy == "vmap":
            try:
                fn = vmap(lambda s, xb: functional_call(model, s, (xb,)), in_dims=(0, None))
                return torch.cat([fn(states, xb) for xb in x.split(chunk)], dim=1)
            except (RuntimeError, NotImplementedError) as e:
                raise_if_out_of_memory(e, "evaluating a chunk of variants")
                log.info("model cannot be evaluated under vmap (%s); evaluating variants in a loop", e)
        n_var = next(iter(states.values())).shape[0]
        m = copy.deepcopy(model).to(x.device).eval()
        outs = []
        for v in range(n_var):
            m.load_state_dict(select(states, v))
            outs.append(torch.cat([m(xb) for xb in x.split(chunk)]))
        return torch.stack(outs)
    finally:
        model.train(was_training)
