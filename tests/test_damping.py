"""Automatic damping: the rule on a known spectrum, its choice on an indefinite problem, and
with_damping re-solving from the cached factorisation (equal to a fresh fit, no new curvature work)."""

import logging

import numpy as np
import pytest
import torch

from distdm import damping as damping_rule
from distdm.attribution import influence as influence_mod
from distdm.attribution import make_attributor
from distdm.config import Schedule
from distdm.errors import DistdmError


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _quadratic(eigvals, seed=0):
    """The Hessian of 0.5 x^T A x with a known spectrum: A = Q diag(eigvals) Q^T, Q random orthogonal."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigvals), len(eigvals), generator=g, dtype=torch.float64))
    return (q * torch.tensor(eigvals, dtype=torch.float64)) @ q.T


def test_rule_on_a_quadratic_with_a_known_spectrum(caplog):
    eig = np.linspace(-0.4, 3.0, 60)
    a = _quadratic(eig).float()
    # Lanczos with as many steps as dimensions spans the space: the extremes are exact
    full = damping_rule.lanczos(lambda v: a @ v, 60, iters=60)
    assert full.lambda_min == pytest.approx(-0.4, abs=1e-4) and full.lambda_max == pytest.approx(
        3.0, abs=1e-4
    )
    with caplog.at_level(logging.WARNING, logger="distdm.damping"):
        choice = damping_rule.choose(full)
    assert choice.value == pytest.approx(damping_rule.SAFETY * 0.4, rel=1e-3)  # SAFETY x |lambda_min|
    assert "indefinite" in caplog.text and f"{damping_rule.SAFETY * 0.4:.4g}" in caplog.text
    # fewer steps: a Ritz value is never below lambda_min, so |lambda_min| is underestimated, not over
    few = damping_rule.lanczos(lambda v: a @ v, 60, iters=12)
    assert -0.4 - 1e-5 <= few.lambda_min < 0 and few.lambda_max <= 3.0 + 1e-5
    # its residual bound: an eigenvalue lies within lambda_min_error of the Ritz value; the full
    # basis is exact (error 0), the short one is not, and the rule damps it by the bound on top
    assert full.lambda_min_error < 1e-4 < few.lambda_min_error
    assert np.abs(eig - few.lambda_min).min() <= few.lambda_min_error + 1e-5
    size = -few.lambda_min + few.lambda_min_error
    assert damping_rule.choose(few).value == pytest.approx(damping_rule.SAFETY * size)
    # the exact spectrum; a positive definite one gets the floor; the mean rule is 0.1 x trace / P
    exact = damping_rule.exact_spectrum(torch.tensor(eig))
    assert damping_rule.choose(exact).value == pytest.approx(damping_rule.SAFETY * 0.4)
    psd = damping_rule.exact_spectrum(torch.tensor(np.linspace(0.5, 3.0, 10)))
    assert damping_rule.choose(psd).value == damping_rule.FLOOR
    assert damping_rule.choose(exact, "mean").value == pytest.approx(0.1 * eig.mean())
    assert damping_rule.choose(exact, "combined").value == pytest.approx(
        max(damping_rule.SAFETY * 0.4, 0.1 * eig.mean())
    )
    # a tiny negative eigenvalue (2 x 0.001 < the floor) keeps the floor
    mild = damping_rule.exact_spectrum(torch.tensor([-0.001, 1.0]))
    assert damping_rule.choose(mild).value == damping_rule.FLOOR
    for bad in ("automatic", -1.0, float("nan"), True):
        with pytest.raises(DistdmError, match="damping"):
            damping_rule.check_damping(bad)
    with pytest.raises(DistdmError, match="rule"):
        damping_rule.choose(exact, "median")


@pytest.fixture(scope="module")
def auto_exact(diabetes_task):
    """if-exact on the Hessian with the default damping, on an MLP that is not at a minimum (indefinite)."""
    return make_attributor("if-exact", curvature="hessian").fit(diabetes_task)


def test_auto_damping_on_an_indefinite_problem_exceeds_the_smallest_eigenvalue(
    diabetes_task, auto_exact, caplog
):
    lam_min = float(torch.linalg.eigvalsh(auto_exact.hessian_.double()).min())
    assert lam_min < -0.05  # the problem is indefinite (measured -0.13)
    assert auto_exact.damping == "auto"
    assert auto_exact.damping_ >= -lam_min
    assert auto_exact.damping_choice_.rule == damping_rule.DEFAULT_RULE
    assert auto_exact.damping_choice_.spectrum.lambda_min <= 0.9 * lam_min  # Lanczos found most of it
    d = diabetes_task.data
    # every iterative method (Lanczos on the HVP) chooses one as well, and warns at WARNING why
    with caplog.at_level(logging.WARNING, logger="distdm.damping"):
        cg = make_attributor("if-cg", curvature="hessian", tol=1e-7, max_iter=400).fit(diabetes_task)
    assert "indefinite" in caplog.text and "if-cg" in caplog.text
    assert cg.damping_ >= -lam_min
    # with the same damping, CG and the exact inverse agree
    same = cg.with_damping(auto_exact.damping_)
    x, y = d.x_test[:4], d.y_test[:4]
    ref = auto_exact.scores(x, y, "squared_error").values
    assert _rel(same.scores(x, y, "squared_error").values, ref) < 1e-3
    # a number is still used as given, with a warning where it leaves H + damping I indefinite
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distdm.damping"):
        low = auto_exact.with_damping(0.01)
    assert low.damping_ == 0.01 and "below" in caplog.text
    ggn = make_attributor("if-exact").fit(diabetes_task)  # the default curvature
    assert ggn.curvature == "ggn" and ggn.damping_choice_.spectrum.lambda_min > -1e-6
    # positive semi-definite: no raise for the spectrum, only the training time's 1 / t (or the floor)
    t = damping_rule.training_time(diabetes_task.schedule, d.n_train)
    assert ggn.damping_ == pytest.approx(max(damping_rule.FLOOR, damping_rule.TIME_FACTOR / t))


def test_with_damping_equals_a_fresh_fit_without_curvature_work(diabetes_task, auto_exact, monkeypatch):
    d = diabetes_task.data
    x, y = d.x_test[:5], d.y_test[:5]
    built = []
    real_dense = influence_mod.dense
    monkeypatch.setattr(influence_mod, "dense", lambda *a, **k: built.append(1) or real_dense(*a, **k))
    fresh = {
        v: make_attributor("if-exact", curvature="hessian", damping=v).fit(diabetes_task) for v in (0.3, 1.0)
    }
    assert len(built) == 2
    hv_calls = []
    auto_exact.hvp_ = (lambda f: lambda v: hv_calls.append(1) or f(v))(auto_exact.hvp_)
    # a Cholesky factorisation of the kept H per damping, then (eigendecompose: one eigh for a
    # sweep) O(P^2) per damping; both equal a fresh fit
    for eig in (False, True):
        if eig:
            auto_exact.eigendecompose()
        for v, f in fresh.items():
            other = auto_exact.with_damping(v)
            assert other.damping_ == v and other.hessian_ is auto_exact.hessian_
            assert "w" in other._eig or not eig  # one eigendecomposition, shared with every copy
            np.testing.assert_allclose(
                other.scores(x, y, "squared_error").values,
                f.scores(x, y, "squared_error").values,
                rtol=1e-4,
                atol=1e-7,
            )
    assert len(built) == 2 and not hv_calls  # no new Hessian, not one HVP
    # 'auto' again: now from the exact spectrum (the eigendecomposition exists), which the Lanczos
    # estimate of fit matched on this small model
    assert auto_exact.with_damping("auto").damping_ == pytest.approx(auto_exact.damping_, rel=1e-3)
    with pytest.raises(DistdmError, match="fit"):
        make_attributor("if-exact").with_damping(0.1)
    with pytest.raises(DistdmError, match="damping"):
        auto_exact.with_damping(-0.5)


def test_with_damping_keeps_arnoldi_eigenpairs_and_ekfac_eigenbases(diabetes_task, monkeypatch):
    d = diabetes_task.data
    x, y = d.x_test[:5], d.y_test[:5]
    settings = {"n_iters": 40, "top_p": 10}
    calls = []
    real = influence_mod.arnoldi
    monkeypatch.setattr(influence_mod, "arnoldi", lambda *a, **k: calls.append(1) or real(*a, **k))
    arn = make_attributor("if-arnoldi", damping=0.2, **settings).fit(diabetes_task)
    moved = arn.with_damping(0.5)
    assert len(calls) == 1 and moved.damping_ == 0.5 and arn.damping_ == 0.2
    fresh = make_attributor("if-arnoldi", damping=0.5, **settings).fit(diabetes_task)
    np.testing.assert_allclose(
        moved.scores(x, y, "squared_error").values,
        fresh.scores(x, y, "squared_error").values,
        rtol=1e-4,
        atol=1e-7,
    )
    ek = make_attributor("if-ekfac").fit(diabetes_task)  # 'auto': the mean per layer
    assert ek.damping_choice_.rule == "ekfac-mean" and "kronfluence" not in ek.damping_choice_.reason
    kron = ek.with_damping("kronfluence")
    for layer in ek.ekfac_.layers:
        mean = float(layer.lam.mean())
        assert ek.damping_[layer.name] == pytest.approx(mean, rel=1e-6)
        assert kron.damping_[layer.name] == pytest.approx(0.1 * mean, rel=1e-6)
    assert make_attributor("if-ekfac", damping="kronfluence").fit(diabetes_task).damping_ == kron.damping_
    fresh_ek = make_attributor("if-ekfac", damping=0.05).fit(diabetes_task)
    moved_ek = ek.with_damping(0.05)
    assert set(moved_ek.damping_.values()) == {0.05}
    assert moved_ek.ekfac_.layers[0].q_a is ek.ekfac_.layers[0].q_a  # the eigenbasis is shared
    np.testing.assert_allclose(
        moved_ek.scores(x, y, "squared_error").values,
        fresh_ek.scores(x, y, "squared_error").values,
        rtol=1e-4,
        atol=1e-7,
    )
    back = moved_ek.with_damping("auto")
    assert back.damping_ == ek.damping_


def test_training_time_is_steps_times_lr_over_one_minus_momentum_and_bounds_the_damping() -> None:
    sgd = Schedule(epochs=2, lr=0.05, batch_size=32, momentum=0.9)
    # 100 samples in batches of 32: 4 steps an epoch (the last one short), 8 in all; 8 x 0.05 / 0.1
    assert damping_rule.training_time(sgd, 100) == pytest.approx(4.0)
    assert damping_rule.training_time(Schedule(epochs=3, lr=0.1, batch_size=None), 50) == pytest.approx(0.3)
    assert damping_rule.training_time(Schedule(optimizer="adam", lr=1e-3), 100) is None
    psd = damping_rule.exact_spectrum(torch.tensor([0.0, 0.5, 3.0]))
    # positive semi-definite: TIME_FACTOR / t above the floor, else the floor; no time: the floor
    assert damping_rule.choose(psd, time=4.0).value == pytest.approx(damping_rule.TIME_FACTOR / 4.0)
    assert "training time" in damping_rule.choose(psd, time=4.0).reason
    assert damping_rule.choose(psd, time=1000.0).value == damping_rule.FLOOR
    assert damping_rule.choose(psd).value == damping_rule.FLOOR
    # indefinite: the larger of 1.25 x |lambda_min| and TIME_FACTOR / t
    indef = damping_rule.exact_spectrum(torch.tensor([-0.4, 0.5, 3.0]))
    assert damping_rule.choose(indef, time=4.0).value == pytest.approx(damping_rule.SAFETY * 0.4)
    assert damping_rule.choose(indef, time=0.1).value == pytest.approx(damping_rule.TIME_FACTOR / 0.1)
    # the alternative rules ignore the time
    assert damping_rule.choose(psd, "mean", time=4.0).value == pytest.approx(0.1 * 3.5 / 3)
