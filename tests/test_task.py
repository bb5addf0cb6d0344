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


# the run store is passed where work is cached; Task.store is a deprecated fallback ---------------


def _files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ".distdm.lock"}


def test_a_store_on_the_task_warns_and_is_read_only_where_none_is_given(mini_task, tmp_path):
    import warnings

    from distdm.attribution.retrain import leave_one_out_masks, retrain_masks
    from distdm.store import RunStore

    with pytest.warns(DeprecationWarning, match="store"):
        old = dataclasses.replace(mini_task, store=RunStore(tmp_path / "old"))
    keep = leave_one_out_masks(mini_task.clusters.n_clusters)[:3]
    retrain_masks(old, keep, tag="t")  # no store given: the task's is used, as before
    assert old.store.is_done("retrain/t/seed0/chunk0")
    new = RunStore(tmp_path / "new")
    retrain_masks(old, keep, tag="t", store=new)  # a store given wins over the task's
    assert new.is_done("retrain/t/seed0/chunk0")
    assert _files(tmp_path / "new") == _files(tmp_path / "old")  # the same names either way
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        plain = dataclasses.replace(mini_task, strategy="loop")  # a task without a store does not warn
    assert plain.store is None and mini_task.store is None
    with pytest.raises(DistdmError, match="RunStore"):
        retrain_masks(mini_task, keep, store=str(tmp_path / "new"))


def test_caches_made_through_the_task_store_are_read_through_the_explicit_store(
    mini_task, queries, tmp_path, monkeypatch
):
    """A run directory written the way the code before explicit stores wrote it (everything through
    `task.store`) has the same files and settings as one written with explicit stores, and is read
    back through an explicit store without recomputing anything."""
    import distdm.attribution.ddm as ddm_module
    import distdm.attribution.further as fmo
    from distdm.attribution.retrain import ExactRetrain
    from distdm.config import DistillConfig
    from distdm.store import RunStore
    from distdm.verify import verify

    cfg = DistillConfig(iterations=2, starts=1, step=1)
    ft = dict(epochs=1, seeds=1, left_out=range(3), chunk_size=2, stage="ft")

    def everything(task, store=None):
        kw = {} if store is None else {"store": store}
        exact = ExactRetrain(chunk_size=8, **kw).fit(task)
        gold = fmo.FurtherTraining(**ft, **kw).fit(task)
        s = exact.scores(*queries, "margin")
        check = verify(task, s, *queries, m=5, **kw)
        syn = ddm_module.load_or_distill(task, cfg, task.clusters, 0.1, 2, **kw)
        return s.values, gold.scores(*queries).values, check.agreement.mean, syn.to_tensors()

    with pytest.warns(DeprecationWarning):
        old_task = dataclasses.replace(mini_task, store=RunStore(tmp_path / "old"))
    before = everything(old_task)
    everything(mini_task, RunStore(tmp_path / "new"))
    old_s, new_s = RunStore(tmp_path / "old"), RunStore(tmp_path / "new")
    assert _files(tmp_path / "old") == _files(tmp_path / "new")
    assert old_s.manifest["configs"] == new_s.manifest["configs"]
    assert old_s.manifest["stages"].keys() == new_s.manifest["stages"].keys()
    entries = [[(r.name, r.kind, r.files) for r in s.index()] for s in (old_s, new_s)]
    assert entries[0] == entries[1] and entries[0]

    listing = _files(tmp_path / "old")
    monkeypatch.setattr(Task, "retrain", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr(fmo.FurtherTraining, "_train", lambda *a, **k: pytest.fail("further-trained"))
    monkeypatch.setattr(ddm_module, "distill", lambda *a, **k: pytest.fail("distilled"))
    after = everything(mini_task, RunStore(tmp_path / "old"))
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    assert after[2] == before[2]
    assert all(torch.equal(after[3][k], before[3][k]) for k in before[3])
    assert _files(tmp_path / "old") == listing
