"""Executors: the in-process default and Ray give the same states and scores."""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch

from distdm.attribution.retrain import ExactRetrain
from distdm.engine import Schedule, train_variants
from distdm.errors import DistdmError
from distdm.executors import LocalExecutor, RayExecutor, get_executor, import_ray
from distdm.models import build_model
from distdm.store import RunStore


def _toy(n=96, d=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_local_executor_maps_in_order():
    assert LocalExecutor().map(lambda v: v * 2, [3, 1, 2]) == [6, 2, 4]


def test_get_executor_by_name():
    assert isinstance(get_executor(None), LocalExecutor)
    assert isinstance(get_executor("local"), LocalExecutor)
    with pytest.raises(DistdmError, match="unknown executor"):
        get_executor("dask")
    with pytest.raises(DistdmError, match="--executor ray"):
        get_executor("local", address="auto")
    with pytest.raises(DistdmError, match="num_cpus"):
        RayExecutor(address="auto", num_cpus=2)


def test_missing_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(DistdmError, match=r"pip install 'distdm\[ray\]'"):
        import_ray()
    with pytest.raises(DistdmError, match="pip install"):
        get_executor("ray")


@pytest.fixture(scope="module")
def ray_executor():
    """One local Ray instance (2 CPUs) for the whole module."""
    pytest.importorskip("ray")
    ex = RayExecutor(num_cpus=2, init_kwargs={"object_store_memory": 100 * 1024**2})
    yield ex
    ex.shutdown()


class _Spy:
    """Passes map calls on to an executor and records how many items each carried."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def map(self, fn, items):
        self.calls.append(len(items))
        return self.inner.map(fn, items)


@pytest.mark.slow
def test_ray_runs_tasks_in_worker_processes_in_order(ray_executor):
    def pid_and_double(v: int) -> tuple[int, int]:  # a closure: Ray ships it by value
        return os.getpid(), 2 * v

    pids = ray_executor.map(pid_and_double, list(range(6)))
    assert [d for _, d in pids] == [0, 2, 4, 6, 8, 10]
    assert all(pid != os.getpid() for pid, _ in pids)
    assert ray_executor.map(pid_and_double, []) == []


@pytest.mark.slow
def test_ray_and_local_train_the_same_states(ray_executor):
    x, y = _toy()
    model = build_model("mlp", (8,), 3, seed=1, hidden=(16,))
    s = Schedule(epochs=2, lr=0.05, batch_size=16, momentum=0.9)
    w = (torch.rand(5, len(y), generator=torch.Generator().manual_seed(1)) > 0.3).float()
    local = train_variants(model, x, y, s, weights=w, chunk_size=2, record=True)
    remote = train_variants(model, x, y, s, weights=w, chunk_size=2, record=True, executor=ray_executor)
    for k in local.states:
        torch.testing.assert_close(remote.states[k], local.states[k], atol=0, rtol=0)
    assert len(remote.trajectory) == 3
    torch.testing.assert_close(remote.trajectory[1]["head.weight"], local.trajectory[1]["head.weight"])
    # a user error inside a Ray task reaches the caller as the same typed error
    with pytest.raises(DistdmError, match="loss must be"):
        train_variants(model, x, y, s, weights=w, chunk_size=2, loss="hinge", executor=ray_executor)


@pytest.mark.slow
def test_ray_exact_retraining_gives_the_same_scores_and_caches_on_the_driver(
    ray_executor, mini_task, queries, tmp_path
):
    local = ExactRetrain(chunk_size=6).fit(mini_task).scores(*queries)
    task = dataclasses.replace(mini_task, store=RunStore(tmp_path / "run"))
    spy = _Spy(ray_executor)
    remote = ExactRetrain(chunk_size=6, executor=spy).fit(task).scores(*queries)
    assert spy.calls == [4]  # 21 models (all kept + 20 left out): 4 chunks of 6 in one call
    np.testing.assert_allclose(remote.values, local.values, atol=1e-6)
    # the driver wrote every chunk (21 models in chunks of 6), so a reopened run reuses them
    assert all(task.store.is_done(f"retrain/loo/seed0/chunk{i}") for i in range(4))
    again = ExactRetrain(chunk_size=6).fit(dataclasses.replace(mini_task, store=RunStore(tmp_path / "run")))
    np.testing.assert_array_equal(again.scores(*queries).values, remote.values)
