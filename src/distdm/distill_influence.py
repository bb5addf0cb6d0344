"""Influence-target distillation (SPEC.md section 7): synsets whose single SGD step from theta_tau
moves the parameters by the influence function's removal update d_k = (H + lambda I)^-1 g_k / N.

g_k is the summed loss gradient of cluster k's members at theta_tau and H the Hessian of the mean
training loss there. The step of a synset is delta_k = -lr * sum_j grad l(theta_tau; s_j, y_j) with
free, real-valued label vectors y_j, so deleting a set of clusters and taking one step on the union
of their synsets gives the sum of their updates: group effects come for free.

The error is measured in the (H + lambda I) metric by default, ||delta_k - d_k||_A^2 / ||d_k||_A^2,
whose gradient needs one Hessian-vector product per step (never a dense Hessian); 'euclidean'
measures it per layer in parameter space instead.

Two solvers. 'adam' (the `influence-adam` preset) moves inputs and labels of all K clusters at once
by gradient steps. 'closed-form' (the `fast` preset) uses that the step is linear in the label
vectors: for fixed inputs the best labels of cluster k solve the (ipc x C)-sized normal equations
(M_k A M_k^T) y = M_k b_k, M_k's rows being the steps per unit label (lr grad log p_c at each
synthetic input); a few Adam steps on the inputs may be alternated with such solves. A is a
pluggable `Curvature` (apply A v, solve A^-1 v on (n, P) batches): low-rank Arnoldi eigenpairs plus
damping, or EK-FAC (distdm.ekfac). Clusters are independent given A, so they are fitted in chunks
sized to the task's memory_budget_bytes: no K x P tensor unless it fits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from typing import Any, Protocol

import numpy as np
import torch

from .clusters import Clusters
from .config import DistillConfig
from .distill_shared import (
    INFLUENCE_HINT,
    cluster_batches,
    cluster_gradients,
    init_synset,
    synthetic_gradients,
    warn_on_cosines,
)
from .errors import DistdmError
from .hessian import _linear_layout, cg, flat_model, gradient_rows, hvp, iter_per_sample_grads, stochastic_hvp
from .progress import progress_bar
from .store import CURVATURE, ChunkedJob, cached_tensors, digest, run_chunked
from .synset import Synset
from .task import Task

log = logging.getLogger(__name__)
# init 'between': how far from the class's mean towards the cluster's the draws are centred
BETWEEN_PULL = 0.5


def influence_targets(
    task: Task, clusters: Clusters, cfg: DistillConfig, store: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """b_k = g_k / N (K, P) and the removal update d_k = A^-1 b_k (K, P).

    With the low-rank metric and hessian_target 'metric', A = U diag(vals) U^T + lambda I is inverted
    in closed form (no solver); otherwise A = H + lambda I and d comes from batched CG."""
    fm = flat_model(task)
    idx, mask = cluster_batches(clusters, np.random.default_rng(0), 10**9)
    g = cluster_gradients(task, task.final, idx, mask, mean=False)
    b = flatten_batch(g, fm.names) / len(clusters.assignment)
    if cfg.target == "oracle":
        return b, oracle_targets(task, clusters, store)
    if cfg.metric == "hessian" and cfg.hessian_rank is not None and cfg.hessian_target == "metric":
        if cfg.damping <= 0:
            raise DistdmError("the low-rank Hessian metric needs damping > 0")
        vals, vecs = top_eigenpairs(
            task, cfg.hessian_rank, cfg.curvature, cfg.hessian_subsample, cfg.residual_subsample
        )
        proj = b @ vecs.T
        return b, (proj / (vals + cfg.damping)) @ vecs + (b - proj @ vecs) / cfg.damping
    hv = hvp(task, curvature=cfg.curvature)
    return b, cg(hv, b, damping=cfg.damping, max_iter=cfg.cg_iterations, tol=1e-4)


def oracle_targets(task: Task, clusters: Clusters, store: Any = None) -> torch.Tensor:
    """The exact removal updates theta_{-k} - theta_tau (K, P): retrain once without each cluster
    (same theta_0 and shuffle order; cached in the run store `store` if given). An upper bound for
    what any synset can reach, at the price of K retrainings: for studies, not for production."""
    from .attribution.retrain import retrain_masks  # import here: attribution builds on distillation

    a = np.asarray(clusters.assignment)
    keep = torch.as_tensor(a[None, :] != np.arange(clusters.n_clusters)[:, None], dtype=torch.float32)
    states = retrain_masks(task, keep, unit="sample", tag=f"oracle-{clusters.kind}", store=store)
    names = flat_model(task).names
    return flatten_batch({k: states[k] - task.final[k] for k in names}, names)


_EIGEN_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def top_eigenpairs(
    task: Task, rank: int, curvature: str, subsample: int | None = None, residual_subsample: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` eigenpairs of the training-loss curvature at theta_tau (block Krylov, distdm.eigen:
    2 x rank HVPs, on all training data or a fixed random subsample; the basis must fit the task's
    memory_budget_bytes), negative eigenvalues clipped to 0 and reported (eigen.last_solve, a logged
    warning); cached per task so cluster- and class-wise synsets share them."""
    from . import eigen  # here: only this function of the module uses it

    fm = flat_model(task)
    h = hashlib.sha1(fm.theta.detach().cpu().numpy().tobytes())
    h.update(task.data.x_train.detach().cpu().numpy().tobytes())
    key = (h.hexdigest(), rank, curvature, subsample, residual_subsample, task.memory_budget_bytes)
    if key not in _EIGEN_CACHE:
        _EIGEN_CACHE.clear()  # one task at a time: the basis is rank x P floats; free it before solving
        hv = hvp(task, curvature=curvature, subsample=subsample, residual_subsample=residual_subsample)
        blocks = getattr(hv, "prefers_blocks", False)  # stored Jacobians: a block costs about one vector
        block = eigen.DEFAULT_BLOCK if blocks else eigen.default_block(task.model, fm.theta.device)
        pairs = eigen.block_krylov(
            hv, fm.n_params, rank, block=block, krylov_dim=2 * rank, dtype=fm.theta.dtype,
            device=fm.theta.device, batched=True if blocks else None,
            memory_budget_bytes=task.memory_budget_bytes,
        )  # fmt: skip
        eigen.note_solve(pairs, curvature)
        _EIGEN_CACHE[key] = (pairs.values.clamp_min(0.0), pairs.vectors)
    return _EIGEN_CACHE[key]


BASIS_SHARE = 0.75  # of a task's memory budget, the most the eigenpairs' Krylov basis may take
MIN_RANK = 10  # below this the curvature part carries too little: refuse rather than shrink further


def rank_within_budget(rank: int, n_params: int, block: int, dtype: torch.dtype, budget: int | None) -> int:
    """`rank`, or the largest rank whose Krylov basis (2 x rank vectors, distdm.eigen) fits
    BASIS_SHARE of the memory budget, with a logged warning; never below MIN_RANK (the solver then
    refuses, naming the memory it needs)."""
    from . import eigen

    if budget is None:
        return rank

    def need(r: int) -> int:
        return eigen.block_krylov_bytes(n_params, r, block, 2 * r, dtype)

    if need(rank) <= BASIS_SHARE * budget:
        return rank
    fits = [r for r in range(MIN_RANK, rank) if need(r) <= BASIS_SHARE * budget]
    if not fits:
        return rank
    log.warning(
        "the top-%d curvature eigenpairs need %.0f MiB, over %.0f%% of the memory budget (%.0f MiB): "
        "using the top %d (raise memory_budget_bytes to keep %d)",
        rank, need(rank) / 2**20, 100 * BASIS_SHARE, budget / 2**20, fits[-1], rank,
    )  # fmt: skip
    return fits[-1]


def metric_hvp(task: Task, cfg: DistillConfig) -> Any:
    """v -> H v for the matching metric: a low-rank eigen-approximation (hessian_rank), the full
    data (hessian_batch None) or a fresh random batch per call (unbiased, much cheaper)."""
    fm = flat_model(task)
    if cfg.hessian_rank is not None:
        vals, vecs = top_eigenpairs(
            task, cfg.hessian_rank, cfg.curvature, cfg.hessian_subsample, cfg.residual_subsample
        )
        return lambda v: ((v @ vecs.T) * vals) @ vecs
    if cfg.hessian_batch is None:
        return hvp(task, curvature=cfg.curvature)
    x, y = task.data.x_train, task.data.y_train
    return stochastic_hvp(
        fm, x, y, task.loss, batch_size=cfg.hessian_batch, seed=cfg.seed, curvature=cfg.curvature
    )


def flatten_batch(g: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """(K, P) from a dict of (K, *shape) tensors, in the given parameter order."""
    return torch.cat([g[k].reshape(g[k].shape[0], -1) for k in names], dim=1)


def _layer_slices(task: Task) -> dict[str, slice]:
    fm = flat_model(task)
    out, i = {}, 0
    for k in fm.names:
        n = fm.like[k].numel()
        out[k] = slice(i, i + n)
        i += n
    return out


def distill_influence(
    task: Task,
    cfg: DistillConfig,
    *,
    clusters: Clusters | None = None,
    lr: float | None = None,
    progress: bool = False,
    store: Any = None,
    journal: str | None = None,
) -> Synset:
    """Distil synsets towards the influence removal update; diagnostics in `synset.info`. `store`:
    where the oracle target's retrains are cached; `journal`: where the closed-form solver saves
    its finished chunks of clusters in that store (see distill_closed_form)."""
    if cfg.solver == "closed-form":
        return distill_closed_form(
            task, cfg, clusters=clusters, lr=lr, progress=progress, store=store, journal=journal
        )
    clusters = clusters or task.clusters
    lr = lr or task.schedule.lr
    t0 = time.perf_counter()
    b, d = influence_targets(task, clusters, cfg, store)
    hv = metric_hvp(task, cfg)
    t_target = time.perf_counter() - t0
    names = flat_model(task).names
    slices = _layer_slices(task)
    damping = cfg.damping

    def a_metric(v: torch.Tensor) -> torch.Tensor:
        return hv(v) + damping * v

    a_d = a_metric(d)
    d_norm_a = (d * a_d).sum(-1)  # ||d_k||_A^2
    # clusters whose members are fitted perfectly have d ~ 0: floor their norm so that their
    # relative error cannot swamp the others
    d_norm_a = d_norm_a.clamp_min(1e-3 * float(d_norm_a.median().clamp_min(1e-30)))
    # 'solve': fit the CG solution d in the metric; 'metric': fit the metric's own minimiser A^-1 b
    rhs = a_d if cfg.hessian_target == "solve" or cfg.target == "oracle" else b
    d_layer_norm = {k: (d[:, s] ** 2).sum(-1).clamp_min(1e-30) for k, s in slices.items()}

    sx, onehot, cl = init_synset(task, clusters, cfg.ipc, cfg.seed)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = synthetic_gradients(task, task.final, x, y, cfg.ipc, mean=False)
        return -lr * flatten_batch(g, names)

    # closed-form label scale per cluster at the initial inputs (the step is linear in the labels)
    with torch.no_grad():
        u = step(sx, onehot)
        if cfg.metric == "hessian":
            alpha = (u * rhs).sum(-1) / (u * a_metric(u)).sum(-1).clamp_min(1e-30)
        else:
            alpha = (u * d).sum(-1) / (u * u).sum(-1).clamp_min(1e-30)
    alpha_rep = alpha.repeat_interleave(cfg.ipc)[:, None]
    z = onehot.clone().requires_grad_(True)
    sx = sx.clone().requires_grad_(True)
    params = [{"params": [sx], "lr": cfg.lr_img}]
    if cfg.soft_labels:
        params.append({"params": [z], "lr": cfg.lr_label})
    opt = torch.optim.Adam(params)

    def errors(delta: torch.Tensor, a_delta: torch.Tensor | None) -> torch.Tensor:
        """Relative error per cluster (K,) in the chosen metric."""
        if cfg.metric == "hessian":
            diff_a = (delta * a_delta).sum(-1) - 2 * (delta * a_d).sum(-1) + d_norm_a
            return diff_a / d_norm_a
        return sum(((delta[:, s] - d[:, s]) ** 2).sum(-1) / d_layer_norm[k] for k, s in slices.items()) / len(
            slices
        )

    history: list[float] = []
    with progress_bar(cfg.iterations, "distilling (influence target)", progress) as bar:
        for _ in range(cfg.iterations):
            delta = step(sx, alpha_rep * z)
            if cfg.metric == "hessian":
                a_delta = a_metric(delta.detach())
                # gradient of ||delta - target||_A^2 is 2 (A delta - rhs) . d delta: one HVP per step
                surrogate = (2 * (delta * (a_delta - rhs)).sum(-1) / d_norm_a).sum()
                value = errors(delta.detach(), a_delta)
            else:
                surrogate = errors(delta, None).sum()
                value = errors(delta.detach(), None)
            opt.zero_grad(set_to_none=True)
            surrogate.backward()
            opt.step()
            history.append(float(value.mean()))
            bar.advance()
    with torch.no_grad():
        y = (alpha_rep * z).detach()
        delta = step(sx.detach(), y)
        final_err = errors(delta, a_metric(delta) if cfg.metric == "hessian" else None)
    cosines = {
        k: float(
            (
                (delta[:, s] * d[:, s]).sum(-1) / (delta[:, s].norm(dim=-1) * d[:, s].norm(dim=-1) + 1e-30)
            ).mean()
        )
        for k, s in slices.items()
    }
    if not np.isfinite(history[-1]):
        raise DistdmError("influence-target distillation diverged: lower lr_img / lr_label")
    warn_on_cosines(cosines, INFLUENCE_HINT)
    info: dict[str, Any] = {
        "config": cfg.to_dict(),
        "loss_history": history[:: max(1, len(history) // 200)],
        "loss_first": history[0],
        "loss_last": float(final_err.mean()),
        "layer_cosine": cosines,
        "relative_error_median": float(final_err.median()),
        "seconds_target": t_target,
        "seconds": time.perf_counter() - t0,
    }
    return Synset(sx.detach(), y, cl, torch.ones(clusters.n_clusters, device=sx.device), lr, 1, info)


# ---------------------------------------------------------------------------------------------
# closed-form distillation: labels by least squares for fixed inputs, clusters in chunks


def curvature_share(curv: LowRankCurvature, b: torch.Tensor) -> torch.Tensor:
    """Per cluster, the share of the target's squared norm ||A^-1 b||^2 that comes from the top-r
    eigenpairs, U diag(1/(vals + damping)) U^T b; the rest, (I - U U^T) b / damping, is a scaled
    gradient (issue 15: near 0 the target degenerates to Grad-Dot)."""
    proj = b @ curv.vecs.T
    low = ((proj / (curv.vals + curv.damping)) ** 2).sum(-1)
    # the complement formed explicitly: ||b||^2 - ||proj||^2 cancels in float32, and / damping^2
    # magnifies the rounding past the basis part when the damping is small
    rest = ((b - proj @ curv.vecs) ** 2).sum(-1) / curv.damping**2
    return low / (low + rest).clamp_min(1e-30)


SHARE_TARGET = 0.1  # damping 'auto': a tenth of the median target's squared norm from the eigenpairs
SHARE_FLOOR = 0.01  # damping 'auto': the smallest damping it may choose (the fixed default before it)


def share_damping(vals: torch.Tensor, proj: torch.Tensor, rest: torch.Tensor) -> float:
    """The damping of DDM's target chosen from the curvature itself: the smallest lambda >=
    SHARE_FLOOR at which the median cluster takes SHARE_TARGET (a tenth: on the robustness suite
    0.05-0.3 all lifted the settings where 0.01 gave under 4%; 0.5 cost 7% within class on
    digits-mlp-k100, where 0.01 gives 18%) of its target's squared norm from the
    top eigenpairs (vals (r,), proj = U^T b_k (K, r), rest = ||(I - U U^T) b_k||^2 (K,)). Below it
    the target is mostly the complement (I - U U^T) b / lambda, a scaled gradient (issue 15). The
    share grows with lambda, so bisection finds it; where even the largest eigenvalue does not reach
    it, that eigenvalue is the answer (beyond it the whole target tends to a scaled gradient)."""

    def share(delta: float) -> float:
        low = ((proj / (vals + delta)) ** 2).sum(-1)
        return float((low / (low + rest / delta**2).clamp_min(1e-30)).median())

    lo, hi = SHARE_FLOOR, max(float(vals.max()), SHARE_FLOOR)
    if share(lo) >= SHARE_TARGET or share(hi) < SHARE_TARGET:
        return lo if share(lo) >= SHARE_TARGET else hi
    for _ in range(40):  # in log space: lambda to about 1e-6 relative
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if share(mid) >= SHARE_TARGET else (mid, hi)
    return hi


POOR_FIT = 0.5  # median relative error above which the synsets reproduce their clusters' effect poorly


def fit_hint(cfg: DistillConfig, share: float | None) -> str:
    """What to change when the fit is poor, naming only settings that differ from the ones in use."""
    tips = [f"more samples per cluster (ipc={2 * cfg.ipc}, now {cfg.ipc})"]
    if cfg.input_steps < 50:
        tips.append(f"more input steps (preset 'thorough', or input_steps=50, now {cfg.input_steps})")
    elif cfg.input_steps < 100:
        tips.append(f"more input steps (input_steps={2 * cfg.input_steps}, now {cfg.input_steps})")
    if share is not None and share < SHARE_TARGET:
        now = f"{cfg.damping:g}" if isinstance(cfg.damping, (int, float)) else repr(cfg.damping)
        tips.append(
            f"a larger damping (now {now}: only {share:.1%} of the target comes from the "
            "curvature, the rest is a scaled gradient)"
        )
    if cfg.curvature == "hessian":
        tips.append("curvature='ggn' (positive semi-definite)")
    elif cfg.hessian_rank is not None:
        tips.append(f"hessian_rank={2 * cfg.hessian_rank} (now {cfg.hessian_rank})")
    return "try " + "; or ".join(tips)


def warn_on_poor_fit(rel_err: float, cfg: DistillConfig, share: float | None) -> None:
    """Log, in the user's terms, that the synsets emulate removal poorly, and what to change."""
    if rel_err > POOR_FIT:
        log.warning(
            "DDM's synsets reproduce the effect of removing their cluster poorly (median relative error "
            "%.2f; 0 is exact, 1 no better than no step): its attributions will be unreliable; %s",
            rel_err,
            fit_hint(cfg, share),
        )


class Curvature(Protocol):
    """A symmetric positive-definite A on flat parameters, for the influence target d = A^-1 b and
    the matching metric ||v||_A^2; both methods take a batch (n, P) and return (n, P)."""

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """A v."""
        ...

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """A^-1 v."""
        ...

    @property
    def nbytes(self) -> int:
        """Memory the curvature holds."""
        ...


@dataclasses.dataclass
class LowRankCurvature:
    """A = U diag(vals) U^T + damping I (top eigenpairs of the Hessian or GGN, plus damping): both
    products in closed form, rank x P floats."""

    vals: torch.Tensor  # (r,) >= 0
    vecs: torch.Tensor  # (r, P), orthonormal rows
    damping: float

    def __post_init__(self) -> None:
        if not self.damping > 0:
            raise DistdmError(f"the low-rank curvature needs damping > 0, got {self.damping!r}")

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """A v."""
        if v.ndim == 2:  # one fused pass over the (k, P) result instead of three
            return torch.addmm(v, (v @ self.vecs.T) * self.vals, self.vecs, beta=self.damping)
        return ((v @ self.vecs.T) * self.vals) @ self.vecs + self.damping * v

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """A^-1 v."""
        proj = v @ self.vecs.T
        return (proj / (self.vals + self.damping)) @ self.vecs + (v - proj @ self.vecs) / self.damping

    def gram(self, m: torch.Tensor) -> torch.Tensor:
        """M A M^T (k, c, c) for a batch M (k, c, P), without forming A M."""
        mu = m @ self.vecs.T  # (k, c, r)
        return self.damping * torch.bmm(m, m.transpose(1, 2)) + torch.bmm(mu * self.vals, mu.transpose(1, 2))

    @property
    def nbytes(self) -> int:
        """Memory of the basis."""
        return self.vecs.numel() * self.vecs.element_size()


@dataclasses.dataclass
class ScaledIdentity:
    """A = scale I: the Euclidean metric (as a target curvature, d = b / scale)."""

    scale: float = 1.0

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """A v."""
        return self.scale * v

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """A^-1 v."""
        return v / self.scale

    @property
    def nbytes(self) -> int:
        """Nothing is held."""
        return 0


def make_curvature(task: Task, cfg: DistillConfig) -> Curvature:
    """The curvature of the influence target: EK-FAC (curvature 'ekfac') or the top `hessian_rank`
    eigenpairs of the Hessian / GGN (block Krylov, on `hessian_subsample` samples), plus damping;
    where their basis would take more than BASIS_SHARE of the task's memory budget, fewer of them
    (`rank_within_budget`, with a warning)."""
    if cfg.curvature == "ekfac":
        return _ekfac_curvature(task, cfg)
    if cfg.hessian_rank is None:
        raise DistdmError(
            "the closed-form solver needs a curvature with a cheap inverse: set hessian_rank (low-rank "
            "Arnoldi) or curvature='ekfac'"
        )
    from . import eigen

    fm = flat_model(task)
    rank = rank_within_budget(
        cfg.hessian_rank, fm.n_params, eigen.DEFAULT_BLOCK, fm.theta.dtype, task.memory_budget_bytes
    )
    vals, vecs = top_eigenpairs(task, rank, cfg.curvature, cfg.hessian_subsample, cfg.residual_subsample)
    return LowRankCurvature(vals, vecs, _numeric_damping(cfg))


def _numeric_damping(cfg: DistillConfig) -> float:
    """cfg's damping, or for 'auto' the floor it starts from (distill_closed_form then chooses it)."""
    return SHARE_FLOOR if cfg.damping == "auto" else float(cfg.damping)


@dataclasses.dataclass
class EKFACCurvature:
    """A = the EK-FAC curvature (distdm.ekfac) plus its damping: per-layer Kronecker eigenbases."""

    ekfac: Any  # a fitted distdm.ekfac.EKFAC

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """A v."""
        return self.ekfac.mvp(v, damped=True)

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """A^-1 v."""
        return self.ekfac.ihvp(v)

    @property
    def nbytes(self) -> int:
        """Memory of the factors."""
        tensors = [t for layer in self.ekfac.layers for t in (layer.q_s, layer.q_a, layer.lam)]
        tensors += list(self.ekfac.fallback.values())
        return sum(t.numel() * t.element_size() for t in tensors)


def _ekfac_curvature(task: Task, cfg: DistillConfig) -> Curvature:
    from .ekfac import fit_ekfac  # imported here: the module is optional for the other curvatures

    return EKFACCurvature(fit_ekfac(task, damping=cfg.damping, samples=cfg.hessian_subsample, seed=cfg.seed))


DISTILL_MEMORY_BUDGET = 2**30  # bytes of working memory for the distillation, without a task budget


def factored_cluster_bytes(n_params: int) -> int:
    """Working memory of one cluster's fit when M is never formed (`factored_normal_equations`): its
    target, right-hand side and step and the input steps' (K, P) temporaries, about 16 parameter-sized
    vectors."""
    return 4 * n_params * 16


def cluster_bytes(n_params: int, ipc: int, n_classes: int) -> int:
    """Working memory of one cluster's closed-form fit: its ipc x C label columns of P floats and
    their share of the per-sample-gradient and metric work (measured 1.5-1.7 copies on MLPs of 10k
    and 100k parameters: 2 here), plus a few parameter-sized vectors."""
    return 4 * n_params * (2 * ipc * n_classes + 8)


def clusters_per_chunk(
    task: Task,
    n_params: int,
    ipc: int,
    n_classes: int,
    reserved: int = 0,
    budget: int | None = None,
    factored: bool = False,
) -> int:
    """Clusters fitted at once so that their working memory plus `reserved` bytes (the curvature)
    stays within `budget` (default the task's memory_budget_bytes, else DISTILL_MEMORY_BUDGET)."""
    budget = task.memory_budget_bytes if budget is None else budget
    budget = DISTILL_MEMORY_BUDGET if budget is None else budget
    per = factored_cluster_bytes(n_params) if factored else cluster_bytes(n_params, ipc, n_classes)
    n = (budget - reserved) // per
    if n < 1:
        log.warning(
            "distillation: one cluster needs %.0f MB beside the curvature's %.0f MB, over the budget of "
            "%.0f MB; fitting one cluster at a time",
            per / 1e6,
            reserved / 1e6,
            budget / 1e6,
        )
    return max(1, int(n))


def label_columns(fm: Any, x: torch.Tensor, lr: float, chunk: int = 256) -> torch.Tensor:
    """The step per unit label (n, C, P): one SGD step of size lr on the soft-label loss
    -sum_c y_c log softmax(f(x))_c moves theta by lr sum_c y_c grad log p_c (linear in y)."""
    n, n_classes = x.shape[0], int(fm.outputs(fm.theta, x[:1]).shape[-1])
    # one per-sample gradient per (sample, class) pair, with the hard label c: far cheaper than a
    # Jacobian by jacrev (measured 0.5 vs 11 s for 400 digits samples); filled in place
    out = torch.empty(n * n_classes, fm.n_params, dtype=fm.theta.dtype, device=fm.theta.device)
    xs = x.repeat_interleave(n_classes, 0)
    cs = torch.arange(n_classes, device=x.device).repeat(n)
    for sl, g in iter_per_sample_grads(fm, xs, cs, "ce", chunk=chunk):
        out[sl] = g
    return out.mul_(-lr).reshape(n, n_classes, fm.n_params)


def factored_normal_equations(
    fm: Any, x: torch.Tensor, lr: float, metric: Curvature, bd: torch.Tensor, *, chunk: int = 128
) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
    """The normal matrix M B M^T (k, c, c) and right-hand side M B d (k, c) of `normal_equations`
    without forming M, for models of nn.Linear layers and a low-rank or scaled-identity metric B; None
    otherwise (use `label_columns` and `normal_equations`). Each row of M is lr grad log p_c(x_j) =
    lr D_jc a_j^T per layer, so M M^T = (D D'^T)(a a'^T + 1) and M bd = D^T Bd_k a_j per cluster, and
    M U^T needs r x P x n operations (U_i a_j) instead of n C r P. Third value: the factors, for
    `factored_steps`."""
    from .hessian import linear_grads

    if not isinstance(metric, LowRankCurvature | ScaledIdentity):
        return None
    jac = linear_grads(fm, x, None, chunk=chunk)  # d: (C, n, d_out) per layer, the logits' Jacobian
    if jac is None:
        return None
    n, kc = x.shape[0], bd.shape[0]
    ipc = n // kc
    with torch.no_grad():
        p = torch.softmax(fm.outputs(fm.theta, x), -1)  # (n, C)
        # grad log p_c = grad z_c - sum_o p_o grad z_o: the same linear map of every layer's D
        ds = [lr * (d - torch.einsum("no,onk->nk", p, d).unsqueeze(0)) for d in jac.d]
        n_classes = p.shape[1]
        kinds: dict[int, dict[str, tuple[int, int]]] = {}
        for layer, kind, off, size in jac.layout.parts:
            kinds.setdefault(layer, {})[kind] = (off, size)
        cc = ipc * n_classes
        mm = torch.zeros(kc, cc, cc, dtype=p.dtype, device=p.device)
        rhs = torch.zeros(kc, cc, dtype=p.dtype, device=p.device)
        low = metric if isinstance(metric, LowRankCurvature) else None
        mu = (
            torch.zeros(n_classes, n, low.vecs.shape[0], dtype=p.dtype, device=p.device)
            if low is not None
            else None
        )
        for layer, parts in kinds.items():
            d = ds[layer]  # (C, n, d_out)
            a = jac.a[layer]  # (n, d_in)
            d_out = d.shape[-1]
            dk = d.permute(1, 0, 2).reshape(kc, cc, d_out)  # rows sample-major: j * C + c
            dd = torch.bmm(dk, dk.transpose(1, 2))
            aa = torch.zeros(kc, ipc, ipc, dtype=p.dtype, device=p.device)
            if "weight" in parts:
                off, size = parts["weight"]
                ak = a.reshape(kc, ipc, -1)
                aa = aa + torch.bmm(ak, ak.transpose(1, 2))
                w = bd[:, off : off + size].reshape(kc, d_out, -1)
                v = torch.bmm(w, ak.transpose(1, 2))  # (kc, d_out, ipc): Bd_k a_j
                rhs += torch.einsum("kjco,koj->kjc", dk.reshape(kc, ipc, n_classes, d_out), v).reshape(kc, cc)
                if low is not None:
                    u = low.vecs[:, off : off + size].reshape(-1, d_out, size // d_out)
                    for sl in _slices(n, chunk):
                        t = torch.einsum("roi,ni->rno", u, a[sl])  # U_i a_j
                        mu[:, sl] += torch.einsum("cno,rno->cnr", d[:, sl], t)
            if "bias" in parts:
                off, size = parts["bias"]
                aa = aa + 1.0
                rhs += torch.einsum("kco,ko->kc", dk, bd[:, off : off + size])
                if low is not None:
                    mu += torch.einsum("cno,ro->cnr", d, low.vecs[:, off : off + size])
            mm += dd * aa.repeat_interleave(n_classes, 1).repeat_interleave(n_classes, 2)
        if low is None:
            return metric.scale * mm, rhs, (ds, jac)
        muk = mu.permute(1, 0, 2).reshape(kc, cc, -1)
        g = low.damping * mm + torch.bmm(muk * low.vals, muk.transpose(1, 2))
    return g, rhs, (ds, jac)


def factored_steps(factors: Any, y: torch.Tensor, kc: int, n_params: int) -> torch.Tensor:
    """The steps (k, P) of labels y (n, C) from `factored_normal_equations`' factors: per layer
    delta_k = sum_j (sum_c y_jc D_jc) a_j^T, without the label columns."""
    ds, jac = factors
    n = y.shape[0]
    ipc = n // kc
    out = torch.empty(kc, n_params, dtype=y.dtype)
    for layer, kind, off, size in jac.layout.parts:
        e = torch.einsum("nc,cno->no", y, ds[layer]).reshape(kc, ipc, -1)  # (kc, ipc, d_out)
        if kind == "bias":
            out[:, off : off + size] = e.sum(1)
        else:
            a = jac.a[layer].reshape(kc, ipc, -1)
            out[:, off : off + size] = torch.bmm(e.transpose(1, 2), a).reshape(kc, size)
    return out


def _slices(n: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def normal_equations(
    m: torch.Tensor, metric: Curvature, bd: torch.Tensor, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normal matrix M B M^T (k, c, c) and right-hand side M B d (k, c) of each cluster's label
    problem, from its steps per unit label M (k, c, P) and B d (k, P); a metric with a `gram` method
    (low rank: half the work of B M) computes the matrix itself, any other is applied to at most
    `rows` label columns at a time (default all: B M is as large as M)."""
    kc, c, p = m.shape
    gram = getattr(metric, "gram", None)
    if gram is not None:
        g = gram(m)
    else:
        rows = kc * c if rows is None else max(1, rows)
        g = m.new_empty(kc, c, c)
        per = max(1, rows // c)  # whole clusters per product where they fit
        for a in range(0, kc, per):
            part = m[a : a + per]
            for r in range(0, c, rows):  # and a cluster's columns in parts where they do not
                bm = metric.apply(part[:, r : r + rows].reshape(-1, p)).reshape(len(part), -1, p)
                g[a : a + per, r : r + rows] = torch.bmm(bm, part.transpose(1, 2))
    return g, torch.bmm(m, bd.unsqueeze(-1)).squeeze(-1)


def solve_labels(g: torch.Tensor, r: torch.Tensor, ridge: float = 1e-5) -> torch.Tensor:
    """Labels y (k, c) minimising ||M_k^T y - d_k||_B^2 per cluster k from the normal equations
    (M B M^T) y = M B d (`normal_equations`), solved in float64."""
    g = g.double()
    g = 0.5 * (g + g.transpose(1, 2))
    # the step cannot see y_j + t p_j (softmax gradients weighted by p sum to zero), so the normal
    # matrix is singular there: a ridge far below its scale picks the smallest such labels
    scale = g.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
    eye = torch.eye(g.shape[1], dtype=g.dtype, device=g.device)
    return torch.linalg.solve(g + ridge * scale[:, None, None] * eye, r.double()).to(r.dtype)


def init_inputs(
    task: Task, clusters: Clusters, ipc: int, seed: int, how: str = "members"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Initial synthetic inputs, one-hot labels and cluster ids. how: 'members' (random members of each
    cluster), 'means' (means of ipc random disjoint groups of its members; members where it has fewer),
    or inputs that start from no member: 'cluster-mean' (the cluster's mean plus noise of 0.1 of its
    per-feature spread), 'gaussian' (draws from a diagonal Gaussian fitted to the cluster), 'between'
    (the class's Gaussian, centred halfway between the class's mean and the cluster's) or 'noise'
    (draws from the class's Gaussian; also for clusters of fewer than 5 members, whose mean is nearly
    a copy of them). Draws are clipped to the training inputs' range."""
    x, onehot, cl = init_synset(task, clusters, ipc, seed)
    if how == "members":
        return x, onehot, cl
    rng = np.random.default_rng(seed)
    xt = task.data.x_train
    if how == "means":
        for k in range(clusters.n_clusters):
            m = clusters.members(k)
            if len(m) >= ipc:
                groups = np.array_split(rng.permutation(m), ipc)
                x[k * ipc : (k + 1) * ipc] = torch.stack([xt[torch.as_tensor(g)].mean(0) for g in groups])
        return x, onehot, cl
    # no member is copied: only a mean and a spread per feature (of the cluster, or of its class) enter
    gen = torch.Generator().manual_seed(seed)
    y_all = np.asarray(task.data.y_train.cpu())
    for k in range(clusters.n_clusters):
        members = clusters.members(k)
        # the mean of a very small cluster is nearly a copy of its members: those use their class's
        cls = xt[torch.as_tensor(np.flatnonzero(y_all == clusters.cluster_class[k]))]
        own = xt[torch.as_tensor(members)]
        if how == "noise" or len(members) < 5:
            mean, spread = cls.mean(0), cls.std(0, unbiased=False)
        elif how == "between":
            mean, spread = torch.lerp(cls.mean(0), own.mean(0), BETWEEN_PULL), cls.std(0, unbiased=False)
        else:
            mean, spread = own.mean(0), own.std(0, unbiased=False)
        factor = 0.1 if how == "cluster-mean" else 1.0
        eps = torch.randn((ipc, *mean.shape), generator=gen).to(mean.device)
        x[k * ipc : (k + 1) * ipc] = mean + factor * spread * eps
    return x.clamp(float(xt.min()), float(xt.max())), onehot, cl


def _refine_inputs(
    task: Task,
    x: torch.Tensor,
    y: torch.Tensor,
    bd: torch.Tensor,
    d_norm: torch.Tensor,
    metric: Curvature,
    cfg: DistillConfig,
    lr: float,
    steps: int,
) -> torch.Tensor:
    """`steps` Adam steps on the inputs for fixed labels, on sum_k ||delta_k - d_k||_B^2 / ||d_k||_B^2
    (its gradient needs one metric product per step)."""
    names = flat_model(task).names
    x = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr_img)
    xt = task.data.x_train
    box = (float(xt.min()), float(xt.max())) if cfg.input_box else None
    for _ in range(steps):
        delta = -lr * flatten_batch(synthetic_gradients(task, task.final, x, y, cfg.ipc, mean=False), names)
        with torch.no_grad():  # the objective's gradient in delta, 2 (B delta - B d) / ||d||_B^2
            g_delta = metric.apply(delta.detach()).sub_(bd).mul_((2 / d_norm)[:, None])
        opt.zero_grad(set_to_none=True)
        delta.backward(g_delta)  # the chain rule into the inputs, without a surrogate's own graph
        opt.step()
        if box is not None:  # projected steps: the inputs stay within the training data's range
            with torch.no_grad():
                x.clamp_(*box)
    return x.detach()


def _fit_chunk(
    task: Task,
    x: torch.Tensor,
    d: torch.Tensor,
    bd: torch.Tensor,
    metric: Curvature,
    cfg: DistillConfig,
    lr: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Inputs, labels and steps of a chunk of clusters; squared metric errors after every stage."""
    fm = flat_model(task)
    kc, p = d.shape
    d_norm = (d * bd).sum(-1).clamp_min(1e-30)

    def sq_error(delta: torch.Tensor) -> torch.Tensor:
        diff = delta - d
        return (diff * metric.apply(diff)).sum(-1)

    def labels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cfg.label_solver == "auto":
            fac = factored_normal_equations(fm, x, lr, metric, bd)
            if fac is not None:
                y = solve_labels(fac[0], fac[1]).reshape(x.shape[0], -1)
                return y, factored_steps(fac[2], y, kc, p)
        budget = task.memory_budget_bytes or DISTILL_MEMORY_BUDGET
        m = label_columns(fm, x, lr, chunk=gradient_rows(p, budget)).reshape(kc, -1, p)
        y = solve_labels(*normal_equations(m, metric, bd, rows=gradient_rows(p, budget, most=4096)))
        return y.reshape(x.shape[0], -1), torch.bmm(y.unsqueeze(1), m).squeeze(1)

    y, delta = labels(x)
    errors = [sq_error(delta)]
    solves_left = cfg.label_solves - 1
    blocks = [len(b) for b in np.array_split(np.arange(cfg.input_steps), max(1, solves_left))]
    for n_steps in blocks:
        if n_steps:
            x = _refine_inputs(task, x, y, bd, d_norm, metric, cfg, lr, n_steps)
            if solves_left == 0:  # labels stay: the step at the refined inputs
                g = synthetic_gradients(task, task.final, x, y, cfg.ipc, mean=False)
                delta = -lr * flatten_batch(g, fm.names).detach()
        if solves_left > 0:
            y, delta = labels(x)
            solves_left -= 1
        if n_steps or len(errors) < cfg.label_solves:
            errors.append(sq_error(delta))
    return x, y, delta, errors


def distill_closed_form(
    task: Task,
    cfg: DistillConfig,
    *,
    clusters: Clusters | None = None,
    lr: float | None = None,
    progress: bool = False,
    curvature: Curvature | None = None,
    store: Any = None,
    journal: str | None = None,
) -> Synset:
    """Synsets whose one step from theta_tau best matches the influence removal update d_k = A^-1 b_k
    in the metric: for fixed inputs the step is linear in the label vectors, so the best labels solve
    an (ipc x C)-sized least-squares problem per cluster; `input_steps` Adam steps on the inputs may be
    alternated with `label_solves` such solves. Clusters are fitted independently, in chunks that fit
    the task's memory budget (the result does not depend on the chunking). `curvature`: a prebuilt A;
    `store`: a run's RunStore for the oracle target's retrains; with `journal` (a job name in that
    store) every finished chunk of clusters is saved there, so an interrupted distillation resumes
    from the chunks it finished (the low-rank curvature is saved there too; EK-FAC is fitted again)."""
    clusters = clusters or task.clusters
    lr = lr or task.schedule.lr
    jstore = store if journal is not None else None  # where the journal goes, if anywhere
    journal = journal or "distill"
    identity = {"settings": cfg.to_dict(), "lr": lr, "clusters": digest(clusters.assignment),
                "kind": clusters.kind}  # fmt: skip
    t0 = time.perf_counter()
    if curvature is not None:
        curv = curvature
    elif jstore is not None and cfg.curvature != "ekfac":
        curv = _journaled_curvature(task, cfg, jstore, f"{journal}/curvature", identity)
    else:
        curv = make_curvature(task, cfg)
    metric: Curvature = curv if cfg.metric == "hessian" else ScaledIdentity(1.0)
    t_curv = time.perf_counter() - t0
    if jstore is not None and curvature is None and cfg.curvature != "ekfac":  # what computing it cost
        t_curv = jstore.stage_info(f"{journal}/curvature").get("seconds", t_curv)
    fm = flat_model(task)
    names, slices = fm.names, _layer_slices(task)
    k_total, n = clusters.n_clusters, len(clusters.assignment)
    sx, onehot, cl = init_inputs(task, clusters, cfg.ipc, cfg.seed, cfg.init)
    idx, mask = cluster_batches(clusters, np.random.default_rng(0), 10**9)
    oracle = oracle_targets(task, clusters, store) if cfg.target == "oracle" else None  # study tool: K x P
    if cfg.input_box:
        xt = task.data.x_train
        sx = sx.clamp(float(xt.min()), float(xt.max()))
    factored = (
        cfg.label_solver == "auto"
        and isinstance(metric, LowRankCurvature | ScaledIdentity)
        and _linear_layout(fm) is not None
    )
    size = clusters_per_chunk(
        task, fm.n_params, cfg.ipc, onehot.shape[1], reserved=curv.nbytes, factored=factored
    )
    damping_choice = None
    if cfg.damping == "auto" and isinstance(curv, LowRankCurvature):
        # a pass over the clusters' gradients first: each keeps r + 1 numbers for the rule
        proj, rest = _target_moments(task, curv, idx, mask, n, size)
        chosen = share_damping(curv.vals, proj, rest)
        curv = LowRankCurvature(curv.vals, curv.vecs, chosen)
        metric = curv if cfg.metric == "hessian" else metric
        damping_choice = f"median curvature share {SHARE_TARGET:g} (floor {SHARE_FLOOR:g})"
        log.info("DDM target damping %.4g: half of the median target comes from the curvature", chosen)
    if jstore is not None:
        size = _journal_chunk_size(jstore, f"{journal}/chunks", identity, k_total, size)

    def fit(chunks: list[slice], executor: Any) -> dict[str, torch.Tensor]:
        parts = [fit_clusters(sl) for sl in chunks]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def fit_clusters(sl: slice) -> dict[str, torch.Tensor]:
        """Every result of one chunk of clusters, a row per cluster (what the journal stores)."""
        t = time.perf_counter()
        share = torch.full((sl.stop - sl.start,), float("nan"))
        if oracle is None:
            b = flatten_batch(cluster_gradients(task, task.final, idx[sl], mask[sl], mean=False), names) / n
            d = curv.solve(b)
            if isinstance(curv, LowRankCurvature):
                share = curvature_share(curv, b)
        else:
            d = oracle[sl]
            b = curv.apply(d)
        bd = b if metric is curv else metric.apply(d)
        t_target = time.perf_counter() - t
        t = time.perf_counter()
        rows = slice(sl.start * cfg.ipc, sl.stop * cfg.ipc)
        x, y, delta, errs = _fit_chunk(task, sx[rows], d, bd, metric, cfg, lr)
        t_fit = time.perf_counter() - t
        cos = []
        for s in slices.values():
            num = (delta[:, s] * d[:, s]).sum(-1)
            cos.append(num / (delta[:, s].norm(dim=-1) * d[:, s].norm(dim=-1) + 1e-30))
        kc = sl.stop - sl.start
        bar.advance(kc)
        return {
            "x": x.reshape(kc, cfg.ipc, *x.shape[1:]),
            "y": y.reshape(kc, cfg.ipc, -1),
            "errors": torch.stack(errs, dim=1),
            "d_norm": (d * bd).sum(-1),
            "cosine": torch.stack(cos, dim=1),
            "share": share.to(d.device),
            "seconds": torch.tensor([[t_target, t_fit]], device=d.device).expand(kc, 2) / kc,
        }

    with progress_bar(k_total, "distilling (closed form)", progress) as bar:
        got = run_chunked(
            jstore, f"{journal}/chunks", identity, k_total, size, fit, device=sx.device, progress=bar
        )
    xs, ys = got["x"].flatten(0, 1), got["y"].flatten(0, 1)
    # clusters whose members are fitted perfectly have d ~ 0: floor their norm so that their relative
    # error cannot swamp the summary
    d_norm = got["d_norm"].clamp_min(1e-3 * float(got["d_norm"].median().clamp_min(1e-30)))
    stages = list((got["errors"] / d_norm[:, None]).T)
    final_err = stages[-1]
    cosines = {key: float(got["cosine"][:, i].mean()) for i, key in enumerate(slices)}
    if not all(np.isfinite(float(s.mean())) for s in stages):
        raise DistdmError("closed-form distillation diverged: lower lr_img or input_steps, or raise damping")
    shares = got["share"][~got["share"].isnan()]
    share = float(shares.median()) if len(shares) else None
    used = cfg.replace(damping=curv.damping) if isinstance(curv, LowRankCurvature) else cfg
    warn_on_cosines(cosines, fit_hint(used, share))
    warn_on_poor_fit(float(final_err.median()), used, share)
    t_target, t_fit = (float(v) for v in got["seconds"].sum(0))
    info: dict[str, Any] = {
        "config": cfg.to_dict(),
        "factored": factored,
        "target_curvature_share": share,
        "damping": float(used.damping) if used.damping != "auto" else None,
        "damping_choice": damping_choice,
        "loss_history": [float(s.mean()) for s in stages],
        "loss_first": float(stages[0].mean()),
        "loss_last": float(final_err.mean()),
        "layer_cosine": cosines,
        "relative_error_median": float(final_err.median()),
        "clusters_per_chunk": size,
        "seconds_curvature": t_curv,
        # target and fit: what computing them cost, in this process or when their chunks were journaled
        "seconds_target": t_target,
        "seconds_distill": t_fit,
        "seconds": t_curv + t_target + t_fit,
    }
    return Synset(xs, ys, cl, torch.ones(k_total, device=xs.device), lr, 1, info)


def _target_moments(
    task: Task, curv: LowRankCurvature, idx: torch.Tensor, mask: torch.Tensor, n: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cluster, U^T b_k (K, r) and ||(I - U U^T) b_k||^2 (K,) for b_k = g_k / N, `size`
    clusters at a time (what share_damping needs; never a K x P tensor)."""
    names, k_total = flat_model(task).names, len(idx)
    projs, rests = [], []
    for start in range(0, k_total, size):
        sl = slice(start, min(start + size, k_total))
        b = flatten_batch(cluster_gradients(task, task.final, idx[sl], mask[sl], mean=False), names) / n
        proj = b @ curv.vecs.T
        projs.append(proj)
        rests.append(((b - proj @ curv.vecs) ** 2).sum(-1))
    return torch.cat(projs), torch.cat(rests)


def _journaled_curvature(task: Task, cfg: DistillConfig, store: Any, name: str, identity: dict) -> Curvature:
    """make_curvature's eigenpairs, saved in the journal the first time, so a resumed distillation
    does not compute them again (the memory budget is part of their identity: it sets the rank)."""

    def compute() -> dict[str, torch.Tensor]:
        curv = make_curvature(task, cfg)
        assert isinstance(curv, LowRankCurvature)  # every curvature but EK-FAC is one
        return {"vals": curv.vals, "vecs": curv.vecs}

    ident = {**identity, "memory_budget_bytes": task.memory_budget_bytes}
    got = cached_tensors(store, name, ident, compute, kind=CURVATURE, device=task.device)
    return LowRankCurvature(got["vals"], got["vecs"], _numeric_damping(cfg))


def _journal_chunk_size(store: Any, journal: str, identity: dict[str, Any], k_total: int, size: int) -> int:
    """The chunk size to journal with: a journal of these settings already in the store keeps its
    own chunking if it fits the budget (at most `size` clusters a chunk); one that does not, or one
    made with other settings, is dropped and started again."""
    recorded = ChunkedJob.recorded(store, journal, k_total)
    if recorded is None:
        return size
    same = recorded.config == ChunkedJob(journal, identity, k_total, recorded.chunk_size).config
    if same and recorded.chunk_size <= size:
        return recorded.chunk_size
    log.info(
        "distillation journal %s: made with other settings or a larger chunk; starting it again", journal
    )
    store.reset(journal)
    return size
