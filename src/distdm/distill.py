"""Offline stage: distil one small synthetic set per cluster (SPEC.md sections 1.3, 6 and 7).

Two targets:
- 'trajectory': reverse gradient matching along the target model's recorded trajectory (the paper),
  with every selectable option (pairing, distance, reduction, reverse vs standard matching), learnable
  label vectors and an explicit step calibration;
- 'influence': the synset's one-step update from theta_tau is fitted to the influence function's
  removal update (H + lambda I)^-1 g_k / N, in the (H + lambda I) metric or per layer (see
  `distill_influence`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch

from .clusters import Clusters
from .config import DistillConfig
from .distill_shared import (
    cluster_batches,
    cluster_gradients,
    init_synset,
    synthetic_gradients,
    warn_on_cosines,
)
from .engine import State, predict, train_variants
from .errors import DistdmError
from .progress import progress_bar
from .store import RunStore, check_store
from .synset import Synset
from .task import Task

log = logging.getLogger(__name__)


def layer_distance(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], distance: str, reduction: str
) -> torch.Tensor:
    """Per-cluster distance (K,) between gradient dicts with a leading cluster dim.

    cosine: per parameter tensor, rows = output units, sum over rows of 1 - cos; tensors with one
    dimension per cluster (biases, norm affines) contribute nothing (dataset condensation's rule).
    mse: sum of squared differences. reduction 'mean' divides by the number of terms."""
    total, terms = 0.0, 0
    for k in a:
        ga, gb = a[k], b[k]
        if distance == "cosine":
            if ga.ndim <= 2:  # (K, out): a bias-like tensor
                continue
            ra, rb = ga.flatten(2), gb.flatten(2)
            cos = (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1) + 1e-6)
            total = total + (1 - cos).sum(-1)
            terms += ra.shape[1]
        else:
            total = total + ((ga - gb) ** 2).flatten(1).sum(-1)
            terms += ga[0].numel()
    if isinstance(total, float):
        raise DistdmError("the model has no weight matrix to match gradients on")
    return total / terms if reduction == "mean" else total


def layer_cosines(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Cosine between two gradient dicts per parameter tensor, averaged over the leading cluster dim."""
    out = {}
    for k in a:
        fa, fb = a[k].flatten(1), b[k].flatten(1)
        out[k] = float(((fa * fb).sum(-1) / (fa.norm(dim=-1) * fb.norm(dim=-1) + 1e-12)).mean())
    return out


def _starts(tau: int, cfg: DistillConfig, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(real, synthetic) checkpoint pairs per sampled start, by the pairing rule."""
    if cfg.direction == "match":
        hi = tau
        return [(t, t) for t in rng.integers(0, hi, size=cfg.starts)]
    if cfg.pairing == "alg1":
        if tau <= cfg.step:
            raise DistdmError(f"pairing alg1 needs more epochs ({tau}) than the step length s={cfg.step}")
        return [(t, t + cfg.step) for t in rng.integers(0, tau - cfg.step, size=cfg.starts)]
    if cfg.pairing == "eq6":
        return [(t, tau - t) for t in rng.integers(0, tau, size=cfg.starts)]
    return [(t, t) for t in rng.integers(0, tau, size=cfg.starts)]


def distill_trajectory(
    task: Task,
    cfg: DistillConfig,
    *,
    clusters: Clusters | None = None,
    lr: float | None = None,
    steps: int = 1,
    progress: bool = False,
) -> Synset:
    """Reverse (or standard) gradient matching along the trajectory; returns a calibrated synset.

    lr and steps are the online fine-tune's step size and count that the synset is calibrated for."""
    clusters = clusters or task.clusters
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    sx, sy, cl = init_synset(task, clusters, cfg.ipc, cfg.seed)
    sx.requires_grad_(True)
    opts = [torch.optim.SGD([sx], lr=cfg.lr_img, momentum=cfg.momentum_img)]
    if cfg.soft_labels:
        sy.requires_grad_(True)
        opts.append(torch.optim.SGD([sy], lr=cfg.lr_label, momentum=cfg.momentum_img))
    tau = len(task.trajectory) - 1
    sign = -1.0 if cfg.direction == "reverse" else 1.0
    history: list[float] = []
    pairs = _starts(tau, cfg, rng)
    with progress_bar(len(pairs) * cfg.iterations, "distilling", progress) as bar:
        for t_real, t_syn in pairs:
            idx, mask = cluster_batches(clusters, rng, cfg.real_batch)
            g_real = cluster_gradients(task, task.trajectory[t_real], idx, mask)
            target = {k: sign * v for k, v in g_real.items()}
            for _ in range(cfg.iterations):
                g_syn = synthetic_gradients(task, task.trajectory[t_syn], sx, sy, cfg.ipc)
                loss = layer_distance(g_syn, target, cfg.distance, cfg.reduction).sum()
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o in opts:
                    o.step()
                history.append(float(loss.detach()))
                bar.advance()
    sx, sy = sx.detach(), sy.detach()
    # diagnostics: matching cosine per layer on the last start's pair, fresh real batches
    idx, mask = cluster_batches(clusters, rng, cfg.real_batch)
    t_real, t_syn = pairs[-1]
    g_real = cluster_gradients(task, task.trajectory[t_real], idx, mask)
    g_syn = synthetic_gradients(task, task.trajectory[t_syn], sx, sy, cfg.ipc)
    cosines = layer_cosines(g_syn, {k: sign * v for k, v in g_real.items()})
    scale = calibrate(task, clusters, sx, sy, cfg.ipc, cfg.calibration, lr or task.schedule.lr)
    info: dict[str, Any] = {
        "config": cfg.to_dict(),
        "loss_history": history[:: max(1, len(history) // 200)],
        "loss_first": history[0],
        "loss_last": history[-1],
        "layer_cosine": cosines,
        "seconds": time.perf_counter() - t0,
    }
    syn = Synset(sx, sy, cl, scale, lr or task.schedule.lr, steps, info)
    warn_on_cosines(cosines)
    return syn


def calibrate(
    task: Task, clusters: Clusters, sx: torch.Tensor, sy: torch.Tensor, ipc: int, how: str, lr: float
) -> torch.Tensor:
    """Per-cluster loss weights: 'none' (1), 'mass' (|D_k| / N), 'norm' (one synthetic step at
    theta_tau has the norm of the cluster's summed gradient over N times lr)."""
    k = clusters.n_clusters
    n = len(clusters.assignment)
    if how == "none":
        return torch.ones(k)
    if how == "mass":
        return torch.as_tensor(clusters.sizes() / n, dtype=torch.float32)
    idx, mask = cluster_batches(clusters, np.random.default_rng(0), 10**9)
    g_real = cluster_gradients(task, task.final, idx, mask, mean=False)
    g_syn = synthetic_gradients(task, task.final, sx, sy, ipc, mean=False)
    real_norm = torch.sqrt(sum((v.flatten(1) ** 2).sum(-1) for v in g_real.values()))
    syn_norm = torch.sqrt(sum((v.detach().flatten(1) ** 2).sum(-1) for v in g_syn.values()))
    return (real_norm / n / syn_norm.clamp_min(1e-12)).float()


def finetune(task: Task, synset: Synset, delete: torch.Tensor, *, executor: Any = None) -> State:
    """Fine-tune theta_tau on the synsets of the deleted clusters, one variant per row of
    `delete` (V, K): `steps` full-batch SGD steps of size `lr` on the scale-weighted summed loss.
    Runs on `executor` (default the task's) within the task's memory budget."""
    from .engine import Schedule

    sched = Schedule(epochs=synset.steps, lr=synset.lr, batch_size=None, shuffle=False)
    weights = synset.weights(delete)
    size = None
    if task.memory_budget_bytes is not None:
        size = task.variants_per_chunk(weights.shape[0], sched, x=synset.x, y=synset.y, loss="ce")
    return train_variants(
        task.model, synset.x, synset.y, sched, weights=weights, init=task.final,
        loss="ce", reduction="sum", strategy=task.strategy, chunk_size=size,
        executor=task.executor if executor is None else executor,
    ).states  # fmt: skip


def forgetting_accuracy(task: Task, synset: Synset) -> dict[str, float]:
    """Test accuracy of theta_0, theta_tau, and theta_tau fine-tuned on the whole synset (Table 4)."""

    def acc(states: State) -> float:
        out = predict(task.model, states, task.data.x_test, strategy=task.strategy)[0]
        return float((out.argmax(-1) == task.data.y_test).float().mean())

    one = {k: v.unsqueeze(0) for k, v in task.init.items()}
    fin = {k: v.unsqueeze(0) for k, v in task.final.items()}
    forgot = finetune(task, synset, torch.ones(1, synset.n_clusters))
    return {"acc_theta0": acc(one), "acc_target": acc(fin), "acc_after_whole_synset": acc(forgot)}


def distill(
    task: Task,
    cfg: DistillConfig,
    *,
    clusters: Clusters | None = None,
    lr: float | None = None,
    steps: int = 1,
    progress: bool = False,
    store: RunStore | None = None,
    journal: str | None = None,
) -> Synset:
    """Distil a synset for every cluster with the configured target; diagnostics in `synset.info`.
    `store`: a run's RunStore, where the 'oracle' target caches its retrains (None: not cached);
    `journal`: a job name in it where the closed-form solver saves each finished chunk of clusters,
    so that an interrupted distillation resumes (the other solvers fit all clusters at once)."""
    check_store(store)
    if task.data.is_regression:
        raise DistdmError("distillation needs a classification task (label vectors)")
    if cfg.target == "trajectory":
        syn = distill_trajectory(task, cfg, clusters=clusters, lr=lr, steps=steps, progress=progress)
    else:
        from .distill_influence import distill_influence

        syn = distill_influence(
            task, cfg, clusters=clusters, lr=lr, progress=progress, store=store, journal=journal
        )
    syn.info["forgetting"] = forgetting_accuracy(task, syn)
    if not math.isfinite(syn.info.get("loss_last", 0.0)):
        raise DistdmError("distillation diverged (loss is not finite): lower lr_img")
    return syn
