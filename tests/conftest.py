"""Tiny tasks shared by the tests: digits with a small MLP, a few dozen clusters."""

from __future__ import annotations

import pytest
import torch

from distdm.clusters import kmeans_per_class
from distdm.data import load_digits
from distdm.engine import Schedule
from distdm.models import build_model
from distdm.task import Task, train_target

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits():
    """The embedded digits dataset (standardised, 1437 train / 360 test)."""
    return load_digits()


@pytest.fixture(scope="session")
def tiny_task(digits) -> Task:
    """Digits, MLP 64-32-10, 10 epochs of SGD (lr 0.1, batch 64), 3 k-means clusters per class."""
    model = build_model("mlp", digits.input_shape, 10, seed=0, hidden=(32,))
    clusters = kmeans_per_class(digits.x_train, digits.y_train, 3, seed=0)
    schedule = Schedule(epochs=10, lr=0.1, batch_size=64, seed=0)
    return train_target(model, digits, schedule, clusters)


@pytest.fixture(scope="session")
def queries(digits):
    """Twenty fixed test queries (inputs, labels)."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(digits.y_test), generator=g)[:20]
    return digits.x_test[idx], digits.y_test[idx]


@pytest.fixture(scope="session")
def mini_task(digits) -> Task:
    """A fast task for retraining tests: 300 digits, logistic regression, 3 epochs, 2 clusters per
    class (K = 20)."""
    from distdm.data import TensorData

    sub = TensorData(
        digits.x_train[:300], digits.y_train[:300], digits.x_test, digits.y_test, 10, "digits-300"
    )
    model = build_model("logreg", sub.input_shape, 10, seed=0)
    clusters = kmeans_per_class(sub.x_train, sub.y_train, 2, seed=0, n_init=2)
    return train_target(model, sub, Schedule(epochs=3, lr=0.1, batch_size=32, seed=0), clusters)


@pytest.fixture(scope="session")
def tiny_lco(tiny_task, queries):
    """Exact leave-cluster-out effects on the queries, {objective: (K, Q) array}: f(without k) - f(all),
    by retraining tiny_task from theta_0 with its schedule and data order (one batched call)."""
    from distdm.engine import predict
    from distdm.objectives import get_objective

    x, y = queries
    k = tiny_task.clusters.n_clusters
    keep = torch.ones(k + 1, k)
    keep[torch.arange(1, k + 1), torch.arange(k)] = 0.0
    states = tiny_task.retrain(keep)
    out = predict(tiny_task.model, states, x)
    ref = tiny_task.outputs(x)
    effects = {}
    for name in ("margin", "dist1", "loss"):
        f = get_objective(name)(out, ref, y)
        effects[name] = (f[1:] - f[:1]).numpy()
    return effects


@pytest.fixture(scope="session")
def diabetes_task():
    """scikit-learn diabetes regression, MLP 10-16-1, 60 epochs of SGD (lr 0.01, batch 32), mse loss,
    one unit per training sample."""
    from distdm.data import load_diabetes

    data = load_diabetes()
    model = build_model("mlp", data.input_shape, 1, seed=0, hidden=(16,))
    return train_target(model, data, Schedule(epochs=60, lr=0.01, batch_size=32, seed=0), loss="mse")


class MapSpy:
    """Passes map calls on to an executor and records how many items each carried."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def map(self, fn, items):
        self.calls.append(len(items))
        return self.inner.map(fn, items)


@pytest.fixture
def map_spy():
    """MapSpy(executor): an executor wrapper that records the size of every map call."""
    return MapSpy
