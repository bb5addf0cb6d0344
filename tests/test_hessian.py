"""The functional building blocks against closed forms and plain autograd (float64, small models)."""

import pytest
import torch
from torch import nn

from distdm import hessian as hs
from distdm.engine import Schedule, per_sample_loss, select, train_variants
from distdm.errors import DistdmError
from distdm.models import build_model
from distdm.objectives import margin


def _regression_mlp(n=120, dim=6, hidden=8, seed=0):
    """A small MLP regression trained close to a minimum, in float64, with its data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    model = build_model("mlp", (dim,), 1, seed=seed, hidden=(hidden,)).double()
    sched = Schedule(epochs=300, lr=0.1, batch_size=None)
    state = select(train_variants(model, x, y, sched, loss="mse").states, 0)
    return hs.flat_model(model, state), x, y


@pytest.fixture(scope="module")
def reg():
    return _regression_mlp()


@pytest.fixture(scope="module")
def reg_exact(reg):
    """Exact Hessian, damping 0.1 (> the most negative eigenvalue, about -0.02), 4 right-hand sides,
    and the exact solutions of (H + 0.1 I) x = b."""
    fm, x, y = reg
    h = hs.hessian(fm, None, x, y, "mse")
    b = torch.randn(4, fm.n_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lam = 0.1
    sol = torch.linalg.solve(h + lam * torch.eye(fm.n_params, dtype=torch.float64), b.T).T
    return h, b, lam, sol


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_flatten_unflatten_roundtrip():
    model = build_model("mlp", (5,), 3, seed=0, hidden=(4,))
    sd = dict(model.named_parameters())
    flat = hs.flatten(sd)
    assert flat.shape == (sum(p.numel() for p in sd.values()),)
    back = hs.unflatten(flat, sd)
    for k in sd:
        torch.testing.assert_close(back[k], sd[k])
    with pytest.raises(DistdmError):
        hs.unflatten(flat[:-1], sd)


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_per_sample_grads_equal_a_loop_of_single_sample_grads(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 5, generator=g)
    y = torch.randint(0, 3, (13,), generator=g) if kind == "ce" else torch.randn(13, generator=g)
    model = build_model("mlp", (5,), 3 if kind == "ce" else 1, seed=0, hidden=(7,))
    fm = hs.flat_model(model)
    batched = hs.per_sample_grads(fm, x, y, kind, chunk=4)  # chunks of 4, 4, 4, 1
    for i in range(13):
        model.zero_grad()
        per_sample_loss(model(x[i : i + 1]), y[i : i + 1], kind)[0].backward()
        single = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(batched[i], single, atol=1e-6, rtol=1e-5)
    # restricted to the last layer: the matching slice of the full gradient
    last = hs.flat_model(model, params="last")
    assert last.names == ["head.weight", "head.bias"]
    torch.testing.assert_close(hs.per_sample_grads(last, x, y, kind), batched[:, -last.n_params :])


def test_hessian_and_hvp_equal_autograd_hessian(reg):
    fm, x, y = reg
    loss = hs.training_loss(fm, x, y, "mse")
    ref = torch.autograd.functional.hessian(loss, fm.theta)
    h = hs.hessian(fm, None, x, y, "mse", block=16, chunk=50)
    torch.testing.assert_close(h, ref, atol=1e-10, rtol=1e-8)
    v = torch.randn(3, fm.n_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    hv = hs.hvp(fm, None, x, y, "mse", chunk=33)
    torch.testing.assert_close(hv(v), v @ ref, atol=1e-10, rtol=1e-8)  # batched
    torch.testing.assert_close(hv(v[0]), ref @ v[0], atol=1e-10, rtol=1e-8)  # single
    wd = hs.hvp(fm, None, x, y, "mse", weight_decay=0.5)
    torch.testing.assert_close(wd(v[0]), ref @ v[0] + 0.5 * v[0], atol=1e-10, rtol=1e-8)
    # a fixed subsample is the Hessian of the mean loss over that subsample
    sub_x, sub_y = hs.subsample_data(x, y, 30, seed=3)
    sub = hs.hvp(fm, None, x, y, "mse", subsample=30, seed=3)
    sub_ref = torch.autograd.functional.hessian(hs.training_loss(fm, sub_x, sub_y, "mse"), fm.theta)
    torch.testing.assert_close(sub(v[0]), sub_ref @ v[0], atol=1e-10, rtol=1e-8)


def test_batched_hvp_groups_vectors_to_fit_the_memory_budget(reg, monkeypatch):
    fm, x, y = reg
    _, graph_bytes = hs._chunk_operator(fm, x, y, "mse", len(x), "hessian")
    # the measured graph is the data's activations: twice the samples, about twice the bytes
    _, double_bytes = hs._chunk_operator(fm, torch.cat([x, x]), torch.cat([y, y]), "mse", len(x), "hessian")
    assert graph_bytes > 0 and 1.8 < double_bytes / graph_bytes < 2.2
    v = torch.randn(5, fm.n_params, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    full = hs.hvp(fm, None, x, y, "mse")(v)
    sizes: list[int] = []
    vjp = hs._vjp

    def counting(out, inp, w):
        sizes.append(w.shape[0] if w.ndim > out.ndim else 1)
        return vjp(out, inp, w)

    monkeypatch.setattr(hs, "_vjp", counting)
    for budget, groups in [(1, [1, 1, 1, 1, 1]), (2 * graph_bytes + 1, [2, 2, 1]), (10**12, [5])]:
        sizes.clear()
        got = hs.hvp(fm, None, x, y, "mse", memory_budget_bytes=budget)(v)
        assert sizes == groups
        torch.testing.assert_close(got, full, atol=1e-12, rtol=1e-10)
    with pytest.raises(DistdmError, match="memory_budget_bytes"):
        hs.hvp(fm, None, x, y, "mse", memory_budget_bytes=0)
    # convolutions on a CPU: one vector at a time, whatever the budget
    conv = hs.flat_model(build_model("convnet", (1, 8, 8), 3, seed=0, width=4, depth=1))
    xc, yc = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    vc = torch.randn(3, conv.n_params)
    sizes.clear()
    got = hs.hvp(conv, None, xc, yc, "ce", memory_budget_bytes=10**12)(vc)
    assert sizes == [1, 1, 1]
    one = hs.hvp(conv, None, xc, yc, "ce")
    torch.testing.assert_close(got, torch.stack([one(v) for v in vc]))


def test_gauss_newton_is_jacobian_gram_for_mse(reg):
    fm, x, y = reg
    j = hs.output_jacobian(fm, x)[:, 0, :]  # (n, P): one output
    ggn = hs.hessian(fm, None, x, y, "mse", curvature="ggn")
    torch.testing.assert_close(ggn, 2.0 / len(x) * j.T @ j, atol=1e-10, rtol=1e-8)
    assert float(torch.linalg.eigvalsh(ggn).min()) > -1e-10


def test_exact_and_cg_solvers_match_the_closed_form(reg, reg_exact):
    fm, x, y = reg
    h, b, lam, sol = reg_exact
    assert _rel(hs.exact_ihvp(h, lam)(b), sol) < 1e-10
    hv = hs.hvp(fm, None, x, y, "mse")
    # CG is exact after at most P steps in exact arithmetic; measured 2e-13 after P = 65
    assert _rel(hs.cg(hv, b, damping=lam, max_iter=fm.n_params, tol=1e-14), sol) < 1e-8
    assert _rel(hs.cg(hv, b[0], damping=lam, max_iter=fm.n_params, tol=1e-14), sol[0]) < 1e-8


def test_lissa_matches_the_closed_form(reg, reg_exact):
    fm, x, y = reg
    h, b, _, _ = reg_exact
    lam = 0.5  # LiSSA's error shrinks by 1 - (lambda_min + lambda) / s per step: about 0.97 here
    sol = torch.linalg.solve(h + lam * torch.eye(fm.n_params, dtype=torch.float64), b.T).T
    lam_max = float(torch.linalg.eigvalsh(h).max())
    s = 2.0 * (lam_max + lam)
    hv = hs.hvp(fm, None, x, y, "mse")
    assert _rel(hs.lissa(hv, b, damping=lam, scale=s, depth=600), sol) < 1e-5  # 0.97^600 ~ 1e-8
    # minibatch HVPs (64 of 120 samples), 2 runs averaged: the noise stays; measured 0.03
    stoch = hs.stochastic_hvp(fm, x, y, "mse", batch_size=64, seed=0)
    assert _rel(hs.lissa(stoch, b, damping=lam, scale=s, depth=300, repeat=2), sol) < 0.1
    # power iteration finds the top eigenvalue used for the scale
    assert abs(hs.top_eigenvalue(hv, fm.n_params, iters=200, dtype=torch.float64) - lam_max) < 1e-3 * lam_max
    with pytest.raises(DistdmError, match="scale"):
        hs.lissa(hv, b, damping=lam, scale=0.05 * lam_max, depth=3000)


def test_arnoldi_matches_the_closed_form(reg, reg_exact):
    fm, x, y = reg
    h, b, lam, sol = reg_exact
    hv = hs.hvp(fm, None, x, y, "mse")
    exact_vals = torch.linalg.eigvalsh(h).flip(0)
    # a full Krylov basis gives every eigenpair: the inverse is exact
    vals, vecs = hs.arnoldi(hv, fm.n_params, n_iters=fm.n_params, top_p=fm.n_params, dtype=torch.float64)
    torch.testing.assert_close(vals, exact_vals, atol=1e-10, rtol=1e-8)
    assert _rel(hs.arnoldi_ihvp(vals, vecs, lam)(b), sol) < 1e-8
    # 20 Krylov steps already pin down the top 3 eigenpairs
    vals, vecs = hs.arnoldi(hv, fm.n_params, n_iters=20, top_p=3, dtype=torch.float64)
    torch.testing.assert_close(vals, exact_vals[:3], atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(vecs @ h @ vecs.T, torch.diag(vals), atol=1e-7, rtol=1e-7)
    # the inverse on that eigenspace is the exact inverse projected onto it
    u = vecs
    proj = hs.arnoldi_ihvp(vals, vecs, lam)(b)
    torch.testing.assert_close(proj, (sol @ u.T) @ u, atol=1e-7, rtol=1e-6)


def test_user_errors_are_clear():
    model = build_model("mlp", (5,), 3, seed=0, hidden=(4,))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    with pytest.raises(DistdmError, match="params='last'"):
        hs.hessian(model, None, x, y, "ce", max_params=10)
    with pytest.raises(DistdmError, match="unknown parameter"):
        hs.flat_model(model, params=["nope"])
    with pytest.raises(DistdmError, match="damping"):
        hs.exact_ihvp(torch.eye(3), damping=-1.0)
    with pytest.raises(DistdmError, match="curvature"):
        hs.hvp(model, None, x, y, "ce", curvature="fisher")
    with pytest.raises(DistdmError, match="training inputs"):
        hs.hvp(model)
    hv = hs.hvp(model, None, x, y, "ce")
    with pytest.raises(DistdmError, match="entries"):
        hv(torch.zeros(3))


def test_exact_solver_handles_definite_and_indefinite_matrices_alike():
    """Cholesky (positive definite) and eigh (indefinite) paths both solve (H + lambda I) x = b."""
    b = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]], dtype=torch.float64)
    for diag in ([1.0, 2.0, 3.0], [-1.0, 2.0, 3.0]):
        q, _ = torch.linalg.qr(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 1.0]]).double())
        h = q @ torch.diag(torch.tensor(diag, dtype=torch.float64)) @ q.T
        x = hs.exact_ihvp(h, 0.1)(b)
        torch.testing.assert_close(x @ (h + 0.1 * torch.eye(3, dtype=torch.float64)), b)
        torch.testing.assert_close(hs.exact_ihvp(h, 0.1)(b[0]), x[0])


class _Twice(torch.nn.Module):
    """A user module that applies one linear layer twice (its gradient is no outer product)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.lin(torch.relu(self.lin(x)))))


def _loop_rows(model, fm, x, fn):
    """Gradients of fn(outputs of sample i) with respect to fm's parameters, one sample at a time."""
    rows = []
    for i in range(len(x)):
        params = dict(model.named_parameters())
        model.zero_grad()
        fn(model(x[i : i + 1]), i).backward()
        rows.append(torch.cat([params[k].grad.reshape(-1) for k in fm.names]))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "name, params, factored",
    [("mlp", "all", True), ("convnet", "last", True), ("convnet", "all", False), ("twice", "all", False)],
)
def test_per_sample_gradients_on_the_factored_and_general_paths(name, params, factored):
    g = torch.Generator().manual_seed(0)
    shape = (1, 8, 8) if name == "convnet" else (4,)
    x, y = torch.randn(11, *shape, generator=g), torch.randint(0, 3, (11,), generator=g)
    if name == "twice":
        torch.manual_seed(0)
        model = _Twice()
    else:
        kw = {"width": 4, "depth": 1} if name == "convnet" else {"hidden": (7, 5)}
        model = build_model(name, shape, 3, seed=0, **kw)
    fm = hs.flat_model(model, params=params)
    f = hs.per_sample_linear_grads(fm, x, y, "ce", chunk=4)
    assert (f is not None) == factored
    loop = _loop_rows(model, fm, x, lambda out, i: per_sample_loss(out, y[i : i + 1], "ce")[0])
    torch.testing.assert_close(hs.per_sample_grads(fm, x, y, "ce", chunk=4), loop, atol=1e-6, rtol=1e-5)
    # query gradients of an objective and output Jacobians agree with the general (vmap) path too
    ref = fm.outputs(fm.theta, x).detach()
    obj_loop = _loop_rows(model, fm, x, lambda out, i: margin(out[None], ref[i : i + 1], y[i : i + 1])[0, 0])
    torch.testing.assert_close(
        hs.objective_grads(fm, x, y, margin, ref, chunk=4), obj_loop, atol=1e-6, rtol=1e-5
    )
    jac = torch.func.vmap(torch.func.jacrev(lambda th, xi: fm.outputs(th, xi[None])[0]), in_dims=(None, 0))
    torch.testing.assert_close(hs.output_jacobian(fm, x, chunk=4), jac(fm.theta, x), atol=1e-6, rtol=1e-5)
    if factored:  # products, norms and Gram matrices from the factors alone
        rows = torch.randn(5, fm.n_params, generator=g)
        torch.testing.assert_close(f.dot(rows, chunk=3), rows @ loop.T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f.sq_norms(), loop.square().sum(1), atol=1e-5, rtol=1e-5)
        q = hs.objective_linear_grads(fm, x[:3], y[:3], margin, ref[:3])
        torch.testing.assert_close(q.gram(f, chunk=4), obj_loop[:3] @ loop.T, atol=1e-5, rtol=1e-5)
        j = hs.linear_grads(fm, x[:2], None).flat_rows()
        torch.testing.assert_close(
            j.dense(), jac(fm.theta, x[:2]).reshape(-1, fm.n_params), atol=1e-6, rtol=1e-5
        )


def _spectrum_matrix(n=300, seed=0, dtype=torch.float64):
    """H = U diag(lambda) U^T with known eigenpairs: a separated top 10, 9, ..., 1 over a bulk in [0, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.cat(
        [torch.arange(10, 0, -1, dtype=torch.float64), 0.5 * torch.rand(n - 10, generator=g).double()]
    )
    return ((u * lam) @ u.T).to(dtype), lam, u


def test_arnoldi_in_float32_finds_known_eigenpairs():
    h, lam, u = _spectrum_matrix()
    h32 = h.float()
    vals, vecs = hs.arnoldi(lambda v: h32 @ v, h.shape[0], n_iters=60, top_p=5)
    assert vals.dtype == vecs.dtype == torch.float32  # the basis and the result stay float32
    # measured: eigenvalues to 1e-7 relative, eigenvectors aligned to 1 - 3e-8, orthonormal to 6e-8
    torch.testing.assert_close(vals.double(), lam[:5], atol=0, rtol=1e-5)
    align = (vecs.double() @ u[:, :5]).abs().diagonal()
    assert float((1 - align).abs().max()) < 1e-5
    gram = vecs.double() @ vecs.double().T
    torch.testing.assert_close(gram, torch.eye(5, dtype=torch.float64), atol=1e-5, rtol=0)
    # a Krylov space that becomes invariant stops early with exact eigenpairs
    d = torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0, 0.0])
    vals, _ = hs.arnoldi(lambda v: d * v, 6, n_iters=6, top_p=6)
    torch.testing.assert_close(vals[:3], d[:3], atol=1e-6, rtol=1e-6)


def test_arnoldi_refuses_a_basis_over_the_memory_budget():
    p = 10_000
    need = hs.arnoldi_bytes(p, 400, 200)
    assert need == (400 + 200 + 4) * p * 4
    with pytest.raises(DistdmError, match=r"needs 23\.0 MiB .* lower n_iters and top_p") as err:
        hs.arnoldi(lambda v: v, p, n_iters=400, top_p=200, memory_budget_bytes=need - 1)
    assert "memory_budget_bytes" in str(err.value) and "params='last'" in str(err.value)
    with pytest.raises(DistdmError, match="memory_budget_bytes must be > 0"):
        hs.arnoldi(lambda v: v, p, memory_budget_bytes=0)


def test_arnoldi_on_a_small_budget_chunks_and_gives_the_same_result(monkeypatch):
    h, _, _ = _spectrum_matrix()
    h32 = h.float()
    n = h.shape[0]
    free = hs.arnoldi(lambda v: h32 @ v, n, n_iters=50, top_p=40)
    blocks = []
    matmul = torch.matmul

    def counting(a, b, **kw):
        if "out" in kw:
            blocks.append(b.shape[1])
        return matmul(a, b, **kw)

    monkeypatch.setattr(torch, "matmul", counting)
    tight = hs.arnoldi(
        lambda v: h32 @ v, n, n_iters=50, top_p=40, memory_budget_bytes=hs.arnoldi_bytes(n, 50, 40)
    )
    assert len(blocks) > 1 and sum(blocks) == n  # the eigenvectors were assembled in column blocks
    torch.testing.assert_close(tight[0], free[0], atol=0, rtol=0)
    torch.testing.assert_close(tight[1], free[1], atol=1e-7, rtol=1e-6)


_PEAK_SCRIPT = """
import resource, torch
from distdm import hessian as hs
p = {p}
d = torch.linspace(1.0, 2.0, p)
hv = lambda v: d * v
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
vals, vecs = hs.arnoldi(hv, p, n_iters={m}, top_p={k})
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_arnoldi_peak_memory_is_its_preallocated_basis():
    # a fresh process, so that its peak resident memory is the Arnoldi step's; the former basis
    # (float64 vectors, re-stacked each iteration) took about 4x arnoldi_bytes here
    import subprocess
    import sys

    p, m, k = 400_000, 40, 10
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT.format(p=p, m=m, k=k)], capture_output=True, text=True, check=True
    )
    grew = int(out.stdout.strip().splitlines()[-1])
    need = hs.arnoldi_bytes(p, m, k)
    assert grew < 1.15 * need + 8 * 2**20, (grew, need)


def test_ggn_products_through_stored_jacobians_equal_reverse_mode(reg):
    conv = hs.flat_model(build_model("convnet", (1, 8, 8), 3, seed=0, width=4, depth=1).double())
    gen = torch.Generator().manual_seed(5)
    xc, yc = torch.randn(7, 1, 8, 8, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 1])
    v = torch.randn(4, conv.n_params, generator=gen, dtype=torch.float64)
    stored = hs.hvp(conv, None, xc, yc, "ce", curvature="ggn", weight_decay=0.01)
    assert isinstance(stored, hs.JacobianGGN) and stored.prefers_blocks
    reverse = hs.hvp(conv, None, xc, yc, "ce", curvature="ggn", weight_decay=0.01, cache=False)
    assert not isinstance(reverse, hs.JacobianGGN)
    torch.testing.assert_close(stored(v), reverse(v), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(stored(v[0]), reverse(v[0]), atol=1e-10, rtol=1e-8)
    # Jacobians over the budget, or a model without shared parameters: reverse mode
    assert not isinstance(hs.hvp(conv, None, xc, yc, "ce", curvature="ggn", memory_budget_bytes=1000),
                          hs.JacobianGGN)  # fmt: skip
    fm, x, y = reg
    assert not isinstance(hs.hvp(fm, None, x, y, "mse", curvature="ggn"), hs.JacobianGGN)
    with pytest.raises(DistdmError, match="parameters"):
        stored(torch.zeros(conv.n_params + 1, dtype=torch.float64))


def _small_conv():
    conv = hs.flat_model(build_model("convnet", (1, 8, 8), 3, seed=0, width=4, depth=1).double())
    gen = torch.Generator().manual_seed(5)
    xc, yc = torch.randn(7, 1, 8, 8, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 1])
    return conv, xc, yc, torch.randn(3, conv.n_params, generator=gen, dtype=torch.float64)


def test_hessian_is_the_ggn_plus_the_output_weighted_residual():
    conv, xc, yc, v = _small_conv()
    full = hs.hvp(conv, None, xc, yc, "ce")
    ggn = hs.hvp(conv, None, xc, yc, "ce", curvature="ggn")
    residual = hs._hvp_on(conv, xc, yc, "ce", 2048, 0.0, "residual")  # all samples, weights 1 / N
    torch.testing.assert_close(hs.SplitHessian(ggn, residual)(v), full(v), atol=1e-10, rtol=1e-8)
    assert (residual(v) - full(v) + ggn(v)).abs().max() < 1e-10 and residual(v).abs().max() > 1e-4


def test_residual_draws_estimate_the_mean_without_bias():
    conv, xc, yc, _ = _small_conv()
    f = torch.arange(1.0, 8.0, dtype=torch.float64) ** 2  # any per-sample quantity
    estimates = []
    for seed in range(400):
        idx, w = hs.residual_draw(conv, xc, yc, "ce", 5, seed)
        assert len(torch.unique(idx)) == len(idx) and (w > 0).all()
        estimates.append(float((w * f[idx]).sum()))
    est = torch.tensor(estimates)
    assert abs(est.mean() - f.mean()) < 3 * est.std() / 20  # within 3 standard errors of 400 draws


def test_split_hessian_approaches_the_hessian_and_falls_back_where_it_does_not_pay(reg):
    conv, xc, yc, v = _small_conv()
    full = hs.hvp(conv, None, xc, yc, "ce")(v)
    split = hs.hvp(conv, None, xc, yc, "ce", residual_subsample=20000)
    assert isinstance(split, hs.SplitHessian)
    assert _rel(split(v), full) < 0.05
    fm, x, y = reg  # an MLP: the stored Jacobians do not pay, so the full Hessian
    plain = hs.hvp(fm, None, x, y, "mse", residual_subsample=10)
    assert not isinstance(plain, hs.SplitHessian)
    w = v.new_ones(fm.n_params)
    torch.testing.assert_close(plain(w), hs.hvp(fm, None, x, y, "mse")(w))
    with pytest.raises(DistdmError, match="residual_subsample"):
        hs.hvp(conv, None, xc, yc, "ce", residual_subsample=0)


def test_per_sample_gradients_by_a_loop_equal_vmap_where_large_models_use_it(monkeypatch):
    conv, xc, yc, _ = _small_conv()
    by_vmap = hs._loss_grads(conv, xc, yc, "ce")
    monkeypatch.setattr(hs, "LOOP_MIN_PARAMS", 0)  # as for an 11M-parameter ResNet on a CPU
    by_loop = hs._loss_grads(conv, xc, yc, "ce")
    torch.testing.assert_close(by_loop, by_vmap, atol=1e-10, rtol=1e-8)
    assert by_loop.shape == (7, conv.n_params) and by_loop.abs().sum() > 0


def test_saved_bytes_are_the_graphs_saved_activations():
    from distdm.engine import saved_tensor_bytes

    lin = nn.Linear(3, 2, bias=False)
    x = torch.randn(4, 3, requires_grad=True)
    # x @ W^T saves x (48 bytes, for W's gradient) and W (24, for x's; excluded here as the
    # parameters); tanh saves its output (32 bytes)
    out = torch.tanh(lin(x)).sum()
    assert saved_tensor_bytes([out], [lin.weight]) == 4 * 3 * 4 + 4 * 2 * 4
    assert saved_tensor_bytes([out]) == 4 * 3 * 4 + 4 * 2 * 4 + 3 * 2 * 4
    assert saved_tensor_bytes([x]) == 0  # no graph


def test_stochastic_hvps_on_a_normalised_convnet_free_their_graphs():
    """Each stochastic HVP builds a double-backward graph; once applied it must be freed (a
    saved-tensors hook that returned the tensor kept every one alive: 10 MB per product)."""
    import gc

    model = build_model("convnet", (1, 8, 8), 3, seed=0, width=4, depth=1)
    fm = hs.flat_model(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 3, (40,), generator=g)
    hv = hs.stochastic_hvp(fm, x, y, "ce", batch_size=16, seed=0)

    def live() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.requires_grad)

    v = torch.randn(fm.n_params)
    for _ in range(3):
        v = hv(v)
    before = live()
    for _ in range(10):
        v = hv(v)
    assert live() <= before
