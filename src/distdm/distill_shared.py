"""What both distillation targets share (distill.py's trajectory matching and
distill_influence.py's influence target): member batches per cluster, cluster and synthetic-sample
gradients, the initial synset and the matching-cosine warning."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from .clusters import Clusters
from .engine import State, param_names, per_sample_loss, saved_tensor_bytes
from .errors import DistdmError
from .task import Task

log = logging.getLogger(__name__)


def cluster_batches(
    clusters: Clusters, rng: np.random.Generator, cap: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded member indices (K, B) and a 0/1 mask: up to `cap` random members of each cluster."""
    rows = []
    for k in range(clusters.n_clusters):
        m = clusters.members(k)
        rows.append(rng.choice(m, size=min(cap, len(m)), replace=False) if len(m) else m)
    width = max(1, max(len(r) for r in rows))
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for k, r in enumerate(rows):
        idx[k, : len(r)] = torch.as_tensor(r)
        mask[k, : len(r)] = 1.0
    return idx, mask


ROWS_PER_PASS = 4096  # member samples whose gradients are taken in one vmap pass, at most
ACTIVATION_SHARE = 0.25  # of the memory budget, the most one pass's saved activations may take
DEFAULT_BUDGET = 2 * 2**30  # bytes, where the task sets no memory budget


def rows_per_pass(task: Task, state: State) -> int:
    """Member samples per gradient pass: ROWS_PER_PASS, or fewer where their saved activations
    (measured on one sample) would exceed ACTIVATION_SHARE of the task's memory budget."""
    model, names = task.model, param_names(task.model)
    params = {k: state[k].detach().requires_grad_(True) for k in names}
    rest = {k: v for k, v in state.items() if k not in params}
    x, y = task.data.x_train[:1].clone(), task.data.y_train[:1]  # own storage: a view counts it all
    with torch.enable_grad():
        one = per_sample_loss(functional_call(model, {**params, **rest}, (x,)), y, task.loss).sum()
    per = max(1, saved_tensor_bytes([one], params.values()))
    budget = task.memory_budget_bytes or DEFAULT_BUDGET
    return max(1, min(ROWS_PER_PASS, int(ACTIVATION_SHARE * budget) // per))


def cluster_gradients(
    task: Task, state: State, idx: torch.Tensor, mask: torch.Tensor, *, mean: bool = True
) -> dict[str, torch.Tensor]:
    """Loss gradient of each cluster's (masked) members at a state: dict of (K, *param_shape).
    Members go through in passes of `rows_per_pass` samples (a large cluster in several), so that
    memory stays within the task's budget whatever the model."""
    model, names = task.model, param_names(task.model)
    params = {k: state[k] for k in names}
    rest = {k: v for k, v in state.items() if k not in params}
    x, y = task.data.x_train, task.data.y_train
    denom = mask.sum(1).clamp_min(1.0) if mean else torch.ones(len(mask))

    def loss(
        p: State, xi: torch.Tensor, yi: torch.Tensor, mi: torch.Tensor, di: torch.Tensor
    ) -> torch.Tensor:
        per = per_sample_loss(functional_call(model, {**p, **rest}, (xi,)), yi, task.loss)
        return (per * mi).sum() / di

    rows = rows_per_pass(task, state)
    width = idx.shape[1]
    cols = min(width, rows)  # a cluster wider than a pass is summed over column chunks
    out = {k: [] for k in names}
    for sl in torch.arange(len(idx)).split(max(1, rows // cols)):
        acc: dict[str, torch.Tensor] | None = None
        for c in range(0, width, cols):
            part = (idx[sl, c : c + cols], mask[sl, c : c + cols])
            g = vmap(grad(loss), in_dims=(None, 0, 0, 0, 0))(
                params, x[part[0]], y[part[0]], part[1], denom[sl]
            )
            acc = (
                {k: g[k].detach() for k in names}
                if acc is None
                else {k: acc[k] + g[k].detach() for k in names}
            )
        for k in names:
            out[k].append(acc[k])
    return {k: torch.cat(v) for k, v in out.items()}


def synthetic_gradients(
    task: Task, state: State, sx: torch.Tensor, sy: torch.Tensor, ipc: int, *, mean: bool = True
) -> dict[str, torch.Tensor]:
    """Loss gradient of each cluster's synthetic samples at a state, differentiable w.r.t. them."""
    model, names = task.model, param_names(task.model)
    params = {k: state[k].detach() for k in names}
    rest = {k: v for k, v in state.items() if k not in params}
    k_clusters = sx.shape[0] // ipc

    def loss(p: State, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        per = per_sample_loss(functional_call(model, {**p, **rest}, (xi,)), yi, "ce")
        return per.mean() if mean else per.sum()

    xs = sx.reshape(k_clusters, ipc, *sx.shape[1:])
    ys = sy.reshape(k_clusters, ipc, *sy.shape[1:])
    return vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)


def init_synset(
    task: Task, clusters: Clusters, ipc: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic inputs from random real members of each cluster, one-hot labels of its class."""
    rng = np.random.default_rng(seed)
    picks = []
    for k in range(clusters.n_clusters):
        m = clusters.members(k)
        if len(m) == 0:
            raise DistdmError(f"cluster {k} is empty; re-cluster with fewer clusters per class")
        picks.append(rng.choice(m, size=ipc, replace=len(m) < ipc))
    idx = torch.as_tensor(np.concatenate(picks))
    x = task.data.x_train[idx].clone()
    if len(np.unique(idx.numpy())) < len(idx):  # duplicates from tiny clusters: nudge apart
        # drawn on the CPU, so that every device starts from the same synset
        x += 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device)
    n_classes = max(task.data.num_classes, 1)
    cls = torch.as_tensor(clusters.cluster_class).long().repeat_interleave(ipc)
    if (cls < 0).any():
        raise DistdmError("distillation needs class-pure clusters (per-class k-means, class-wise or index)")
    y = torch.nn.functional.one_hot(cls, n_classes).float()
    return x, y, torch.arange(clusters.n_clusters).repeat_interleave(ipc)


TRAJECTORY_HINT = "use soft labels or the influence target"
INFLUENCE_HINT = "raise ipc, hessian_rank or input_steps, or check the target model's training"


def warn_on_cosines(cosines: dict[str, float], hint: str = TRAJECTORY_HINT) -> None:
    """Log a warning for every layer whose matching cosine stayed <= 0 (SPEC.md section 6)."""
    bad = {k: round(v, 3) for k, v in cosines.items() if v <= 0}
    if bad:
        log.warning(
            "distillation did not match the gradients of %s (cosine <= 0): fine-tuning on this synset "
            "will not emulate removal in those layers; %s",
            bad,
            hint,
        )
