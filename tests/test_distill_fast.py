"""The closed-form (fast) influence-target distillation: label solve, chunking, presets."""

import dataclasses

import pytest
import torch

from distdm.config import DistillConfig
from distdm.distill import distill, finetune
from distdm.distill_influence import (
    SHARE_TARGET,
    EKFACCurvature,
    LowRankCurvature,
    ScaledIdentity,
    cluster_bytes,
    curvature_share,
    distill_closed_form,
    factored_cluster_bytes,
    factored_normal_equations,
    factored_steps,
    fit_hint,
    flatten_batch,
    init_inputs,
    label_columns,
    make_curvature,
    normal_equations,
    rank_within_budget,
    share_damping,
    solve_labels,
)
from distdm.errors import DistdmError
from distdm.hessian import flat_model
from distdm.models import build_model
from distdm.presets import PRESETS, preset
from distdm.store import RunStore


def _random_low_rank(p: int, r: int, damping: float, seed: int = 0) -> LowRankCurvature:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, r, generator=g))
    return LowRankCurvature(torch.rand(r, generator=g) * 5 + 0.5, q.T.contiguous(), damping)


class _NoGram:
    """The same metric seen only through apply (the generic path of normal_equations)."""

    def __init__(self, inner):
        self.inner = inner

    def apply(self, v):
        return self.inner.apply(v)


def test_closed_form_labels_match_brute_force_least_squares():
    model = build_model("mlp", (8,), 3, seed=0, hidden=(6,))
    fm = flat_model(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, generator=g)
    m = label_columns(fm, x, lr=0.1).reshape(1, -1, fm.n_params)  # (1, ipc * C = 6, P = 75)
    # one column per (sample, class): lr times the gradient of log softmax_c at that sample
    logp = lambda th: torch.log_softmax(fm.outputs(th, x[1:2])[0], -1)[2]  # noqa: E731
    torch.testing.assert_close(m[0, 5], 0.1 * torch.func.grad(logp)(fm.theta))
    d = torch.randn(1, fm.n_params, generator=g)
    for metric in (_random_low_rank(fm.n_params, 4, 0.1), ScaledIdentity(2.0)):
        y = solve_labels(*normal_equations(m, metric, metric.apply(d)))
        dense = metric.apply(torch.eye(fm.n_params, dtype=torch.float64).float()).double()
        chol = torch.linalg.cholesky(0.5 * (dense + dense.T))
        # brute force: min ||L^T (M^T y - d)||^2 as an explicit least-squares problem, minimum norm
        # (the columns of a sample, weighted by its probabilities, sum to zero: a rank cut-off)
        lhs, rhs = chol.T @ m[0].double().T, chol.T @ d[0].double()
        y_ls = torch.linalg.lstsq(lhs, rhs, rcond=1e-6, driver="gelsd").solution
        step, step_ls = y[0].double() @ m[0].double(), y_ls @ m[0].double()
        torch.testing.assert_close(step, step_ls, rtol=1e-4, atol=1e-5)
        err, err_ls = ((lhs @ y[0].double() - rhs) ** 2).sum(), ((lhs @ y_ls - rhs) ** 2).sum()
        assert float(err) <= float(err_ls) * (1 + 1e-5)
        assert float(err) < float((rhs**2).sum())  # better than no step
    low = _random_low_rank(fm.n_params, 4, 0.1)
    # the low-rank gram shortcut equals the generic M (A M)^T
    torch.testing.assert_close(low.gram(m), normal_equations(m, _NoGram(low), d)[0], rtol=1e-4, atol=1e-6)
    # and a metric applied to a few label columns at a time (a small memory budget) gives the same
    m3 = torch.cat([m, 2 * m, -m])  # three clusters
    for rows in (1, 4, 7, 13):
        parts = normal_equations(m3, _NoGram(low), d.expand(3, -1), rows=rows)
        torch.testing.assert_close(parts[0], low.gram(m3), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("metric_kind", ["low-rank", "identity"])
def test_factored_normal_equations_equal_the_materialised_ones(metric_kind):
    model = build_model("mlp", (8,), 3, seed=0, hidden=(6, 5))
    fm = flat_model(model)
    g = torch.Generator().manual_seed(2)
    kc, ipc = 3, 2
    x = torch.randn(kc * ipc, 8, generator=g)
    metric = _random_low_rank(fm.n_params, 7, 0.1) if metric_kind == "low-rank" else ScaledIdentity(2.0)
    bd = torch.randn(kc, fm.n_params, generator=g)
    m = label_columns(fm, x, lr=0.1).reshape(kc, -1, fm.n_params)
    want_g, want_r = normal_equations(m, metric, bd)
    got_g, got_r, factors = factored_normal_equations(fm, x, 0.1, metric, bd, chunk=4)
    scale = float(want_g.abs().max())
    torch.testing.assert_close(got_g, want_g, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(got_r, want_r, rtol=0, atol=1e-5 * float(want_r.abs().max()))
    # the steps of given labels equal y^T M
    y = torch.randn(kc * ipc, 3, generator=g)
    step = factored_steps(factors, y, kc, fm.n_params)
    torch.testing.assert_close(step, torch.bmm(y.reshape(kc, 1, -1), m).squeeze(1), rtol=1e-4, atol=1e-6)


def test_factored_path_falls_back_for_other_models_and_metrics():
    conv = build_model("convnet", (1, 8, 8), 3, seed=0, width=4, depth=1)
    fm = flat_model(conv)
    x = torch.randn(2, 1, 8, 8)
    bd = torch.randn(1, fm.n_params)
    assert factored_normal_equations(fm, x, 0.1, ScaledIdentity(1.0), bd) is None
    mlp = flat_model(build_model("mlp", (8,), 3, seed=0, hidden=(6,)))

    class Other:
        def apply(self, v):
            return v

    bd = torch.randn(1, mlp.n_params)
    assert factored_normal_equations(mlp, torch.randn(2, 8), 0.1, Other(), bd) is None


def test_curvature_share_and_hint_name_settings_not_in_use():
    low = _random_low_rank(30, 5, 1e-3)
    g = torch.Generator().manual_seed(1)
    inside = torch.randn(2, 5, generator=g) @ low.vecs  # within the basis: all curvature
    outside = torch.randn(2, 30, generator=g)
    outside -= (outside @ low.vecs.T) @ low.vecs
    torch.testing.assert_close(curvature_share(low, inside), torch.ones(2))
    torch.testing.assert_close(curvature_share(low, outside), torch.zeros(2), rtol=0, atol=1e-5)
    cfg = preset("default", epochs=30)[0]
    hint = fit_hint(cfg, 0.01)
    assert f"ipc={2 * cfg.ipc}" in hint and "damping" in hint
    assert "ggn" not in fit_hint(cfg.replace(curvature="ggn"), 0.9)
    assert "damping" not in fit_hint(cfg, 0.9)


def _share(vals, proj, rest, delta):
    low = ((proj / (vals + delta)) ** 2).sum(-1)
    return low / (low + rest / delta**2)


def test_share_damping_finds_where_the_median_target_reaches_its_curvature_share():
    t = SHARE_TARGET
    # one cluster, one eigenpair: share(d) = (p/(v+d))^2 / ((p/(v+d))^2 + r/d^2) = t where
    # p d c = sqrt(r) (v + d), c = sqrt((1 - t) / t), i.e. d = sqrt(r) v / (p c - sqrt(r))
    vals, proj, rest = torch.tensor([4.0]), torch.tensor([[3.0]]), torch.tensor([1.0])
    d = share_damping(vals, proj, rest)
    assert d == pytest.approx(4.0 / (3.0 * ((1 - t) / t) ** 0.5 - 1.0), rel=1e-5)
    assert float(_share(vals, proj, rest, d)) == pytest.approx(t, abs=1e-5)
    # the share grows with the damping, so the choice is the smallest that reaches the target
    g = torch.Generator().manual_seed(0)
    vals = torch.rand(8, generator=g) * 10
    proj, rest = torch.randn(31, 8, generator=g) * 0.1, torch.rand(31, generator=g)
    grid = torch.logspace(-3, 1, 50)
    shares = torch.stack([_share(vals, proj, rest, float(x)).median() for x in grid])
    assert bool((shares[1:] >= shares[:-1] - 1e-6).all())
    d = share_damping(vals, proj, rest)
    assert 0.01 <= d <= float(vals.max())
    if 0.01 < d < float(vals.max()):
        assert float(_share(vals, proj, rest, d).median()) == pytest.approx(t, abs=1e-3)
    # a target already mostly curvature keeps the floor; one that never gets there, the top eigenvalue
    assert share_damping(torch.tensor([1.0]), torch.tensor([[1.0]]), torch.tensor([1e-9])) == 0.01
    assert share_damping(torch.tensor([2.0]), torch.tensor([[1e-6]]), torch.tensor([1.0])) == 2.0


def test_auto_damping_needs_a_low_rank_closed_form_target():
    base = preset("default", epochs=30)[0]
    assert base.damping == "auto"  # the default preset's
    base = base.replace(damping=0.01)
    for bad in (
        base.replace(solver="adam"),
        base.replace(curvature="ekfac"),
        base.replace(hessian_rank=None),
    ):
        with pytest.raises(DistdmError, match="damping='auto'"):
            bad.replace(damping="auto")


def test_auto_damping_records_its_choice_and_uses_it(tiny_task):
    cfg = FAST.replace(input_steps=0, label_solves=1)
    curv = make_curvature(tiny_task, cfg.replace(damping="auto"))
    auto = distill_closed_form(tiny_task, cfg.replace(damping="auto"), curvature=curv)
    chosen = auto.info["damping"]
    assert chosen >= 0.01 and "median curvature share" in auto.info["damping_choice"]
    assert auto.info["target_curvature_share"] >= SHARE_TARGET - 1e-3 or chosen == pytest.approx(
        float(curv.vals.max())
    )
    fixed = distill_closed_form(
        tiny_task, cfg.replace(damping=chosen), curvature=LowRankCurvature(curv.vals, curv.vecs, chosen)
    )
    assert fixed.info["damping"] == chosen and fixed.info["damping_choice"] is None
    torch.testing.assert_close(auto.y, fixed.y, rtol=1e-4, atol=1e-5)


def test_curvatures_invert_their_products(tiny_task):
    p = flat_model(tiny_task).n_params
    v = torch.randn(3, p, generator=torch.Generator().manual_seed(0))
    low = _random_low_rank(p, 5, 0.05)
    torch.testing.assert_close(low.apply(low.solve(v)), v, rtol=1e-3, atol=1e-4)
    ek = make_curvature(tiny_task, DistillConfig(target="influence", solver="closed-form", curvature="ekfac"))
    assert isinstance(ek, EKFACCurvature) and ek.nbytes > 0
    torch.testing.assert_close(ek.apply(ek.solve(v)), v, rtol=1e-3, atol=1e-3)


FAST = DistillConfig(
    target="influence", ipc=2, soft_labels=True, solver="closed-form", hessian_rank=20,
    hessian_subsample=256, input_steps=4, label_solves=2, lr_img=0.03,
)  # fmt: skip


@pytest.mark.parametrize("solver", ["auto", "materialise"])
@pytest.mark.parametrize("steps", [0, 4])
def test_small_memory_budget_chunks_and_gives_the_same_synset(tiny_task, steps, solver):
    cfg = FAST.replace(input_steps=steps, label_solves=1 + (steps > 0), label_solver=solver)
    curv = make_curvature(tiny_task, cfg)
    whole = distill_closed_form(tiny_task, cfg, curvature=curv)
    assert whole.info["factored"] is (solver == "auto")
    k = tiny_task.clusters.n_clusters
    assert whole.info["clusters_per_chunk"] >= k
    p = flat_model(tiny_task).n_params
    per = factored_cluster_bytes(p) if solver == "auto" else cluster_bytes(p, cfg.ipc, 10)
    small = dataclasses.replace(tiny_task, memory_budget_bytes=curv.nbytes + 4 * per)
    chunked = distill_closed_form(small, cfg, curvature=curv)
    assert chunked.info["clusters_per_chunk"] == 4 < k
    # labels alone: the same up to float rounding; Adam's first steps move inputs by about lr_img
    # whatever the gradient's size, so rounding-level gradients leave differences far below lr_img
    # (a coordinate whose gradient is near zero may step either way: 0.2 lr_img)
    tol = 1e-5 if steps == 0 else 0.2 * cfg.lr_img
    torch.testing.assert_close(chunked.x, whole.x, rtol=0, atol=tol)
    # labels are unique only up to y_j + t p_j (invisible to the step): compare the steps themselves
    eye = torch.eye(k)
    a, b = finetune(tiny_task, chunked, eye), finetune(tiny_task, whole, eye)
    for name, v in a.items():
        step_a, step_b = v - tiny_task.final[name], b[name] - tiny_task.final[name]
        scale = float(step_b.abs().max())
        torch.testing.assert_close(step_a, step_b, rtol=0, atol=(1e-3 if steps == 0 else 0.05) * scale)
    rel = 1e-4 if steps == 0 else 1e-2
    assert chunked.info["loss_history"] == pytest.approx(whole.info["loss_history"], rel=rel)


def test_an_interrupted_distillation_resumes_from_the_chunks_it_journaled(tiny_task, tmp_path, monkeypatch):
    from distdm import distill_influence as di
    from distdm.attribution.ddm import load_or_distill, synset_key

    cfg = FAST.replace(input_steps=2, label_solves=2)
    curv = make_curvature(tiny_task, cfg)
    per = factored_cluster_bytes(flat_model(tiny_task).n_params)
    small = dataclasses.replace(tiny_task, memory_budget_bytes=curv.nbytes + 4 * per)
    whole = distill_closed_form(small, cfg)  # the same budget: the same curvature rank and chunks
    n_chunks = -(-small.clusters.n_clusters // whole.info["clusters_per_chunk"])
    assert n_chunks >= 4
    calls = []
    real_fit = di._fit_chunk

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user stops it in the third chunk
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(di, "_fit_chunk", crash_on_third)
    store = RunStore(tmp_path / "run")
    lr = small.schedule.lr
    with pytest.raises(KeyboardInterrupt):
        load_or_distill(small, cfg, small.clusters, lr, 1, store=store)
    key = synset_key(cfg, small.clusters, lr, 1)
    assert [store.is_done(f"{key}/journal/chunks/chunk{i}") for i in range(3)] == [True, True, False]
    counted = []
    monkeypatch.setattr(di, "_fit_chunk", lambda *a, **kw: counted.append(1) or real_fit(*a, **kw))
    monkeypatch.setattr(di, "make_curvature", lambda *a: pytest.fail("the journaled curvature is recomputed"))
    resumed = load_or_distill(small, cfg, small.clusters, lr, 1, store=RunStore(tmp_path / "run"))
    assert len(counted) == n_chunks - 2  # only the chunks not journaled are fitted again
    # the same chunks from the same curvature: bit for bit what an uninterrupted distillation gives
    assert torch.equal(resumed.x, whole.x)
    assert torch.equal(resumed.y, whole.y)
    assert resumed.info["loss_history"] == whole.info["loss_history"]
    # the synset holds everything now: the journal is gone from the run, and the synset is cached
    store = RunStore(tmp_path / "run")
    assert not any(name.startswith(f"{key}/journal") for name in store.manifest["artifacts"])
    assert not list((tmp_path / "run").rglob("journal/*"))
    counted.clear()
    again = load_or_distill(small, cfg, small.clusters, lr, 1, store=store)
    assert not counted
    assert torch.equal(again.x, resumed.x)


def test_a_journal_from_a_larger_budget_is_started_again_under_a_smaller_one(tiny_task, tmp_path):
    from distdm.distill_influence import _journal_chunk_size

    store = RunStore(tmp_path / "run")
    identity = {"settings": FAST.to_dict(), "lr": 0.1}
    store.check_config("job", {**identity, "chunk_size": 8})
    store.mark_done("job/chunk0", identity="x", items=8)
    assert _journal_chunk_size(store, "job", identity, 20, 10) == 8  # fits: its chunking is kept
    assert _journal_chunk_size(store, "job", identity, 20, 4) == 4  # too large now: dropped
    assert store.config("job") is None and not store.is_done("job/chunk0")
    store.check_config("job", {**identity, "chunk_size": 4})
    assert _journal_chunk_size(store, "job", {**identity, "lr": 0.2}, 20, 4) == 4  # other settings
    assert store.config("job") is None


def test_fast_preset_synset_steps_reproduce_the_target_better_than_initial_labels(tiny_task):
    from distdm.distill_shared import cluster_batches, cluster_gradients, init_synset, synthetic_gradients

    cfg = preset("fast", epochs=tiny_task.schedule.epochs)[0].replace(hessian_rank=30)
    syn = distill(tiny_task, cfg)
    assert syn.info["loss_history"][-1] < syn.info["loss_history"][0] < 1.0
    # the target d_k = A^-1 g_k / N and the metric, rebuilt here
    curv = make_curvature(tiny_task, cfg)
    fm = flat_model(tiny_task)
    import numpy as np

    idx, mask = cluster_batches(tiny_task.clusters, np.random.default_rng(0), 10**9)
    b = flatten_batch(cluster_gradients(tiny_task, tiny_task.final, idx, mask, mean=False), fm.names)
    d = curv.solve(b / len(tiny_task.clusters.assignment))

    def rel_err(delta):
        diff = delta - d
        return (diff * curv.apply(diff)).sum(-1) / (d * curv.apply(d)).sum(-1)

    k = syn.n_clusters
    states = finetune(tiny_task, syn, torch.eye(k))  # the online stage's own fine-tune
    delta = flatten_batch({n: states[n] - tiny_task.final[n] for n in fm.names}, fm.names)
    x0, onehot, _ = init_synset(tiny_task, tiny_task.clusters, cfg.ipc, cfg.seed)
    lr = tiny_task.schedule.lr
    g0 = synthetic_gradients(tiny_task, tiny_task.final, x0, onehot, cfg.ipc, mean=False)
    initial = -lr * flatten_batch({n: v.detach() for n, v in g0.items()}, fm.names)
    assert float(rel_err(delta).median()) < 0.5 * float(rel_err(initial).median())
    assert float(rel_err(delta).median()) < 1.0  # better than the zero step
    assert float(rel_err(delta).median()) == pytest.approx(syn.info["relative_error_median"], rel=0.05)


def test_old_default_stays_selectable_by_name():
    assert {"paper", "default", "influence-adam", "fast"} <= set(PRESETS)
    d, o = preset("influence-adam", epochs=30)
    # the settings the 'default' preset had before the closed-form solver (RESULTS.md, DDM variants)
    assert (d.target, d.ipc, d.soft_labels, d.metric, d.hessian_rank, d.iterations) == (
        "influence", 4, True, "hessian", 200, 1000,
    )  # fmt: skip
    assert (d.lr_img, d.lr_label, d.damping, d.solver, d.hessian_subsample) == (
        0.03,
        0.03,
        0.01,
        "adam",
        None,
    )
    assert (o.perturbations_per_cluster, o.steps) == (4.0, 1)
    fast, default = preset("fast", epochs=30)[0], preset("default", epochs=30)[0]
    # 'fast' is the default of 2026-12-01 (label columns formed); 'default' differs in how it solves
    # and in the split Hessian where parameters are reused, and chooses its target's damping
    assert (fast.label_solver, default.label_solver) == ("materialise", "auto")
    assert (fast.damping, default.damping) == (0.01, "auto")
    assert default == fast.replace(
        label_solver="auto", input_steps=20, label_solves=2, residual_subsample=200, damping="auto"
    )
    assert (fast.solver, fast.input_steps, fast.label_solves) == ("closed-form", 50, 3)
    from distdm.attribution.ddm import DDM

    assert DDM("influence-adam").preset == "influence-adam"


def test_closed_form_refuses_a_curvature_without_a_cheap_inverse(tiny_task):
    with pytest.raises(DistdmError, match="hessian_rank"):
        distill(tiny_task, FAST.replace(hessian_rank=None))
    with pytest.raises(DistdmError, match="solver"):
        DistillConfig(target="influence", curvature="ekfac")
    with pytest.raises(DistdmError, match="solver"):
        DistillConfig(solver="lbfgs")


def test_factored_and_materialised_label_solves_give_the_same_synset(tiny_task):
    cfg = FAST.replace(input_steps=0, label_solves=1)
    curv = make_curvature(tiny_task, cfg)
    a = distill_closed_form(tiny_task, cfg.replace(label_solver="auto"), curvature=curv)
    b = distill_closed_form(tiny_task, cfg.replace(label_solver="materialise"), curvature=curv)
    assert a.info["factored"] and not b.info["factored"]
    k = tiny_task.clusters.n_clusters
    sa, sb = finetune(tiny_task, a, torch.eye(k)), finetune(tiny_task, b, torch.eye(k))
    for name, v in sa.items():
        step_a, step_b = v - tiny_task.final[name], sb[name] - tiny_task.final[name]
        torch.testing.assert_close(step_a, step_b, rtol=0, atol=1e-3 * float(step_b.abs().max()))
    assert a.info["loss_history"] == pytest.approx(b.info["loss_history"], rel=1e-3)
    assert 0.0 <= a.info["target_curvature_share"] <= 1.0


def _conv_task(digits, width=4, depth=1):
    from distdm.clusters import kmeans_per_class
    from distdm.data import TensorData
    from distdm.engine import Schedule
    from distdm.task import train_target

    img = (-1, 1, 8, 8)
    sub = TensorData(
        digits.x_train[:200].reshape(img), digits.y_train[:200], digits.x_test[:50].reshape(img),
        digits.y_test[:50], 10, "digits-img",
    )  # fmt: skip
    model = build_model("convnet", (1, 8, 8), 10, seed=0, width=width, depth=depth)
    clusters = kmeans_per_class(sub.x_train.reshape(200, -1), sub.y_train, 1, seed=0)
    return train_target(model, sub, Schedule(epochs=2, lr=0.1, batch_size=64, seed=0), clusters)


def test_a_small_budget_computes_the_label_columns_a_few_gradients_at_a_time(digits, monkeypatch):
    import distdm.hessian as hs

    task = _conv_task(digits)
    fm = flat_model(task)
    assert hs.gradient_rows(fm.n_params, None) == 256  # the default budget: no change for small models
    assert hs.gradient_rows(fm.n_params, 160 * fm.n_params) == 2  # 0.1 of the budget: 2 gradients
    assert hs.gradient_rows(10**9, 160 * fm.n_params) == 1
    x = task.data.x_train[:3]
    torch.testing.assert_close(label_columns(fm, x, 0.1, chunk=2), label_columns(fm, x, 0.1))
    cfg = FAST.replace(hessian_rank=5, hessian_subsample=64, input_steps=2)
    whole = distill_closed_form(task, cfg)
    monkeypatch.setattr(hs, "GRADIENT_SHARE", 1e-9)  # one gradient at a time: the same fit
    one_by_one = distill_closed_form(task, cfg)
    # equal columns up to rounding (above); the label solve and Adam's normalised input steps amplify
    # rounding in individual entries, so the fit is compared where it is stable: its errors
    assert one_by_one.info["loss_history"] == pytest.approx(whole.info["loss_history"], rel=1e-3)


def test_a_convnet_falls_back_to_the_label_columns_and_still_fits(digits):
    task = _conv_task(digits)
    syn = distill_closed_form(task, FAST.replace(hessian_rank=5, hessian_subsample=64, input_steps=2))
    assert not syn.info["factored"]
    assert syn.info["loss_history"][-1] < syn.info["loss_history"][0]


def test_input_box_keeps_synthetic_inputs_within_the_training_range(tiny_task):
    xt = tiny_task.data.x_train
    lo, hi = float(xt.min()), float(xt.max())
    cfg = FAST.replace(input_steps=6, label_solves=2, lr_img=5.0)  # steps large enough to leave the box
    free = distill_closed_form(tiny_task, cfg)
    boxed = distill_closed_form(tiny_task, cfg.replace(input_box=True))
    assert float(free.x.min()) < lo or float(free.x.max()) > hi
    assert lo <= float(boxed.x.min()) and float(boxed.x.max()) <= hi


def test_thorough_preset_is_default_with_50_input_steps_and_fits_closer(tiny_task):
    d, o = preset("default", epochs=10)
    t, to = preset("thorough", epochs=10)
    assert to == o and t == d.replace(input_steps=50)
    small = {"hessian_rank": 30, "residual_subsample": None}
    curv = make_curvature(tiny_task, d.replace(**small))
    fits = {
        name: distill_closed_form(tiny_task, c.replace(**small), curvature=curv).info["relative_error_median"]
        for name, c in (("default", d), ("thorough", t))
    }
    assert fits["thorough"] < fits["default"]
    # the poor-fit hint names the preset to the default's users, and more steps to the preset's own
    assert "preset 'thorough'" in fit_hint(d, None)
    assert "input_steps=100, now 50" in fit_hint(t, None) and "thorough" not in fit_hint(t, None)


def test_private_preset_is_default_started_from_no_member_within_the_data_range(tiny_task):
    d, o = preset("default", epochs=10)
    p, po = preset("private", epochs=10)
    assert po == o
    assert p == d.replace(init="between", input_box=True, input_steps=50, label_solves=3)
    x, _, _ = init_inputs(tiny_task, tiny_task.clusters, p.ipc, p.seed, p.init)
    xt = tiny_task.data.x_train
    # no synthetic input equals a training image, and all lie within the training inputs' range
    assert torch.cdist(x.flatten(1), xt.flatten(1)).min() > 1e-3
    assert float(x.min()) >= float(xt.min()) - 1e-6 and float(x.max()) <= float(xt.max()) + 1e-6


def test_a_small_memory_budget_lowers_the_eigenpair_rank_with_a_warning(tiny_task, caplog):
    from distdm import eigen

    p = flat_model(tiny_task).n_params
    need = eigen.block_krylov_bytes(p, 20, 10, 40)
    assert rank_within_budget(20, p, 10, torch.float32, None) == 20
    assert rank_within_budget(20, p, 10, torch.float32, 2 * need) == 20
    small = eigen.block_krylov_bytes(p, 12, 10, 24)  # fits rank 12 at 3/4 of the budget, not 13
    budget = int(small / 0.75) + 1
    with caplog.at_level("WARNING", logger="distdm.distill_influence"):
        assert rank_within_budget(20, p, 10, torch.float32, budget) == 12
    assert "using the top 12" in caplog.text and "raise memory_budget_bytes" in caplog.text
    # below the smallest useful rank it is the solver's refusal, naming the memory
    assert rank_within_budget(20, p, 10, torch.float32, 1000) == 20
    cfg = DistillConfig(target="influence", solver="closed-form", hessian_rank=20, curvature="ggn")
    curv = make_curvature(dataclasses.replace(tiny_task, memory_budget_bytes=budget), cfg)
    assert curv.vals.shape == (12,) and curv.vecs.shape == (12, p)
    with pytest.raises(DistdmError, match="MiB"):
        make_curvature(dataclasses.replace(tiny_task, memory_budget_bytes=1000), cfg)


def test_the_split_hessian_reaches_the_eigenpairs_on_convnets_and_leaves_mlps_alone(digits, tiny_task):
    from distdm.distill_influence import _EIGEN_CACHE, top_eigenpairs

    conv = _conv_task(digits, width=16, depth=2)  # convolutions dominate: the stored Jacobians pay
    assert preset("default", epochs=2)[0].residual_subsample == 200
    full, _ = top_eigenpairs(conv, 8, "hessian")
    exact_split, _ = top_eigenpairs(conv, 8, "hessian", residual_subsample=10**6)  # all samples: exact
    torch.testing.assert_close(exact_split, full, rtol=1e-3, atol=1e-5)
    drawn, _ = top_eigenpairs(conv, 8, "hessian", residual_subsample=50)
    # a draw of a quarter of the samples of a barely trained model: near the top eigenvalues, not on them
    assert not torch.allclose(drawn, full, rtol=1e-3) and abs(float(drawn[0] / full[0]) - 1) < 0.35
    mlp_full, _ = top_eigenpairs(tiny_task, 8, "hessian")
    mlp_split, _ = top_eigenpairs(tiny_task, 8, "hessian", residual_subsample=50)  # no stored Jacobians
    torch.testing.assert_close(mlp_split, mlp_full)
    _EIGEN_CACHE.clear()


def test_cluster_gradients_in_passes_that_fit_a_small_budget_equal_one_pass(tiny_task):
    import numpy as np

    from distdm.distill_shared import cluster_batches, cluster_gradients, rows_per_pass

    idx, mask = cluster_batches(tiny_task.clusters, np.random.default_rng(0), 10**9)
    small = dataclasses.replace(tiny_task, memory_budget_bytes=200_000)  # a few samples a pass
    rows = rows_per_pass(small, small.final)
    assert rows < idx.shape[1], (rows, idx.shape)  # a cluster takes several passes
    assert rows_per_pass(tiny_task, tiny_task.final) == 4096  # the default budget: one pass, as before
    for mean in (True, False):
        whole = cluster_gradients(tiny_task, tiny_task.final, idx, mask, mean=mean)
        passes = cluster_gradients(small, small.final, idx, mask, mean=mean)
        for k in whole:
            torch.testing.assert_close(passes[k], whole[k], rtol=1e-4, atol=1e-6)


def test_a_changed_auto_damping_rule_names_another_synset(tiny_task, monkeypatch):
    from distdm.attribution import ddm as ddm_mod

    cfg = FAST.replace(damping="auto")
    before = ddm_mod.synset_key(cfg, tiny_task.clusters, 0.1, 1)
    assert ddm_mod.synset_key(FAST, tiny_task.clusters, 0.1, 1) != before
    monkeypatch.setattr(ddm_mod, "SHARE_TARGET", 0.3)
    assert ddm_mod.synset_key(cfg, tiny_task.clusters, 0.1, 1) != before
    assert ddm_mod.synset_key(FAST, tiny_task.clusters, 0.1, 1) == ddm_mod.synset_key(
        FAST, tiny_task.clusters, 0.1, 1
    )
