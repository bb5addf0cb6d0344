"""Influence-target distillation (SPEC.md section 7): synsets whose single SGD step from theta_tau
moves the parameters by the influence function's removal update d_k = (H + lambda I)^-1 g_k / N.

g_k is the summed loss gradient of cluster k's members at theta_tau and H the Hessian of the mean
training loss there. The step of a synset is delta_k = -lr * sum_j grad l(theta_tau; s_j, y_j) with
free, real-valued label vectors y_j, so deleting a set of clusters and taking one step on the union
of their synsets gives the sum of their updates: group effects come for free.

The error is measured in the (H + lambda I) metric by default, ||delta_k - d_k||_A^2 / ||d_k||_A^2,
whose gradient needs one Hessian-vector product per step (never a dense Hessian); 'euclidean'
measures it per layer in parameter space instead.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import numpy as np
import torch

from .clusters import Clusters
from .config import DistillConfig
from .distill import _cluster_batches, cluster_gradients, init_synset, synthetic_gradients, warn_on_cosines
from .errors import DistdmError
from .hessian import arnoldi, cg, flat_model, hvp, stochastic_hvp
from .progress import progress_bar
from .synset import Synset
from .task import Task

log = logging.getLogger(__name__)


def influence_targets(
    task: Task, clusters: Clusters, cfg: DistillConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """b_k = g_k / N (K, P) and the removal update d_k = A^-1 b_k (K, P).

    With the low-rank metric and hessian_target 'metric', A = U diag(vals) U^T + lambda I is inverted
    in closed form (no solver); otherwise A = H + lambda I and d comes from batched CG."""
    fm = flat_model(task)
    idx, mask = _cluster_batches(clusters, np.random.default_rng(0), 10**9)
    g = cluster_gradients(task, task.final, idx, mask, mean=False)
    b = flatten_batch(g, fm.names) / len(clusters.assignment)
    if cfg.target == "oracle":
        return b, oracle_targets(task, clusters)
    if cfg.metric == "hessian" and cfg.hessian_rank is not None and cfg.hessian_target == "metric":
        if cfg.damping <= 0:
            raise DistdmError("the low-rank Hessian metric needs damping > 0")
        vals, vecs = top_eigenpairs(task, cfg.hessian_rank, cfg.curvature)
        proj = b @ vecs.T
        return b, (proj / (vals + cfg.damping)) @ vecs + (b - proj @ vecs) / cfg.damping
    hv = hvp(task, curvature=cfg.curvature)
    return b, cg(hv, b, damping=cfg.damping, max_iter=cfg.cg_iterations, tol=1e-4)


def oracle_targets(task: Task, clusters: Clusters) -> torch.Tensor:
    """The exact removal updates theta_{-k} - theta_tau (K, P): retrain once without each cluster
    (same theta_0 and shuffle order; cached in the task's run directory). An upper bound for what
    any synset can reach, at the price of K retrainings: for studies, not for production."""
    from .attribution.retrain import retrain_masks  # import here: attribution builds on distillation

    a = np.asarray(clusters.assignment)
    keep = torch.as_tensor(a[None, :] != np.arange(clusters.n_clusters)[:, None], dtype=torch.float32)
    states = retrain_masks(task, keep, unit="sample", tag=f"oracle-{clusters.kind}")
    names = flat_model(task).names
    return flatten_batch({k: states[k] - task.final[k] for k in names}, names)


_EIGEN_CACHE: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def top_eigenpairs(task: Task, rank: int, curvature: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` eigenpairs of the training-loss curvature at theta_tau (Arnoldi, 2 x rank HVPs),
    negative eigenvalues clipped to 0; cached per task so cluster- and class-wise synsets share them."""
    fm = flat_model(task)
    h = hashlib.sha1(fm.theta.numpy().tobytes())
    h.update(task.data.x_train.numpy().tobytes())
    key = (h.hexdigest(), rank, curvature)
    if key not in _EIGEN_CACHE:
        vals, vecs = arnoldi(
            hvp(task, curvature=curvature), flat_model(task).n_params, n_iters=2 * rank, top_p=rank
        )
        _EIGEN_CACHE.clear()  # one task at a time: the basis is rank x P floats
        _EIGEN_CACHE[key] = (vals.clamp_min(0.0), vecs)
    return _EIGEN_CACHE[key]


def metric_hvp(task: Task, cfg: DistillConfig) -> Any:
    """v -> H v for the matching metric: a low-rank eigen-approximation (hessian_rank), the full
    data (hessian_batch None) or a fresh random batch per call (unbiased, much cheaper)."""
    fm = flat_model(task)
    if cfg.hessian_rank is not None:
        vals, vecs = top_eigenpairs(task, cfg.hessian_rank, cfg.curvature)
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
) -> Synset:
    """Distil synsets towards the influence removal update; diagnostics in `synset.info`."""
    clusters = clusters or task.clusters
    lr = lr or task.schedule.lr
    t0 = time.perf_counter()
    b, d = influence_targets(task, clusters, cfg)
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
    warn_on_cosines(cosines)
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
    return Synset(sx.detach(), y, cl, torch.ones(clusters.n_clusters), lr, 1, info)
