"""Data diagnosis (DDM paper, Table 3): which training clusters hurt the model on held-out data?

Every cluster k gets a score s_k = the predicted change of the mean validation cross-entropy when k is
removed from training (sign convention of scores.py: f(without k) - f(all)); negative means that the
model would generalise better without it. Clusters are removed in ascending order of s_k (most
harmful first) until the removed share of the training samples is closest to each requested
fraction (at least one cluster), the model is retrained from theta_0 with the target's schedule
and data order (one batched `retrain_masks` call per seed, cached in the run directory if given
one: `store=`), and its test accuracy is compared with removing the same share of randomly ordered
clusters (several draws).

Validation data: a TensorData has a training and a test split only, and the target model was
trained on all of its training split. So the validation set is held out of the *test* set: a
stratified split (seed `split_seed`, `validation_fraction` of the test set, at most
`max_validation` samples) ranks the clusters, and accuracy is reported on the remaining test
samples only. Neither the training set nor the target model changes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..attribution import make_attributor
from ..attribution.base import Attributor, accepts
from ..attribution.retrain import retrain_masks
from ..clusters import Clusters
from ..data import TensorData
from ..engine import State, predict
from ..errors import DistdmError
from ..objectives import accuracy, dist2
from ..store import RunStore, check_store
from ..task import Task

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.01, 0.1, 0.2, 0.5)


# ------------------------------------------------------------------------------------------------
# validation split and cluster scores


@dataclasses.dataclass(frozen=True)
class Split:
    """Indices into the test set: `validation` ranks clusters, `test` measures accuracy."""

    validation: np.ndarray
    test: np.ndarray

    def xy(self, data: TensorData, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of one part ('validation' or 'test')."""
        idx = torch.as_tensor(getattr(self, part))
        return data.x_test[idx], data.y_test[idx]


def validation_split(
    data: TensorData, fraction: float = 0.5, *, seed: int = 0, max_validation: int | None = 1000
) -> Split:
    """Hold a stratified `fraction` of the test set out as validation data (at most max_validation)."""
    from sklearn.model_selection import train_test_split

    if data.is_regression:
        raise DistdmError("diagnosis ranks clusters by validation cross-entropy: it needs class labels")
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise DistdmError(f"the validation fraction must lie in (0, 1), got {fraction!r}")
    n = len(data.y_test)
    n_val = int(round(fraction * n))
    if max_validation is not None:
        n_val = min(n_val, int(max_validation))
    classes = int(torch.unique(data.y_test).numel())
    if n_val < classes or n - n_val < classes:
        raise DistdmError(
            f"the test set has {n} samples: too few to split into validation and test parts with at "
            f"least one sample of each of its {classes} classes; give a larger test set"
        )
    idx = np.arange(n)
    try:
        val, test = train_test_split(
            idx, train_size=n_val, random_state=seed, stratify=data.y_test.cpu().numpy()
        )
    except ValueError:  # a class with a single test sample cannot be stratified
        val, test = train_test_split(idx, train_size=n_val, random_state=seed)
    return Split(np.sort(val), np.sort(test))


def validation_scores(att: Attributor, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per cluster (K,), the attributor's predicted change of the mean validation loss on (x, y)
    when the cluster is removed (negative: the model would do better without it); one solve for
    the methods that are linear in the queries."""
    clusters = att.task_.clusters
    s = att.mean_scores(x, y, "loss")
    if s.unit == "sample":
        s = s.to_clusters(clusters.assignment, clusters.n_clusters)
    return s.values[:, 0]


def fit_methods(
    task: Task, methods: Sequence[str] | Mapping[str, Attributor], store: RunStore | None = None
) -> dict[str, Attributor]:
    """Fitted attributors by name: given ones are used as they are, names are made and fitted (those
    that cache their work, e.g. exact retraining, in `store` if given)."""
    if isinstance(methods, Mapping):
        return dict(methods)
    if isinstance(methods, str):
        methods = [m for m in methods.split(",") if m]
    out = {}
    for name in methods:
        if name == "random":
            raise DistdmError("'random' is always the baseline; list only the methods that rank clusters")
        settings = {"store": store} if store is not None and accepts(name, "store") else {}
        out[name] = make_attributor(name, **settings).fit(task)
    return out


def fit_and_score(
    task: Task,
    methods: Sequence[str] | Mapping[str, Attributor],
    score: Callable[[Attributor, torch.Tensor, torch.Tensor], np.ndarray],
    x: torch.Tensor,
    y: torch.Tensor,
    store: RunStore | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Fit every method (caching in `store` if given) and score its clusters with `score` on (x, y);
    returns the scores by name and the seconds spent ('fit', 'scores NAME')."""
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    fitted = fit_methods(task, methods, store)
    seconds["fit"] = time.perf_counter() - t
    scores = {}
    for name, att in fitted.items():
        t = time.perf_counter()
        scores[name] = score(att, x, y)
        seconds[f"scores {name}"] = time.perf_counter() - t
        log.info("%s: scored %d clusters on %d samples", name, len(scores[name]), len(y))
    return scores, seconds


# ------------------------------------------------------------------------------------------------
# removal masks


def check_fractions(fractions: Sequence[float]) -> list[float]:
    """Removal fractions as floats in (0, 1), or a DistdmError."""
    try:
        fr = [float(f) for f in fractions]
    except (TypeError, ValueError):
        raise DistdmError(f"removal fractions must be numbers in (0, 1), got {fractions!r}") from None
    if not fr or any(not 0 < f < 1 for f in fr):
        raise DistdmError(f"removal fractions must lie in (0, 1) (e.g. 0.1 for 10%), got {fr}")
    return fr


def removal_keep(order: np.ndarray, sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Keep-mask (K,) dropping clusters in `order` until the removed share of samples is closest
    to `fraction` (at least one cluster, never all)."""
    sizes = np.asarray(sizes)
    total = sizes.sum()
    cum = np.cumsum(sizes[order]) / total
    m = int(np.argmin(np.abs(cum[:-1] - fraction))) + 1 if len(order) > 1 else 0
    keep = np.ones(len(sizes))
    keep[order[:m]] = 0.0
    return keep


def balanced_order(order: np.ndarray, sizes: np.ndarray, cluster_class: np.ndarray) -> np.ndarray:
    """`order` rearranged so that every prefix removes about the same share of every class: the next
    cluster is always that of the class with the smallest share removed so far (ties: the class whose
    next cluster comes first in `order`), so a large removal cannot wipe out whole classes."""
    sizes = np.asarray(sizes, dtype=np.float64)
    cluster_class = np.asarray(cluster_class)
    classes = np.unique(cluster_class)
    queues = {c: [k for k in order if cluster_class[k] == c] for c in classes}
    totals = {c: sizes[cluster_class == c].sum() for c in classes}
    removed = dict.fromkeys(classes, 0.0)
    rank = {int(k): i for i, k in enumerate(order)}
    out = []
    while len(out) < len(order):
        open_ = [c for c in classes if queues[c]]
        c = min(open_, key=lambda c: (removed[c] / totals[c], rank[int(queues[c][0])]))
        k = queues[c].pop(0)
        removed[c] += sizes[k]
        out.append(k)
    return np.asarray(out, dtype=np.int64)


def random_orders(n_clusters: int, seeds: Sequence[int]) -> list[np.ndarray]:
    """One random cluster order per seed (the random-removal baseline)."""
    return [np.random.default_rng(1000 + int(s)).permutation(n_clusters) for s in seeds]


@dataclasses.dataclass
class Removal:
    """Keep masks of one ranking (or of R random draws) at every fraction: (F, R, K)."""

    keep: np.ndarray
    removed: np.ndarray  # (F, R) share of training samples removed

    @classmethod
    def from_orders(
        cls,
        orders: Sequence[np.ndarray],
        sizes: np.ndarray,
        fractions: Sequence[float],
        cluster_class: np.ndarray | None = None,
    ) -> Removal:
        """Masks for each order (R) at each fraction (F); with cluster_class, about the same share
        of every class is removed (`balanced_order`)."""

        if cluster_class is not None:
            orders = [balanced_order(o, sizes, cluster_class) for o in orders]
        keep = np.stack([np.stack([removal_keep(o, sizes, f) for o in orders]) for f in fractions])
        removed = ((1 - keep) * sizes).sum(-1) / sizes.sum()
        return cls(keep, removed)


def retrain_and_evaluate(
    task: Task,
    keeps: np.ndarray,
    seeds: Sequence[int | None],
    evaluations: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    progress: bool = False,
    store: RunStore | None = None,
) -> dict[str, np.ndarray]:
    """Retrain once per keep-mask (M, K) and seed (cached in the run store `store` if given);
    accuracy and mean CE on each named (x, y): {'<name>_accuracy': (M, S), '<name>_loss': (M, S)}."""
    uniq, inverse = np.unique(keeps, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    out: dict[str, list[np.ndarray]] = {}
    for s in seeds:
        keep = torch.as_tensor(uniq, dtype=torch.float32)
        states = retrain_masks(task, keep, seed=s, progress=progress, store=store)
        for name, (x, y) in evaluations.items():
            acc, loss = accuracy_and_loss(task, states, x, y)
            out.setdefault(f"{name}_accuracy", []).append(acc[inverse])
            out.setdefault(f"{name}_loss", []).append(loss[inverse])
    return {k: np.stack(v, axis=1) for k, v in out.items()}


def accuracy_and_loss(
    task: Task, states: State, x: torch.Tensor, y: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and mean cross-entropy (V,) of stacked states on (x, y)."""
    out = predict(task.model, states, x, strategy=task.strategy)
    acc = accuracy(out, y).cpu().numpy()
    loss = dist2(out, out[0], y).double().mean(-1).cpu().numpy()
    return acc, loss


# ------------------------------------------------------------------------------------------------
# the diagnosis and its outputs


@dataclasses.dataclass
class Diagnosis:
    """Test accuracy after removing each method's most harmful clusters, beside random removal.

    Arrays per method (and 'random'): accuracy / val_loss (F, R, S): fractions x draws (1 for a
    ranking, one per random seed) x retrain seeds; removed (F, R): share of samples removed."""

    fractions: list[float]
    scores: dict[str, np.ndarray]  # (K,) predicted change of validation loss per cluster
    accuracy: dict[str, np.ndarray]
    val_loss: dict[str, np.ndarray]
    removed: dict[str, np.ndarray]
    keep: dict[str, np.ndarray]  # (F, R, K)
    base_accuracy: np.ndarray  # (S,) retrained on everything
    base_val_loss: np.ndarray
    target_accuracy: float  # the target model on the test part
    clusters: Clusters
    split: Split
    retrain_seeds: list[int | None]
    random_seeds: list[int]
    seconds: dict[str, float]
    balanced: bool = False  # the same share removed from every class
    title: str = "test accuracy after removing the clusters ranked most harmful"

    def order(self, method: str) -> np.ndarray:
        """Clusters from most harmful (lowest score) to most helpful."""
        return np.argsort(self.scores[method], kind="stable")

    def ranking(self, method: str, top: int | None = None) -> list[dict[str, Any]]:
        """The ranked cluster list: rank, cluster, class, size and score, most harmful first."""
        sizes = self.clusters.sizes()
        order = self.order(method)[:top]
        return [
            {
                "rank": i + 1,
                "cluster": int(k),
                "class": int(self.clusters.cluster_class[k]),
                "size": int(sizes[k]),
                "score": float(self.scores[method][k]),
            }
            for i, k in enumerate(order)
        ]

    def rows(self) -> list[dict[str, Any]]:
        """One flat record per method, fraction, draw and retrain seed (the CSV's rows)."""
        out = []
        for s, seed in enumerate(self.retrain_seeds):
            out.append(
                {
                    "method": "none",
                    "fraction": 0.0,
                    "draw": 0,
                    "retrain_seed": seed,
                    "removed": 0.0,
                    "accuracy": float(self.base_accuracy[s]),
                    "val_loss": float(self.base_val_loss[s]),
                }
            )
        for m, acc in self.accuracy.items():
            for f, frac in enumerate(self.fractions):
                for r in range(acc.shape[1]):
                    for s, seed in enumerate(self.retrain_seeds):
                        out.append(
                            {
                                "method": m,
                                "fraction": frac,
                                "draw": r,
                                "retrain_seed": seed,
                                "removed": float(self.removed[m][f, r]),
                                "accuracy": float(acc[f, r, s]),
                                "val_loss": float(self.val_loss[m][f, r, s]),
                            }
                        )
        return out

    def to_csv(self) -> str:
        """The flat records as CSV text."""
        return rows_to_csv(self.rows())

    def to_markdown(self) -> str:
        """Accuracy table (mean ± sd over draws and seeds) and the validation-loss table."""
        head = (
            f"{self.title}; test part {len(self.split.test)} samples, validation part "
            f"{len(self.split.validation)}; target model {100 * self.target_accuracy:.2f}%; "
            f"retrained with {seeds_text(self.retrain_seeds)}; random: {len(self.random_seeds)} draws"
            + ("; the same share removed from every class" if self.balanced else "")
        )
        acc = accuracy_table(self.fractions, self.base_accuracy, self.accuracy, self.removed, percent=True)
        loss = accuracy_table(self.fractions, self.base_val_loss, self.val_loss, self.removed, percent=False)
        return f"{head}\n\nTest accuracy (%):\n\n{acc}\n\nValidation loss (mean CE):\n\n{loss}\n"

    def curve_png(self) -> bytes:
        """Removal curve: test accuracy against the share of training data removed."""
        return removal_curve_png(self.base_accuracy, self.accuracy, self.removed, "test accuracy", self.title)

    def to_json(self) -> dict[str, Any]:
        """Everything except the arrays of masks, as JSON-able values."""
        return {
            "fractions": self.fractions,
            "target_accuracy": self.target_accuracy,
            "retrain_seeds": self.retrain_seeds,
            "random_seeds": self.random_seeds,
            "balanced": self.balanced,
            "validation_indices": self.split.validation.tolist(),
            "seconds": self.seconds,
            "rankings": {m: self.ranking(m) for m in self.scores},
            "rows": self.rows(),
        }


def seeds_text(seeds: Sequence[int | None]) -> str:
    """Retrain seeds for people: None is the target's own initialisation and data order."""
    others = [str(s) for s in seeds if s is not None]
    parts = ["the target's own seed"] if any(s is None for s in seeds) else []
    if others:
        parts.append(("seed " if len(others) == 1 else "seeds ") + ", ".join(others))
    return " and ".join(parts)


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text of flat records (header from the first record)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _cell(v: np.ndarray, scale: float) -> str:
    v = np.asarray(v, dtype=np.float64).ravel() * scale
    digits = 2 if scale == 100 else 4
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def accuracy_table(
    fractions: Sequence[float],
    base: np.ndarray,
    values: Mapping[str, np.ndarray],
    removed: Mapping[str, np.ndarray],
    *,
    percent: bool = True,
) -> str:
    """Markdown: one row per method, one column per removal fraction (mean ± sd over draws x seeds),
    the share of samples actually removed in brackets."""
    scale = 100.0 if percent else 1.0
    cols = ["method", "0%"] + [f"{100 * f:g}%" for f in fractions]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for m, v in values.items():
        cells = [m, _cell(base, scale)]
        for f in range(len(fractions)):
            cells.append(f"{_cell(v[f], scale)} ({100 * float(np.mean(removed[m][f])):.1f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def removal_curve_png(
    base: np.ndarray,
    values: Mapping[str, np.ndarray],
    removed: Mapping[str, np.ndarray],
    ylabel: str,
    title: str,
) -> bytes:
    """Line plot of a metric (mean, ± sd band for repeated draws) against the share removed."""
    from ..figures import _png, plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, v in values.items():
        x = np.concatenate([[0.0], 100 * removed[m].mean(1)])
        flat = v.reshape(v.shape[0], -1)
        mean = np.concatenate([[base.mean()], flat.mean(1)])
        (line,) = ax.plot(x, 100 * mean, marker="o", label=m)
        if flat.shape[1] > 1:
            sd = np.concatenate([[0.0], flat.std(1, ddof=1)])
            ax.fill_between(x, 100 * (mean - sd), 100 * (mean + sd), alpha=0.2, color=line.get_color())
    ax.set_xlabel("training data removed (%)")
    ax.set_ylabel(f"{ylabel} (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def flagged_png(
    diagnosis: Diagnosis, x_train: torch.Tensor, method: str, *, n_clusters: int = 8, per_cluster: int = 10
) -> bytes:
    """Members of the clusters ranked most harmful (an image grid), or their scores as bars when
    the inputs are not images."""
    from ..figures import _as_image, _png, bar_png, plt

    ranked = diagnosis.ranking(method, n_clusters)
    if _as_image(x_train[0]) is None:
        labels = [f"k={r['cluster']} (class {r['class']}, n={r['size']})" for r in ranked]
        return bar_png(
            labels,
            [r["score"] for r in ranked],
            f"{method}: most harmful clusters",
            "predicted change of validation loss",
        )
    fig, axes = plt.subplots(
        len(ranked), per_cluster, figsize=(1.0 * per_cluster, 1.05 * len(ranked)), squeeze=False
    )
    for r, info in enumerate(ranked):
        members = diagnosis.clusters.members(info["cluster"])[:per_cluster]
        for c in range(per_cluster):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(members):
                ax.imshow(_as_image(x_train[members[c]]), cmap="gray")
        axes[r, 0].text(
            -0.6,
            0.5,
            f"#{info['rank']} k={info['cluster']}\nclass {info['class']}, "
            f"n={info['size']}\n{info['score']:+.3g}",
            transform=axes[r, 0].transAxes,
            ha="right",
            va="center",
            fontsize=7,
        )
    fig.suptitle(f"{method}: clusters whose removal most lowers validation loss", fontsize=9)
    return _png(fig)


def diagnose(
    task: Task,
    methods: Sequence[str] | Mapping[str, Attributor] = ("ddm", "if-cg"),
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    random_seeds: Sequence[int] = (0, 1, 2, 3, 4),
    retrain_seeds: Sequence[int | None] = (None,),
    split: Split | None = None,
    validation_fraction: float = 0.5,
    balanced: bool = False,
    progress: bool = False,
    store: RunStore | None = None,
) -> Diagnosis:
    """Rank clusters by each method's predicted change of validation loss, remove the most harmful
    `fractions` of the training data (balanced: of every class), retrain, and compare test accuracy
    with random removal. `store`: a run's RunStore to cache the retrains in (None: not cached)."""
    check_store(store)
    fr = check_fractions(fractions)
    if not random_seeds:
        raise DistdmError("give at least one random seed for the random-removal baseline")
    split = split or validation_split(task.data, validation_fraction)
    xv, yv = split.xy(task.data, "validation")
    xt, yt = split.xy(task.data, "test")
    scores, seconds = fit_and_score(task, methods, validation_scores, xv, yv, store)
    sizes = task.clusters.sizes()
    cc = task.clusters.cluster_class if balanced else None
    removals = {
        m: Removal.from_orders([np.argsort(s, kind="stable")], sizes, fr, cc) for m, s in scores.items()
    }
    removals["random"] = Removal.from_orders(random_orders(len(sizes), random_seeds), sizes, fr, cc)
    keeps = np.concatenate(
        [np.ones((1, len(sizes)))] + [r.keep.reshape(-1, len(sizes)) for r in removals.values()]
    )
    t = time.perf_counter()
    ev = retrain_and_evaluate(
        task, keeps, list(retrain_seeds), {"test": (xt, yt), "val": (xv, yv)}, progress=progress,
        store=store,
    )  # fmt: skip
    seconds["retrain"] = time.perf_counter() - t
    acc, loss, at = {}, {}, 1
    for m, r in removals.items():
        f, n_r = r.keep.shape[:2]
        acc[m] = ev["test_accuracy"][at : at + f * n_r].reshape(f, n_r, -1)
        loss[m] = ev["val_loss"][at : at + f * n_r].reshape(f, n_r, -1)
        at += f * n_r
    target_acc = float(accuracy(task.outputs(xt), yt))
    return Diagnosis(
        fractions=fr,
        scores=scores,
        accuracy=acc,
        val_loss=loss,
        removed={m: r.removed for m, r in removals.items()},
        keep={m: r.keep for m, r in removals.items()},
        base_accuracy=ev["test_accuracy"][0],
        base_val_loss=ev["val_loss"][0],
        target_accuracy=target_acc,
        clusters=task.clusters,
        split=split,
        retrain_seeds=list(retrain_seeds),
        random_seeds=[int(s) for s in random_seeds],
        seconds=seconds,
        balanced=balanced,
    )


def save_outputs(store: Any, prefix: str, files: Mapping[str, bytes | str | None]) -> dict[str, str]:
    """Write named outputs into a run directory (atomically, with checksums); returns their paths."""
    paths = {}
    for name, data in files.items():
        if data is None:
            continue
        raw = data.encode() if isinstance(data, str) else data
        paths[name] = str(store.save_file(f"{prefix}/{name}", raw))
    return paths


def diagnosis_files(diagnosis: Diagnosis, x_train: torch.Tensor, stem: str = "diagnose") -> dict[str, Any]:
    """The standard outputs of a diagnosis: table (md, csv), rankings (json), curve and flagged
    clusters (png) by file name."""
    import json

    files: dict[str, Any] = {
        f"{stem}.md": diagnosis.to_markdown(),
        f"{stem}.csv": diagnosis.to_csv(),
        f"{stem}.json": json.dumps(diagnosis.to_json(), indent=2),
        f"{stem}-curve.png": diagnosis.curve_png(),
    }
    for m in diagnosis.scores:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", m)  # method specs like 'ddm:paper' -> 'ddm-paper'
        files[f"{stem}-flagged-{safe}.png"] = flagged_png(diagnosis, x_train, m)
    return files
