"""Exact leave-unit-out retraining: the ground truth every other method is measured against.

`retrain_masks` retrains the target model from theta_0 with the target's schedule (same data order,
dropped units masked out of every batch) once per keep-mask, through the batched engine
(`Task.retrain`), and caches the final states chunk by chunk in the RunStore it is given, so that a
second call does not recompute and a killed sweep resumes at the first unfinished chunk.
`ExactRetrain` ("exact") is the leave-one-cluster-out attributor built on it.

Store layout (when a store is given): stage 'retrain' holds the identity of what is retrained
(clusters, schedule, loss, reduction, a hash of theta_0); each seed's job 'retrain/<tag>/seed<s>' is
a `store.run_chunked` job whose identity is its masks' hash, count and unit: chunk i is the artifact
'retrain/<tag>/seed<s>/chunk<i>' (a safetensors file of stacked states) with a completion flag of
the same name.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import torch

from ..engine import State, predict
from ..errors import DistdmError
from ..objectives import Objective, get_objective, objective_name
from ..progress import Progress, StageProgress, check_progress, progress_bar
from ..scores import Scores
from ..store import ChunkedJob, RunStore, check_store, digest, run_chunked
from ..task import Task, check_memory_budget, store_of
from .base import UNITS, Attributor, Settings, check_int, check_unit, register

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 25  # variants per chunk: the unit of caching and resuming (and of one batched run)


def clusters_id(task: Task) -> str:
    """A hash identifying the task's partition into clusters (assignment and cluster classes)."""
    return digest(np.asarray(task.clusters.assignment), np.asarray(task.clusters.cluster_class))


def task_identity(task: Task) -> dict[str, object]:
    """What a retrained state depends on, as JSON-able settings for `RunStore.check_config`."""
    init = task.init
    loss = task.loss if isinstance(task.loss, str) else getattr(task.loss, "__qualname__", "custom")
    return {
        "clusters": clusters_id(task),
        "cluster_kind": task.clusters.kind,
        "n_clusters": task.clusters.n_clusters,
        "schedule": dataclasses.asdict(task.schedule),
        "loss": loss,
        "reduction": task.reduction,
        "model": type(task.model).__name__,
        "init": digest(*[init[k] for k in sorted(init)]),
    }


def n_units(task: Task, unit: str) -> int:
    """Number of attribution units of the task: clusters or training samples."""
    if unit == "cluster":
        return task.clusters.n_clusters
    if unit == "sample":
        return task.data.n_train
    raise DistdmError(f"unit must be 'cluster' or 'sample', got {unit!r}")


def leave_one_out_masks(n: int) -> torch.Tensor:
    """Keep-masks (n + 1, n): row 0 keeps everything, row k + 1 drops unit k."""
    keep = torch.ones(n + 1, n)
    keep[1:] -= torch.eye(n)
    return keep


def retrain_masks(
    task: Task,
    keep: torch.Tensor | np.ndarray,
    *,
    seed: int | None = None,
    unit: str = "cluster",
    tag: str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: Progress = False,
    executor: object = None,
    memory_budget_bytes: int | None = None,
    store: RunStore | None = None,
) -> State:
    """Retrain once per row of `keep` (V, units) and return the stacked final states (V leading).

    seed None means the task's own seed (its theta_0 and shuffle order); another seed draws a new
    initialisation and shuffle order. With a store (a run's RunStore; default the task's deprecated
    `store`), chunks of `chunk_size` rows are cached under 'retrain/<tag>/seed<s>/chunk<i>' (tag
    default: a hash of the masks) and reused or resumed; without one nothing is cached.
    executor (see distdm.executors; default the task's): runs the chunks, e.g. in parallel on Ray;
    the unfinished chunks then go out in one engine call and are saved when it returns.
    memory_budget_bytes (default the task's): trains fewer variants at once than a chunk if one
    chunk would not fit; results do not depend on the executor or the budget.
    progress (see distdm.progress): one stage 'retraining' over all chunks, in variant-epochs;
    chunks loaded from the store count as done at once.
    """
    keep_t = torch.as_tensor(np.asarray(keep) if not torch.is_tensor(keep) else keep, dtype=torch.float32)
    k = n_units(task, unit)
    if keep_t.ndim != 2 or keep_t.shape[1] != k:
        raise DistdmError(
            f"keep masks must have shape (variants, {k}) for unit {unit!r}, got {tuple(keep_t.shape)}"
        )
    if keep_t.shape[0] == 0:
        raise DistdmError("no keep masks given: pass at least one row")
    if not bool(((keep_t == 0) | (keep_t == 1)).all()):
        raise DistdmError("keep masks must contain only 0 (drop) and 1 (keep)")
    if chunk_size < 1:
        raise DistdmError(f"chunk_size must be >= 1, got {chunk_size}")
    check_progress(progress)
    check_store(store)
    with progress_bar(len(keep_t) * task.schedule.epochs, "retraining", progress) as bar:
        return _retrain_chunks(
            task, keep_t, seed, unit, tag, chunk_size, bar, executor, memory_budget_bytes,
            store_of(task, store),
        )  # fmt: skip


def _retrain_chunks(
    task: Task, keep_t: torch.Tensor, seed: int | None, unit: str, tag: str | None, chunk_size: int,
    progress: StageProgress, executor: object, memory_budget_bytes: int | None, store: RunStore | None,
) -> State:  # fmt: skip
    """`retrain_masks` after its checks: every chunk's training advances the one `progress` stage."""
    s = task.schedule.seed if seed is None else int(seed)
    executor = task.executor if executor is None else executor
    budget = task.memory_budget_bytes if memory_budget_bytes is None else memory_budget_bytes

    def compute(slices: list[slice], ex: object) -> State:
        rows = keep_t[slices[0]] if len(slices) == 1 else torch.cat([keep_t[sl] for sl in slices])
        if ex is None:
            return task.retrain(rows, seed=s, unit=unit, progress=progress, memory_budget_bytes=budget)
        # the engine splits the rows into chunks of chunk_size again and maps them onto the executor
        return task.retrain(
            rows, seed=s, unit=unit, progress=progress, chunk_size=chunk_size, executor=ex,
            memory_budget_bytes=budget,
        )  # fmt: skip

    name, identity = "retrain", {}  # without a store nothing is recorded: the name is not used
    if store is not None:
        masks_hash = digest(keep_t.to(torch.uint8), length=64)
        tag = tag or f"masks-{masks_hash[:12]}"
        if "/" in tag or not tag:
            raise DistdmError(f"retrain tag must be a non-empty name without '/', got {tag!r}")
        store.check_config("retrain", task_identity(task))
        name, identity = job_name(tag, s), {"masks": masks_hash, "variants": len(keep_t), "unit": unit}
    return run_chunked(
        store, name, identity, len(keep_t), chunk_size, compute, executor=executor, device=task.device,
        progress=progress, work_per_item=task.schedule.epochs,
    )  # fmt: skip


def job_name(tag: str, seed: int) -> str:
    """The store's name of the retrain job of masks `tag` and one seed; its chunks lie under it."""
    return f"retrain/{tag}/seed{seed}"


def recorded_seconds(
    task: Task, tag: str, seed: int | None = None, store: RunStore | None = None
) -> float | None:
    """Seconds the chunks of a cached job took when they were computed (None without a store or
    before any chunk finished): the true cost of a retrain that was later loaded from the cache.
    store: the run's RunStore (default the task's deprecated `store`)."""
    store = store_of(task, store)
    if store is None:
        return None
    s = task.schedule.seed if seed is None else int(seed)
    name = job_name(tag, s)
    cfg = store.config(name)
    n = cfg.get("variants") if isinstance(cfg, dict) else None
    job = ChunkedJob.recorded(store, name, n) if isinstance(n, int) else None
    return None if job is None else job.recorded_seconds(store)


def objective_values(
    task: Task,
    states: State,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: str | Objective = "margin",
    reference: torch.Tensor | None = None,
) -> np.ndarray:
    """Objective values (V, Q) of stacked states on queries; reference outputs default to variant 0's."""
    f = get_objective(objective)
    xq = torch.as_tensor(x, dtype=torch.float32, device=task.device)
    out = predict(task.model, states, xq, strategy=task.strategy)
    ref = out[0] if reference is None else reference
    with torch.no_grad():  # raw values are NumPy, as Scores are
        return f(out, ref, torch.as_tensor(y, device=out.device)).double().cpu().numpy()


@dataclasses.dataclass(frozen=True)
class ExactArgs(Settings):
    """exact: the retraining seeds (None: the task's), the unit, the variants per cached chunk."""

    seeds: tuple[int, ...] | None = None
    unit: str = "cluster"
    chunk_size: int = DEFAULT_CHUNK

    def validate(self) -> None:
        seeds = self.seeds
        if seeds is not None and (
            not isinstance(seeds, tuple)
            or len(seeds) == 0
            or len(set(seeds)) != len(seeds)
            or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)
        ):
            raise DistdmError(f"seeds must be a non-empty list of distinct integers, got {seeds!r}")
        check_unit(self.unit)
        check_int("chunk_size", self.chunk_size, 1)


@register("exact")
class ExactRetrain(Attributor):
    """Exact leave-one-unit-out retraining, averaged over seeds: score[k, q] = f(without k)(q) - f(all)(q).

    Settings: seeds (None: the task's own seed only; put the task's seed first so that per-seed
    index 0 is the model other methods explain), unit ('cluster' or 'sample'), chunk_size (variants
    per cached chunk), progress (distdm.progress: False, True or a callable; one stage over every
    seed and chunk), executor (distdm.executors; default the task's, else in-process),
    memory_budget_bytes (bytes one engine call may use; default the task's), store (a run's
    RunStore: the retrains are cached there and reused; default the task's deprecated `store`,
    else none). The reference outputs an objective sees are those of the all-kept model of the
    same seed.
    """

    Args = ExactArgs
    execution = ("progress", "executor", "memory_budget_bytes", "store")
    trains_models = True
    units = UNITS

    def __init__(
        self,
        seeds: Sequence[int] | None = None,
        unit: str = "cluster",
        chunk_size: int = DEFAULT_CHUNK,
        progress: Progress = False,
        executor: object = None,
        memory_budget_bytes: int | None = None,
        store: RunStore | None = None,
    ):
        check_memory_budget(memory_budget_bytes)
        check_progress(progress)
        check_store(store)
        super().__init__(seeds=seeds, unit=unit, chunk_size=chunk_size)
        self.progress = progress
        self.executor = executor
        self.memory_budget_bytes = memory_budget_bytes
        self.store = store

    def _fit(self, task: Task) -> None:
        self.seeds_ = self.seeds if self.seeds is not None else (task.schedule.seed,)
        masks = leave_one_out_masks(n_units(task, self.unit))
        tag = "loo" if self.unit == "cluster" else "loo-sample"
        # one stage over every seed's chunks, not one bar per seed or chunk
        total = len(self.seeds_) * len(masks) * task.schedule.epochs
        with progress_bar(total, "exact retraining", self.progress) as bar:
            self.states_: dict[int, State] = {
                s: retrain_masks(
                    task,
                    masks,
                    seed=s,
                    unit=self.unit,
                    tag=tag,
                    chunk_size=self.chunk_size,
                    progress=bar,
                    executor=self.executor,
                    memory_budget_bytes=self.memory_budget_bytes,
                    store=self.store,
                )
                for s in self.seeds_
            }
        recorded = [recorded_seconds(task, tag, s, self.store) for s in self.seeds_]
        # with a store: what the retrains cost when computed, also when this fit loaded them
        self.recorded_seconds_ = None if None in recorded else float(sum(recorded))  # type: ignore[arg-type]

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Raw model outputs (seeds, 1 + units, Q, O): row 0 the all-kept model, row k + 1 without k."""
        if not hasattr(self, "states_"):
            raise DistdmError("exact: call fit(task) before outputs(...)")
        xq = torch.as_tensor(x, dtype=torch.float32, device=self.task_.device)
        m, strategy = self.task_.model, self.task_.strategy
        return torch.stack([predict(m, self.states_[s], xq, strategy=strategy) for s in self.seeds_])

    def values(self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective = "margin") -> np.ndarray:
        """Raw objective values (seeds, 1 + units, Q): row 0 the all-kept model, row k + 1 without unit k."""
        f = get_objective(objective)
        out = self.outputs(x)
        yq = torch.as_tensor(y, device=out.device)
        with torch.no_grad():  # raw values are NumPy, as Scores are
            return np.stack([f(o, o[0], yq).double().cpu().numpy() for o in out])

    def per_seed_scores(
        self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective = "margin"
    ) -> np.ndarray:
        """Leave-one-out effects per seed (seeds, units, Q), e.g. for the noise ceiling."""
        v = self.values(x, y, objective)
        return v[:, 1:, :] - v[:, :1, :]

    def _scores(self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective) -> Scores:
        eff = self.per_seed_scores(x, y, objective).mean(0)
        return Scores(eff, self.unit, objective_name(objective), self.name)
