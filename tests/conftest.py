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
