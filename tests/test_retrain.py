import dataclasses

import numpy as np
import pytest
import torch

import distdm.engine
import distdm.task
from distdm.attribution.retrain import ExactRetrain, leave_one_out_masks, retrain_masks
from distdm.clusters import Clusters
from distdm.data import from_tensors
from distdm.engine import Schedule
from distdm.errors import DistdmError
from distdm.models import build_model
from distdm.store import RunStore
from distdm.task import train_target


def _output(out, ref, y):
    """The regression output itself, as an objective."""
    return out.squeeze(-1)


def _lstsq_prediction(x, t, xq):
    a = np.hstack([x, np.ones((len(x), 1))])
    w, *_ = np.linalg.lstsq(a, t, rcond=None)
    return np.hstack([xq, np.ones((len(xq), 1))]) @ w


def test_linear_least_squares_effects_match_normal_equations():
    # full-batch gradient descent on the mean squared error converges to the least-squares fit of
    # the kept samples, so each leave-cluster-out effect has a closed form
    rng = np.random.default_rng(0)
    n, d, k = 60, 3, 5
    x = rng.standard_normal((n, d))
    t = x @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.5 * rng.standard_normal(n)
    xq = rng.standard_normal((4, d))
    data = from_tensors(x, t, test=(xq, np.zeros(4)), regression=True)
    clusters = Clusters(np.arange(n) % k, -np.ones(k, dtype=np.int64), "index")
    model = build_model("logreg", (d,), 1, seed=0)
    schedule = Schedule(epochs=300, lr=0.2, batch_size=None, shuffle=False)
    task = train_target(model, data, schedule, clusters, loss="mse")

    scores = ExactRetrain().fit(task).scores(data.x_test, data.y_test, _output)

    full = _lstsq_prediction(x, t, xq)
    out = [clusters.assignment != c for c in range(k)]
    expected = np.stack([_lstsq_prediction(x[o], t[o], xq) - full for o in out])
    assert np.abs(expected).max() > 0.02  # the effects are not trivially zero
    np.testing.assert_allclose(scores.values, expected, atol=2e-4)


def test_own_seed_reproduces_the_target_and_per_seed_scores_average(mini_task, queries):
    ex = ExactRetrain(seeds=(0, 1)).fit(mini_task)
    full0 = {k: v[0] for k, v in ex.states_[0].items()}
    for name, v in mini_task.final.items():
        torch.testing.assert_close(full0[name], v, atol=1e-5, rtol=1e-4)
    # another seed is another model
    assert not torch.allclose(ex.states_[1]["head.weight"][0], mini_task.final["head.weight"])
    per_seed = ex.per_seed_scores(*queries, "margin")
    assert per_seed.shape == (2, mini_task.clusters.n_clusters, len(queries[1]))
    np.testing.assert_allclose(ex.scores(*queries, "margin").values, per_seed.mean(0))
    assert ex.outputs(queries[0]).shape == (2, mini_task.clusters.n_clusters + 1, len(queries[1]), 10)
    values = ex.values(*queries, "dist1")
    np.testing.assert_allclose(values[:, 0], 0.0, atol=1e-12)  # the full model against itself


def _counting(monkeypatch, fail_after=None):
    calls = []
    real = distdm.engine.train_variants

    def wrapped(*args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise RuntimeError("killed")
        calls.append(kwargs["weights"].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(distdm.task, "train_variants", wrapped)
    return calls


def test_cached_retrains_are_not_recomputed(mini_task, queries, tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    a = ExactRetrain(chunk_size=6, store=RunStore(tmp_path / "run")).fit(mini_task)
    assert calls == [6, 6, 6, 3]  # 21 models (all kept + 20 left out) in chunks of 6
    # a new attributor on a reopened store loads everything
    b = ExactRetrain(chunk_size=6, store=RunStore(tmp_path / "run")).fit(mini_task)
    assert calls == [6, 6, 6, 3]
    np.testing.assert_array_equal(a.scores(*queries).values, b.scores(*queries).values)
    # the cost recorded when the chunks were computed survives loading them
    assert b.recorded_seconds_ == a.recorded_seconds_ > 0


def test_killed_sweep_resumes_where_it_stopped(mini_task, queries, tmp_path, monkeypatch):
    reference = ExactRetrain(chunk_size=6).fit(mini_task).scores(*queries)
    store = RunStore(tmp_path / "run")
    _counting(monkeypatch, fail_after=2)
    with pytest.raises(RuntimeError, match="killed"):
        ExactRetrain(chunk_size=6, store=store).fit(mini_task)
    assert store.is_done("retrain/loo/seed0/chunk1")
    assert not store.is_done("retrain/loo/seed0/chunk2")
    calls = _counting(monkeypatch)
    resumed = ExactRetrain(chunk_size=6, store=RunStore(tmp_path / "run")).fit(mini_task).scores(*queries)
    assert calls == [6, 3]  # only chunks 2 and 3
    np.testing.assert_allclose(resumed.values, reference.values, atol=1e-5)


def test_store_refuses_other_clusters_or_schedule(mini_task, tmp_path):
    store = RunStore(tmp_path / "run")
    keep = leave_one_out_masks(mini_task.clusters.n_clusters)[:3]
    retrain_masks(mini_task, keep, store=store)
    moved = Clusters(np.roll(mini_task.clusters.assignment, 1), mini_task.clusters.cluster_class)
    other = dataclasses.replace(mini_task, clusters=moved)
    with pytest.raises(DistdmError, match="retrain"):
        retrain_masks(other, keep, store=store)
    slower = dataclasses.replace(mini_task, schedule=dataclasses.replace(mini_task.schedule, lr=0.05))
    with pytest.raises(DistdmError, match="lr"):
        retrain_masks(slower, keep, store=store)


def test_arbitrary_masks_are_cached_by_content(mini_task, tmp_path, monkeypatch):
    store = RunStore(tmp_path / "run")
    k = mini_task.clusters.n_clusters
    rng = np.random.default_rng(0)
    a = (rng.random((4, k)) < 0.5).astype(np.float32)
    b = 1.0 - a
    calls = _counting(monkeypatch)
    sa = retrain_masks(mini_task, a, store=store)
    sb = retrain_masks(mini_task, b, store=store)
    sa2 = retrain_masks(mini_task, a, store=store)
    assert calls == [4, 4]
    torch.testing.assert_close(sa["head.weight"], sa2["head.weight"])
    assert not torch.allclose(sa["head.weight"], sb["head.weight"])
    # and a cached retrain equals an uncached one
    torch.testing.assert_close(retrain_masks(mini_task, a)["head.weight"], sa["head.weight"])


def test_bad_masks_and_settings_are_rejected(mini_task):
    k = mini_task.clusters.n_clusters
    with pytest.raises(DistdmError, match="shape"):
        retrain_masks(mini_task, torch.ones(2, k + 1))
    with pytest.raises(DistdmError, match="only 0"):
        retrain_masks(mini_task, torch.full((1, k), 0.5))
    with pytest.raises(DistdmError, match="seeds"):
        ExactRetrain(seeds=())
    with pytest.raises(DistdmError, match="unit"):
        ExactRetrain(unit="class")
    with pytest.raises(DistdmError, match="fit"):
        ExactRetrain().values(torch.zeros(1, 64), torch.zeros(1, dtype=torch.long))
