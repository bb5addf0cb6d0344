"""The Task's Runtime: how work runs (device, executor, memory budget, progress), never what it gives."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from distdm.clusters import kmeans_per_class
from distdm.engine import estimate_variant_bytes
from distdm.errors import DistdmError
from distdm.executors import LocalExecutor
from distdm.runtime import Runtime
from distdm.task import Task


def _parts(task: Task) -> tuple:
    return task.model, task.data, task.clusters, task.schedule, task.trajectory


def test_a_task_built_with_a_runtime_equals_one_built_with_the_old_keywords(mini_task, map_spy):
    spy = map_spy(LocalExecutor())
    old = Task(*_parts(mini_task), executor=spy, memory_budget_bytes=10**6, device="cpu")
    new = Task(*_parts(mini_task), runtime=Runtime(device="cpu", executor=spy, memory_budget_bytes=10**6))
    assert old.runtime == new.runtime == Runtime("cpu", spy, 10**6)
    for t in (old, new):
        assert (t.executor, t.memory_budget_bytes, t.device) == (spy, 10**6, torch.device("cpu"))
    # a keyword sets its entry over the given runtime's, keeping the others
    mixed = Task(*_parts(mini_task), runtime=Runtime(executor=spy), memory_budget_bytes=5000)
    assert mixed.runtime == Runtime(executor=spy, memory_budget_bytes=5000)
    assert Task(*_parts(mini_task)).runtime == Runtime()


def test_replace_keeps_the_runtime_and_changes_only_what_it_is_given(mini_task, map_spy):
    spy = map_spy(LocalExecutor())
    task = Task(*_parts(mini_task), runtime=Runtime(executor=spy, memory_budget_bytes=10**6))
    other = kmeans_per_class(task.data.x_train, task.data.y_train, 3, seed=1, n_init=1)
    moved = dataclasses.replace(task, clusters=other)
    assert moved.runtime == task.runtime and moved.clusters is other
    budget = dataclasses.replace(task, memory_budget_bytes=2 * 10**6)
    assert budget.runtime == Runtime(executor=spy, memory_budget_bytes=2 * 10**6)
    assert budget.executor is spy
    swapped = dataclasses.replace(task, runtime=Runtime(memory_budget_bytes=7))
    assert swapped.runtime == Runtime(memory_budget_bytes=7) and swapped.executor is None


@pytest.mark.parametrize("budget", [0, -1, True, 1.5, "1GB"])
def test_a_bad_memory_budget_is_refused_wherever_it_is_given(mini_task, budget):
    with pytest.raises(DistdmError, match="memory_budget_bytes must be a positive integer or None"):
        Runtime(memory_budget_bytes=budget)
    with pytest.raises(DistdmError, match="memory_budget_bytes must be a positive integer or None"):
        Task(*_parts(mini_task), memory_budget_bytes=budget)
    with pytest.raises(DistdmError, match="memory_budget_bytes must be a positive integer or None"):
        dataclasses.replace(mini_task, memory_budget_bytes=budget)


def test_a_runtime_refuses_what_cannot_run_and_normalises_what_can(mini_task):
    with pytest.raises(DistdmError, match=r"executor must be None .* map\(fn, items\)"):
        Runtime(executor="ray")
    with pytest.raises(DistdmError, match="progress must be False, True"):
        Runtime(progress="loud")
    with pytest.raises(DistdmError, match="device must be one of"):
        Runtime(device="gpu")
    with pytest.raises(DistdmError, match="unknown entries"):
        Runtime().replace(dtype=torch.float64)
    with pytest.raises(DistdmError, match="runtime must be a distdm.Runtime"):
        Task(*_parts(mini_task), runtime={"device": "cpu"})
    r = Runtime(device="auto", memory_budget_bytes=np.int64(4096))
    assert isinstance(r.device, torch.device)  # 'auto' resolved once, where the runtime is made
    assert type(r.memory_budget_bytes) is int and r.memory_budget_bytes == 4096


def test_retrain_runs_on_the_runtime_and_gives_the_same_states(mini_task, map_spy):
    t = mini_task
    keep = torch.ones(6, t.clusters.n_clusters)
    keep[torch.arange(6), torch.arange(6)] = 0  # leave out one of the first six clusters each
    plain = t.retrain(keep)
    per = estimate_variant_bytes(t.model, t.data.x_train, t.data.y_train, t.schedule, loss=t.loss)
    spy, seen = map_spy(LocalExecutor()), []
    task = dataclasses.replace(
        t,
        runtime=Runtime(
            executor=spy, memory_budget_bytes=per * 2, progress=lambda stage, done, total: seen.append(done)
        ),
    )
    got = task.retrain(keep)
    assert spy.calls == [3]  # six variants, two at a time, as the budget allows
    assert seen and seen[-1] == 6 * t.schedule.epochs  # the runtime's progress callback heard every epoch
    for k in plain:
        torch.testing.assert_close(got[k], plain[k], atol=1e-6, rtol=1e-5)
    seen.clear()
    task.retrain(keep[:1], progress=False)  # an explicit argument wins over the runtime's
    assert seen == []
