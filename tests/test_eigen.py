"""The block Krylov eigensolver (distdm.eigen) against dense eigendecompositions of tiny models."""

import dataclasses
import logging

import pytest
import torch

from distdm import eigen
from distdm import hessian as hs
from distdm.distill_influence import _EIGEN_CACHE, top_eigenpairs
from distdm.engine import Schedule, select, train_variants
from distdm.errors import DistdmError
from distdm.models import build_model


@pytest.fixture(scope="module")
def tiny():
    """A float64 classification MLP (P = 83) trained briefly, its data, and both exact curvatures."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).long() + (x[:, 3] > 0.5).long()
    model = build_model("mlp", (5,), 3, seed=0, hidden=(8,)).double()
    state = select(train_variants(model, x, y, Schedule(epochs=40, lr=0.2, batch_size=None)).states, 0)
    fm = hs.flat_model(model, state)
    dense = {c: hs.hessian(fm, None, x, y, "ce", curvature=c) for c in hs.CURVATURES}
    return fm, x, y, dense


def _solve(fm, x, y, curvature, rank, **kw):
    hv = hs.hvp(fm, None, x, y, "ce", curvature=curvature)
    return eigen.block_krylov(hv, fm.n_params, rank, dtype=torch.float64, **kw)


@pytest.mark.parametrize("curvature", hs.CURVATURES)
@pytest.mark.parametrize("block", [1, 4, 7])
def test_full_basis_equals_dense_eigendecomposition(tiny, curvature, block):
    fm, x, y, dense = tiny
    w, v = torch.linalg.eigh(dense[curvature])
    w, v = w.flip(0), v.flip(1)
    rank = 10
    e = _solve(fm, x, y, curvature, rank, block=block, krylov_dim=fm.n_params)
    torch.testing.assert_close(e.values, w[:rank], atol=1e-10, rtol=1e-8)
    # eigenvectors up to sign, where the eigenvalue is separated from its neighbours
    gaps = torch.minimum(
        (w[:rank] - w[1 : rank + 1]).abs(), (w[:rank] - torch.cat([w[:1] + 1, w[: rank - 1]])).abs()
    )
    sep = gaps > 1e-4 * w[0]
    cos = (e.vectors @ v[:, :rank]).diagonal().abs()
    assert bool(sep.sum() >= 5)
    torch.testing.assert_close(cos[sep], torch.ones_like(cos[sep]), atol=1e-7, rtol=0)
    torch.testing.assert_close(
        e.vectors @ e.vectors.T, torch.eye(rank, dtype=torch.float64), atol=1e-10, rtol=0
    )
    assert e.smallest == pytest.approx(float(w[-1]), abs=1e-9)
    assert e.n_hvps <= fm.n_params + block
    assert float(e.residuals.max()) < 1e-8


def test_indefinite_hessian_reports_negative_eigenvalues_and_ggn_none(tiny):
    fm, x, y, dense = tiny
    w = torch.linalg.eigvalsh(dense["hessian"])
    assert float(w.min()) < -1e-4 * float(w.max())  # the fixture's Hessian is indefinite
    e = _solve(fm, x, y, "hessian", 5, block=4, krylov_dim=fm.n_params)
    assert e.n_negative == int((w < -1e-12).sum())
    g = _solve(fm, x, y, "ggn", 5, block=4, krylov_dim=fm.n_params)
    assert g.smallest > -1e-10


def test_partial_basis_finds_the_top_eigenvalues(tiny):
    fm, x, y, dense = tiny
    w = torch.linalg.eigvalsh(dense["ggn"]).flip(0)
    e = _solve(fm, x, y, "ggn", 3, block=4, krylov_dim=40)  # a basis of about half of P
    assert e.n_hvps == 40
    torch.testing.assert_close(e.values, w[:3], rtol=1e-6, atol=0)
    assert e.n_converged == 3


def test_deterministic_given_the_seed(tiny):
    fm, x, y, _ = tiny
    a = _solve(fm, x, y, "hessian", 6, block=3, krylov_dim=24, seed=5)
    b = _solve(fm, x, y, "hessian", 6, block=3, krylov_dim=24, seed=5)
    c = _solve(fm, x, y, "hessian", 6, block=3, krylov_dim=24, seed=6)
    assert torch.equal(a.values, b.values) and torch.equal(a.vectors, b.vectors)
    assert not torch.equal(a.vectors, c.vectors)  # the seed draws the start block
    torch.testing.assert_close(a.values[:2], c.values[:2], rtol=1e-4, atol=0)


def test_budget_refusal_names_the_mib_and_what_to_lower():
    hv = lambda v: v  # noqa: E731
    need = eigen.block_krylov_bytes(10_000, 50, 10, 100)
    assert need == (100 + 50 + 3 * 10) * 10_000 * 4
    with pytest.raises(DistdmError, match=r"need 6\.9 MiB.*lower the rank"):
        eigen.block_krylov(hv, 10_000, 50, block=10, krylov_dim=100, memory_budget_bytes=need - 1)
    e = eigen.block_krylov(hv, 10_000, 50, block=10, krylov_dim=100, memory_budget_bytes=need)
    torch.testing.assert_close(e.values, torch.ones(50))  # the identity: every eigenvalue 1
    with pytest.raises(DistdmError, match="rank"):
        eigen.block_krylov(hv, 100, 0)


def test_a_small_budget_assembles_the_same_vectors(tiny):
    fm, x, y, _ = tiny
    hv = hs.hvp(fm, None, x, y, "ce")
    kw = dict(block=4, krylov_dim=20, dtype=torch.float64)
    free = eigen.block_krylov(hv, fm.n_params, 5, **kw)
    need = eigen.block_krylov_bytes(fm.n_params, 5, 4, 20, torch.float64)
    tight = eigen.block_krylov(hv, fm.n_params, 5, memory_budget_bytes=need, **kw)
    assert torch.equal(free.values, tight.values) and torch.equal(free.vectors, tight.vectors)


def test_top_eigenpairs_refuses_over_the_task_budget_and_reports_negatives(tiny_task, caplog):
    _EIGEN_CACHE.clear()
    small = dataclasses.replace(tiny_task, memory_budget_bytes=2**20)  # P = 2,410: 200 + 100 rows = 2.8 MiB
    with pytest.raises(DistdmError, match=r"MiB.*hessian_rank"):
        top_eigenpairs(small, 100, "hessian")
    with caplog.at_level(logging.WARNING, logger="distdm.eigen"):
        vals, vecs = top_eigenpairs(tiny_task, 8, "hessian")
    assert vals.shape == (8,) and vecs.shape == (8, 2410) and bool((vals >= 0).all())
    torch.testing.assert_close(vecs @ vecs.T, torch.eye(8), atol=1e-5, rtol=0)
    info = eigen.last_solve()
    block = eigen.default_block(tiny_task.model)
    hvps = -(-16 // block) * block  # 2 x rank, whole blocks
    assert info["rank"] == 8 and info["n_hvps"] == hvps and info["largest"] == pytest.approx(float(vals[0]))
    if info["smallest"] < -1e-3 * info["largest"]:
        assert "indefinite" in caplog.text
    _EIGEN_CACHE.clear()


def test_default_block_is_one_where_products_loop():
    conv = build_model("convnet", (1, 8, 8), 3, seed=0, width=4, depth=1)
    mlp = build_model("mlp", (8,), 3, seed=0, hidden=(6,))
    assert eigen.default_block(conv, "cpu") == 1  # convolutions on a CPU: one product at a time
    assert eigen.default_block(mlp, "cpu") == eigen.DEFAULT_BLOCK > 1
