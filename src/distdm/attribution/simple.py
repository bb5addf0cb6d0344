"""Simple baselines of the DDM paper: Random, Predict-based and Clustering-based attribution.

Predict- and Clustering-based methods measure how *similar* a cluster is to the query (a larger
similarity means more influence) and turn that into a signed score with the direction in which
removing similar data moves the objective (`DIRECTION`): removing data that looks like the query
lowers its true-class margin (-), moves its prediction (dist1: +), raises its loss (dist2: +) and
lowers dist3 (-). Objectives not listed (user functions) get +1: the score is then a similarity.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..clusters import penultimate_features
from ..errors import DistdmError
from ..objectives import Objective, objective_name
from ..scores import Scores
from ..task import Task
from .base import Attributor, Settings, check_choice, check_int, register

DIRECTION: dict[str, float] = {
    "margin": -1.0,
    "dist1": 1.0,
    "dist2": 1.0,
    "loss": 1.0,
    "dist3": -1.0,
    "squared_error": 1.0,
}


def direction(objective: str | Objective) -> float:
    """Sign of the effect of removing data similar to the query on this objective (+1 if unknown)."""
    return DIRECTION.get(objective_name(objective), 1.0)


def cluster_means(values: np.ndarray, assignment: np.ndarray, n_clusters: int) -> np.ndarray:
    """Mean over each cluster's members of per-sample rows: (n, Q) -> (K, Q)."""
    out = np.zeros((n_clusters, values.shape[1]))
    np.add.at(out, assignment, values)
    sizes = np.bincount(assignment, minlength=n_clusters)
    return out / np.maximum(sizes, 1)[:, None]


@dataclasses.dataclass(frozen=True)
class RandomArgs(Settings):
    """random: the seed of the scores."""

    seed: int = 0

    def validate(self) -> None:
        check_int("seed", self.seed)


@dataclasses.dataclass(frozen=True)
class ClusteringArgs(Settings):
    """clustering: the feature space ('penultimate' or 'input')."""

    features: str = "penultimate"

    def validate(self) -> None:
        check_choice("features", self.features, ("penultimate", "input"))


@register("random")
class RandomAttributor(Attributor):
    """Random scores (standard normal per cluster and query), reproducible from `seed`."""

    Args = RandomArgs

    def __init__(self, seed: int = 0):
        super().__init__(seed=seed)

    def _scores(self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective) -> Scores:
        rng = np.random.default_rng(self.seed)
        vals = rng.standard_normal((self.task_.clusters.n_clusters, len(x)))
        return Scores(vals, "cluster", objective_name(objective), self.name)


@register("predict")
class PredictAttributor(Attributor):
    """Predict-based: similarity of the members' softmax predictions to the query's prediction
    (minus the mean squared distance between probability vectors, averaged over the cluster)."""

    def _fit(self, task: Task) -> None:
        if task.data.is_regression:
            raise DistdmError("the predict-based baseline needs a classification task (softmax outputs)")
        # the simple baselines compute their similarities in NumPy: a boundary, like Scores
        self.train_probs_ = torch.softmax(task.outputs(task.data.x_train), -1).double().cpu().numpy()

    def _scores(self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective) -> Scores:
        pq = torch.softmax(self.task_.outputs(x), -1).double().cpu().numpy()  # (Q, O)
        p = self.train_probs_  # (n, O)
        sq = (p**2).sum(1)[:, None] + (pq**2).sum(1)[None, :] - 2.0 * p @ pq.T  # (n, Q)
        cl = self.task_.clusters
        similarity = -cluster_means(np.maximum(sq, 0.0), cl.assignment, cl.n_clusters)
        return Scores(direction(objective) * similarity, "cluster", objective_name(objective), self.name)


@register("clustering")
class ClusteringAttributor(Attributor):
    """Clustering-based: minus the Euclidean distance from the query to each cluster's centroid in
    feature space ('penultimate': the target model's penultimate features; 'input': raw inputs)."""

    Args = ClusteringArgs

    def __init__(self, features: str = "penultimate"):
        super().__init__(features=features)

    def _embed(self, task: Task, x: torch.Tensor) -> np.ndarray:
        if self.features == "input":
            return x.reshape(len(x), -1).double().cpu().numpy()
        return penultimate_features(task.model, x.to(task.device), state=task.final).double().cpu().numpy()

    def _fit(self, task: Task) -> None:
        f = self._embed(task, task.data.x_train)
        cl = task.clusters
        self.centroids_ = cluster_means(f, cl.assignment, cl.n_clusters)

    def _scores(self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective) -> Scores:
        from scipy.spatial.distance import cdist

        fq = self._embed(self.task_, x)
        similarity = -cdist(self.centroids_, fq)  # (K, Q)
        return Scores(direction(objective) * similarity, "cluster", objective_name(objective), self.name)
