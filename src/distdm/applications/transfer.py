"""Transferability (DDM paper, Table 7): which training data can a student do without when it learns
from a teacher by knowledge distillation?

The teacher is the trained target model. The objective is KL(teacher || model) on held-out
validation data (`teacher_kl`; the teacher's outputs are the objective's reference outputs, so
every attribution method can use it). Each cluster's score is the predicted change of the mean KL
when the cluster is removed (scores.py sign). Removing any data can only move a model away from the
teacher, so the deleted clusters are those with the *lowest* scores, whose removal is predicted to
reduce (or least increase) the KL to the teacher: data the teacher's behaviour does not rest on.
Then a student (the target's architecture, from theta_0 or a fresh initialisation per seed) is
trained with the target's schedule on the remaining data with the loss (1 - alpha) CE + alpha
KL(teacher || student) (`kd_loss`, through the engine's custom-loss hook), and its test accuracy is
compared with deleting the same share of randomly chosen clusters. A sanity row deletes the
clusters with the *highest* scores instead (the data the teacher rests on most), which should hurt.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..attribution.base import Attributor
from ..engine import LossFn, predict, train_variants
from ..errors import DistdmError
from ..objectives import accuracy
from ..task import Task, reinitialise
from .diagnose import (
    Removal,
    Split,
    accuracy_table,
    check_fractions,
    fit_and_score,
    random_orders,
    removal_curve_png,
    rows_to_csv,
    seeds_text,
    validation_split,
)

TRANSFER_FRACTIONS = (0.1, 0.2, 0.5)


def teacher_kl(out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(out)) per query: distance of a model to the teacher's outputs `ref`."""
    pt = F.log_softmax(ref, -1)
    return (pt.exp() * (pt - F.log_softmax(out, -1))).sum(-1)


def kd_targets(labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Training targets for `kd_loss`: (n, 1 + O) floats, the label then the teacher's logits."""
    return torch.cat([labels.float().unsqueeze(-1), teacher_logits.float()], dim=-1)


def kd_loss(alpha: float, temperature: float = 1.0) -> LossFn:
    """Per-sample (1 - alpha) CE(label) + alpha T^2 KL(teacher_T || student_T) on `kd_targets`."""
    if not 0 <= alpha <= 1:
        raise DistdmError(f"alpha must lie in [0, 1], got {alpha!r}")
    if not temperature > 0:
        raise DistdmError(f"the temperature must be > 0, got {temperature!r}")

    def loss(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        y = targets[..., 0].long()
        logp = F.log_softmax(out, -1)
        ce = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        pt = F.log_softmax(targets[..., 1:] / temperature, -1)
        kl = (pt.exp() * (pt - F.log_softmax(out / temperature, -1))).sum(-1)
        return (1 - alpha) * ce + alpha * temperature**2 * kl

    loss.__qualname__ = f"kd_loss(alpha={alpha:g}, T={temperature:g})"
    return loss


def kl_scores(att: Attributor, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per cluster (K,), the predicted change of the mean KL(teacher || model) on x when removed."""
    task = att.task_  # type: ignore[attr-defined]
    s = att.scores(x, y, teacher_kl)
    if s.unit == "sample":
        s = s.to_clusters(task.clusters.assignment, task.clusters.n_clusters)
    return s.values.mean(1)


def train_students(
    task: Task,
    keep: np.ndarray,
    alpha: float,
    seeds: Sequence[int | None],
    *,
    temperature: float = 1.0,
    progress: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Students trained with `kd_loss` on each keep-mask (M, K), one stacked state per seed
    (None: the target's theta_0 and shuffle order; else a fresh initialisation and order)."""
    targets = kd_targets(task.data.y_train, task.outputs(task.data.x_train))
    weights = task.clusters.keep_weights(torch.as_tensor(keep, dtype=torch.float32))
    out = []
    for s in seeds:
        schedule, init = task.schedule, task.init
        if s is not None and s != task.schedule.seed:
            schedule = dataclasses.replace(task.schedule, seed=int(s))
            init = reinitialise(task.model, int(s))
        res = train_variants(
            task.model,
            task.data.x_train,
            targets,
            schedule,
            weights=weights,
            init=init,
            loss=kd_loss(alpha, temperature),
            reduction=task.reduction,
            strategy=task.strategy,
            progress=progress,
        )
        out.append(res.states)
    return out


@dataclasses.dataclass
class TransferResult:
    """Student accuracy after deleting clusters by each ranking, beside random deletion.
    accuracy[m]: (F, R, S) fractions x draws x student seeds; removed[m]: (F, R)."""

    fractions: list[float]
    alpha: float
    scores: dict[str, np.ndarray]
    accuracy: dict[str, np.ndarray]
    removed: dict[str, np.ndarray]
    base_accuracy: np.ndarray  # (S,) student on all data
    teacher_accuracy: float
    split: Split
    student_seeds: list[int | None]
    random_seeds: list[int]
    seconds: dict[str, float]

    def to_markdown(self) -> str:
        """Student test accuracy (%) per deletion rule and deleted share."""
        head = (
            f"student test accuracy after deleting clusters, trained with (1 - a) CE + a KL to the "
            f"teacher, a = {self.alpha:g}; teacher {100 * self.teacher_accuracy:.2f}% on the test part "
            f"({len(self.split.test)} samples; KL ranked on {len(self.split.validation)} validation "
            f"samples); students trained with {seeds_text(self.student_seeds)}; "
            f"random: {len(self.random_seeds)} draws"
        )
        table = accuracy_table(self.fractions, self.base_accuracy, self.accuracy, self.removed)
        return f"{head}\n\n{table}\n"

    def rows(self) -> list[dict[str, Any]]:
        """Flat records: method, fraction, draw, student seed, removed share, accuracy."""
        out = [
            {
                "method": "none",
                "fraction": 0.0,
                "draw": 0,
                "student_seed": s,
                "removed": 0.0,
                "accuracy": float(self.base_accuracy[i]),
            }
            for i, s in enumerate(self.student_seeds)
        ]
        for m, acc in self.accuracy.items():
            for f, frac in enumerate(self.fractions):
                for r in range(acc.shape[1]):
                    for i, s in enumerate(self.student_seeds):
                        out.append(
                            {
                                "method": m,
                                "fraction": frac,
                                "draw": r,
                                "student_seed": s,
                                "removed": float(self.removed[m][f, r]),
                                "accuracy": float(acc[f, r, i]),
                            }
                        )
        return out

    def to_csv(self) -> str:
        """The flat records as CSV text."""
        return rows_to_csv(self.rows())

    def curve_png(self) -> bytes:
        """Student accuracy against the share of training data deleted."""
        return removal_curve_png(
            self.base_accuracy,
            self.accuracy,
            self.removed,
            "student test accuracy",
            f"knowledge distillation after deletion (a = {self.alpha:g})",
        )

    def files(self, stem: str = "transfer") -> dict[str, Any]:
        """The outputs by file name: table (md, csv), summary (json), curve (png)."""
        summary = {
            "fractions": self.fractions,
            "alpha": self.alpha,
            "teacher_accuracy": self.teacher_accuracy,
            "seconds": self.seconds,
            "scores": {m: v.tolist() for m, v in self.scores.items()},
            "rows": self.rows(),
        }
        return {
            f"{stem}.md": self.to_markdown(),
            f"{stem}.csv": self.to_csv(),
            f"{stem}.json": json.dumps(summary, indent=2),
            f"{stem}-curve.png": self.curve_png(),
        }


def transfer(
    task: Task,
    methods: Sequence[str] | Mapping[str, Attributor] = ("ddm",),
    *,
    fractions: Sequence[float] = TRANSFER_FRACTIONS,
    alpha: float = 0.5,
    temperature: float = 1.0,
    random_seeds: Sequence[int] = (0, 1, 2),
    student_seeds: Sequence[int | None] = (None,),
    split: Split | None = None,
    validation_fraction: float = 0.5,
    reverse_check: bool = True,
    balanced: bool = False,
    progress: bool = False,
) -> TransferResult:
    """Delete the clusters each method ranks least needed by the teacher (lowest KL score; balanced:
    the same share of every class), train KD students on the rest, and compare their test accuracy
    with random deletion."""
    fr = check_fractions(fractions)
    kd_loss(alpha, temperature)  # validate before any expensive work
    if not random_seeds:
        raise DistdmError("give at least one random seed for the random-deletion baseline")
    if task.data.is_regression:
        raise DistdmError("knowledge distillation here needs a classification task")
    split = split or validation_split(task.data, validation_fraction)
    xv, yv = split.xy(task.data, "validation")
    xt, yt = split.xy(task.data, "test")
    scores, seconds = fit_and_score(task, methods, kl_scores, xv, yv)
    sizes = task.clusters.sizes()
    cc = task.clusters.cluster_class if balanced else None
    removals = {
        m: Removal.from_orders([np.argsort(s, kind="stable")], sizes, fr, cc) for m, s in scores.items()
    }
    if reverse_check:
        for m, s in scores.items():
            removals[f"{m} (highest removed)"] = Removal.from_orders(
                [np.argsort(-s, kind="stable")], sizes, fr, cc
            )
    removals["random"] = Removal.from_orders(random_orders(len(sizes), random_seeds), sizes, fr, cc)
    k = len(sizes)
    keeps = np.concatenate([np.ones((1, k))] + [r.keep.reshape(-1, k) for r in removals.values()])
    uniq, inverse = np.unique(keeps, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    t = time.perf_counter()
    per_seed = []
    for states in train_students(
        task, uniq, alpha, list(student_seeds), temperature=temperature, progress=progress
    ):
        out = predict(task.model, states, xt, strategy=task.strategy)
        per_seed.append(accuracy(out, yt).cpu().numpy()[inverse])
    seconds["students"] = time.perf_counter() - t
    acc_all = np.stack(per_seed, axis=1)  # (M, S)
    acc, at = {}, 1
    for m, r in removals.items():
        f, n_r = r.keep.shape[:2]
        acc[m] = acc_all[at : at + f * n_r].reshape(f, n_r, -1)
        at += f * n_r
    teacher = float(accuracy(task.outputs(xt), yt))
    return TransferResult(
        fractions=fr,
        alpha=float(alpha),
        scores=scores,
        accuracy=acc,
        removed={m: r.removed for m, r in removals.items()},
        base_accuracy=acc_all[0],
        teacher_accuracy=teacher,
        split=split,
        student_seeds=list(student_seeds),
        random_seeds=[int(s) for s in random_seeds],
        seconds=seconds,
    )
