"""Functional building blocks for gradient methods: flat parameters, per-sample gradients
(factored for nn.Linear layers, `LinearGrads`), Hessian-vector products, exact Hessians and
inverse-HVP solvers (CG, LiSSA, Arnoldi).

Everything works on *flat* parameter vectors of one model state (`FlatModel`), so the pieces
compose: `hvp(...)` returns a callable v -> Hv (v of shape (P,) or (k, P)), and every solver takes
such a callable and returns an estimate of (H + damping I)^-1 b. The training loss is the mean of
the per-sample loss over the training set (or a fixed subsample), as in `engine.per_sample_loss`.
Gradients are taken in eval mode (deterministic; the built-in models have no dropout or batch norm).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from .engine import LossFn, State, choose_strategy, per_sample_loss, saved_tensor_bytes
from .errors import DistdmError
from .models import last_linear

log = logging.getLogger(__name__)

HVP = Callable[[torch.Tensor], torch.Tensor]  # flat v (P,) or (k, P) -> H v of the same shape


# ---------------------------------------------------------------------------------------------
# flat parameters


def flatten(tensors: dict[str, torch.Tensor], names: Sequence[str] | None = None) -> torch.Tensor:
    """Concatenate the named tensors (default: all, in dict order) into one flat vector."""
    keys = list(names) if names is not None else list(tensors)
    return torch.cat([tensors[k].reshape(-1) for k in keys])


def unflatten(vec: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split a flat vector (P,) back into tensors shaped like `like` (same key order as flatten)."""
    total = sum(t.numel() for t in like.values())
    if total != vec.shape[-1]:
        raise DistdmError(f"flat vector has {vec.shape[-1]} entries, the parameters {total}")
    out, i = {}, 0
    for k, t in like.items():
        n = t.numel()
        out[k] = vec[i : i + n].view(t.shape)
        i += n
    return out


def last_layer_names(model: nn.Module) -> list[str]:
    """Parameter names of the model's last nn.Linear layer (its head)."""
    head = last_linear(model)
    prefix = next(name for name, m in model.named_modules() if m is head)
    return [f"{prefix}.{k}" if prefix else k for k, _ in head.named_parameters()]


def _param_names(model: nn.Module, params: str | Sequence[str]) -> list[str]:
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    if params == "all":
        return trainable
    if params == "last":
        return last_layer_names(model)
    if isinstance(params, str):
        raise DistdmError(f"params must be 'all', 'last' or a list of parameter names, got {params!r}")
    unknown = [k for k in params if k not in trainable]
    if unknown or not params:
        raise DistdmError(f"unknown parameter names {unknown[:3]}; the model's are {trainable[:6]}...")
    return [k for k in trainable if k in set(params)]  # model order


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@dataclasses.dataclass
class FlatModel:
    """One state of a model seen as a function of a flat vector of (some of) its parameters;
    the other parameters and the buffers stay fixed."""

    model: nn.Module
    names: list[str]  # the parameters in the flat vector, model order
    like: dict[str, torch.Tensor]  # shapes of those parameters
    fixed: dict[str, torch.Tensor]  # everything else of the state
    theta: torch.Tensor  # (P,) the state's flat parameters

    @property
    def n_params(self) -> int:
        """P, the length of the flat vector."""
        return int(self.theta.numel())

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat vector -> parameter dict (only the parameters in the vector)."""
        return unflatten(vec, self.like)

    def state(self, vec: torch.Tensor | None = None) -> State:
        """The full state (fixed part plus the parameters from `vec`, default theta)."""
        return {**self.fixed, **self.unflatten(self.theta if vec is None else vec)}

    def outputs(self, vec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Model outputs on a batch x with parameters `vec` (differentiable in vec)."""
        return functional_call(self.model, self.state(vec), (x,))


def flat_model(
    source: Any,
    state: State | None = None,
    params: str | Sequence[str] = "all",
) -> FlatModel:
    """A FlatModel of a Task (default state: its final model), a model (default: its current
    state) or an existing FlatModel; params: 'all', 'last' (last linear layer) or names."""
    if isinstance(source, FlatModel):
        return source
    model = source.model if hasattr(source, "trajectory") else source
    if not isinstance(model, nn.Module):
        raise DistdmError(f"expected a Task, an nn.Module or a FlatModel, got {type(source).__name__}")
    if state is None:
        state = source.final if hasattr(source, "trajectory") else dict(model.state_dict())
    names = _param_names(model, params)
    missing = [k for k in names if k not in state]
    if missing:
        raise DistdmError(f"the state lacks parameters {missing[:3]}: it is not a state of this model")
    like = {k: state[k].detach() for k in names}
    fixed = {k: v.detach() for k, v in state.items() if k not in like}
    return FlatModel(model, names, like, fixed, flatten(like).clone())


def _data_of(source: Any, x: torch.Tensor | None, y: torch.Tensor | None, loss: Any) -> tuple:
    if hasattr(source, "trajectory"):
        x = source.data.x_train if x is None else x
        y = source.data.y_train if y is None else y
        loss = source.loss if loss is None else loss
    if x is None or y is None:
        raise DistdmError("pass training inputs x and targets y (or a Task that holds them)")
    return x, y, "ce" if loss is None else loss


# ---------------------------------------------------------------------------------------------
# per-sample gradients


def _chunks(n: int, chunk: int) -> list[slice]:
    if chunk <= 0:
        raise DistdmError(f"chunk must be > 0, got {chunk}")
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


# ---------------------------------------------------------------------------------------------
# per-sample gradients of linear layers, kept factored
#
# For an nn.Linear layer z = W a + b, one sample's gradient of a scalar of the outputs is the outer
# product D A^T for W and D for b, with A the layer's input and D the scalar's gradient with respect
# to z. One batched forward and backward yield A and D for every sample at once, where the model
# treats each sample of a batch on its own; the gradients need never be formed (N x sum(d_in + d_out)
# floats instead of N x P), and products with them are two small matrix products per layer. This is
# what makes the first-order methods cheap. Measured on digits-mlp-k100 (1,437 samples, P = 9,610,
# 1 thread): factors 4 ms, against 0.1 s (idle machine) for vmap over per-sample `grad`, the general
# path, whose first call in a process also imports torch._dynamo (1.2 s).

# modules whose eval-mode forward treats each sample of a batch on its own (batch norm only with
# running statistics: without them it normalises over the batch even in eval mode)
_PER_SAMPLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Sequential,
    nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Mish,
    nn.Hardtanh, nn.Dropout, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)  # fmt: skip


def _per_sample_model(model: nn.Module) -> bool:
    """True when every module is a known per-sample one or a built-in distdm model (their forward
    code mixes no samples); user-defined modules may do anything with a batch, so they are not."""
    from . import models

    own = tuple(c for c in vars(models).values() if isinstance(c, type) and issubclass(c, nn.Module))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not m.track_running_stats:
                return False
        elif type(m) not in _PER_SAMPLE_MODULES and type(m) not in own:
            return False
    return True


@dataclasses.dataclass
class _LinearLayout:
    """Where each nn.Linear layer's weight and bias sit in a FlatModel's flat vector."""

    modules: list[nn.Linear]
    parts: list[tuple[int, str, int, int]]  # per flat entry: (layer, 'weight' or 'bias', offset, size)


def _linear_layout(fm: FlatModel) -> _LinearLayout | None:
    """The layout when the flat vector is nn.Linear weights and biases only, each parameter owned by
    one module and the model per-sample (see _per_sample_model); else None."""
    owners: dict[int, int] = {}
    for m in fm.model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    if any(c > 1 for c in owners.values()) or not _per_sample_model(fm.model):
        return None  # a shared (tied) parameter's gradient is a sum of several layers' terms
    modules: list[nn.Linear] = []
    parts: list[tuple[int, str, int, int]] = []
    offset = 0
    for name in fm.names:
        prefix, _, kind = name.rpartition(".")
        try:
            mod = fm.model.get_submodule(prefix)
        except AttributeError:
            return None
        if not isinstance(mod, nn.Linear) or kind not in ("weight", "bias"):
            return None
        if not modules or modules[-1] is not mod:
            if any(m is mod for m in modules):
                return None  # not contiguous: never for model-order names
            modules.append(mod)
        size = fm.like[name].numel()
        parts.append((len(modules) - 1, kind, offset, size))
        offset += size
    return _LinearLayout(modules, parts)


@dataclasses.dataclass
class LinearGrads:
    """Per-sample gradients (n, P) of a FlatModel of nn.Linear layers, kept as factors: per layer
    the inputs a (n, d_in) and the output gradients d (..., n, d_out); sample i's gradient is
    d_i a_i^T for a weight and d_i for a bias. Leading dimensions of d (an output index, for
    Jacobians) become leading dimensions of the dense gradients."""

    layout: _LinearLayout
    a: list[torch.Tensor]
    d: list[torch.Tensor]

    @property
    def n(self) -> int:
        """Number of samples."""
        return int(self.a[0].shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes the factors take."""
        return sum(t.numel() * t.element_size() for t in [*self.a, *self.d])

    def dense(self, sl: slice | None = None) -> torch.Tensor:
        """The gradients of samples `sl` (default all) as a dense (..., c, P) tensor."""
        sl = sl or slice(None)
        lead = self.d[0].shape[:-2]
        c = self.a[0][sl].shape[0]
        total = self.layout.parts[-1][2] + self.layout.parts[-1][3]
        out = torch.empty(*lead, c, total, dtype=self.d[0].dtype, device=self.d[0].device)
        for layer, kind, off, size in self.layout.parts:
            d = self.d[layer][..., sl, :]
            if kind == "bias":
                out[..., off : off + size] = d
            else:
                a = self.a[layer][sl]
                # written in place: half the time of forming the products and copying them
                torch.mul(d.unsqueeze(-1), a.unsqueeze(-2), out=out[..., off : off + size].view(*d.shape, -1))
        return out

    def flat_rows(self) -> LinearGrads:
        """Jacobian factors (d of shape (O, n, d_out)) as n x O rows, sample-major (the order of
        output_jacobian(...).reshape(-1, P))."""
        if self.d[0].ndim == 2:
            return self
        o = self.d[0].shape[0]
        d = [t.permute(1, 0, 2).reshape(-1, t.shape[-1]) for t in self.d]
        return LinearGrads(self.layout, [a.repeat_interleave(o, dim=0) for a in self.a], d)

    def gram(self, other: LinearGrads, *, chunk: int = 4096) -> torch.Tensor:
        """Inner products (n_self, n_other) of these gradients with another set's (same model), from
        the factors alone: per layer (D D'^T) * (A A'^T + 1 for a bias), about n n' (d_in + d_out)
        operations instead of n n' P."""
        if self.d[0].ndim != 2 or other.d[0].ndim != 2:
            raise AssertionError("gram needs one gradient per sample: use flat_rows()")
        out = torch.zeros(self.n, other.n, dtype=self.d[0].dtype, device=self.d[0].device)
        kinds: dict[int, set[str]] = {}
        for layer, kind, _, _ in self.layout.parts:
            kinds.setdefault(layer, set()).add(kind)
        for i in range(0, other.n, chunk):
            sl = slice(i, min(i + chunk, other.n))
            for layer, ks in kinds.items():
                dd = self.d[layer] @ other.d[layer][sl].T
                if "weight" in ks:
                    aa = self.a[layer] @ other.a[layer][sl].T
                    dd = dd * (aa + 1.0 if "bias" in ks else aa)
                out[:, sl] += dd
        return out

    def sq_norms(self) -> torch.Tensor:
        """Squared gradient norm of every sample (..., n)."""
        total = torch.zeros(self.d[0].shape[:-1], dtype=self.d[0].dtype, device=self.d[0].device)
        for layer, kind, _, _ in self.layout.parts:
            dd = self.d[layer].square().sum(-1)
            total = total + (dd if kind == "bias" else dd * self.a[layer].square().sum(-1))
        return total

    def dot(self, rows: torch.Tensor, *, chunk: int = 256) -> torch.Tensor:
        """rows (R, P) times every sample's gradient: (R, n), forming `chunk` gradients at a time
        (one matrix product each; measured faster than contracting the factors layer by layer)."""
        if self.d[0].ndim != 2:
            raise AssertionError("dot needs one gradient per sample")
        out = torch.empty(rows.shape[0], self.n, dtype=rows.dtype)
        for i in range(0, self.n, chunk):
            sl = slice(i, min(i + chunk, self.n))
            out[:, sl] = rows @ self.dense(sl).T
        return out


def _linear_forward(
    fm: FlatModel, layout: _LinearLayout, x: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]] | None:
    """Outputs on x with each layer's inputs (detached) and outputs (in the graph) recorded; None
    when a layer ran other than once on a (n, d_in) input (then its gradient is no outer product)."""
    inputs: list[list[torch.Tensor]] = [[] for _ in layout.modules]
    outs: list[list[torch.Tensor]] = [[] for _ in layout.modules]

    def hook(i: int) -> Callable[..., None]:
        def record(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            inputs[i].append(args[0].detach())
            outs[i].append(out)

        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layout.modules)]
    try:
        th = fm.theta.detach().requires_grad_(True)  # puts every layer output in the graph
        with torch.enable_grad(), _eval_mode(fm.model):
            out = fm.outputs(th, x)
    finally:
        for h in handles:
            h.remove()
    n = x.shape[0]
    if any(len(a) != 1 or a[0].ndim != 2 or a[0].shape[0] != n for a in inputs):
        return None
    return out, [a[0] for a in inputs], [o[0] for o in outs]


def linear_grads(
    fm: FlatModel,
    x: torch.Tensor,
    seed: Callable[[torch.Tensor, slice], torch.Tensor] | None,
    *,
    chunk: int = 256,
) -> LinearGrads | None:
    """Factored per-sample gradients of seed(outputs of x[sl], sl), a vector with one entry per
    sample; seed=None: of every output (the output Jacobian, d of shape (O, n, d_out)). Runs
    `chunk` samples at a time; None where the model does not allow it (use the vmap path)."""
    layout = _linear_layout(fm)
    if layout is None:
        return None
    a_parts: list[list[torch.Tensor]] = [[] for _ in layout.modules]
    d_parts: list[list[torch.Tensor]] = [[] for _ in layout.modules]
    for sl in _chunks(x.shape[0], chunk):
        rec = _linear_forward(fm, layout, x[sl])
        if rec is None:
            return None
        out, ins, zs = rec
        if seed is None:
            eye = torch.eye(out.shape[-1], dtype=out.dtype, device=out.device)
            per_output = [
                torch.autograd.grad(out, zs, eye[o].expand_as(out), retain_graph=True, allow_unused=True)
                for o in range(out.shape[-1])
            ]  # one backward per output: O is small, and is_grads_batched would import torch._dynamo
            ds = [torch.stack([_or_zeros(g[i], zs[i]) for g in per_output]) for i in range(len(zs))]
        else:
            with torch.enable_grad():
                grads = torch.autograd.grad(seed(out, sl).sum(), zs, allow_unused=True)
            ds = [_or_zeros(g, z) for g, z in zip(grads, zs, strict=True)]
        for i, (a, d) in enumerate(zip(ins, ds, strict=True)):
            a_parts[i].append(a)
            d_parts[i].append(d.detach())
    return LinearGrads(layout, [torch.cat(p) for p in a_parts], [torch.cat(p, dim=-2) for p in d_parts])


def _or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def per_sample_linear_grads(
    fm: FlatModel, x: torch.Tensor, y: torch.Tensor, loss: str | LossFn = "ce", *, chunk: int = 256
) -> LinearGrads | None:
    """Factored gradients of each sample's loss (see LinearGrads); None where the model does not
    allow them (parameters other than nn.Linear ones, or a module that may mix samples)."""
    return linear_grads(fm, x, lambda out, sl: per_sample_loss(out, y[sl], loss), chunk=chunk)


GRADIENT_SHARE = 0.1  # of a memory budget, the most one chunk of per-sample gradients may take


def gradient_rows(n_params: int, budget: int | None, most: int = 256) -> int:
    """Per-sample gradients to hold at once so that they (about twice their P floats each while they
    are built) stay within GRADIENT_SHARE of `budget` bytes (None: HVP_MEMORY_BUDGET): all `most`
    for small models, a few for an 11M-parameter ResNet."""
    budget = HVP_MEMORY_BUDGET if budget is None else budget
    return max(1, min(most, int(GRADIENT_SHARE * budget) // (2 * 4 * n_params)))


def iter_per_sample_grads(
    fm: FlatModel,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str | LossFn = "ce",
    *,
    chunk: int = 256,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (slice, gradients (chunk, P)) of each sample's loss, chunk by chunk.

    Memory per step is bounded by chunk x P floats for the gradients (plus chunk samples'
    activations), whatever the number of samples: reduce each chunk before asking for the next.
    """
    for sl in _chunks(x.shape[0], chunk):
        f = per_sample_linear_grads(fm, x[sl], y[sl], loss, chunk=chunk)
        yield sl, (f.dense() if f is not None else _loss_grads(fm, x[sl], y[sl], loss))


LOOP_MIN_PARAMS = 1_000_000  # per-sample gradients by a loop from this size (see _loss_grads)


def _loss_grads(fm: FlatModel, x: torch.Tensor, y: torch.Tensor, loss: str | LossFn) -> torch.Tensor:
    """Per-sample loss gradients (n, P), any model, one batch: vmap over grad, or one backward pass
    per sample for large models where `engine.choose_strategy` picks 'loop' (convolutions on a CPU):
    measured in the DDM distillation, the loop took 0.44x the time on ResNet-18-AP (11M parameters)
    but 1.5x on the 6,346-parameter fmnist ConvNet (21 vs 14 s), where vmap's batching wins."""
    if fm.n_params >= LOOP_MIN_PARAMS and choose_strategy(fm.model, fm.theta.device) == "loop":
        th = fm.theta.detach().requires_grad_(True)
        out = torch.empty(x.shape[0], fm.n_params, dtype=th.dtype, device=th.device)
        with torch.enable_grad(), _eval_mode(fm.model):
            for i in range(x.shape[0]):
                li = per_sample_loss(fm.outputs(th, x[i : i + 1]), y[i : i + 1], loss)[0]
                out[i] = torch.autograd.grad(li, th)[0]
        return out

    def one(theta: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = fm.outputs(theta, xi.unsqueeze(0))
        return per_sample_loss(out, yi.unsqueeze(0), loss)[0]

    with _eval_mode(fm.model):
        return vmap(grad(one), in_dims=(None, 0, 0))(fm.theta, x, y).detach()


def per_sample_grads(
    fm: FlatModel,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str | LossFn = "ce",
    *,
    chunk: int = 256,
) -> torch.Tensor:
    """Gradients (n, P) of each sample's loss at fm.theta (factored for nn.Linear models, else
    vmap over grad; `chunk` samples at a time: working memory chunk x P floats plus the result)."""
    return torch.cat([g for _, g in iter_per_sample_grads(fm, x, y, loss, chunk=chunk)])


ObjectiveFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def objective_linear_grads(
    fm: FlatModel,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: ObjectiveFn,
    ref: torch.Tensor,
    *,
    chunk: int = 256,
) -> LinearGrads | None:
    """Factored gradients of objective(outputs(theta, x_q), ref_q, y_q) per query (see LinearGrads;
    an objective's value for query q depends on that query's outputs only); None as for
    per_sample_linear_grads."""

    def seed(out: torch.Tensor, sl: slice) -> torch.Tensor:
        return objective(out.unsqueeze(0), ref[sl], y[sl]).reshape(-1)

    return linear_grads(fm, x, seed, chunk=chunk)


def objective_grads(
    fm: FlatModel,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: ObjectiveFn,
    ref: torch.Tensor,
    *,
    chunk: int = 256,
) -> torch.Tensor:
    """Gradients (Q, P) of objective(outputs(theta, x_q), ref_q, y_q) per query (objectives.py form)."""
    f = objective_linear_grads(fm, x, y, objective, ref, chunk=chunk)
    if f is not None:
        return f.dense()

    def one(theta: torch.Tensor, xi: torch.Tensor, ri: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = fm.outputs(theta, xi.unsqueeze(0)).unsqueeze(0)  # (V=1, Q=1, O)
        return objective(out, ri.unsqueeze(0), yi.reshape(1)).reshape(())

    g = vmap(grad(one), in_dims=(None, 0, 0, 0))
    with _eval_mode(fm.model):
        return torch.cat([g(fm.theta, x[sl], ref[sl], y[sl]).detach() for sl in _chunks(x.shape[0], chunk)])


def output_jacobian(fm: FlatModel, x: torch.Tensor, *, chunk: int = 64) -> torch.Tensor:
    """Jacobians (n, O, P) of each sample's outputs with respect to the flat parameters
    (working memory chunk x O x P floats)."""
    f = linear_grads(fm, x, None, chunk=chunk)
    if f is not None:
        return f.dense().transpose(0, 1)

    def one(theta: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        return fm.outputs(theta, xi.unsqueeze(0))[0]

    j = vmap(jacrev(one), in_dims=(None, 0))
    with _eval_mode(fm.model):
        return torch.cat([j(fm.theta, x[sl]).detach() for sl in _chunks(x.shape[0], chunk)])


# ---------------------------------------------------------------------------------------------
# training loss and Hessian-vector products


def training_loss(
    fm: FlatModel,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str | LossFn = "ce",
    *,
    subsample: int | None = None,
    seed: int = 0,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """theta -> mean per-sample loss over (x, y), or over a fixed random subsample of that size."""
    x, y = subsample_data(x, y, subsample, seed)

    def value(theta: torch.Tensor) -> torch.Tensor:
        with _eval_mode(fm.model):
            return per_sample_loss(fm.outputs(theta, x), y, loss).mean()

    return value


def subsample_data(
    x: torch.Tensor, y: torch.Tensor, subsample: int | None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset of `subsample` samples of (x, y) (all of them for None)."""
    if subsample is None or subsample >= x.shape[0]:
        return x, y
    if subsample <= 0:
        raise DistdmError(f"subsample must be > 0, got {subsample}")
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:subsample]
    return x[idx], y[idx]


def _vjp(out: torch.Tensor, inp: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """v^T d out / d inp through a retained graph; v may carry a leading batch dimension."""
    batched = v.ndim == out.ndim + 1
    try:
        (g,) = torch.autograd.grad(
            out, inp, v, retain_graph=True, allow_unused=True, is_grads_batched=batched
        )
    except RuntimeError:  # an op without a batching rule: one vector at a time
        if not batched:
            raise
        return torch.stack([_vjp(out, inp, vi) for vi in v])
    if g is None:  # out does not depend on inp
        return torch.zeros(*v.shape[: v.ndim - out.ndim], *inp.shape, dtype=inp.dtype)
    return g


def _chunk_operator(
    fm: FlatModel,
    xb: torch.Tensor,
    yb: torch.Tensor,
    loss: str | LossFn,
    n: int,
    curvature: str,
    weights: torch.Tensor | None = None,
) -> tuple[HVP, int]:
    """The Hessian (or GGN, or the residual H - GGN with per-sample `weights`) of sum_{i in chunk}
    loss_i / n as a double-backward graph, built once, and the bytes that graph saves (what one
    vector's pass through it costs again in memory)."""
    th = fm.theta.detach().clone().requires_grad_(True)
    with torch.enable_grad(), _eval_mode(fm.model):
        out = fm.outputs(th, xb)
        if curvature == "residual":
            # H - GGN = sum_i sum_o (dloss_i / do) d2 o / dtheta2: the Hessian of the outputs
            # weighted by the loss's gradient in them, held fixed
            leaf = out.detach().requires_grad_(True)
            (r,) = torch.autograd.grad(per_sample_loss(leaf, yb, loss).sum(), leaf)
            w = out.new_full((len(xb),), 1.0 / n) if weights is None else weights.to(out.dtype)
            w = r * w.view(-1, *[1] * (r.ndim - 1))
            (g,) = torch.autograd.grad((out * w).sum(), th, create_graph=True)
            return (lambda v: _vjp(g, th, v)), saved_tensor_bytes([g], [th])
        if curvature == "hessian":
            (g,) = torch.autograd.grad(per_sample_loss(out, yb, loss).sum() / n, th, create_graph=True)
            return (lambda v: _vjp(g, th, v)), saved_tensor_bytes([g], [th])
        # generalised Gauss-Newton J^T H_out J v, every factor by reverse mode
        leaf = out.detach().requires_grad_(True)
        (g_out,) = torch.autograd.grad(per_sample_loss(leaf, yb, loss).sum() / n, leaf, create_graph=True)
        u = torch.zeros_like(out, requires_grad=True)
        (jt_u,) = torch.autograd.grad(out, th, u, create_graph=True)  # J^T u, linear in u

    def ggn(v: torch.Tensor) -> torch.Tensor:
        jv = _vjp(jt_u, u, v)  # J v by the double-vjp trick
        return _vjp(out, th, _vjp(g_out, leaf, jv))

    return ggn, saved_tensor_bytes([out, g_out, jt_u], [th])


CURVATURES = ("hessian", "ggn")


class JacobianGGN:
    """v -> G v for the GGN J^T H_out J / n from the stored output Jacobians of every sample (n O x P
    floats) and the per-sample Hessians of the loss in the outputs (n x O x O): two matrix products
    per batch of vectors instead of backward passes through the model. Where parameters are shared
    (convolutions) that is far cheaper: measured on fmnist-convnet-k100 (P = 6,346, 1,000 samples),
    0.004 s a vector against 0.69 s by reverse mode, after 2.3 s to form the Jacobians.
    `prefers_blocks`: batches of vectors cost little more than one, whatever the model."""

    prefers_blocks = True

    def __init__(self, jac: torch.Tensor, out_hess: torch.Tensor, weight_decay: float):
        self.n, self.n_out, self.n_params = jac.shape
        self.jac = jac.reshape(self.n * self.n_out, self.n_params)
        self.out_hess = out_hess / self.n
        self.weight_decay = weight_decay

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape[-1] != self.n_params or v.ndim > 2:
            raise DistdmError(f"vector has {v.shape[-1]} entries, the model {self.n_params} parameters")
        rows = v.detach().reshape(-1, self.n_params)
        jv = (self.jac @ rows.T).reshape(self.n, self.n_out, -1)
        out = (self.jac.T @ torch.bmm(self.out_hess, jv).reshape(self.n * self.n_out, -1)).T
        if self.weight_decay:
            out = out + self.weight_decay * rows
        return out.reshape(v.shape)


def _stored_jacobian_pays(fm: FlatModel, x: torch.Tensor, n_out: int) -> bool:
    """Whether products through stored Jacobians (4 O P flops a sample and vector) cost well under
    reverse-mode products (a few forward passes a sample and vector): when the forward pass of one
    sample takes more than 2 O P flops, i.e. parameters are reused across positions."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), _eval_mode(fm.model), FlopCounterMode(display=False) as flops:
        fm.outputs(fm.theta, x[:1])
    return flops.get_total_flops() > 2 * n_out * fm.n_params


def jacobian_ggn(
    fm: FlatModel, x: torch.Tensor, y: torch.Tensor, loss: str | LossFn, weight_decay: float, budget: int
) -> JacobianGGN | None:
    """The GGN as a `JacobianGGN` where the model treats samples independently, its Jacobians (twice
    their size while they are stacked) fit `budget` bytes and the products pay; else None."""
    if not _per_sample_model(fm.model):
        return None
    with torch.no_grad(), _eval_mode(fm.model):
        out = fm.outputs(fm.theta, x[:1])
    n_out = out[0].numel()
    need = 2 * x.shape[0] * n_out * fm.n_params * fm.theta.element_size()
    if need > budget or not _stored_jacobian_pays(fm, x, n_out):
        return None
    jac = output_jacobian(fm, x).reshape(x.shape[0], n_out, fm.n_params)
    with torch.no_grad(), _eval_mode(fm.model):
        outputs = fm.outputs(fm.theta, x).reshape(x.shape[0], n_out)

    def loss_of(o: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(o.unsqueeze(0), yi.unsqueeze(0), loss).sum()

    out_hess = vmap(torch.func.hessian(loss_of))(outputs, y).detach()
    return JacobianGGN(jac, out_hess, weight_decay)


HVP_MEMORY_BUDGET = 2 * 2**30  # bytes a batched Hessian-vector product may take by default


def residual_draw(
    fm: FlatModel, x: torch.Tensor, y: torch.Tensor, loss: str | LossFn, m: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and weights of an unbiased estimate, from about m samples, of the mean residual
    (H - GGN) over the N given: each sample's share is the norm of the loss's gradient in its outputs
    (the residual's weight, so well-fitted samples are rarely drawn). Samples whose expected draws
    reach 1 are taken exactly (weight 1 / N), the others drawn with replacement in proportion to
    their share (weight = draws / (draws in all x N x probability)); all N where m >= N."""
    n = len(x)
    if m >= n:
        return torch.arange(n), torch.full((n,), 1.0 / n, dtype=fm.theta.dtype)
    with torch.enable_grad(), _eval_mode(fm.model):
        leaf = fm.outputs(fm.theta.detach(), x).detach().requires_grad_(True)
        (r,) = torch.autograd.grad(per_sample_loss(leaf, y, loss).sum(), leaf)
    share = r.reshape(n, -1).norm(dim=1).double()
    exact = torch.zeros(n, dtype=torch.bool)
    for _ in range(m):  # taking a heavy sample exactly raises the others' expected draws: repeat
        rest = share * ~exact
        draws = m - int(exact.sum())
        heavy = (rest * draws >= rest.sum()) & (rest > 0)
        if draws <= 0 or not heavy.any():
            break
        exact |= heavy
    rest = share * ~exact
    draws = m - int(exact.sum())
    idx, w = [torch.nonzero(exact).flatten()], [torch.full((int(exact.sum()),), 1.0 / n, dtype=torch.float64)]
    if draws > 0 and float(rest.sum()) > 0:
        q = rest / rest.sum()
        picked = torch.multinomial(q, draws, replacement=True, generator=torch.Generator().manual_seed(seed))
        u, counts = torch.unique(picked, return_counts=True)
        idx.append(u)
        w.append(counts.double() / (draws * n * q[u]))
    return torch.cat(idx), torch.cat(w).to(fm.theta.dtype)


class SplitHessian:
    """v -> G v + R v: the GGN G of all training samples (through stored Jacobians, `JacobianGGN`)
    plus the residual R = H - G estimated on a weighted draw of samples (`residual_draw`). Where
    the GGN is cheap and the residual small, this costs a fraction of the full Hessian."""

    prefers_blocks = False  # the residual part goes one vector at a time

    def __init__(self, ggn: JacobianGGN, residual: HVP):
        self.ggn, self.residual = ggn, residual

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.ggn(v) + self.residual(v)


def _hvp_on(
    fm: FlatModel,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str | LossFn,
    chunk: int,
    weight_decay: float,
    curvature: str = "hessian",
    cache: bool = True,
    memory_budget_bytes: int | None = None,
    weights: torch.Tensor | None = None,
) -> HVP:
    if curvature not in (*CURVATURES, "residual"):
        raise DistdmError(f"curvature must be one of {list(CURVATURES)}, got {curvature!r}")
    budget = HVP_MEMORY_BUDGET if memory_budget_bytes is None else int(memory_budget_bytes)
    if budget <= 0:
        raise DistdmError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
    if curvature == "ggn" and cache:
        stored = jacobian_ggn(fm, x, y, loss, weight_decay, budget)
        if stored is not None:
            return stored
    n = x.shape[0]
    slices = _chunks(n, chunk)
    cached: list[tuple[HVP, int]] = []
    loop = choose_strategy(fm.model, fm.theta.device) == "loop"

    def operators() -> Iterator[tuple[HVP, int]]:
        if cached:
            yield from cached
            return
        for sl in slices:
            op = _chunk_operator(
                fm, x[sl], y[sl], loss, n, curvature, None if weights is None else weights[sl]
            )
            if cache:
                cached.append(op)
            yield op

    def apply(v: torch.Tensor) -> torch.Tensor:
        if v.shape[-1] != fm.n_params or v.ndim > 2:
            raise DistdmError(f"vector has {v.shape[-1]} entries, the model {fm.n_params} parameters")
        v = v.detach()
        total = weight_decay * v if weight_decay else torch.zeros_like(v)
        for op, graph_bytes in operators():
            if v.ndim == 1:
                total = total + op(v)
                continue
            # a batched backward holds one copy of the graph's intermediates per vector; where the
            # engine trains one variant at a time (convolutions on a CPU), one vector at a time is
            # faster too (measured: 0.046 vs 0.082 s per vector on the benchmark ConvNet)
            if loop:
                total = total + torch.stack([op(vi) for vi in v])
                continue
            rows = max(1, budget // max(graph_bytes, 1))
            total = total + torch.cat([op(v[i : i + rows]) for i in range(0, v.shape[0], rows)])
        return total.detach()

    return apply


def hvp(
    source: Any,
    state: State | None = None,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    loss: str | LossFn | None = None,
    *,
    params: str | Sequence[str] = "all",
    subsample: int | None = None,
    seed: int = 0,
    chunk: int = 2048,
    weight_decay: float = 0.0,
    curvature: str = "hessian",
    cache: bool = True,
    memory_budget_bytes: int | None = None,
    residual_subsample: int | None = None,
) -> HVP:
    """v -> H v for the Hessian of the mean training loss at `state` (double backward).

    source: a Task (x, y, loss default to its training set and loss; state to its final model),
    an nn.Module or a FlatModel. v may be (P,) or a batch (k, P) (batched backward). The data are
    processed `chunk` samples at a time; with `cache` each chunk's gradient graph is built on the
    first call and kept (memory: a few times the activations of the data), so later calls cost one
    backward pass; cache=False rebuilds them per call. `subsample` fixes a random subset;
    `weight_decay` adds wd * v.
    curvature='ggn' uses the generalised Gauss-Newton matrix J^T H_out J instead (positive
    semi-definite for convex losses such as 'ce' and 'mse', so CG and LiSSA always converge).
    A batch of vectors goes through the graph in groups sized so that their intermediates stay
    within memory_budget_bytes (default HVP_MEMORY_BUDGET, 2 GiB; at least one vector a pass), or
    one at a time where `engine.choose_strategy` picks 'loop' (convolutions on a CPU).
    `residual_subsample` (curvature 'hessian'): the Hessian split as the GGN on all samples through
    stored Jacobians plus the residual H - GGN on that many weighted draws (`SplitHessian`), where
    the stored Jacobians pay and fit (models that reuse parameters, such as convolutions); else the
    full Hessian, logged.
    """
    fm = flat_model(source, state, params)
    x, y, loss = _data_of(source, x, y, loss)
    x, y = subsample_data(x, y, subsample, seed)
    if memory_budget_bytes is None:  # a Task carries the user's budget
        memory_budget_bytes = getattr(source, "memory_budget_bytes", None)
    if residual_subsample is not None and curvature == "hessian" and cache:
        if residual_subsample <= 0:
            raise DistdmError(f"residual_subsample must be > 0, got {residual_subsample}")
        budget = HVP_MEMORY_BUDGET if memory_budget_bytes is None else int(memory_budget_bytes)
        g = jacobian_ggn(fm, x, y, loss, weight_decay, budget)
        if g is not None:
            idx, w = residual_draw(fm, x, y, loss, residual_subsample, seed)
            r = _hvp_on(fm, x[idx], y[idx], loss, chunk, 0.0, "residual", True, budget, weights=w)
            return SplitHessian(g, r)
        log.info("residual_subsample: the stored-Jacobian GGN does not pay or fit here; full Hessian")
    return _hvp_on(fm, x, y, loss, chunk, weight_decay, curvature, cache, memory_budget_bytes)


def stochastic_hvp(
    fm: FlatModel,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str | LossFn = "ce",
    *,
    batch_size: int = 128,
    seed: int = 0,
    weight_decay: float = 0.0,
    curvature: str = "hessian",
    memory_budget_bytes: int | None = None,
) -> HVP:
    """v -> H_B v on a fresh random minibatch B at every call (for LiSSA); reproducible by seed."""
    if batch_size <= 0:
        raise DistdmError(f"batch_size must be > 0, got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]

    def apply(v: torch.Tensor) -> torch.Tensor:
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        return _hvp_on(
            fm, x[idx], y[idx], loss, len(idx), weight_decay, curvature, False, memory_budget_bytes
        )(v)

    return apply


def hessian(
    source: Any,
    state: State | None = None,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    loss: str | LossFn | None = None,
    *,
    params: str | Sequence[str] = "all",
    subsample: int | None = None,
    seed: int = 0,
    damping: float = 0.0,
    block: int = 128,
    chunk: int = 2048,
    weight_decay: float = 0.0,
    curvature: str = "hessian",
    max_params: int = 20_000,
    memory_budget_bytes: int | None = None,
) -> torch.Tensor:
    """The exact (P, P) Hessian (or GGN) of the mean training loss plus damping I, from P HVPs
    with the unit vectors, `block` at a time. Memory P^2 floats: small models or params='last'."""
    fm = flat_model(source, state, params)
    x, y, loss = _data_of(source, x, y, loss)
    x, y = subsample_data(x, y, subsample, seed)
    hv = _hvp_on(fm, x, y, loss, chunk, weight_decay, curvature, True, memory_budget_bytes)
    h = dense(
        hv, fm.n_params, block=block, dtype=fm.theta.dtype, max_params=max_params, device=fm.theta.device
    )
    if damping:
        h = h + damping * torch.eye(fm.n_params, dtype=h.dtype, device=h.device)
    return h


def dense(
    hv: HVP,
    n_params: int,
    *,
    block: int = 128,
    dtype: torch.dtype = torch.float32,
    max_params: int = 20_000,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The symmetric (P, P) matrix of a linear operator v -> Hv, from HVPs with `block` unit
    vectors at a time (memory P^2 floats) on hv's `device`."""
    if n_params > max_params:
        raise DistdmError(
            f"an exact Hessian of {n_params} parameters needs {n_params**2 * 4 / 1e9:.1f} GB: use "
            f"params='last', an iterative solver (CG, LiSSA, Arnoldi), or raise max_params"
        )
    eye = torch.eye(n_params, dtype=dtype, device=device)
    h = torch.cat([hv(eye[i : i + block]) for i in range(0, n_params, block)])
    return 0.5 * (h + h.T)


def top_eigenvalue(
    hv: HVP, n_params: int, *, iters: int = 30, seed: int = 0, dtype: torch.dtype = torch.float32
) -> float:
    """Largest-magnitude eigenvalue of H by power iteration (iters HVPs)."""
    v = torch.randn(n_params, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        w = hv(v)
        lam = float(v @ w)
        nrm = w.norm()
        if nrm == 0:
            return 0.0
        v = w / nrm
    return lam


# ---------------------------------------------------------------------------------------------
# inverse-HVP solvers: each estimates (H + damping I)^-1 b for b of shape (P,) or (k, P)


def refuse_over_budget(need: int, budget: int | None, what: str, layout: str, lower: str) -> None:
    """Raise a DistdmError saying what to lower when `need` bytes exceed a (positive) memory budget."""
    if budget is None:
        return
    if budget <= 0:
        raise DistdmError(f"memory_budget_bytes must be > 0, got {budget}")
    if need > budget:
        raise DistdmError(
            f"{what} {need / 2**20:.1f} MiB ({layout}), over the memory budget of {budget / 2**20:.1f} "
            f"MiB: lower {lower}, or raise memory_budget_bytes"
        )


def _check_damping(damping: float) -> None:
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
        raise DistdmError(f"damping must be a finite number >= 0, got {damping!r}")


def exact_ihvp(h: torch.Tensor, damping: float = 0.0) -> HVP:
    """b -> (H + damping I)^-1 b from a dense symmetric Hessian, factorised once: Cholesky when
    H + damping I is positive definite (about 25x cheaper than an eigendecomposition), else eigh.

    In the eigh case, directions with H + damping I singular (|eigenvalue| < 1e-12 * largest) are
    dropped (pseudo-inverse) and a warning is logged when H + damping I is indefinite."""
    _check_damping(damping)
    a = h.double() + damping * torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:

        def solve(b: torch.Tensor) -> torch.Tensor:
            rhs = b.double().reshape(-1, h.shape[0]).T
            return torch.cholesky_solve(rhs, chol).T.reshape(b.shape).to(h.dtype)

        return solve
    w, v = torch.linalg.eigh(h.double())
    w = w + damping
    if w.min() < 0:
        log.warning(
            "H + damping I has negative eigenvalues (smallest %.3g): raise damping above the most "
            "negative Hessian eigenvalue or use curvature='ggn'",
            float(w.min()),
        )
    cutoff = 1e-12 * float(w.abs().max().clamp_min(1e-300))
    inv = torch.where(w.abs() > cutoff, 1.0 / w, torch.zeros_like(w))
    vt = v.T.to(h.dtype)
    vv = v.to(h.dtype)
    inv = inv.to(h.dtype)

    def apply(b: torch.Tensor) -> torch.Tensor:
        return ((b @ vv) * inv) @ vt

    return apply


def cg(
    hv: HVP,
    b: torch.Tensor,
    *,
    damping: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Conjugate gradient for (H + damping I) x = b, all columns of b (k, P) at once.

    Stops a column when ||r|| <= tol ||b|| or after max_iter HVPs (logs if any did not converge);
    needs H + damping I positive definite (a column meeting negative curvature stops there)."""
    _check_damping(damping)
    single = b.ndim == 1
    bb = b.unsqueeze(0) if single else b

    def a(v: torch.Tensor) -> torch.Tensor:
        return hv(v) + damping * v

    x = torch.zeros_like(bb)
    r = bb.clone()
    p = r.clone()
    rs = (r * r).sum(-1)
    target = tol * bb.norm(dim=-1)
    active = rs.sqrt() > target
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        ap = a(p)
        pap = (p * ap).sum(-1)
        bad = active & (pap <= 0)
        if bool(bad.any()):
            log.warning(
                "CG met negative curvature in %d of %d columns: raise damping or use curvature='ggn'",
                int(bad.sum()),
                len(rs),
            )
            active = active & ~bad
        alpha = torch.where(active, rs / pap.where(pap != 0, torch.ones_like(pap)), torch.zeros_like(rs))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rs_new = (r * r).sum(-1)
        beta = torch.where(active, rs_new / rs.clamp_min(1e-300), torch.zeros_like(rs))
        p = torch.where(active[:, None], r + beta[:, None] * p, p)
        rs = torch.where(active, rs_new, rs)
        active = active & (rs.sqrt() > target)
    if bool(active.any()):
        log.info("CG: %d of %d columns did not reach tol %.1e in %d iterations", int(active.sum()),
                 len(rs), tol, max_iter)  # fmt: skip
    return x[0] if single else x


def lissa(
    hv: HVP,
    b: torch.Tensor,
    *,
    damping: float = 0.0,
    scale: float,
    depth: int = 1000,
    repeat: int = 1,
) -> torch.Tensor:
    """LiSSA (Agarwal et al.; Koh & Liang's recursion) for (H + damping I)^-1 b.

    Recursion x_0 = b, x_j = b + (1 - lambda') x_{j-1} - H_B x_{j-1} / s, estimate x_depth / s,
    with lambda' = damping / s, so the fixed point is exactly (H + damping I)^-1 b. `hv` may be
    stochastic (`stochastic_hvp`); `repeat` independent runs are averaged. Converges only if
    s > lambda_max(H_B + damping I) / 2 (choose s > lambda_max to be safe); the error shrinks by
    1 - (lambda_min + damping) / s per step, so small damping needs a large depth."""
    _check_damping(damping)
    if not scale > 0:
        raise DistdmError(f"LiSSA scale must be > 0, got {scale}")
    if depth < 1 or repeat < 1:
        raise DistdmError(f"LiSSA depth and repeat must be >= 1, got {depth}, {repeat}")
    keep = 1.0 - damping / scale
    total = torch.zeros_like(b)
    for _ in range(repeat):
        xj = b.clone()
        for _ in range(depth):
            xj = b + keep * xj - hv(xj) / scale
            if not bool(torch.isfinite(xj).all()):
                raise DistdmError(
                    f"LiSSA diverged: the scale {scale:g} is below the Hessian's largest eigenvalue; "
                    f"raise scale (or damping)"
                )
        total = total + xj / scale
    return total / repeat


def arnoldi_bytes(n_params: int, n_iters: int, top_p: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes `arnoldi` needs: its basis (n_iters x P), the eigenvectors it returns (top_p x P) and
    a working set of a few vectors of P, all in `dtype`."""
    m = min(n_iters, n_params)
    return (
        (m + min(top_p, m) + ARNOLDI_WORKING_VECTORS) * n_params * torch.empty((), dtype=dtype).element_size()
    )


ARNOLDI_WORKING_VECTORS = 4  # w, H q and two temporaries of the orthogonalisation


def arnoldi(
    hv: HVP,
    n_params: int,
    *,
    n_iters: int = 100,
    top_p: int = 20,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    memory_budget_bytes: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p eigenpairs of the symmetric H from an n_iters-dimensional Krylov basis (Arnoldi with
    full re-orthogonalisation; Schioppa et al. 2022). Returns eigenvalues (p,) in decreasing order
    and eigenvectors (p, P). n_iters HVPs.

    The basis is allocated once, n_iters x P in `dtype` (float32 by default: two Gram-Schmidt
    passes keep it orthogonal to about 1e-6, and the small projected matrix is float64), so the
    memory is arnoldi_bytes(...) = (n_iters + top_p + 4) x P floats; where memory_budget_bytes is
    given and that does not fit, a DistdmError says what to lower. The eigenvectors are assembled
    in column blocks that fit what the budget leaves (the same numbers at any budget)."""
    if n_iters < 1 or top_p < 1:
        raise DistdmError(f"Arnoldi needs n_iters >= 1 and top_p >= 1, got {n_iters}, {top_p}")
    m = min(n_iters, n_params)
    p = min(top_p, m)
    need = arnoldi_bytes(n_params, n_iters, top_p, dtype)
    refuse_over_budget(
        need,
        memory_budget_bytes,
        f"Arnoldi with n_iters={n_iters} and top_p={top_p} on {n_params} parameters needs",
        f"(n_iters + top_p + {ARNOLDI_WORKING_VECTORS}) x P floats in {dtype}",
        "n_iters and top_p (the rank), restrict the parameters (params='last')",
    )
    basis = torch.empty(m, n_params, dtype=dtype, device=device)  # on hv's device
    q = torch.randn(n_params, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    basis[0] = q / q.norm()
    del q
    hess = torch.zeros(m + 1, m, dtype=torch.float64, device=device)
    # a residual this small relative to the column is rounding noise: the Krylov space is invariant
    breakdown = max(1e-10, 100 * torch.finfo(dtype).eps)
    for j in range(m):
        w = hv(basis[j]).to(dtype)
        qs = basis[: j + 1]  # a view: no copy of the basis
        for _ in range(2):  # twice is enough (Kahan): keeps the basis orthogonal in float
            c = qs @ w
            hess[: j + 1, j] += c.double()
            w -= c @ qs
        nrm = float(w.double().norm())
        hess[j + 1, j] = nrm
        if nrm <= breakdown * float(hess[: j + 1, j].abs().max().clamp_min(1e-300)):
            m = j + 1  # exact eigenpairs of H on the invariant space
            break
        if j + 1 < m:
            basis[j + 1] = w / nrm
        del w
    p = min(p, m)
    t = hess[:m, :m]
    evals, evecs = torch.linalg.eigh(0.5 * (t + t.T))
    order = torch.argsort(evals, descending=True)[:p]
    coef = evecs[:, order].T.to(dtype).contiguous()  # (p, m)
    vecs = torch.empty(p, n_params, dtype=dtype, device=device)
    block = n_params
    if memory_budget_bytes is not None:  # the block's temporary fits what the basis leaves
        spare = memory_budget_bytes - (need - ARNOLDI_WORKING_VECTORS * n_params * basis.element_size())
        block = max(1, min(n_params, spare // max(1, p * basis.element_size())))
    for i in range(0, n_params, block):
        torch.matmul(coef, basis[:m, i : i + block], out=vecs[:, i : i + block])
    return evals[order].to(dtype), vecs


def arnoldi_ihvp(eigvals: torch.Tensor, eigvecs: torch.Tensor, damping: float = 0.0) -> HVP:
    """b -> U diag(1 / (lambda + damping)) U^T b: the inverse on the top-p eigenspace only
    (components outside it are dropped, as in Schioppa et al.)."""
    _check_damping(damping)
    denom = eigvals + damping
    if bool((denom <= 0).any()):
        raise DistdmError("an Arnoldi eigenvalue plus damping is <= 0: raise damping or lower top_p")
    inv = 1.0 / denom

    def apply(b: torch.Tensor) -> torch.Tensor:
        return ((b @ eigvecs.T) * inv) @ eigvecs

    return apply
