"""Grad-Dot, Grad-Cos and TracIn: values against hand-computed gradients, units, signs, regression."""

import copy

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from distdm.attribution import make_attributor
from distdm.engine import per_sample_loss
from distdm.errors import DistdmError
from distdm.objectives import dist1, margin


def _grad(task, state, fn):
    """Gradient of fn(model outputs) with respect to all parameters at `state` (plain autograd)."""
    model = copy.deepcopy(task.model)  # the shared task's module stays untouched
    model.load_state_dict(state)
    model.zero_grad()
    fn(model).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _train_grad(task, state, i):
    x, y = task.data.x_train[i : i + 1], task.data.y_train[i : i + 1]
    return _grad(task, state, lambda m: per_sample_loss(m(x), y, task.loss)[0])


def _margin_grad(task, state, xq, yq):
    ref = task.outputs(xq[None])
    return _grad(task, state, lambda m: margin(m(xq[None])[None], ref, yq[None])[0, 0])


def _mean_spearman(a, b):
    return float(np.mean([spearmanr(a[:, q], b[:, q])[0] for q in range(a.shape[1])]))


def test_grad_dot_and_cos_equal_hand_computed_gradients(tiny_task, queries):
    x, y = queries
    dot = make_attributor("grad-dot", unit="sample").fit(tiny_task).scores(x[:3], y[:3], "margin")
    cos = make_attributor("grad-cos", unit="sample").fit(tiny_task).scores(x[:3], y[:3], "margin")
    assert dot.values.shape == (tiny_task.data.n_train, 3) and dot.unit == "sample"
    assert np.abs(cos.values).max() <= 1 + 1e-6
    for q, i in [(0, 0), (1, 17), (2, 500)]:
        gq = _margin_grad(tiny_task, tiny_task.final, x[q], y[q])
        gi = _train_grad(tiny_task, tiny_task.final, i)
        assert dot.values[i, q] == pytest.approx(float(gq @ gi), rel=1e-4, abs=1e-6)
        assert cos.values[i, q] == pytest.approx(float(gq @ gi / (gq.norm() * gi.norm())), rel=1e-4, abs=1e-6)


def test_cluster_scores_are_sums_of_member_scores(tiny_task, queries):
    x, y = queries
    per_sample = make_attributor("grad-dot", unit="sample").fit(tiny_task).scores(x, y, "margin")
    per_cluster = make_attributor("grad-dot").fit(tiny_task).scores(x, y, "margin")
    assert per_cluster.unit == "cluster" and per_cluster.n_units == tiny_task.clusters.n_clusters
    for k in (0, 7, 29):
        members = tiny_task.clusters.members(k)
        np.testing.assert_allclose(per_cluster.values[k], per_sample.values[members].sum(0), rtol=1e-6)


def test_tracin_sums_lr_times_dot_over_checkpoints(tiny_task, queries):
    x, y = queries
    lr = tiny_task.schedule.lr
    s = make_attributor("tracin", unit="sample", checkpoints=[3, 10]).fit(tiny_task).scores(x[:2], y[:2])
    ref = tiny_task.outputs(x[:2])
    for q, i in [(0, 5), (1, 900)]:
        expected = 0.0
        for c in (3, 10):
            st = tiny_task.trajectory[c]
            xq = x[q : q + 1]
            gq = _grad(
                tiny_task, st, lambda m, xq=xq, q=q: margin(m(xq)[None], ref[q : q + 1], y[q : q + 1])[0, 0]
            )
            expected += lr * float(gq @ _train_grad(tiny_task, st, i))
        assert s.values[i, q] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # the final checkpoint alone is lr x Grad-Dot
    last = make_attributor("tracin", unit="sample", checkpoints=[-1]).fit(tiny_task).scores(x[:2], y[:2])
    dot = make_attributor("grad-dot", unit="sample").fit(tiny_task).scores(x[:2], y[:2])
    np.testing.assert_allclose(last.values, lr * dot.values, rtol=1e-5, atol=1e-8)
    with pytest.raises(DistdmError, match="checkpoints"):
        make_attributor("tracin", checkpoints=[99]).fit(tiny_task)


def test_flat_objectives_use_the_output_expansion(tiny_task, queries):
    # dist1 has zero gradient at the target model: scores come from f(out + J delta) - f(out)
    x, y = queries
    s = make_attributor("grad-dot", unit="sample").fit(tiny_task).scores(x[:2], y[:2], "dist1")
    assert (s.values >= 0).all() and s.values.max() > 0  # a squared distance can only grow
    forced = make_attributor("grad-dot", unit="sample", expansion="linear").fit(tiny_task)
    assert np.abs(forced.scores(x[:2], y[:2], "dist1").values).max() < 1e-12  # the flat first order
    # one (sample, query) pair by hand: delta = lr * epochs / batch * g_i, out change = J_q delta
    sched = tiny_task.schedule
    i, q = 11, 1
    delta = sched.lr * sched.epochs / sched.batch_size * _train_grad(tiny_task, tiny_task.final, i)
    names = [k for k, _ in tiny_task.model.named_parameters()]
    final = tiny_task.final
    theta = torch.cat([final[k].reshape(-1) for k in names])
    sizes = [final[k].numel() for k in names]

    def out_of(t):
        parts = {k: v.view(final[k].shape) for k, v in zip(names, t.split(sizes), strict=True)}
        return torch.func.functional_call(tiny_task.model, parts, (x[q : q + 1],))[0]

    ref = out_of(theta).detach()
    _, jd = torch.func.jvp(out_of, (theta,), (delta,))
    expected = float(dist1((ref + jd)[None, None], ref[None], y[q : q + 1]))
    assert s.values[i, q] == pytest.approx(expected, rel=1e-3)
    # clusters: the members' output changes add up before the distance is taken
    clus = make_attributor("grad-dot").fit(tiny_task).scores(x[:2], y[:2], "dist1")
    assert clus.values.shape == (tiny_task.clusters.n_clusters, 2) and (clus.values >= 0).all()


def test_first_order_signs_agree_with_exact_leave_cluster_out(tiny_task, queries, tiny_lco):
    # measured mean Spearman over 20 queries: grad-dot 0.46, grad-cos 0.40, tracin 0.44 (margin);
    # dist1 0.78 / 0.74 / 0.75. Thresholds leave room for platform round-off, not for a sign flip.
    x, y = queries
    for name in ("grad-dot", "grad-cos", "tracin"):
        a = make_attributor(name).fit(tiny_task)
        assert _mean_spearman(a.scores(x, y, "margin").values, tiny_lco["margin"]) > 0.3, name
        assert _mean_spearman(a.scores(x, y, "dist1").values, tiny_lco["dist1"]) > 0.5, name


def test_user_callable_objective_and_regression(diabetes_task):
    d = diabetes_task.data
    x, y = d.x_test[:5], d.y_test[:5]
    for name in ("grad-dot", "grad-cos", "tracin"):
        a = make_attributor(name).fit(diabetes_task)
        s = a.scores(x, y, "squared_error")
        assert s.values.shape == (d.n_train, 5) and np.isfinite(s.values).all()
        raw = a.scores(x, y, lambda out, ref, yy: out[..., 0])  # the prediction itself
        assert raw.objective != "squared_error" and np.abs(raw.values).max() > 0


def test_settings_are_checked(tiny_task, queries):
    with pytest.raises(DistdmError, match="unit"):
        make_attributor("grad-dot", unit="pixel")
    with pytest.raises(DistdmError, match="expansion"):
        make_attributor("grad-cos", expansion="taylor")
    with pytest.raises(DistdmError, match="fit"):
        make_attributor("grad-dot").scores(*queries)
    last = make_attributor("grad-dot", params="last", cache_grads=False).fit(tiny_task)
    assert last.fm_.names == ["head.weight", "head.bias"]
    assert last.scores(*queries).values.shape == (tiny_task.clusters.n_clusters, 20)


def _loop_grads(task, state, x, fn):
    """Per-sample gradients by a plain autograd loop: row i is the gradient of fn(model, i)."""
    model = copy.deepcopy(task.model)
    model.load_state_dict(state)
    model.eval()
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        fn(model, i).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows).double()


def test_all_scores_equal_a_reference_loop_on_both_gradient_paths(tiny_task, queries, monkeypatch):
    # every (sample, query) score of the three methods against per-sample gradients taken one by one
    from distdm import hessian as hs

    d = tiny_task.data
    x, y = queries[0][:4], queries[1][:4]
    ref_out = tiny_task.outputs(x)

    def train_fn(state):
        return _loop_grads(
            tiny_task, state, d.x_train,
            lambda m, i: per_sample_loss(m(d.x_train[i : i + 1]), d.y_train[i : i + 1], tiny_task.loss)[0],
        )  # fmt: skip

    def query_fn(state):
        return _loop_grads(
            tiny_task,
            state,
            x,
            lambda m, q: margin(m(x[q : q + 1])[None], ref_out[q : q + 1], y[q : q + 1])[0, 0],
        )

    g, gq = train_fn(tiny_task.final), query_fn(tiny_task.final)
    expected = {
        "grad-dot": (g @ gq.T).numpy(),
        "grad-cos": ((g / g.norm(dim=1, keepdim=True)) @ (gq / gq.norm(dim=1, keepdim=True)).T).numpy(),
        "tracin": sum(
            tiny_task.schedule.lr * (train_fn(tiny_task.trajectory[c]) @ query_fn(tiny_task.trajectory[c]).T)
            for c in (3, 10)
        ).numpy(),
    }
    settings = {"tracin": {"checkpoints": [3, 10]}}

    def all_scores(cache):
        return {
            name: make_attributor(name, unit="sample", cache_grads=cache, **settings.get(name, {}))
            .fit(tiny_task)
            .scores(x, y, "margin")
            .values
            for name in expected
        }

    factored = all_scores("auto")
    assert hs._linear_layout(hs.flat_model(tiny_task)) is not None  # the MLP takes the factored path
    for name, want in expected.items():
        scale = np.abs(want).max()
        np.testing.assert_allclose(factored[name], want, rtol=0, atol=1e-5 * scale, err_msg=name)
    uncached = all_scores(False)
    monkeypatch.setattr(hs, "_linear_layout", lambda fm: None)  # the general path: vmap over grad
    general = all_scores("auto")
    for name, want in expected.items():
        scale = np.abs(want).max()
        np.testing.assert_allclose(uncached[name], factored[name], rtol=0, atol=1e-6 * scale, err_msg=name)
        np.testing.assert_allclose(general[name], want, rtol=0, atol=1e-5 * scale, err_msg=name)


def test_output_expansion_is_the_same_on_both_gradient_paths(tiny_task, queries, monkeypatch):
    from distdm import hessian as hs

    x, y = queries[0][:3], queries[1][:3]
    names = ("grad-dot", "grad-cos", "tracin")
    factored = {n: make_attributor(n).fit(tiny_task).scores(x, y, "dist1").values for n in names}
    last = make_attributor("grad-dot", params="last").fit(tiny_task).scores(x, y, "dist1").values
    monkeypatch.setattr(hs, "_linear_layout", lambda fm: None)
    for n in names:
        general = make_attributor(n).fit(tiny_task).scores(x, y, "dist1").values
        np.testing.assert_allclose(
            factored[n], general, rtol=1e-4, atol=1e-7 * np.abs(general).max(), err_msg=n
        )
    general_last = make_attributor("grad-dot", params="last").fit(tiny_task).scores(x, y, "dist1").values
    np.testing.assert_allclose(last, general_last, rtol=1e-4, atol=1e-7 * np.abs(general_last).max())


def test_training_gradients_are_kept_factored(tiny_task):
    # fit keeps N x (d_in + d_out) floats per layer, not N x P; train_grads still yields dense chunks
    a = make_attributor("grad-dot", chunk=500).fit(tiny_task)
    n, p = tiny_task.data.n_train, a.fm_.n_params
    assert a.grads_ is None and a.factors_ is not None
    assert a.factors_.nbytes < 0.1 * n * p * 4
    chunks = list(a.train_grads())
    assert [c.shape for _, c in chunks] == [(500, p), (500, p), (n - 1000, p)]
    torch.testing.assert_close(
        chunks[1][1][7], _train_grad(tiny_task, tiny_task.final, 507), atol=1e-6, rtol=1e-5
    )
    tr = make_attributor("tracin").fit(tiny_task)
    assert len(tr.cp_grads_) == len(tiny_task.trajectory) - 1
    assert all(c is not None and not isinstance(c, torch.Tensor) for c in tr.cp_grads_)


def test_a_small_memory_budget_streams_fewer_training_gradients_at_once_with_the_same_scores(
    tiny_task, queries, monkeypatch
):
    import dataclasses

    import distdm.hessian as hs

    x, y = queries
    want = make_attributor("if-ekfac", cache_grads=False).fit(tiny_task).scores(x, y, "margin").values
    seen = []
    real = hs.iter_per_sample_grads

    def spy(*a, chunk=256, **k):
        seen.append(chunk)
        return real(*a, chunk=chunk, **k)

    monkeypatch.setattr("distdm.attribution.gradients.iter_per_sample_grads", spy)
    p = sum(v.numel() for v in tiny_task.final.values())
    small = dataclasses.replace(tiny_task, memory_budget_bytes=16 * 8 * p * 10)  # 0.1 of it: 16 gradients
    got = make_attributor("if-ekfac", cache_grads=False).fit(small).scores(x, y, "margin").values
    assert seen and set(seen) == {16}
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
