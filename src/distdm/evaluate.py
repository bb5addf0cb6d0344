"""Evaluate attribution methods against exact leave-cluster-out retraining (SPEC.md section 3).

`evaluate` fits every method, scores the queries for the margin and the paper's Dist objectives,
and compares with the truth: the paper's Dist protocol, Spearman over all clusters and within the
query's class, LDS, top-1 in the true top 3, removal curves, the noise ceiling, and offline and
online seconds. Intervals are 95% Student-t intervals over queries (metrics.t_interval), clipped
to each metric's range; `legend` says what every printed column measures. The retraining
protocols behind the truths (`retrained_values`, `removal_curve`) live here, beside it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics
from .attribution.base import Attributor
from .attribution.retrain import ExactRetrain, objective_values, retrain_masks
from .engine import predict
from .errors import DistdmError
from .intervals import SHARE, t_interval
from .objectives import Objective
from .scores import Scores
from .store import RunStore, check_store
from .task import Task

log = logging.getLogger(__name__)

OBJECTIVES = ("margin", "dist1", "dist2", "dist3")
CEILING = "noise-ceiling"

# columns of the table, in order, with how they are printed
COLUMNS = (
    "method",
    "dist1_x100",
    "dist2",
    "dist3",
    "spearman",
    "spearman_class",
    "pearson",
    "lds",
    "top1_in_top3",
    "offline_s",
    "online_s",
)


@dataclasses.dataclass
class Evaluation:
    """The result of `evaluate`: one row (dict) per method plus what the figures need."""

    rows: list[dict[str, Any]]
    scores: dict[str, dict[str, np.ndarray]]  # method -> objective -> (K, Q) cluster scores
    truth: np.ndarray  # (K, Q) exact margin effects, mean over the truth's seeds
    curves: dict[str, dict[str, Any]]  # method -> removal curve (removal_curve)
    y: np.ndarray  # the queries' labels
    cluster_class: np.ndarray
    truth_seeds: tuple[int, ...]

    def to_markdown(self) -> str:
        """The table as GitHub markdown (intervals in brackets)."""
        return to_markdown(self.rows)

    def to_csv(self) -> str:
        """The table as CSV (one column per number, interval bounds as *_lo / *_hi)."""
        return to_csv(self.rows)

    def save(self, out: str | Path, stem: str = "quality") -> dict[str, Path]:
        """Write stem.md, stem.csv and stem.png into the directory `out`; returns their paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"md": out / f"{stem}.md", "csv": out / f"{stem}.csv", "png": out / f"{stem}.png"}
        paths["md"].write_text(self.to_markdown() + "\n")
        paths["csv"].write_text(self.to_csv())
        plot(self, paths["png"])
        return paths


# Retraining protocols: the exact effects every method is measured against ----------------------


def retrained_values(
    task: Task,
    keep: np.ndarray,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    objective: str | Objective = "margin",
    seed: int | None = None,
    tag: str | None = None,
    progress: bool = False,
    store: RunStore | None = None,
) -> np.ndarray:
    """Objective values (m, Q) of models retrained on each keep-mask (cached in `store`, a run's
    RunStore; default the task's deprecated `store`). Objectives that compare with a reference get
    the target model's outputs."""
    states = retrain_masks(
        task, torch.as_tensor(keep, dtype=torch.float32), seed=seed, tag=tag, progress=progress, store=store
    )
    return objective_values(task, states, x, y, objective, reference=task.outputs(x))


def removal_curve(
    task: Task,
    scores: metrics.ArrayLike,
    x: torch.Tensor,
    y: torch.Tensor,
    ks: Sequence[int] = (1, 3, 10),
    *,
    seed: int | None = None,
    progress: bool = False,
    store: RunStore | None = None,
) -> dict[str, Any]:
    """Remove each query's top-k clusters by margin score (the most negative: those the method says
    support the true class), retrain, and measure against the all-kept retrain of the same seed the
    drop in margin (full - without) and the fraction of predictions that change.
    Returns {'ks': [...], 'drop': [Interval per k], 'flipped': [Interval per k]}. The retrains are
    cached in `store` (a run's RunStore; default the task's deprecated `store`)."""
    masks = metrics.removal_masks(scores, ks)
    n_q, n_units = masks.shape[1], masks.shape[2]
    flat = np.concatenate([np.ones((1, n_units)), masks.reshape(-1, n_units)])
    uniq, inverse = np.unique(flat, axis=0, return_inverse=True)
    states = retrain_masks(
        task, torch.as_tensor(uniq, dtype=torch.float32), seed=seed, progress=progress, store=store
    )
    xq = torch.as_tensor(x, dtype=torch.float32, device=task.device)
    out = predict(task.model, states, xq, strategy=task.strategy)  # (U, Q, O)
    inverse = np.asarray(inverse).ravel()
    full = int(inverse[0])
    margins = objective_values(task, states, xq, y, "margin", reference=out[full])  # (U, Q)
    base_pred = out[full].argmax(-1).cpu().numpy()
    rows = inverse[1:].reshape(len(ks), n_q)
    q_idx = np.arange(n_q)
    drop, flipped = [], []
    for i in range(len(ks)):
        pred = out[rows[i], q_idx].argmax(-1).cpu().numpy()
        drop.append(t_interval(margins[full] - margins[rows[i], q_idx]))
        flipped.append(t_interval((pred != base_pred).astype(np.float64), bounds=SHARE))
    return {"ks": list(ks), "drop": drop, "flipped": flipped}


def _is_fitted_on(method: Attributor, task: Task) -> bool:
    return getattr(method, "task_", None) is task


def _cluster_values(s: Scores, task: Task) -> np.ndarray:
    if s.unit == "sample":
        s = s.to_clusters(task.clusters.assignment, task.clusters.n_clusters)
    if s.values.shape[0] != task.clusters.n_clusters:
        raise DistdmError(
            f"{s.method} returned {s.values.shape[0]} units, the task has {task.clusters.n_clusters}"
        )
    return s.values


def evaluate(
    task: Task,
    methods: Mapping[str, Attributor],
    queries: tuple[torch.Tensor, torch.Tensor],
    *,
    truth: ExactRetrain | None = None,
    truth_seeds: Sequence[int] | None = None,
    lds_subsets: int = 100,
    lds_alpha: float = 0.5,
    lds_seed: int = 1,
    removal_ks: Sequence[int] = (1, 3, 10),
    top_objective: str = "dist1",
    ceiling: bool = True,
    progress: bool = False,
    store: RunStore | None = None,
) -> Evaluation:
    """Fit and score every method on the queries and compare it with exact leave-cluster-out
    retraining; returns an `Evaluation` whose `rows` is the table (one dict per method).

    truth: a (fitted or unfitted) ExactRetrain to use as ground truth; default ExactRetrain with
    truth_seeds (default: the task's seed and the next two). The truth is the mean over its seeds;
    the noise ceiling compares its first seed with the mean of the others. LDS subsets are retrained
    once, with the task's own seed; lds_subsets=0 or removal_ks=() skips LDS or removal curves.
    top_objective: the objective under which 'top1_in_top3' compares a method's top cluster.
    store: a run's RunStore in which the truth's, the LDS subsets' and the removal curves' retrains
    are cached (default the task's deprecated `store`, else none).
    """
    check_store(store)
    x, y = queries
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y)
    if len(x) != len(y) or len(x) == 0:
        raise DistdmError(f"queries need as many labels as inputs (at least one), got {len(x)} and {len(y)}")
    if truth is None:
        s0 = task.schedule.seed
        truth = ExactRetrain(seeds=tuple(truth_seeds) if truth_seeds is not None else (s0, s0 + 1, s0 + 2))
    if not _is_fitted_on(truth, task):
        log.info("fitting the exact truth (seeds %s)", truth.seeds)
        truth.progress = progress
        if truth.store is None:  # an execution keyword, like progress: the truth's retrains go to the run
            truth.store = store
        truth.fit(task)
    if truth.unit != "cluster":
        raise DistdmError("the truth must be leave-cluster-out retraining (ExactRetrain(unit='cluster'))")
    cc = np.asarray(task.clusters.cluster_class)
    y_np = y.cpu().numpy()

    per_seed = truth.per_seed_scores(x, y, "margin")  # (S, K, Q)
    true_margin = per_seed.mean(0)
    removed = {obj: truth.values(x, y, obj)[:, 1:, :].mean(0) for obj in metrics.PAPER_OBJECTIVES}
    true_top = (
        truth.per_seed_scores(x, y, top_objective).mean(0) if top_objective != "margin" else true_margin
    )

    keep = actual = None
    if lds_subsets:
        keep = metrics.lds_masks(task.clusters.n_clusters, lds_subsets, lds_alpha, lds_seed)
        actual = retrained_values(
            task, keep, x, y, objective="margin", tag="lds", progress=progress, store=store
        )

    rows: list[dict[str, Any]] = []
    all_scores: dict[str, dict[str, np.ndarray]] = {}
    curves: dict[str, dict[str, Any]] = {}

    def add_row(name: str, by_obj: dict[str, np.ndarray], offline: float, online: float) -> None:
        row: dict[str, Any] = {"method": name}
        picks = {obj: np.argmax(by_obj[obj], axis=0) for obj in metrics.PAPER_OBJECTIVES if obj in by_obj}
        for key, iv in metrics.paper_dist(picks, removed).items():
            row.update(iv.as_dict(key))
        cmp = metrics.compare(by_obj["margin"], true_margin, task.clusters, y_np)
        for key in ("spearman", "spearman_class", "pearson"):
            row.update(cmp[key].as_dict(key))
        if keep is not None:
            row.update(metrics.lds(by_obj["margin"], keep, actual).as_dict("lds"))
        if top_objective in by_obj:
            row.update(metrics.top1_in_topk(by_obj[top_objective], true_top, 3).as_dict("top1_in_top3"))
        if removal_ks:
            curve = removal_curve(task, by_obj["margin"], x, y, removal_ks, progress=progress, store=store)
            curves[name] = curve
            for k, d in zip(curve["ks"], curve["drop"], strict=True):
                row[f"drop_at_{k}"] = d.mean
        row["offline_s"] = offline
        row["online_s"] = online
        row["n_queries"] = len(y)
        rows.append(row)
        all_scores[name] = by_obj

    for name, method in methods.items():
        if not _is_fitted_on(method, task):
            log.info("fitting %s", name)
            if "store" in type(method).execution and method.store is None:  # cache its work in the run
                method.store = store
            method.fit(task)
        by_obj: dict[str, np.ndarray] = {}
        online = 0.0
        for obj in OBJECTIVES:
            s = method.scores(x, y, obj)
            online += s.seconds
            by_obj[obj] = _cluster_values(s, task)
            if not np.isfinite(by_obj[obj]).all():
                log.warning("%s: non-finite scores for objective %s", name, obj)
        offline = float(getattr(method, "offline_seconds_", math.nan))
        recorded = getattr(method, "recorded_seconds_", None)  # cached work (retrains, synsets): its cost
        add_row(name, by_obj, max(offline, recorded) if recorded is not None else offline, online)

    if ceiling and len(truth.seeds_) >= 2:
        # seed 0's exact effects against the mean of the other seeds' (metrics.noise_ceiling); here the
        # "method" is the mean of the other seeds so that LDS and Dist use effects independent of the
        # seed-0 retrains they are checked on.
        t = time.perf_counter()
        others = {obj: truth.per_seed_scores(x, y, obj)[1:].mean(0) for obj in OBJECTIVES}
        nc = metrics.noise_ceiling(per_seed, task.clusters, y_np)
        add_row(CEILING, others, math.nan, time.perf_counter() - t)
        row = rows[-1]
        for key in ("spearman", "spearman_class", "pearson"):
            row.update(nc[key].as_dict(key))
        seed0_top = truth.per_seed_scores(x, y, top_objective)[0]
        row.update(metrics.top1_in_topk(others[top_objective], seed0_top, 3).as_dict("top1_in_top3"))
    return Evaluation(rows, all_scores, true_margin, curves, y_np, cc, tuple(truth.seeds_))


# Writers ----------------------------------------------------------------------------------------


DIGITS = {"dist3": 6}  # dist3 = 1 / (1 + Dist1) sits close to 1: show enough digits to order methods


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


# what each column means, with its range and which way is better (printed once under the table)
COLUMN_HELP = {
    "method": "the attribution method; noise-ceiling: exact retraining with the other seeds against "
    "the first seed (how far any method can agree with a truth that itself varies with the seed)",
    "dist1_x100": "100 x ||p - p'||^2, the squared change of the query's predicted probabilities after "
    "retraining without the method's top cluster for objective dist1; 0 to 200, higher = it found "
    "the cluster that moves the prediction most",
    "dist2": "cross-entropy (nats) of the true label after retraining without the method's top cluster "
    "for objective dist2; >= 0, higher = it found what the correct prediction rests on",
    "dist3": "1 / (1 + ||p - p'||^2) after retraining without the method's top cluster for objective "
    "dist3; 1/3 to 1, higher = it found a cluster of least influence",
    "spearman": "per query, rank correlation of the method's margin scores with the exact "
    "leave-cluster-out effects over all clusters; -1 to 1, higher is better, 0 = no information",
    "spearman_class": "the same as spearman over the clusters of the query's own class only",
    "pearson": "per query, linear correlation of the margin scores with the exact effects; -1 to 1",
    "lds": "linear datamodeling score: per query, rank correlation over random half-subsets of clusters "
    "between the scores' additive prediction and the margin of a model retrained on each subset; "
    "-1 to 1, higher is better",
    "top1_in_top3": "share of queries whose top-scored cluster is among the exact top 3 (objective "
    "dist1); 0 to 1",
    "drop_at_K": "mean drop of the query's margin (log-odds of the true class, nats) after retraining "
    "without the K clusters the method says support it most; higher = it found the support",
    "offline_s": "seconds of one-off fitting (retraining, distillation; a cached stage counts its "
    "recorded cost); - where not measured",
    "online_s": "seconds to score these queries for all four objectives",
}


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The printed columns of evaluation rows, in table order (drop_at_K after the fixed ones)."""
    if not rows:
        return []
    extra = [k for k in rows[0] if k.startswith("drop_at_")]
    return [c for c in COLUMNS if any(c in r for r in rows)] + extra


def cell(row: Mapping[str, Any], column: str, sep: str = " ") -> str:
    """One printed value: the mean, then sep and its [lo, hi] interval where it has one."""
    v, d = row.get(column, float("nan")), DIGITS.get(column, 3)
    lo = row.get(f"{column}_lo")
    if lo is not None and not math.isnan(lo):
        return f"{_fmt(v, d)}{sep}[{_fmt(lo, d)}, {_fmt(row[f'{column}_hi'], d)}]"
    return _fmt(v, d)


def legend(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per printed column saying what it measures, its range and which way is better."""
    cols = columns(rows)
    n = sorted({int(r["n_queries"]) for r in rows if "n_queries" in r})
    queries = f"{n[0]} queries" if len(n) == 1 else "the queries"
    lines = [f"mean over {queries} [95% Student-t interval, clipped to the metric's range]"]
    drops = [c for c in cols if c.startswith("drop_at_")]
    for c in cols:
        if c in COLUMN_HELP:
            lines.append(f"{c}: {COLUMN_HELP[c]}")
    if drops:
        lines.append(f"{', '.join(drops)}: {COLUMN_HELP['drop_at_K']}")
    return lines


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of evaluation rows; an interval is shown as mean [lo, hi]."""
    cols = columns(rows)
    if not cols:
        return ""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV text of evaluation rows (all keys of all rows as columns)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def write_markdown(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write the rows as a markdown table to path."""
    p = Path(path)
    p.write_text(to_markdown(rows) + "\n")
    return p


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write the rows as CSV to path."""
    p = Path(path)
    p.write_text(to_csv(rows))
    return p


# Figure -----------------------------------------------------------------------------------------


def plot(ev: Evaluation, path: str | Path, *, n_queries: int = 3) -> Path:
    """Score-vs-truth scatter (margin) for the first few queries of each method, and the removal
    curves (mean margin drop after removing each method's top-k clusters), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ev.scores)
    nq = min(n_queries, ev.truth.shape[1])
    n_rows = len(names) + (1 if ev.curves else 0)
    fig = plt.figure(figsize=(3.0 * max(nq, 2), 2.6 * max(n_rows, 1)), layout="constrained")
    grid = fig.add_gridspec(max(n_rows, 1), max(nq, 1))
    for i, name in enumerate(names):
        s = ev.scores[name]["margin"]
        for j in range(nq):
            ax = fig.add_subplot(grid[i, j])
            same = ev.cluster_class == ev.y[j]
            ax.scatter(ev.truth[~same, j], s[~same, j], s=8, c="0.6", label="other classes")
            ax.scatter(ev.truth[same, j], s[same, j], s=12, c="C3", label="query's class")
            ax.set_title(f"{name}, query {j} (class {ev.y[j]})", fontsize=8)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel("score (margin)", fontsize=8)
            if i == len(names) - 1:
                ax.set_xlabel("exact effect", fontsize=8)
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    if ev.curves:
        ax = fig.add_subplot(grid[n_rows - 1, :])
        for name, c in ev.curves.items():
            means = [d.mean for d in c["drop"]]
            lo = [d.low for d in c["drop"]]
            hi = [d.high for d in c["drop"]]
            ax.errorbar(
                c["ks"],
                means,
                yerr=[np.subtract(means, lo), np.subtract(hi, means)],
                marker="o",
                capsize=3,
                label=name,
            )
        ax.set_xlabel("clusters removed (each method's top-k per query)")
        ax.set_ylabel("margin drop after retraining")
        ax.legend(fontsize=7)
    p = Path(path)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
