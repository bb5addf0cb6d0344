import numpy as np
import pytest
import torch

from distdm.config import DistillConfig
from distdm.datamodel import fit_datamodel, sample_deletions
from distdm.distill import distill, finetune, layer_distance
from distdm.errors import DistdmError


def test_cosine_distance_ignores_biases_and_scale():
    a = {"w": torch.randn(3, 4, 5), "b": torch.randn(3, 4)}
    b = {"w": 7.0 * a["w"], "b": -a["b"]}
    torch.testing.assert_close(layer_distance(a, b, "cosine", "sum"), torch.zeros(3), atol=1e-5, rtol=0)
    opposite = {"w": -a["w"], "b": a["b"]}
    # 1 - cos = 2 for each of the 4 rows
    torch.testing.assert_close(layer_distance(a, opposite, "cosine", "sum"), torch.full((3,), 8.0))
    torch.testing.assert_close(layer_distance(a, opposite, "cosine", "mean"), torch.full((3,), 2.0))


def test_mse_distance_is_sum_of_squares():
    a = {"w": torch.ones(2, 2, 2), "b": torch.zeros(2, 2)}
    b = {"w": torch.zeros(2, 2, 2), "b": torch.ones(2, 2)}
    torch.testing.assert_close(layer_distance(a, b, "mse", "sum"), torch.full((2,), 6.0))


@pytest.mark.parametrize("soft", [False, True])
def test_reverse_matching_loss_decreases(tiny_task, soft):
    cfg = DistillConfig(starts=2, iterations=15, step=2, soft_labels=soft, seed=0)
    syn = distill(tiny_task, cfg)
    hist = syn.info["loss_history"]
    # the loss of the first start's first and last step (same checkpoints, same real batch)
    per_start = len(hist) // 2
    assert hist[per_start - 1] < hist[0]
    assert set(syn.info["layer_cosine"]) == {"body.1.weight", "body.1.bias", "head.weight", "head.bias"}


def test_hard_labels_cannot_reverse_the_last_layer_but_soft_labels_can(tiny_task):
    # SPEC.md section 6: with hard labels the head's matching cosine stays <= 0
    hard = distill(tiny_task, DistillConfig(starts=2, iterations=30, step=2, soft_labels=False))
    soft = distill(tiny_task, DistillConfig(starts=2, iterations=30, step=2, soft_labels=True))
    assert hard.info["layer_cosine"]["head.weight"] <= 0.05
    assert soft.info["layer_cosine"]["head.weight"] > 0.3


def test_influence_target_error_decreases(tiny_task):
    cfg = DistillConfig(
        target="influence", ipc=2, iterations=40, soft_labels=True, lr_img=0.01, lr_label=0.01
    )
    syn = distill(tiny_task, cfg)
    assert syn.info["loss_history"][-1] < syn.info["loss_history"][0]
    assert syn.info["loss_last"] < 1.0  # better than the zero step, whose relative error is 1


def test_one_step_on_a_union_is_the_sum_of_single_steps(tiny_task):
    syn = distill(tiny_task, DistillConfig(target="influence", ipc=1, iterations=5, soft_labels=True))
    k = syn.n_clusters
    delete = torch.zeros(3, k)
    delete[0, 0] = 1
    delete[1, 5] = 1
    delete[2, [0, 5]] = 1
    states = finetune(tiny_task, syn, delete)
    for name, v in states.items():
        base = tiny_task.final[name]
        torch.testing.assert_close(v[2] - base, (v[0] - base) + (v[1] - base), atol=1e-6, rtol=1e-4)
    # DDM's fast path (sum of cached single-cluster steps) equals fine-tuning each mask
    from distdm.attribution.ddm import DDM

    fast = DDM(synset=syn).fit(tiny_task).finetuned(delete)
    for name, v in states.items():
        torch.testing.assert_close(fast[name], v, atol=1e-6, rtol=1e-4)


def test_sample_deletions_and_ridge_recover_a_linear_model():
    rng = np.random.default_rng(0)
    k = 12
    q = sample_deletions(k, 80, seed=1)
    assert q.shape == (81, k) and q[0].sum() == 0 and (q[1:].sum(1) >= 1).all()
    w_true = rng.normal(size=(k, 3))
    r = 2.0 + q @ w_true
    fit = fit_datamodel(q, r, ridge=1e-8)
    np.testing.assert_allclose(fit.w, w_true, atol=1e-5)
    np.testing.assert_allclose(fit.c, 2.0, atol=1e-5)
    assert fit.heldout_r2 > 0.999


def test_distill_rejects_regression_and_bad_settings(tiny_task):
    with pytest.raises(DistdmError, match="pairing"):
        DistillConfig(pairing="sideways")
    with pytest.raises(DistdmError, match="ipc"):
        DistillConfig(ipc=0)


@pytest.mark.parametrize("solver", ["adam", "closed-form"])
def test_the_oracle_target_caches_its_retrains_in_the_store_it_is_given(
    mini_task, tmp_path, monkeypatch, solver
):
    """distill(..., store=) and DDM(store=): the oracle target's K retrains go to the given store (the
    task carries none; nothing warns) and are read back from there by the next distillation."""
    import warnings

    from distdm.attribution.ddm import DDM
    from distdm.presets import preset
    from distdm.store import CHUNKED_JOB, RunStore
    from distdm.task import Task

    name = "influence-adam" if solver == "adam" else "default"
    cfg = preset(name, epochs=mini_task.schedule.epochs)[0].replace(target="oracle", iterations=2)
    assert cfg.solver == solver
    tag = f"retrain/oracle-{mini_task.clusters.kind}/"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        first = distill(mini_task, cfg, store=RunStore(tmp_path / "a"))
        DDM(distill=cfg, store=RunStore(tmp_path / "b")).fit(mini_task)
    for run in ("a", "b"):
        jobs = {r.name for r in RunStore(tmp_path / run).index(CHUNKED_JOB)}
        assert any(j.startswith(tag) for j in jobs), (run, jobs)
    with pytest.raises(DistdmError, match="RunStore"):
        distill(mini_task, cfg, store=str(tmp_path / "a"))
    monkeypatch.setattr(Task, "retrain", lambda *a, **k: pytest.fail("retrained"))
    again = distill(mini_task, cfg, store=RunStore(tmp_path / "a"))
    got, want = again.to_tensors(), first.to_tensors()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
