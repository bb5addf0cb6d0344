"""Unlearning with synsets (DDM paper, Table 4): remove clusters' effect by fine-tuning on their synsets.

`unlearn(task, synset, clusters)` fine-tunes theta_tau on the synthetic samples of the chosen clusters
(exactly DDM's online step, `distill.finetune`) and returns the new state. `unlearn_report` puts it
beside the original model and exact retraining without those clusters (same initialisation, schedule
and data order, `Task.retrain`): accuracy and mean margin (log p_y / (1 - p_y)) on the removed
clusters' training samples, on the kept training samples and on the test set. `forgetting_table`
reproduces Table 4: fine-tune on the whole synset; an effective synset drives test accuracy towards
Acc(theta_0).

Synset variants by name (`SYNSET_VARIANTS`): 'paper' (reverse gradient matching as in the paper),
'paper-match' (the same settings with standard gradient matching, the paper's DDM-match) and
'default' (the library's preset: the influence-function target).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from ..config import DistillConfig, OnlineConfig
from ..distill import finetune
from ..engine import State, predict, select
from ..errors import DistdmError
from ..objectives import accuracy, margin
from ..presets import preset
from ..store import RunStore, atomic_write_bytes
from ..synset import Synset
from ..task import Task

SYNSET_VARIANTS = ("paper", "paper-match", "default")


def variant_settings(name: str, *, epochs: int) -> tuple[DistillConfig, OnlineConfig]:
    """Distillation and online settings of a synset variant ('paper', 'paper-match', 'default')."""
    if name == "paper-match":
        d, o = preset("paper", epochs=epochs)
        return d.replace(direction="match"), o
    if name in ("paper", "default"):
        return preset(name, epochs=epochs)
    raise DistdmError(f"unknown synset variant {name!r}; one of {list(SYNSET_VARIANTS)}")


def synset_variant(task: Task, name: str, *, progress: bool = False, store: RunStore | None = None) -> Synset:
    """The synset of a named variant for the task's clusters, cached in `store` (a run's RunStore;
    default the task's deprecated `store`, else not cached)."""
    from ..attribution.ddm import load_or_distill

    d, o = variant_settings(name, epochs=task.schedule.epochs)
    return load_or_distill(task, d, task.clusters, o.lr or task.schedule.lr, o.steps, progress, store)


def parse_clusters(text: str | Sequence[int], n_clusters: int) -> list[int]:
    """Cluster ids from '3,17' or a sequence; each in 0..K-1, no duplicates, not all of them."""
    if isinstance(text, str):
        try:
            ids = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise DistdmError(f"clusters must be comma-separated integers like 3,17, got {text!r}") from None
    else:
        ids = [int(v) for v in text]
    if not ids:
        raise DistdmError("name at least one cluster to unlearn (e.g. --clusters 3,17)")
    bad = [k for k in ids if not 0 <= k < n_clusters]
    if bad:
        raise DistdmError(f"clusters {bad} do not exist: the run has clusters 0..{n_clusters - 1}")
    if len(set(ids)) != len(ids):
        raise DistdmError(f"clusters {ids} name a cluster twice")
    if len(ids) == n_clusters:
        raise DistdmError("unlearning every cluster leaves no data: use --all for the whole-synset table")
    return ids


def delete_mask(clusters: Sequence[int], n_clusters: int) -> torch.Tensor:
    """A (1, K) deletion indicator with ones at the given clusters."""
    d = torch.zeros(1, n_clusters)
    d[0, list(clusters)] = 1.0
    return d


def unlearn(task: Task, synset: Synset, clusters: Sequence[int]) -> State:
    """theta_tau fine-tuned on the synsets of `clusters` (the synset's lr and steps): their effect removed."""
    if synset.n_clusters != task.clusters.n_clusters:
        raise DistdmError(
            f"the synset covers {synset.n_clusters} clusters, the task has {task.clusters.n_clusters}"
        )
    ids = parse_clusters(clusters, task.clusters.n_clusters)
    return select(finetune(task, synset, delete_mask(ids, synset.n_clusters)), 0)


def _stack(states: Sequence[State]) -> State:
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def _accuracy_and_margin(
    task: Task, states: State, x: torch.Tensor, y: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Per variant: accuracy and mean margin on (x, y); NaN where outputs are not finite."""
    if len(y) == 0:
        v = next(iter(states.values())).shape[0]
        return np.full(v, np.nan), np.full(v, np.nan)
    out = predict(task.model, states, x, strategy=task.strategy)
    finite = torch.isfinite(out).all(-1).all(-1).cpu().numpy()
    acc = accuracy(out, y).cpu().numpy()
    m = margin(out, out[0], y).mean(-1).cpu().numpy().astype(np.float64)
    acc[~finite] = np.nan
    m[~finite] = np.nan
    return acc, m


@dataclasses.dataclass
class UnlearnReport:
    """Unlearned model beside the original and exact retraining without the removed clusters."""

    clusters: list[int]
    state: State  # the unlearned model
    rows: list[dict[str, Any]]  # one per model: accuracy / margin on removed, kept and test samples
    n_removed: int  # training samples in the removed clusters

    def row(self, model: str) -> dict[str, Any]:
        """The row of one model ('original', 'unlearned', 'retrained', 'theta_0')."""
        for r in self.rows:
            if r["model"] == model:
                return r
        raise DistdmError(f"no row {model!r}; rows: {[r['model'] for r in self.rows]}")

    def to_markdown(self) -> str:
        """The rows as a markdown table."""
        return rows_to_markdown(self.rows)


def unlearn_report(
    task: Task,
    synset: Synset,
    clusters: Sequence[int],
    *,
    retrain: bool = True,
    seed: int | None = None,
) -> UnlearnReport:
    """Unlearn `clusters` by synset fine-tuning and measure it against the original, exact retraining
    without the clusters (from theta_0, same schedule and data order; `seed` for another seed) and
    theta_0: accuracy and mean margin on the removed training samples, the kept ones and the test set."""
    ids = parse_clusters(clusters, task.clusters.n_clusters)
    state = unlearn(task, synset, ids)
    names = ["original", "unlearned"]
    states = [task.final, state]
    if retrain:
        keep = 1.0 - delete_mask(ids, task.clusters.n_clusters)
        states.append(select(task.retrain(keep, seed=seed), 0))
        names.append("retrained")
    states.append(task.init)
    names.append("theta_0")
    stacked = _stack(states)
    d = task.data
    removed = np.isin(task.clusters.assignment, ids)
    parts = {
        "removed": (d.x_train[removed], d.y_train[removed]),
        "kept": (d.x_train[~removed], d.y_train[~removed]),
        "test": (d.x_test, d.y_test),
    }
    cols = {name: _accuracy_and_margin(task, stacked, x, y) for name, (x, y) in parts.items()}
    agree = _agreement(task, stacked, names)
    rows = []
    for i, name in enumerate(names):
        row: dict[str, Any] = {"model": name}
        for part, (acc, m) in cols.items():
            row[f"acc_{part}"] = float(acc[i])
            row[f"margin_{part}"] = float(m[i])
        if agree is not None:
            row["test_agreement_with_retrained"] = float(agree[i])
        rows.append(row)
    return UnlearnReport(ids, state, rows, int(removed.sum()))


def _agreement(task: Task, stacked: State, names: list[str]) -> np.ndarray | None:
    """Fraction of test predictions equal to the retrained model's, per model (None without it)."""
    if "retrained" not in names:
        return None
    pred = predict(task.model, stacked, task.data.x_test, strategy=task.strategy).argmax(-1)
    return (pred == pred[names.index("retrained")]).float().mean(-1).cpu().numpy()


def forgetting_table(
    task: Task, synsets: Mapping[str, Synset], *, lr_scales: Sequence[float] = (1.0,)
) -> list[dict[str, Any]]:
    """Table 4: per synset (and per multiple of its online lr in `lr_scales`), test and training
    accuracy of theta_0, theta_tau and theta_tau fine-tuned on the whole synset; 'forgotten' =
    (acc_target - acc_after) / (acc_target - acc_theta0) on the test set (1: back to theta_0's
    accuracy; 0: nothing forgotten; < 0: accuracy went up; > 1: below theta_0)."""
    d = task.data
    base = _stack([task.init, task.final])
    t0, tt = _accuracy_and_margin(task, base, d.x_test, d.y_test)[0]
    r0, rt = _accuracy_and_margin(task, base, d.x_train, d.y_train)[0]
    rows = []
    for name, syn in synsets.items():
        if syn.n_clusters != task.clusters.n_clusters:
            raise DistdmError(f"synset {name!r} covers {syn.n_clusters} clusters, the task has "
                              f"{task.clusters.n_clusters}")  # fmt: skip
        for scale in lr_scales:
            if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
                raise DistdmError(f"lr scales must be finite numbers > 0, got {scale!r}")
            run = dataclasses.replace(syn, lr=syn.lr * float(scale))
            after = finetune(task, run, torch.ones(1, syn.n_clusters))
            ta = float(_accuracy_and_margin(task, after, d.x_test, d.y_test)[0][0])
            ra = float(_accuracy_and_margin(task, after, d.x_train, d.y_train)[0][0])
            gap = float(tt - t0)
            cfg = syn.info.get("config", {})
            rows.append(
                {
                    "synset": name,
                    "target": cfg.get("target", "?"),
                    "direction": cfg.get("direction", "?") if cfg.get("target") == "trajectory" else "-",
                    "steps x lr": f"{run.steps} x {run.lr:g}",
                    "test_acc_theta0": float(t0),
                    "test_acc_target": float(tt),
                    "test_acc_after_whole_synset": ta,
                    "train_acc_target": float(rt),
                    "train_acc_after_whole_synset": ra,
                    "forgotten": (float(tt) - ta) / gap
                    if math.isfinite(ta) and abs(gap) > 1e-12
                    else math.nan,
                }
            )
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "diverged (NaN)" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def rows_to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A list of dicts (same keys) as a markdown table; NaN is shown as 'diverged (NaN)'."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def save_state(path: str | os.PathLike, state: State, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a model state as a safetensors file atomically (metadata as JSON strings in the header)."""
    p = Path(path)
    if p.suffix != ".safetensors":
        raise DistdmError(f"the model file must end in .safetensors, got {p.name!r}")
    if p.exists() and p.is_dir():
        raise DistdmError(f"{p} is a directory: name a .safetensors file")
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write_bytes(p, safetensors_bytes(tensors, metadata=meta))
    return p
