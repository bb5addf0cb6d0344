"""Noisy-data detection (DDM paper, Table 6): corrupt part of the training set, train on it, rank
its clusters by the validation objective (diagnose.py), remove the most harmful 10-40%, retrain,
and measure both test accuracy and how well the ranking finds the corrupted samples.

Corruptions (each returns exactly which training indices it changed):
- `inject_noise`: to a `fraction` of the training inputs chosen with `seed`, add Gaussian noise
  scaled to an L2 norm of exactly `norm` per sample (default 0.1, in the data's own units: the
  built-in datasets are standardised);
- `flip_labels`: give a `fraction` of the training samples a label drawn uniformly from the other
  classes.
The corrupted copy gets its own target model (same architecture, theta_0, schedule and loss as the
clean task) and its own clusters, recomputed on the corrupted data the way the clean ones were made
(per-class k-means on the target's penultimate features or on the inputs). From a `Run`,
`Run.corrupted` keeps that copy as a run directory of its own under RUN/corrupted/<tag>, so its
trajectory, clusters, synsets and retrains are computed once.

Detection: a sample's suspicion is minus its cluster's score (a cluster whose removal is predicted
to lower validation loss most is most suspect); AUC is scikit-learn's roc_auc_score of suspicion
against the corruption indicator; precision and recall at each removal fraction count the members
of the removed clusters.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..attribution.base import Attributor
from ..clusters import make_clusters, penultimate_features
from ..data import TensorData
from ..errors import DistdmError
from ..store import RunStore
from ..task import Task, train_target
from .diagnose import Diagnosis, check_fractions, diagnose, rows_to_csv

KINDS = ("noise", "labels")
NOISE_FRACTIONS = (0.1, 0.2, 0.3, 0.4)


@dataclasses.dataclass(frozen=True)
class Corruption:
    """A corrupted copy of a dataset and exactly which training samples were changed."""

    data: TensorData
    indices: np.ndarray  # sorted training indices that were corrupted
    kind: str  # 'noise' | 'labels'
    fraction: float
    seed: int
    norm: float | None = None  # L2 norm of the noise added per sample ('noise' only)

    @property
    def mask(self) -> np.ndarray:
        """Boolean (n_train,): True for corrupted samples."""
        m = np.zeros(self.data.n_train, dtype=bool)
        m[self.indices] = True
        return m

    @property
    def tag(self) -> str:
        """A short name of the corruption's settings (used for directories and file names)."""
        extra = f"-norm{self.norm:g}" if self.kind == "noise" else ""
        return f"{self.kind}{self.fraction:g}{extra}-seed{self.seed}"


def _pick(data: TensorData, fraction: float, seed: int) -> np.ndarray:
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction < 1:
        raise DistdmError(f"the corrupted fraction must lie in (0, 1) (e.g. 0.2), got {fraction!r}")
    n = data.n_train
    m = int(round(fraction * n))
    if m < 1:
        raise DistdmError(f"a fraction of {fraction} of {n} training samples corrupts none: raise it")
    return np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))


def inject_noise(data: TensorData, fraction: float = 0.2, norm: float = 0.1, *, seed: int = 0) -> Corruption:
    """Add Gaussian noise of L2 norm exactly `norm` to a random `fraction` of the training inputs."""
    if not isinstance(norm, (int, float)) or not np.isfinite(norm) or norm <= 0:
        raise DistdmError(f"the noise norm must be a finite number > 0, got {norm!r}")
    idx = _pick(data, fraction, seed)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(idx), *data.input_shape), generator=g, dtype=torch.float64)
    noise *= norm / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * len(data.input_shape))
    x = data.x_train.clone()
    x[torch.as_tensor(idx)] = (x[torch.as_tensor(idx)].double() + noise).to(x.dtype)
    new = dataclasses.replace(data, x_train=x, name=f"{data.name}+noise{fraction:g}n{norm:g}s{seed}")
    return Corruption(new, idx, "noise", float(fraction), int(seed), float(norm))


def flip_labels(data: TensorData, fraction: float = 0.2, *, seed: int = 0) -> Corruption:
    """Give a random `fraction` of the training samples a label drawn uniformly from the other classes."""
    if data.is_regression or data.num_classes < 2:
        raise DistdmError("label flips need a classification dataset with at least two classes")
    idx = _pick(data, fraction, seed)
    rng = np.random.default_rng(seed + 1)
    shift = torch.as_tensor(rng.integers(1, data.num_classes, size=len(idx)))
    y = data.y_train.clone()
    t = torch.as_tensor(idx)
    y[t] = (y[t] + shift) % data.num_classes
    new = dataclasses.replace(data, y_train=y, name=f"{data.name}+flip{fraction:g}s{seed}")
    return Corruption(new, idx, "labels", float(fraction), int(seed))


def corrupt(data: TensorData, kind: str, fraction: float, *, seed: int = 0, norm: float = 0.1) -> Corruption:
    """A corruption by kind: 'noise' (Gaussian, norm per sample) or 'labels' (flips)."""
    if kind == "noise":
        return inject_noise(data, fraction, norm, seed=seed)
    if kind == "labels":
        return flip_labels(data, fraction, seed=seed)
    raise DistdmError(f"corruption kind must be one of {KINDS}, got {kind!r}")


def corrupted_task(
    task: Task,
    corruption: Corruption,
    *,
    per_class: int | None = None,
    features: str = "penultimate",
    cluster_seed: int = 0,
    progress: bool = False,
) -> Task:
    """The clean task's model trained from the same theta_0 with the same schedule on the corrupted
    data, with k-means clusters per class recomputed on it (per_class default: the clean task's
    K / classes; features 'penultimate' (the corrupted target's) or 'inputs')."""
    if corruption.data.n_train != task.data.n_train:
        raise DistdmError("the corruption was made from another dataset than the task's")
    model = copy.deepcopy(task.model)
    model.load_state_dict(task.init)
    ctask = train_target(
        model, corruption.data, task.schedule, loss=task.loss, strategy=task.strategy, progress=progress
    )
    if per_class is None:
        per_class = max(1, task.clusters.n_clusters // max(1, task.data.num_classes))
    if features == "penultimate":
        feats = penultimate_features(model, corruption.data.x_train, ctask.final)
    elif features == "inputs":
        feats = corruption.data.x_train.flatten(1)
    else:
        raise DistdmError(f"features must be 'penultimate' or 'inputs', got {features!r}")
    clusters = make_clusters("kmeans", corruption.data.y_train, per_class, feats, seed=cluster_seed)
    return dataclasses.replace(ctask, clusters=clusters)


@dataclasses.dataclass
class Detection:
    """How well one ranking finds the corrupted samples."""

    auc: float  # mean over draws for 'random'
    precision: np.ndarray  # (F,) at each removal fraction (mean over draws)
    recall: np.ndarray  # (F,)


def detection(diagnosis: Diagnosis, corrupted: np.ndarray) -> dict[str, Detection]:
    """AUC, precision and recall of finding the corrupted samples (bool mask (n_train,)) for each
    method of a diagnosis made on the corrupted task, and for its random draws."""
    from sklearn.metrics import roc_auc_score

    assign = diagnosis.clusters.assignment
    corrupted = np.asarray(corrupted, dtype=bool)
    if len(corrupted) != len(assign) or corrupted.all() or not corrupted.any():
        raise DistdmError("the corruption mask must cover the training set and mark some, not all, samples")
    out = {}
    for m, keep in diagnosis.keep.items():
        if m in diagnosis.scores:
            aucs = [roc_auc_score(corrupted, -diagnosis.scores[m][assign])]
        else:  # random draws: suspicion = how early the draw removes the sample's cluster
            aucs = []
            for r in range(keep.shape[1]):
                removed_at = np.full(keep.shape[2], len(diagnosis.fractions), dtype=float)
                for f in range(len(diagnosis.fractions) - 1, -1, -1):
                    removed_at[keep[f, r] == 0] = f
                aucs.append(roc_auc_score(corrupted, -removed_at[assign]))
        removed = keep[:, :, assign] == 0  # (F, R, n)
        hits = (removed & corrupted).sum(-1)
        precision = (hits / np.maximum(removed.sum(-1), 1)).mean(1)
        recall = (hits / corrupted.sum()).mean(1)
        out[m] = Detection(float(np.mean(aucs)), precision, recall)
    return out


@dataclasses.dataclass
class NoiseReport:
    """Table 6: accuracy after removing ranked clusters of a corrupted training set, and detection."""

    corruption: Corruption
    diagnosis: Diagnosis
    detection: dict[str, Detection]
    clean_accuracy: float  # the clean target model on the test part

    def to_markdown(self) -> str:
        """Accuracy tables (from the diagnosis) and the detection table."""
        c = self.corruption
        what = f"Gaussian noise of norm {c.norm:g}" if c.kind == "noise" else "label flips"
        head = (
            f"{what} on {100 * c.fraction:g}% of the training samples ({len(c.indices)} of "
            f"{c.data.n_train}, seed {c.seed}); clean target model {100 * self.clean_accuracy:.2f}% "
            f"on the test part"
        )
        fr = self.diagnosis.fractions
        cols = ["method", "AUC"] + [f"P/R @{100 * f:g}%" for f in fr]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for m, d in self.detection.items():
            cells = [m, f"{d.auc:.3f}"] + [
                f"{p:.2f} / {r:.2f}" for p, r in zip(d.precision, d.recall, strict=True)
            ]
            lines.append("| " + " | ".join(cells) + " |")
        det = "\n".join(lines)
        return (
            f"{head}\n\n{self.diagnosis.to_markdown()}\nDetection of the corrupted samples "
            f"(AUC of -score; precision / recall of the removed samples):\n\n{det}\n"
        )

    def rows(self) -> list[dict[str, Any]]:
        """Detection records (one per method and fraction) for CSV."""
        out = []
        for m, d in self.detection.items():
            for f, frac in enumerate(self.diagnosis.fractions):
                out.append(
                    {
                        "method": m,
                        "fraction": frac,
                        "auc": d.auc,
                        "precision": float(d.precision[f]),
                        "recall": float(d.recall[f]),
                    }
                )
        return out

    def to_csv(self) -> str:
        """Detection records as CSV text (the accuracy records are in the diagnosis's CSV)."""
        return rows_to_csv(self.rows())

    def to_json(self) -> dict[str, Any]:
        """JSON-able summary: the corruption, the diagnosis and the detection numbers."""
        c = self.corruption
        return {
            "corruption": {
                "kind": c.kind,
                "fraction": c.fraction,
                "seed": c.seed,
                "norm": c.norm,
                "indices": c.indices.tolist(),
            },
            "clean_accuracy": self.clean_accuracy,
            "diagnosis": self.diagnosis.to_json(),
            "detection": self.rows(),
        }


def noisy_diagnosis(
    ctask: Task,
    corruption: Corruption,
    methods: Sequence[str] | Mapping[str, Attributor] = ("ddm", "if-cg"),
    *,
    clean_accuracy: float = float("nan"),
    fractions: Sequence[float] = NOISE_FRACTIONS,
    store: RunStore | None = None,
    **settings: Any,
) -> NoiseReport:
    """Diagnose the corrupted task `ctask` (see `corrupted_task` / `Run.corrupted`) and measure how
    well each ranking finds the corrupted samples. `store`: the corrupted run's RunStore to cache the
    retrains in (None: not cached). Other settings as in `diagnose`."""
    same = ctask.data.n_train == corruption.data.n_train
    if not (
        same
        and torch.equal(ctask.data.y_train, corruption.data.y_train)
        and torch.equal(ctask.data.x_train, corruption.data.x_train)
    ):
        raise DistdmError("the task was not trained on this corruption's data")
    d = diagnose(ctask, methods, fractions=check_fractions(fractions), store=store, **settings)
    d.title = f"test accuracy after removing ranked clusters of the corrupted training set ({corruption.tag})"
    return NoiseReport(corruption, d, detection(d, corruption.mask), clean_accuracy)
