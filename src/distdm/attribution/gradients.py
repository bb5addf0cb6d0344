"""First-order gradient methods: Grad-Dot, Grad-Cos and TracIn-CP (SPEC 4), and the machinery
that every gradient-based method shares (influence functions build on it).

Sign (scores.py): score = objective(without the unit) - objective(with it). Removing training
sample i moves the parameters by delta_i; a first-order method takes delta_i proportional to +g_i
(the descent steps taken on sample i are undone), an influence function delta_i = +(1/N) H^-1 g_i.
The predicted change of the objective on query q is then grad f(q)^T delta_i ("linear" expansion).

Objectives whose gradient vanishes at the target model (dist1, dist3: distances to the model's
own outputs) would get all-zero scores that way. For them ("outputs" expansion) the change of the
query's outputs is predicted to first order, dout = J_q delta (J_q: the output Jacobian), and the
objective is evaluated there: score = f(out_q + dout) - f(out_q), a second-order prediction. For a
cluster the members' output changes are summed before f is applied (its removal moves all of them).
`expansion='auto'` picks 'outputs' when the objective's gradient is zero at the target's outputs for
every query, else 'linear'. In 'outputs' mode the first-order methods need a physical step size:
delta_i = lr * epochs / batch_size * g_i (the SGD steps sample i contributed; Grad-Cos uses unit
directions times the mean gradient norm, TracIn lr / batch_size per checkpoint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from ..data import check_queries
from ..errors import DistdmError
from ..hessian import (
    FlatModel,
    LinearGrads,
    flat_model,
    gradient_rows,
    iter_per_sample_grads,
    linear_grads,
    objective_grads,
    objective_linear_grads,
    output_jacobian,
    per_sample_linear_grads,
)
from ..objectives import Objective, get_objective, objective_name
from ..scores import Scores
from ..task import Task
from .base import UNITS, Attributor, Settings, check_choice, check_unit, register

EXPANSIONS = ("auto", "linear", "outputs")
CACHE_LIMIT_BYTES = 1 << 30  # cache_grads='auto' keeps training gradients up to this size
TrainCache = LinearGrads | torch.Tensor | None  # what fit keeps of one state's training gradients


def expansion_for(objective: Objective, ref: torch.Tensor, y: torch.Tensor) -> str:
    """'outputs' if the objective's gradient with respect to the outputs is zero at the reference
    outputs for every query (e.g. dist1, dist3), else 'linear'."""
    out = ref.detach().clone().requires_grad_(True)
    val = objective(out.unsqueeze(0), ref, y)
    (d,) = torch.autograd.grad(val.sum(), out, allow_unused=True)
    if d is None:
        return "outputs"
    tol = 1e-8 * (1.0 + float(val.detach().abs().max()))
    return "outputs" if float(d.abs().max()) <= tol else "linear"


def query_rows(
    fm: FlatModel,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: Objective,
    ref: torch.Tensor,
    expansion: str,
    *,
    chunk: int = 256,
) -> torch.Tensor:
    """The query side of a gradient method: grad f(q) per query (Q, P) for 'linear', the output
    Jacobian rows (Q * O, P) for 'outputs'."""
    if expansion == "linear":
        return objective_grads(fm, x, y, objective, ref, chunk=chunk)
    return output_jacobian(fm, x, chunk=max(1, chunk // 4)).reshape(-1, fm.n_params)


def query_linear_grads(
    fm: FlatModel,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: Objective,
    ref: torch.Tensor,
    expansion: str,
    *,
    chunk: int = 256,
) -> LinearGrads | None:
    """query_rows as factors (hessian.LinearGrads, rows in the same order), or None where the
    model does not allow them."""
    if expansion == "linear":
        return objective_linear_grads(fm, x, y, objective, ref, chunk=chunk)
    f = linear_grads(fm, x, None, chunk=max(1, chunk // 4))
    return None if f is None else f.flat_rows()


def finish_scores(
    products: torch.Tensor,
    task: Task,
    objective: Objective,
    ref: torch.Tensor,
    y: torch.Tensor,
    expansion: str,
    unit: str,
    name: str,
    objective_label: str,
) -> Scores:
    """Turn products rows x samples (rows = grad f(q)^T delta_i, or J_q delta_i for 'outputs') into
    Scores: summed into clusters for unit='cluster', objective evaluated for 'outputs'."""
    n = products.shape[1]
    if n != task.data.n_train:
        raise AssertionError("products must have one column per training sample")
    if expansion == "linear":
        s = Scores(products.T.double(), "sample", objective_label, name)  # Scores move it to the CPU
        if unit == "cluster":
            s = s.to_clusters(task.clusters.assignment, task.clusters.n_clusters)
        return s
    d = products
    if unit == "cluster":
        d = d @ task.clusters.indicator().to(d.device, d.dtype).T  # members' output changes add up
    q, o = ref.shape
    delta = d.reshape(q, o, d.shape[1]).permute(2, 0, 1)  # (units, Q, O)
    with torch.no_grad():
        values = objective(ref.unsqueeze(0) + delta, ref, y) - objective(ref.unsqueeze(0), ref, y)
    return Scores(values.double(), unit, objective_label, name)


def dot_chunks(rows: torch.Tensor, chunks: Iterator[tuple[slice, torch.Tensor]], n: int) -> torch.Tensor:
    """rows (R, P) times every training gradient chunk (c, P)^T, assembled into (R, n)."""
    out = torch.zeros(rows.shape[0], n, dtype=rows.dtype)
    for sl, g in chunks:
        out[:, sl] = rows @ g.T
    return out


@dataclasses.dataclass(frozen=True)
class GradientArgs(Settings):
    """Settings of every gradient-based method (see GradientAttributor)."""

    unit: str = "cluster"
    params: str | tuple[str, ...] = "all"
    expansion: str = "auto"
    chunk: int = 256
    cache_grads: bool | str = "auto"

    def validate(self) -> None:
        check_unit(self.unit)
        names = (
            isinstance(self.params, tuple) and self.params and all(isinstance(p, str) for p in self.params)
        )
        if not (names or self.params in ("all", "last")):
            raise DistdmError(
                f"params must be 'all', 'last' or a list of parameter names, got {self.params!r}"
            )
        check_choice("expansion", self.expansion, EXPANSIONS)
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk <= 0:
            raise DistdmError(f"chunk must be a positive integer, got {self.chunk!r}")
        if self.cache_grads not in (True, False, "auto") or not isinstance(self.cache_grads, (bool, str)):
            raise DistdmError(f"cache_grads must be True, False or 'auto', got {self.cache_grads!r}")


class GradientAttributor(Attributor):
    """Shared settings and machinery of the gradient-based methods.

    unit: 'cluster' (per-sample scores summed over each cluster's members) or 'sample'.
    params: 'all', 'last' (the last linear layer only) or a list of parameter names.
    expansion: 'auto', 'linear' or 'outputs' (see the module docstring).
    chunk: samples per gradient batch (memory: chunk x P floats).
    cache_grads: keep the training gradients (per checkpoint for TracIn) from fit; False
    recomputes them in every `scores` call; 'auto' caches when that takes at most 1 GiB.
    Where every parameter scored is an nn.Linear one (MLPs, or params='last'), the gradients are
    kept factored (hessian.LinearGrads: N x (d_in + d_out) floats per layer instead of N x P) and
    never formed: products with them are small matrix products per layer.
    """

    Args = GradientArgs
    units = UNITS
    _mean_queries = False

    # offline ------------------------------------------------------------------------------
    def _fit(self, task: Task) -> None:
        self.fm_ = flat_model(task, task.final, self.params)
        cache = self._train_cache(self.fm_, 1)
        self.factors_ = cache if isinstance(cache, LinearGrads) else None
        self.grads_ = cache if isinstance(cache, torch.Tensor) else None  # dense (N, P), or None
        self._prepare(task)

    def _prepare(self, task: Task) -> None:  # noqa: B027 - optional hook
        """Method-specific offline work after the training gradients."""

    def _caching(self, task: Task, copies: int) -> bool:
        if self.cache_grads != "auto":
            return bool(self.cache_grads)
        size = copies * task.data.n_train * self.fm_.n_params * self.fm_.theta.element_size()
        return size <= CACHE_LIMIT_BYTES

    def _train_cache(self, fm: FlatModel, copies: int) -> TrainCache:
        """What fit keeps of the training gradients at fm (`copies` states are kept alike): their
        factors, the dense gradients, or nothing (recomputed per call)."""
        if self.cache_grads is False:
            return None
        f = self._factors(fm)
        if f is not None:
            return f if self.cache_grads is True or copies * f.nbytes <= CACHE_LIMIT_BYTES else None
        return self._compute_grads(fm) if self._caching(self.task_, copies) else None

    def _factors(self, fm: FlatModel) -> LinearGrads | None:
        d = self.task_.data
        return per_sample_linear_grads(fm, d.x_train, d.y_train, self.task_.loss, chunk=self.chunk)

    def _cached(self, fm: FlatModel, cached: TrainCache) -> TrainCache:
        if cached is None and fm is self.fm_:
            return self.factors_ if self.factors_ is not None else self.grads_
        return cached

    def _rows_at_once(self, fm: FlatModel) -> int:
        """`chunk`, or fewer per-sample gradients where `chunk` of them would not fit the task's memory
        budget (an 11M-parameter model: a few)."""
        return gradient_rows(fm.n_params, self.task_.memory_budget_bytes, most=self.chunk)

    def _compute_grads(self, fm: FlatModel) -> torch.Tensor:
        d = self.task_.data
        return torch.cat([g for _, g in iter_per_sample_grads(fm, d.x_train, d.y_train, self.task_.loss,
                                                              chunk=self._rows_at_once(fm))])  # fmt: skip

    def train_grads(
        self, fm: FlatModel | None = None, cached: TrainCache = None
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield (slice, per-sample training gradients) chunk by chunk, from the cache if any."""
        fm = fm or self.fm_
        cached = self._cached(fm, cached)
        rows = self._rows_at_once(fm)
        if isinstance(cached, LinearGrads):
            for i in range(0, cached.n, rows):
                sl = slice(i, min(i + rows, cached.n))
                yield sl, cached.dense(sl)
            return
        if cached is not None:
            n = cached.shape[0]
            for i in range(0, n, self.chunk):
                sl = slice(i, min(i + self.chunk, n))
                yield sl, cached[sl]
            return
        d = self.task_.data
        yield from iter_per_sample_grads(fm, d.x_train, d.y_train, self.task_.loss, chunk=rows)

    def train_products(
        self, rows: torch.Tensor | LinearGrads, fm: FlatModel | None = None, cached: TrainCache = None
    ) -> torch.Tensor:
        """rows (R, P), dense or factored, times every per-sample training gradient at fm (default
        the fitted state): (R, N). Factors on both sides need no gradient formed at all."""
        fm = fm or self.fm_
        cached = self._cached(fm, cached)
        if cached is None:
            cached = self._factors(fm)
        if isinstance(rows, LinearGrads):
            if isinstance(cached, LinearGrads):
                return rows.gram(cached)
            rows = rows.dense()
        if isinstance(cached, LinearGrads):
            return cached.dot(rows, chunk=self.chunk)
        return dot_chunks(rows, self.train_grads(fm, cached), self.task_.data.n_train)

    def train_norms(self, fm: FlatModel | None = None, cached: TrainCache = None) -> torch.Tensor:
        """Norm of every per-sample training gradient at fm (default the fitted state): (N,)."""
        fm = fm or self.fm_
        cached = self._cached(fm, cached)
        if cached is None:
            cached = self._factors(fm)
        if isinstance(cached, LinearGrads):
            return cached.sq_norms().sqrt()
        return torch.cat([g.norm(dim=1) for _, g in self.train_grads(fm, cached)])

    def _sgd_step(self) -> float:
        """lr * epochs / batch size: how far SGD moved along one sample's gradient in training."""
        s, n = self.task_.schedule, self.task_.data.n_train
        return s.lr * s.epochs / min(s.batch_size or n, n)

    # online -------------------------------------------------------------------------------
    def _scores(self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective) -> Scores:
        obj = get_objective(objective)
        ref = self.task_.outputs(x)
        expansion = self.expansion if self.expansion != "auto" else expansion_for(obj, ref, y)
        products = self._products(x, y, obj, ref, expansion)
        return finish_scores(
            products, self.task_, obj, ref, y, expansion, self.unit, self.name, objective_name(objective)
        )

    def mean_query_products(
        self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective
    ) -> torch.Tensor:
        """Per training sample (N,), the predicted change of the mean objective over the queries (x,
        y) on removing it, in the first-order expansion: one product (or solve) for all queries."""
        if not self.linear_in_queries:
            raise DistdmError(
                f"{self.name}'s scores are not linear in the queries: average its scores instead"
            )
        if not hasattr(self, "task_"):
            raise DistdmError(f"{self.name}: call fit(task) before mean_query_products(...)")
        x, y = check_queries(x, y, self.task_.data)
        obj = get_objective(objective)
        self._mean_queries = True
        try:
            products = self._products(x, y, obj, self.task_.outputs(x), "linear")
        finally:
            self._mean_queries = False
        return products[0]

    def _mean_scores(self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective) -> Scores:
        obj = get_objective(objective)
        ref = self.task_.outputs(x)
        expansion = self.expansion if self.expansion != "auto" else expansion_for(obj, ref, y)
        if not self.linear_in_queries or expansion != "linear":
            return super()._mean_scores(x, y, objective)
        # the mean objective's gradient is the mean of the per-query gradients: one (inverse) product
        products = self.mean_query_products(x, y, obj)[None, :]
        return finish_scores(
            products, self.task_, obj, ref, y, "linear", self.unit, self.name, objective_name(objective)
        )

    def _rows(
        self,
        fm: FlatModel,
        x: torch.Tensor,
        y: torch.Tensor,
        obj: Objective,
        ref: torch.Tensor,
        expansion: str,
    ) -> torch.Tensor:
        rows = query_rows(fm, x, y, obj, ref, expansion, chunk=self.chunk)
        return rows.mean(0, keepdim=True) if self._mean_queries else rows

    def _query_grads(
        self,
        fm: FlatModel,
        x: torch.Tensor,
        y: torch.Tensor,
        obj: Objective,
        ref: torch.Tensor,
        expansion: str,
    ) -> torch.Tensor | LinearGrads:
        """The query rows as factors where the model allows, else dense (`_rows`); the mean row
        (dense) when `mean_query_products` asks for it."""
        if not self._mean_queries:
            f = query_linear_grads(fm, x, y, obj, ref, expansion, chunk=self.chunk)
            if f is not None:
                return f
        return self._rows(fm, x, y, obj, ref, expansion)

    def _products(
        self, x: torch.Tensor, y: torch.Tensor, obj: Objective, ref: torch.Tensor, expansion: str
    ) -> torch.Tensor:
        """(rows, N): grad f(q)^T delta_i ('linear') or J_q delta_i ('outputs')."""
        raise NotImplementedError


@register("grad-dot")
class GradDot(GradientAttributor):
    """Grad-Dot: grad f(query)^T grad L(z_i) at the final model (per-sample, summed into clusters)."""

    linear_in_queries = True

    def _products(
        self, x: torch.Tensor, y: torch.Tensor, obj: Objective, ref: torch.Tensor, expansion: str
    ) -> torch.Tensor:
        d = self.train_products(self._query_grads(self.fm_, x, y, obj, ref, expansion))
        return d if expansion == "linear" else d * self._sgd_step()


@register("grad-cos")
class GradCos(GradientAttributor):
    """Grad-Cos: cosine between grad f(query) and grad L(z_i) at the final model."""

    linear_in_queries = False  # each query row is normalised: the mean query's score is not the mean

    def _prepare(self, task: Task) -> None:
        norms = self.train_norms()
        self.grad_norms_ = norms
        self.mean_norm_ = float(norms.mean())

    def _products(
        self, x: torch.Tensor, y: torch.Tensor, obj: Objective, ref: torch.Tensor, expansion: str
    ) -> torch.Tensor:
        rows = self._query_grads(self.fm_, x, y, obj, ref, expansion)
        # dividing the products by the gradients' norms = the products with unit gradients
        d = self.train_products(rows) / self.grad_norms_.clamp_min(1e-30)
        if expansion == "linear":
            norms = rows.sq_norms().sqrt() if isinstance(rows, LinearGrads) else rows.norm(dim=1)
            d = d / norms.clamp_min(1e-30)[:, None]
        return d if expansion == "linear" else d * self._sgd_step() * self.mean_norm_


@dataclasses.dataclass(frozen=True)
class TracInArgs(GradientArgs):
    """TracIn's settings: the gradient settings and the checkpoints (None: 1..tau)."""

    checkpoints: tuple[int, ...] | None = None

    def validate(self) -> None:
        super().validate()
        cps = self.checkpoints
        if cps is not None and (
            not isinstance(cps, tuple) or any(isinstance(c, bool) or not isinstance(c, int) for c in cps)
        ):
            raise DistdmError(f"checkpoints must be a list of integers or None, got {cps!r}")


@register("tracin")
class TracIn(GradientAttributor):
    """TracIn-CP: sum over stored checkpoints c of lr * grad f(query; theta_c)^T grad L(z_i; theta_c).

    checkpoints: indices into the task's trajectory (default: every checkpoint after the first
    epoch, 1..tau). The objective's reference outputs are the final model's.
    """

    Args = TracInArgs
    linear_in_queries = True

    def _fit(self, task: Task) -> None:
        t = len(task.trajectory)
        cps = list(self.checkpoints) if self.checkpoints is not None else list(range(1, t)) or [0]
        bad = [c for c in cps if not -t <= c < t]
        if bad or not cps:
            raise DistdmError(f"checkpoints {bad or cps} do not exist: the trajectory has {t} (0..{t - 1})")
        self.checkpoints_ = cps
        self.fms_ = [flat_model(task, task.trajectory[c], self.params) for c in cps]
        self.fm_ = self.fms_[-1]
        self.grads_ = self.factors_ = None
        self.cp_grads_: list[TrainCache] = [self._train_cache(fm, len(self.fms_)) for fm in self.fms_]

    def _products(
        self, x: torch.Tensor, y: torch.Tensor, obj: Objective, ref: torch.Tensor, expansion: str
    ) -> torch.Tensor:
        s, n = self.task_.schedule, self.task_.data.n_train
        step = s.lr if expansion == "linear" else s.lr / min(s.batch_size or n, n)
        total = torch.zeros(0)
        for i, fm in enumerate(self.fms_):
            rows = self._query_grads(fm, x, y, obj, ref, expansion)
            d = self.train_products(rows, fm, self.cp_grads_[i]) * step
            total = d if i == 0 else total + d
        return total
