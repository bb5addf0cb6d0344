"""Executors: the in-process default and Ray give the same states and scores."""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch

from distdm.attribution.retrain import ExactRetrain
from distdm.engine import Schedule, estimate_variant_bytes, train_variants
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


@pytest.mark.slow
@pytest.mark.ray
def test_ray_runs_tasks_in_worker_processes_in_order(ray_executor):
    def pid_and_double(v: int) -> tuple[int, int]:  # a closure: Ray ships it by value
        return os.getpid(), 2 * v

    pids = ray_executor.map(pid_and_double, list(range(6)))
    assert [d for _, d in pids] == [0, 2, 4, 6, 8, 10]
    assert all(pid != os.getpid() for pid, _ in pids)
    assert ray_executor.map(pid_and_double, []) == []


@pytest.mark.slow
@pytest.mark.ray
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
@pytest.mark.ray
def test_ray_exact_retraining_gives_the_same_scores_and_caches_on_the_driver(
    ray_executor, mini_task, queries, tmp_path, map_spy
):
    local = ExactRetrain(chunk_size=6).fit(mini_task).scores(*queries)
    store = RunStore(tmp_path / "run")
    spy = map_spy(ray_executor)
    remote = ExactRetrain(chunk_size=6, executor=spy, store=store).fit(mini_task).scores(*queries)
    assert spy.calls == [4]  # 21 models (all kept + 20 left out): 4 chunks of 6 in one call
    # workers run with their own torch thread count, so float32 reductions may round differently
    np.testing.assert_allclose(remote.values, local.values, rtol=1e-4, atol=1e-4)
    # the driver wrote every chunk (21 models in chunks of 6), so a reopened run reuses them
    assert all(store.is_done(f"retrain/loo/seed0/chunk{i}") for i in range(4))
    again = ExactRetrain(chunk_size=6, store=RunStore(tmp_path / "run")).fit(mini_task)
    np.testing.assert_array_equal(again.scores(*queries).values, remote.values)


def test_memory_budget_through_exact_retrain_and_the_task(mini_task, queries, map_spy):
    x, y = queries
    t = mini_task
    per = estimate_variant_bytes(t.model, t.data.x_train, t.data.y_train, t.schedule, loss=t.loss)
    full = ExactRetrain().fit(t).scores(x, y).values  # 21 models (all kept + 20 left out) at once
    counts = []
    for budget in (per * 100, per * 7, per * 3):
        spy = map_spy(LocalExecutor())
        got = ExactRetrain(executor=spy, memory_budget_bytes=budget).fit(t).scores(x, y).values
        counts.append(spy.calls)
        np.testing.assert_allclose(got, full, atol=1e-6)
    assert counts == [[1], [3], [7]]  # chunks of 21, 7 and 3 models
    # the task's own settings are the default of every retrain (what Run and the CLI set)
    spy = map_spy(LocalExecutor())
    task = dataclasses.replace(t, executor=spy, memory_budget_bytes=per * 3)
    np.testing.assert_allclose(ExactRetrain().fit(task).scores(x, y).values, full, atol=1e-6)
    assert spy.calls == [7]
    with pytest.raises(DistdmError, match="memory_budget_bytes"):
        ExactRetrain(memory_budget_bytes=per - 1).fit(t)
    with pytest.raises(DistdmError, match="positive integer"):
        ExactRetrain(memory_budget_bytes=0)


def test_further_training_runs_its_chunks_on_the_executor(mini_task, queries, tmp_path, map_spy):
    from distdm.attribution.further import FurtherTraining

    x, y = queries
    settings = dict(epochs=2, seeds=2, chunk_size=8)  # 21 models per seed: 3 chunks
    local = FurtherTraining(**settings).fit(mini_task).scores(x, y).values
    spy = map_spy(LocalExecutor())
    store = RunStore(tmp_path / "run")
    got = FurtherTraining(**settings, executor=spy, store=store).fit(mini_task).scores(x, y).values
    assert spy.calls == [3, 3]  # one engine call per seed, one item per chunk
    np.testing.assert_allclose(got, local, atol=1e-6)
    assert store.is_done("further/seed1/chunk2")  # the driver cached every chunk
    spy = map_spy(LocalExecutor())
    again = FurtherTraining(**settings, executor=spy, store=store).fit(mini_task).scores(x, y).values
    assert spy.calls == [] and np.array_equal(again, got)
    # a budget for 4 models at once splits every seed's 21 models into 6 engine chunks
    ft = FurtherTraining(**settings)
    d = mini_task.data
    per = estimate_variant_bytes(mini_task.model, d.x_train, d.y_train, ft.schedule_for(mini_task, 0))
    spy = map_spy(LocalExecutor())
    small = FurtherTraining(**settings, executor=spy, memory_budget_bytes=4 * per)
    np.testing.assert_allclose(small.fit(mini_task).scores(x, y).values, local, atol=1e-6)
    assert spy.calls == [6, 6]


@pytest.mark.slow
@pytest.mark.ray
def test_ray_further_training_gives_the_same_scores(ray_executor, mini_task, queries):
    from distdm.attribution.further import FurtherTraining

    x, y = queries
    settings = dict(epochs=1, seeds=2, chunk_size=11, optimizer="adam")
    local = FurtherTraining(**settings).fit(mini_task).scores(x, y).values
    remote = FurtherTraining(**settings, executor=ray_executor).fit(mini_task).scores(x, y).values
    np.testing.assert_allclose(remote, local, rtol=1e-4, atol=1e-4)  # workers' own thread count


@pytest.mark.slow
@pytest.mark.ray
def test_cli_executor_ray_gives_the_same_exact_scores(ray_executor, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from distdm.cli import app
    from distdm.run import Run

    calls = []
    real_map = RayExecutor.map

    def counting_map(self, fn, items):
        calls.append(len(items))
        return real_map(self, fn, items)

    monkeypatch.setattr(RayExecutor, "map", counting_map)

    def invoke(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, (result.output, result.exception)
        return result

    root = tmp_path / "ray"
    invoke("train", root, "--epochs", 1, "--batch-size", 64)
    invoke("cluster", root, "--per-class", 1)  # 10 clusters: 11 models to retrain
    shutil.copytree(root, tmp_path / "local")
    task = Run.open(root).task()
    per = estimate_variant_bytes(task.model, task.data.x_train, task.data.y_train, task.schedule)
    common = ("--method", "exact", "--queries", 4, "--objective", "margin")
    invoke("attribute", root, *common, "--executor", "ray", "--memory-budget", 3.5 * per / 2**20)
    assert calls == [4]  # 11 models, 3 at a time within the budget, as Ray tasks
    invoke("attribute", tmp_path / "local", *common)
    assert calls == [4]
    tag = "attribution/exact-margin-q4s0.safetensors"
    remote, local = load_file(root / tag), load_file(tmp_path / "local" / tag)
    torch.testing.assert_close(remote["scores"], local["scores"], atol=1e-4, rtol=1e-4)  # workers' threads
    assert (root / "retrain").is_dir()  # the driver wrote the retrained states into the run
