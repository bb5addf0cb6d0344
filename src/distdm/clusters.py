"""Attribution units: per-class k-means clusters, class-wise and index-order partitions."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .errors import DistdmError
from .models import last_linear


@dataclasses.dataclass(frozen=True)
class Clusters:
    """A partition of the training set: `assignment[i]` is the cluster of sample i; cluster k
    belongs to class `cluster_class[k]` (-1 when clusters mix classes, e.g. regression)."""

    assignment: np.ndarray  # (n,) int
    cluster_class: np.ndarray  # (K,) int
    kind: str = "kmeans"

    def __post_init__(self) -> None:
        # frozen: lists and tensors are converted once here, so every method sees int64 arrays
        object.__setattr__(self, "assignment", _int_array(self.assignment, "assignment"))
        object.__setattr__(self, "cluster_class", _int_array(self.cluster_class, "cluster_class"))
        if not isinstance(self.kind, str):
            raise DistdmError(f"Clusters kind must be a string, got {type(self.kind).__name__}")
        k = len(self.cluster_class)
        if len(self.assignment) and (self.assignment.min() < 0 or self.assignment.max() >= k):
            bad = self.assignment[(self.assignment < 0) | (self.assignment >= k)][0]
            raise DistdmError(
                f"cluster assignment refers to cluster {int(bad)}, which does not exist "
                f"(cluster_class lists {k} clusters, ids 0..{k - 1})"
            )

    @property
    def n_clusters(self) -> int:
        """K, the number of clusters."""
        return len(self.cluster_class)

    def members(self, k: int) -> np.ndarray:
        """Indices of the training samples in cluster k."""
        return np.flatnonzero(self.assignment == k)

    def sizes(self) -> np.ndarray:
        """Number of samples in each cluster."""
        return np.bincount(self.assignment, minlength=self.n_clusters)

    def indicator(self) -> torch.Tensor:
        """(K, n) 0/1 matrix: row k marks cluster k's members."""
        m = torch.zeros(self.n_clusters, len(self.assignment))
        m[torch.as_tensor(self.assignment), torch.arange(len(self.assignment))] = 1.0
        return m

    def keep_weights(self, keep: torch.Tensor) -> torch.Tensor:
        """Sample weights (V, n) from cluster keep masks (V, K): a sample is kept with its cluster."""
        return torch.as_tensor(keep, dtype=torch.float32)[:, torch.as_tensor(self.assignment)]


def _int_array(v: object, what: str) -> np.ndarray:
    """A 1-D int64 array from a list, array or tensor of integers, or a DistdmError."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    try:
        a = np.asarray(v)
    except (TypeError, ValueError) as e:
        raise DistdmError(f"Clusters {what} must be a 1-D array of integers ({e})") from e
    if a.ndim != 1:
        raise DistdmError(f"Clusters {what} must be a 1-D array of integers, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and np.isfinite(a).all() and (a == np.round(a)).all():
            return a.astype(np.int64)  # whole numbers stored as floats (e.g. read from a CSV)
        raise DistdmError(f"Clusters {what} must be integers, got an array of dtype {a.dtype}")
    return a.astype(np.int64)


def _check_per_class(per_class: object) -> int:
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise DistdmError(f"per_class (clusters per class) must be an integer >= 1, got {per_class!r}")
    return int(per_class)


def penultimate_features(
    model: nn.Module,
    x: torch.Tensor,
    state: dict[str, torch.Tensor] | None = None,
    chunk: int = 2048,
) -> torch.Tensor:
    """Inputs of the model's last linear layer (its penultimate features) for every sample."""
    from torch.func import functional_call

    head = last_linear(model)
    feats: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].detach()))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for xb in x.split(chunk):
                functional_call(model, state, (xb,)) if state is not None else model(xb)
    finally:
        hook.remove()
        model.train(was)
    return torch.cat(feats).flatten(1)


def kmeans_per_class(
    features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    per_class: int,
    *,
    seed: int = 0,
    n_init: int = 10,
) -> Clusters:
    """k-means with `per_class` clusters inside each class; cluster ids grouped by class."""
    from sklearn.cluster import KMeans

    per_class = _check_per_class(per_class)
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    try:
        f = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    except (TypeError, ValueError) as e:
        raise DistdmError(f"clustering features must be an (n, d) array of numbers ({e})") from e
    y = np.asarray(labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels)
    if y.ndim != 1 or len(y) != len(f):
        raise DistdmError(f"{len(f)} feature rows but labels of shape {y.shape}: they must match")
    if not np.isfinite(f).all():
        raise DistdmError("clustering features contain NaN or inf")
    assignment = np.empty(len(y), dtype=np.int64)
    cluster_class: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < per_class:
            raise DistdmError(
                f"class {c} has {len(idx)} training samples but {per_class} clusters per class were "
                f"asked for: lower per_class to at most {len(idx)}"
            )
        km = KMeans(per_class, n_init=n_init, random_state=seed).fit(f[idx])
        # relabel by first appearance so ids are stable and every cluster is non-empty
        _, first = np.unique(km.labels_, return_index=True)
        order = np.argsort(first)
        remap = np.empty(per_class, dtype=np.int64)
        remap[order] = np.arange(len(order))
        assignment[idx] = len(cluster_class) + remap[km.labels_]
        cluster_class += [int(c)] * len(order)
    return Clusters(assignment, np.asarray(cluster_class), "kmeans")


def classwise(labels: torch.Tensor | np.ndarray) -> Clusters:
    """One cluster per class (K = L): the coarse level of the hierarchical search."""
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    classes = np.unique(y)
    return Clusters(np.searchsorted(classes, y).astype(np.int64), classes.astype(np.int64), "classwise")


def index_order(labels: torch.Tensor | np.ndarray, per_class: int) -> Clusters:
    """Per class, consecutive chunks in index order (the paper's 'w/o cluster' ablation)."""
    per_class = _check_per_class(per_class)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    assignment = np.empty(len(y), dtype=np.int64)
    cluster_class: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < per_class:
            raise DistdmError(f"class {c} has {len(idx)} samples, fewer than per_class={per_class}")
        for part in np.array_split(idx, per_class):
            assignment[part] = len(cluster_class)
            cluster_class.append(int(c))
    return Clusters(assignment, np.asarray(cluster_class), "index")


def make_clusters(
    kind: str,
    labels: torch.Tensor | np.ndarray,
    per_class: int,
    features: torch.Tensor | np.ndarray | Callable[[], torch.Tensor] | None = None,
    *,
    seed: int = 0,
    n_init: int = 10,
) -> Clusters:
    """Clusters of one kind: 'kmeans' (on features), 'classwise' or 'index'."""
    if kind == "classwise":
        return classwise(labels)
    if kind == "index":
        return index_order(labels, per_class)
    if kind == "kmeans":
        if features is None:
            raise DistdmError("k-means clustering needs features")
        f = features() if callable(features) else features
        return kmeans_per_class(f, labels, per_class, seed=seed, n_init=n_init)
    raise DistdmError(f"unknown cluster kind {kind!r}; one of kmeans, classwise, index")
