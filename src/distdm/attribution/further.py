"""The final-model-only gold standard (Wei et al., "Final-Model-Only Data Attribution", SPEC 4)
and the agreement study of other methods with it.

From the final model theta_tau only, further-train for T epochs on D and on D minus each left-out
unit, with the same shuffle order (the unit masked out of every batch), for several shuffle seeds.
The attribution of unit i on query q is a_i = E_seed[f(theta_-i)](q) - E_seed[f(theta_D)](q):
subtracting the full-data further-training term is the "adjustment", so that the drift of further
training itself cancels; `centre=True` also subtracts the mean over the left-out units per query.
Positive means removing the unit increases the objective, as everywhere in distdm.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine import Schedule, State, predict, train_variants, variants_per_chunk
from ..errors import DistdmError
from ..intervals import t_interval
from ..objectives import Objective, get_objective, objective_name
from ..progress import Progress, StageProgress, check_progress, progress_bar
from ..scores import Scores
from ..store import RunStore, check_store, digest, run_chunked
from ..task import Task, check_memory_budget, store_of
from .base import UNITS, Attributor, Settings, check_choice, check_int, check_number, check_unit, register

log = logging.getLogger(__name__)


def state_digest(state: State) -> str:
    """A short SHA-256 of a state's names, shapes and values (identifies the final model)."""
    return digest(state)


@dataclasses.dataclass(frozen=True)
class FurtherArgs(Settings):
    """further-training's settings (see FurtherTraining), as given: `seeds` may be a count."""

    epochs: int = 10
    record: tuple[int, ...] | None = None
    optimizer: str = "sgd"
    lr: float | None = None
    batch_size: int | str | None = "task"
    momentum: float = 0.0
    seeds: int | tuple[int, ...] = 5
    unit: str = "cluster"
    left_out: tuple[int, ...] | None = None
    centre: bool = False
    chunk_size: int | None = None
    stage: str = "further"

    def validate(self) -> None:
        check_int("epochs", self.epochs)
        rec = self.record
        if rec is not None and (
            not isinstance(rec, tuple)
            or not rec
            or any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e <= self.epochs for e in rec)
        ):
            raise DistdmError(f"record must list epochs between 0 and {self.epochs}, got {rec!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise DistdmError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        check_number("lr", self.lr, strict=True, none=True)
        bs = self.batch_size
        if not (bs is None or bs == "task" or (isinstance(bs, int) and not isinstance(bs, bool) and bs > 0)):
            raise DistdmError(f"batch_size must be 'task', None (full batch) or > 0, got {bs!r}")
        check_number("momentum", self.momentum)
        seeds = self.seeds
        count = isinstance(seeds, int) and not isinstance(seeds, bool) and seeds > 0
        listed = (
            isinstance(seeds, tuple)
            and bool(seeds)
            and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            and len(set(seeds)) == len(seeds)
        )
        if not (count or listed):
            raise DistdmError(f"seeds must be a positive count or a list of distinct seeds, got {seeds!r}")
        check_unit(self.unit)
        if self.left_out is not None:  # any shape of indices, e.g. a NumPy array, as a flat list
            flat = np.asarray(self.left_out).reshape(-1)
            if flat.size and not np.issubdtype(flat.dtype, np.integer):
                raise DistdmError(f"left_out must list {self.unit} indices, got {self.left_out!r}")
            object.__setattr__(self, "left_out", tuple(int(i) for i in flat))
        check_choice("centre", self.centre, (True, False))
        check_int("chunk_size", self.chunk_size, 1, none=True)
        if not isinstance(self.stage, str) or not self.stage:
            raise DistdmError(f"stage must be a non-empty name, got {self.stage!r}")


@register("further-training")
class FurtherTraining(Attributor):
    """FMO gold standard: further training from the final model with and without each unit.

    epochs: further-training epochs T (0 gives all-zero attributions). record: the epochs whose
    states are kept (default [epochs]); scores use the last, `gold` any of them. optimizer: 'sgd' or
    'adam'; lr (default: the task's lr for SGD, 1e-3 for Adam); batch_size ('task': the task's;
    None: full batch); momentum (SGD). seeds: a number of shuffle seeds (0..n-1) or a list.
    unit: 'cluster' or 'sample'. left_out: the units to evaluate (default all; the others get NaN).
    centre: subtract the per-query mean over left-out units. chunk_size: variants trained at once
    (and the unit of caching). stage: the name under which results are cached in the store.
    store (a run's RunStore; default the task's deprecated `store`, else none): caches the
    further-trained states chunk by chunk, so that a second fit loads them and a killed one resumes.
    executor (distdm.executors; default the task's, else in-process): runs the chunks, e.g. on Ray;
    then a seed's unfinished chunks go out in one engine call. memory_budget_bytes (default the
    task's): trains fewer variants at once than a chunk if one would not fit. Results do not depend
    on the executor or the budget. progress (distdm.progress: False, True or a callable): one stage
    'further training' over every seed and chunk.
    """

    Args = FurtherArgs
    execution = ("progress", "executor", "memory_budget_bytes", "store")
    trains_models = True
    units = UNITS

    def __init__(
        self,
        *,
        epochs: int = 10,
        record: Sequence[int] | None = None,
        optimizer: str = "sgd",
        lr: float | None = None,
        batch_size: int | str | None = "task",
        momentum: float = 0.0,
        seeds: int | Sequence[int] = 5,
        unit: str = "cluster",
        left_out: Sequence[int] | np.ndarray | None = None,
        centre: bool = False,
        chunk_size: int | None = None,
        stage: str = "further",
        progress: Progress = False,
        executor: object = None,
        memory_budget_bytes: int | None = None,
        store: RunStore | None = None,
    ):
        check_memory_budget(memory_budget_bytes)
        check_progress(progress)
        check_store(store)
        super().__init__(
            epochs=epochs, record=record, optimizer=optimizer, lr=lr, batch_size=batch_size,
            momentum=momentum, seeds=seeds, unit=unit, left_out=left_out, centre=centre,
            chunk_size=chunk_size, stage=stage,
        )  # fmt: skip
        self.progress = progress
        self.executor = executor
        self.memory_budget_bytes = memory_budget_bytes
        self.store = store

    # the settings resolved: a seed count as the seeds 0..n-1, the recorded epochs sorted
    @property
    def seeds(self) -> list[int]:
        """The shuffle seeds (0..n-1 for a count)."""
        s = self.args.seeds
        return list(range(s)) if isinstance(s, int) else list(s)

    @property
    def record(self) -> list[int]:
        """The recorded epochs, sorted (default [epochs])."""
        return sorted(set(self.args.record)) if self.args.record is not None else [self.epochs]

    @property
    def left_out(self) -> list[int] | None:
        """The units to evaluate (None: all)."""
        return None if self.args.left_out is None else list(self.args.left_out)

    # offline ------------------------------------------------------------------------------
    def schedule_for(self, task: Task, seed: int) -> Schedule:
        """The further-training schedule for one shuffle seed."""
        lr = self.lr if self.lr is not None else (task.schedule.lr if self.optimizer == "sgd" else 1e-3)
        bs = task.schedule.batch_size if self.batch_size == "task" else self.batch_size
        return Schedule(
            epochs=self.epochs, lr=lr, batch_size=bs, optimizer=self.optimizer,  # type: ignore[arg-type]
            momentum=self.momentum, weight_decay=task.schedule.weight_decay, seed=seed,
        )  # fmt: skip

    def _config(self, task: Task) -> dict[str, Any]:
        s = self.schedule_for(task, 0)
        return {
            "epochs": self.epochs, "record": self.record, "optimizer": self.optimizer, "lr": s.lr,
            "batch_size": s.batch_size, "momentum": self.momentum, "weight_decay": s.weight_decay,
            "seeds": self.seeds, "unit": self.unit, "left_out": self.left_out_.tolist(),
            "chunk_size": self.chunk_size, "reduction": task.reduction,
            "loss": task.loss if isinstance(task.loss, str) else objective_name(task.loss),
            "target": state_digest(task.final),
        }  # fmt: skip

    def _fit(self, task: Task) -> None:
        n_units = task.clusters.n_clusters if self.unit == "cluster" else task.data.n_train
        left = np.arange(n_units) if self.left_out is None else np.asarray(self.left_out, dtype=np.int64)
        if len(left) == 0 or left.min() < 0 or left.max() >= n_units or len(np.unique(left)) != len(left):
            raise DistdmError(f"left_out must list distinct {self.unit} indices in 0..{n_units - 1}")
        self.n_units_ = n_units
        self.left_out_ = left
        keep = torch.ones(len(left) + 1, n_units)
        keep[torch.arange(1, len(left) + 1), torch.as_tensor(left)] = 0.0  # row 0: all data
        weights = task.clusters.keep_weights(keep) if self.unit == "cluster" else keep
        size = self.chunk_size or int(weights.shape[0])
        store = store_of(task, self.store)
        if store is not None:
            store.check_config(self.stage, self._config(task))
        executor = task.executor if self.executor is None else self.executor
        # states_[e][s]: stacked states (1 + left-out units) at recorded epoch e, seed s
        self.states_: list[list[State]] = [[] for _ in self.record]
        # one stage over every seed and chunk (in variant-epochs), not one bar per engine call
        total = len(self.seeds) * int(weights.shape[0]) * self.epochs
        with progress_bar(total, "further training", self.progress) as bar:
            for seed in self.seeds:
                self._fit_seed(task, weights, size, seed, executor, bar, store)
        if store is not None:
            store.mark_done(self.stage, seeds=len(self.seeds), variants=int(weights.shape[0]))

    def _fit_seed(
        self, task: Task, weights: torch.Tensor, size: int, seed: int, executor: object, bar: StageProgress,
        store: RunStore | None,
    ) -> None:  # fmt: skip
        """Further-train (or load) every chunk of one shuffle seed and append its states."""
        for i, st in enumerate(further_train_seed(self, task, weights, size, seed, executor, bar, store)):
            self.states_[i].append(st)

    def _train(
        self,
        task: Task,
        weights: torch.Tensor,
        seed: int,
        progress: Progress = False,
        chunk_size: int | None = None,
        executor: object = None,
    ) -> list[State]:
        schedule = self.schedule_for(task, seed)
        record = self.record != [self.epochs]
        size = chunk_size
        budget = self.memory_budget_bytes or task.memory_budget_bytes
        if budget is not None:
            size = variants_per_chunk(
                task.model, task.data.x_train, task.data.y_train, schedule, weights.shape[0],
                chunk_size=chunk_size, memory_budget_bytes=budget, loss=task.loss, record=record,
            )  # fmt: skip
        res = train_variants(
            task.model, task.data.x_train, task.data.y_train, schedule,
            weights=weights, init=task.final, loss=task.loss, reduction=task.reduction,
            record=record, strategy=task.strategy, progress=progress, chunk_size=size,
            executor=executor,
        )  # fmt: skip
        if res.trajectory is None:
            return [res.states]
        return [res.trajectory[e] for e in self.record]

    # online -------------------------------------------------------------------------------
    def objective_values(
        self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective = "margin"
    ) -> torch.Tensor:
        """f of every further-trained model: (recorded epochs, seeds, 1 + left-out units, queries);
        index 0 of the third axis is the model further-trained on all data."""
        if not hasattr(self, "states_"):
            raise DistdmError(f"{self.name}: call fit(task) first")
        obj = get_objective(objective)
        x = torch.as_tensor(x, dtype=torch.float32)
        y = torch.as_tensor(y)
        ref = self.task_.outputs(x)
        out = torch.stack([
            torch.stack([obj(predict(self.task_.model, st, x, strategy=self.task_.strategy), ref, y)
                         for st in per_seed])
            for per_seed in self.states_
        ])  # fmt: skip
        return out.detach()

    def gold_from_values(
        self,
        values: torch.Tensor,
        *,
        epoch: int | None = None,
        n_seeds: int | None = None,
        centre: bool | None = None,
    ) -> np.ndarray:
        """Attributions (left-out units, queries) from `objective_values`, at a recorded epoch
        (default the last) averaged over the first n_seeds seeds (default all)."""
        e = self._epoch_index(epoch)
        s = len(self.seeds) if n_seeds is None else n_seeds
        if not 1 <= s <= len(self.seeds):
            raise DistdmError(f"n_seeds must be between 1 and {len(self.seeds)}, got {n_seeds}")
        mean = values[e, :s].double().mean(0)  # (1 + L, Q)
        a = (mean[1:] - mean[0:1]).cpu().numpy()  # gold scores are NumPy, as Scores
        if self.centre if centre is None else centre:
            a = a - a.mean(0, keepdims=True)
        return a

    def _epoch_index(self, epoch: int | None) -> int:
        if epoch is None:
            return len(self.record) - 1
        if epoch not in self.record:
            raise DistdmError(f"epoch {epoch} was not recorded; recorded: {self.record} (set record=...)")
        return self.record.index(epoch)

    def gold(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        objective: str | Objective = "margin",
        *,
        epoch: int | None = None,
        n_seeds: int | None = None,
        centre: bool | None = None,
    ) -> Scores:
        """The gold-standard Scores (all units; NaN for units that were not left out)."""
        vals = self.gold_from_values(
            self.objective_values(x, y, objective), epoch=epoch, n_seeds=n_seeds, centre=centre
        )
        full = np.full((self.n_units_, vals.shape[1]), np.nan)
        full[self.left_out_] = vals
        return Scores(full, self.unit, objective_name(objective), self.name)

    def _scores(self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective) -> Scores:
        return self.gold(x, y, objective)


def further_train_seed(
    ft: FurtherTraining, task: Task, weights: torch.Tensor, chunk_size: int, seed: int, executor: object,
    progress: StageProgress, store: RunStore | None = None,
) -> list[State]:  # fmt: skip
    """One shuffle seed's further-trained states, one stacked state (rows of `weights` leading) per
    recorded epoch, through the store's chunked-job runner: with a store (default the task's
    deprecated `store`), chunk c is cached as
    '<stage>/seed<s>/chunk<c>' and a killed fit resumes at the first unfinished chunk. Without an
    executor every chunk is one engine call; with one, a seed's unfinished chunks go out together."""

    def compute(slices: list[slice], ex: object) -> dict[str, torch.Tensor]:
        rows = weights[slices[0]] if len(slices) == 1 else torch.cat([weights[sl] for sl in slices])
        if ex is None:
            per_epoch = ft._train(task, rows, seed, progress)
        else:
            per_epoch = ft._train(task, rows, seed, progress, chunk_size, ex)
        return _flat_epochs(per_epoch, ft.record)

    # the stage's settings (checked against configs[stage] by `fit`) and the seed identify a chunk
    store = store_of(task, store)
    identity = {"settings": digest(ft._config(task)), "seed": seed} if store is not None else {}
    flat = run_chunked(
        store, f"{ft.stage}/seed{seed}", identity, int(weights.shape[0]), chunk_size, compute,
        executor=executor, device=task.device, progress=progress, work_per_item=ft.epochs,
    )  # fmt: skip
    return _split_epochs(flat, ft.record)


def _flat_epochs(per_epoch: Sequence[State], record: list[int]) -> dict[str, torch.Tensor]:
    """One tensors dict for the states of every recorded epoch ('epoch<e>:<name>')."""
    return {f"epoch{e}:{k}": v for e, st in zip(record, per_epoch, strict=True) for k, v in st.items()}


def _split_epochs(flat: dict[str, torch.Tensor], record: list[int]) -> list[State]:
    out: list[State] = [{} for _ in record]
    for key, v in flat.items():
        tag, name = key.split(":", 1)
        out[record.index(int(tag.removeprefix("epoch")))][name] = v
    return out


# -------------------------------------------------------------------------------------------------
# agreement study


def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=0)


def agreement(method: np.ndarray, gold: np.ndarray) -> dict[str, np.ndarray]:
    """Per query (column): cosine and Spearman between a method's scores and the gold standard over
    the same units (rows); NaN where either column is constant (e.g. all-zero gold)."""
    m = np.asarray(method, dtype=np.float64)
    g = np.asarray(gold, dtype=np.float64)
    if m.shape != g.shape or m.ndim != 2:
        raise DistdmError(
            f"method and gold scores must have the same (units, queries) shape: {m.shape}, {g.shape}"
        )

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
        ok = (na > 0) & (nb > 0)
        out = np.full(a.shape[1], np.nan)
        out[ok] = (a * b).sum(0)[ok] / (na[ok] * nb[ok])
        return out

    def centred(a: np.ndarray) -> np.ndarray:
        return a - a.mean(0, keepdims=True)

    return {"cosine": cos(m, g), "spearman": cos(centred(_ranks(m)), centred(_ranks(g)))}


def interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean over finite values and its 95% Student-t interval, clipped to a correlation's [-1, 1]."""
    iv = t_interval(values, bounds=(-1.0, 1.0))
    return iv.mean, iv.low, iv.high


@dataclasses.dataclass(frozen=True)
class AgreementRow:
    """Agreement of one method with the gold standard at one (epochs, seeds) setting."""

    method: str
    epochs: int
    n_seeds: int
    cosine: float
    cosine_lo: float
    cosine_hi: float
    spearman: float
    spearman_lo: float
    spearman_hi: float
    label: str = ""  # e.g. the further-training optimizer

    def to_dict(self) -> dict[str, Any]:
        """The row as a plain dict."""
        return dataclasses.asdict(self)


def agreement_study(
    further: FurtherTraining,
    methods: Mapping[str, Scores],
    x: torch.Tensor,
    y: torch.Tensor,
    objective: str | Objective = "margin",
    *,
    epochs: Sequence[int] | None = None,
    seed_counts: Sequence[int] | None = None,
    centre: bool | None = None,
    label: str = "",
) -> list[AgreementRow]:
    """Agreement (cosine, Spearman; mean over queries with 95% interval) of each method's scores
    with the fitted gold standard over its left-out units, for every recorded further-training
    epoch count and every number of seeds averaged (default 1, 2, 4, ... and all)."""
    if not hasattr(further, "states_"):
        raise DistdmError("fit the FurtherTraining gold standard before the agreement study")
    values = further.objective_values(x, y, objective)
    epochs = list(further.record) if epochs is None else list(epochs)
    n_all = len(further.seeds)
    if seed_counts is None:
        seed_counts = sorted({min(2**i, n_all) for i in range(int(math.log2(n_all)) + 1)} | {n_all})
    rows = []
    for name, sc in methods.items():
        if sc.n_units != further.n_units_ or sc.unit != further.unit:
            raise DistdmError(
                f"{name}: {sc.n_units} {sc.unit} scores, the gold standard has {further.n_units_} "
                f"{further.unit} units: use the same unit setting"
            )
        if sc.n_queries != len(x):
            raise DistdmError(f"{name}: scores for {sc.n_queries} queries, {len(x)} queries given")
        m = sc.values[further.left_out_]
        for e in epochs:
            for s in seed_counts:
                g = further.gold_from_values(values, epoch=e, n_seeds=s, centre=centre)
                a = agreement(m, g)
                rows.append(AgreementRow(name, e, s, *interval(a["cosine"]), *interval(a["spearman"]), label))
    return rows


def plot_agreement(
    rows: Sequence[AgreementRow],
    path: str | Path,
    *,
    metric: str = "cosine",
    seeds_at_epoch: int | None = None,
) -> Path:
    """Figure: agreement vs further-training epochs (all seeds) and vs seeds averaged (at one
    epoch, default the largest), one row of panels per label (e.g. optimizer); saved as PNG/PDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if metric not in ("cosine", "spearman"):
        raise DistdmError(f"metric must be 'cosine' or 'spearman', got {metric!r}")
    if not rows:
        raise DistdmError("no agreement rows to plot")
    labels = list(dict.fromkeys(r.label for r in rows))
    fig, axes = plt.subplots(len(labels), 2, figsize=(10, 3.6 * len(labels)), squeeze=False)
    for li, lab in enumerate(labels):
        sub = [r for r in rows if r.label == lab]
        s_max = max(r.n_seeds for r in sub)
        e_at = seeds_at_epoch if seeds_at_epoch is not None else max(r.epochs for r in sub)
        for name in dict.fromkeys(r.method for r in sub):
            by_e = sorted((r for r in sub if r.method == name and r.n_seeds == s_max), key=lambda r: r.epochs)
            by_s = sorted((r for r in sub if r.method == name and r.epochs == e_at), key=lambda r: r.n_seeds)
            for ax, pts, key in ((axes[li, 0], by_e, "epochs"), (axes[li, 1], by_s, "n_seeds")):
                xs = [getattr(r, key) for r in pts]
                mean = [getattr(r, metric) for r in pts]
                lo = [getattr(r, metric + "_lo") for r in pts]
                hi = [getattr(r, metric + "_hi") for r in pts]
                (line,) = ax.plot(xs, mean, marker="o", label=name)
                ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
        prefix = f"{lab}: " if lab else ""
        axes[li, 0].set(xlabel="further-training epochs", ylabel=metric, title=f"{prefix}{s_max} seeds")
        axes[li, 1].set(xlabel="seeds averaged", ylabel=metric, title=f"{prefix}{e_at} epochs")
        if any(r.epochs > 0 for r in sub):
            axes[li, 0].set_xscale("symlog", linthresh=1)
        for ax in axes[li]:
            ax.axhline(0, color="grey", lw=0.5)
            ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------------
# the study from a task: what `distdm evaluate --gold further-training` and the benchmark run


def left_out_units(n_units: int, count: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted indices of `count` units drawn at random with `seed` (all units if count is None or
    at least n_units)."""
    if count is not None and count < 1:
        raise DistdmError(f"the number of left-out units must be >= 1, got {count}")
    if count is None or count >= n_units:
        return np.arange(n_units)
    return np.sort(np.random.default_rng(seed).choice(n_units, count, replace=False))


def further_agreement(
    task: Task,
    scores: Mapping[str, Scores],
    x: torch.Tensor,
    y: torch.Tensor,
    objective: str | Objective = "margin",
    *,
    epochs: Sequence[int] = (1, 2, 20),
    seeds: int | Sequence[int] = 5,
    seed_counts: Sequence[int] | None = None,
    optimizer: str = "sgd",
    lr: float | None = None,
    unit: str = "cluster",
    left_out: Sequence[int] | np.ndarray | None = None,
    centre: bool | None = None,
    chunk_size: int | None = None,
    stage: str | None = None,
    executor: object = None,
    memory_budget_bytes: int | None = None,
    progress: Progress = False,
    store: RunStore | None = None,
) -> list[AgreementRow]:
    """Fit the further-training gold standard once (recording every epoch count in `epochs`) and
    return each method's agreement with it per epoch count and number of seeds averaged, labelled
    with the optimizer. stage (default: a name derived from the settings) caches it in `store` (a
    run's RunStore; default the task's deprecated `store`)."""
    record = sorted({int(e) for e in epochs})
    if not record or record[0] < 0:
        raise DistdmError(f"further-training epochs must be integers >= 0, got {list(epochs)}")
    if stage is None:
        settings = {
            "record": record, "seeds": seeds if isinstance(seeds, int) else list(seeds),
            "optimizer": optimizer, "lr": lr, "unit": unit, "chunk_size": chunk_size,
            "left_out": None if left_out is None else [int(i) for i in np.asarray(left_out).reshape(-1)],
        }  # fmt: skip
        stage = f"further-{optimizer}-{unit}-{digest(settings, length=10)}"
    ft = FurtherTraining(
        epochs=record[-1], record=record, optimizer=optimizer, lr=lr, seeds=seeds, unit=unit,
        left_out=left_out, chunk_size=chunk_size, stage=stage, progress=progress, executor=executor,
        memory_budget_bytes=memory_budget_bytes, store=store,
    ).fit(task)  # fmt: skip
    return agreement_study(
        ft, scores, x, y, objective, epochs=record, seed_counts=seed_counts, centre=centre, label=optimizer
    )


def _cell(r: AgreementRow, metric: str) -> str:
    m, lo, hi = getattr(r, metric), getattr(r, metric + "_lo"), getattr(r, metric + "_hi")
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) else f"{m:.3f}"


def agreement_to_markdown(rows: Sequence[AgreementRow], *, seeds_at_epoch: int | None = None) -> str:
    """Markdown tables, per label and metric: methods x further-training epochs (all seeds averaged)
    and methods x seeds averaged (at one epoch count, default the largest); mean [95% interval]."""
    if not rows:
        raise DistdmError("no agreement rows to tabulate")
    out = []
    for lab in dict.fromkeys(r.label for r in rows):
        sub = [r for r in rows if r.label == lab]
        names = list(dict.fromkeys(r.method for r in sub))
        epochs = sorted({r.epochs for r in sub})
        counts = sorted({r.n_seeds for r in sub})
        e_at = seeds_at_epoch if seeds_at_epoch is not None else epochs[-1]
        at = {(r.method, r.epochs, r.n_seeds): r for r in sub}
        prefix = f"further training by {lab}: " if lab else ""
        for metric in ("cosine", "spearman"):
            by_epoch = {(m, e): at.get((m, e, counts[-1])) for m in names for e in epochs}
            by_seeds = {(m, c): at.get((m, e_at, c)) for m in names for c in counts}
            out += _table(f"{prefix}{metric} vs further-training epochs, {counts[-1]} seeds averaged",
                          "epochs", epochs, names, by_epoch, metric)  # fmt: skip
            out += _table(f"{prefix}{metric} vs seeds averaged, {e_at} further-training epochs",
                          "seeds", counts, names, by_seeds, metric)  # fmt: skip
    return "\n".join(out)


def _table(
    title: str,
    head: str,
    cols: list[int],
    names: list[str],
    cells: dict[tuple[str, int], AgreementRow | None],
    metric: str,
) -> list[str]:
    lines = [f"**{title}**", "", "| method | " + " | ".join(f"{head} {c}" for c in cols) + " |"]
    lines.append("|---|" + "---:|" * len(cols))
    for name in names:
        row = [cells[name, c] for c in cols]
        lines.append(f"| {name} | " + " | ".join("" if r is None else _cell(r, metric) for r in row) + " |")
    return [*lines, ""]


def agreement_to_csv(rows: Sequence[AgreementRow]) -> str:
    """The rows as CSV, one line per (label, method, epochs, seeds averaged)."""
    import csv
    import io

    buf = io.StringIO()
    fields = [f.name for f in dataclasses.fields(AgreementRow)]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r.to_dict())
    return buf.getvalue()


def write_agreement(
    rows: Sequence[AgreementRow],
    out: str | Path,
    *,
    stem: str = "further-agreement",
    seeds_at_epoch: int | None = None,
) -> dict[str, Path]:
    """Write the agreement as markdown, CSV and one figure per metric (cosine, Spearman) under out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{stem}.md"
    md.write_text(agreement_to_markdown(rows, seeds_at_epoch=seeds_at_epoch))
    csv_path = out / f"{stem}.csv"
    csv_path.write_text(agreement_to_csv(rows))
    written = {"markdown": md, "csv": csv_path}
    for metric in ("cosine", "spearman"):
        written[metric] = plot_agreement(
            rows, out / f"{stem}-{metric}.png", metric=metric, seeds_at_epoch=seeds_at_epoch
        )
    return written
