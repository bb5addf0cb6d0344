"""Top eigenpairs of a symmetric curvature operator (Hessian or GGN) from Hessian-vector products:
block Krylov (block Lanczos with full re-orthogonalisation, Rayleigh-Ritz on the whole basis).

`hessian.arnoldi` grows its Krylov basis one vector at a time: each step orthogonalises one vector
against the whole basis (a matrix-vector product over m x P floats, memory-bound), so at 200k
parameters and m = 200 it streams the basis from memory 400 times. Here the basis grows by a block
of b vectors per step: the orthogonalisation becomes matrix-matrix products (the basis is read m / b
times instead of m), and the curvature is applied to b vectors at once, as one batched product where
that is faster (accelerators) or as b single products (a CPU, where one product over the training
set already runs at matrix-matrix speed; measured in benchmarks/eigen_speed.py). The projected
matrix T = Q^T H Q is formed exactly (every basis block is multiplied by H and projected on all
earlier blocks), so its eigenpairs are the Rayleigh-Ritz pairs of the basis: block size 1 is Arnoldi.

The solver also reports what the Krylov space sees at the other end of the spectrum: the smallest
Ritz value (a good estimate of the most negative eigenvalue after a few blocks) and how many Ritz
values are negative, so that an indefinite Hessian is not clipped to zero silently (issue 15).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import torch

from .engine import choose_strategy
from .errors import DistdmError
from .hessian import refuse_over_budget

log = logging.getLogger(__name__)

HVP = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class Eigenpairs:
    """Top eigenpairs of a symmetric operator and what the solver saw on the way."""

    values: torch.Tensor  # (r,) decreasing
    vectors: torch.Tensor  # (r, P) orthonormal rows
    smallest: float  # the smallest Ritz value of the basis (estimates the most negative eigenvalue)
    n_negative: int  # Ritz values below -100 eps |lambda_max| (a lower bound on the negative eigenvalues)
    residuals: torch.Tensor  # (r,) ||H u_i - lambda_i u_i|| of each returned pair
    n_hvps: int  # Hessian-vector products spent

    @property
    def n_converged(self) -> int:
        """Pairs whose residual is below 1e-2 of the largest eigenvalue's magnitude."""
        scale = float(self.values.abs().max()) if self.values.numel() else 0.0
        return int((self.residuals <= 1e-2 * scale).sum())


BLOCK_WORKING_VECTORS = 3  # per block row: H Q_j, the QR factor and one temporary


def block_krylov_bytes(
    n_params: int, rank: int, block: int, krylov_dim: int, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes `block_krylov` needs: its basis (krylov_dim x P), the eigenvectors it returns (rank x P)
    and a working set of a few blocks of P, all in `dtype`."""
    m = min(_round_up(krylov_dim, block), n_params)
    b = min(block, m)
    size = torch.empty((), dtype=dtype).element_size()
    return (m + min(rank, m) + BLOCK_WORKING_VECTORS * b) * n_params * size


def _round_up(n: int, b: int) -> int:
    return int(math.ceil(n / b) * b)


def _apply(hv: HVP, v: torch.Tensor, batched: bool) -> torch.Tensor:
    if batched:
        return hv(v)
    return torch.stack([hv(vi) for vi in v])


def _orthonormal_block(
    w: torch.Tensor, basis: torch.Tensor, gen: torch.Generator, tol: float, scale: float, rows: int
) -> tuple[torch.Tensor, int]:
    """`rows` orthonormal rows (orthogonal to `basis`) spanning as much of w (already orthogonal to
    the basis) as they can, and how many of them are w's own. A column whose norm is below
    tol x scale (the operator's size) is rounding noise: it is dropped and the block filled up with
    random unit vectors orthogonal to everything kept, so the basis stays orthonormal; a small but
    real column is orthogonalised once more, since normalising it magnifies its rounding error."""
    q, r = torch.linalg.qr(w.T)  # (P, b), (b, b)
    q = q.T
    good = r.diagonal().abs() > tol * scale
    q = q[good][:rows].contiguous()
    if basis.shape[0] and q.shape[0] and bool((r.diagonal().abs()[good] < 1e-4 * scale).any()):
        for _ in range(2):
            q -= (q @ basis.T) @ basis
        q = torch.linalg.qr(q.T)[0].T.contiguous()
    kept = q.shape[0]
    fill = []
    for _ in range(rows - kept):
        v = torch.randn(w.shape[1], generator=gen, dtype=torch.float64).to(w.dtype).to(w.device)
        done = torch.cat([basis, q, *[f[None] for f in fill]])
        for _ in range(2):
            v = v - (done @ v) @ done
        fill.append(v / v.norm())
    return torch.cat([q, *[f[None] for f in fill]]), kept


def block_krylov(
    hv: HVP,
    n_params: int,
    rank: int,
    *,
    block: int = 16,
    krylov_dim: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    batched: bool | None = None,
    memory_budget_bytes: int | None = None,
) -> Eigenpairs:
    """Top-`rank` eigenpairs (largest eigenvalues first) of the symmetric operator hv from a block
    Krylov basis of krylov_dim (default 2 x rank, rounded up to whole blocks, at most P) vectors grown
    `block` at a time, one HVP per basis vector.

    batched: apply hv to a whole block at once (default: on an accelerator) or vector by vector (a
    CPU). The basis is preallocated in `dtype` (float32: two block Gram-Schmidt passes keep it
    orthogonal to ~1e-6; T and its eigendecomposition are float64); memory block_krylov_bytes(...)
    = (krylov_dim + rank + 3 block) x P floats, and where that exceeds memory_budget_bytes a
    DistdmError names the MiB needed and what to lower (the rank is never lowered silently)."""
    if rank < 1 or block < 1:
        raise DistdmError(f"the block Krylov solver needs rank >= 1 and block >= 1, got {rank}, {block}")
    krylov_dim = 2 * rank if krylov_dim is None else krylov_dim
    if krylov_dim < rank:
        raise DistdmError(f"krylov_dim ({krylov_dim}) must be at least the rank ({rank})")
    device = torch.device(device)
    batched = device.type != "cpu" if batched is None else batched
    m = min(_round_up(krylov_dim, block), n_params)
    b = min(block, m)
    need = block_krylov_bytes(n_params, rank, block, krylov_dim, dtype)
    refuse_over_budget(
        need,
        memory_budget_bytes,
        f"the top-{rank} eigenpairs of {n_params} parameters (Krylov basis of {m} vectors) need",
        f"(basis + rank + {BLOCK_WORKING_VECTORS} x block) x P floats in {dtype}",
        "the rank (hessian_rank) or the Krylov dimension, restrict the parameters",
    )
    gen = torch.Generator().manual_seed(seed)
    eps = torch.finfo(dtype).eps
    tol = max(1e-10, 100 * eps)
    basis = torch.empty(m, n_params, dtype=dtype, device=device)
    start = torch.randn(b, n_params, generator=gen, dtype=torch.float64).to(dtype).to(device)
    q0, _ = _orthonormal_block(start, basis[:0], gen, tol, float(start.norm(dim=1).max()), b)
    basis[:b] = q0
    del start, q0
    t = torch.zeros(m, m, dtype=torch.float64, device=device)
    j0, n_hvps, scale = 0, 0, 0.0
    while True:
        jb = min(b, m - j0)
        w = _apply(hv, basis[j0 : j0 + jb], batched).to(dtype)
        n_hvps += jb
        scale = max(scale, float(w.norm(dim=1).max()))  # a lower bound on ||H||
        qs = basis[: j0 + jb]
        for _ in range(2):  # twice is enough (Kahan), as in hessian.arnoldi
            c = w @ qs.T  # (jb, j0 + jb)
            t[: j0 + jb, j0 : j0 + jb] += c.T.double()
            w -= c @ qs
        nxt = j0 + jb
        if nxt >= m:
            resid = w
            break
        nb = min(b, m - nxt)
        # where the basis spans an invariant subspace (w all noise), random vectors restart it
        q, _ = _orthonormal_block(w, qs, gen, tol, scale, nb)
        del w
        basis[nxt : nxt + nb] = q
        j0 = nxt
    # column block j of t projects H Q_j on every earlier block exactly, so the upper triangle is
    # Q^T H Q itself (H symmetric): mirror it rather than average it with the unformed lower part
    upper = torch.triu(t[:m, :m])
    evals, evecs = torch.linalg.eigh(upper + torch.triu(upper, 1).T)
    p = min(rank, m)
    order = torch.argsort(evals, descending=True)[:p]
    y = evecs[:, order]  # (m, p)
    # H Q = Q T + resid^T E_last: a Ritz pair's residual is the last block's rows of y through resid
    last = y[m - resid.shape[0] :] if resid.shape[0] <= m else y
    gram = (resid @ resid.T).double()
    residuals = (last * (gram @ last)).sum(0).clamp_min(0).sqrt()
    coef = y.T.to(dtype).contiguous()  # (p, m)
    vecs = torch.empty(p, n_params, dtype=dtype, device=device)
    cols = n_params
    if memory_budget_bytes is not None:  # the product's column blocks fit what the basis leaves
        size = basis.element_size()
        spare = memory_budget_bytes - (m + p) * n_params * size
        cols = max(1, min(n_params, spare // max(1, p * size)))
    for i in range(0, n_params, cols):
        torch.matmul(coef, basis[:m, i : i + cols], out=vecs[:, i : i + cols])
    return Eigenpairs(
        values=evals[order].to(dtype),
        vectors=vecs,
        smallest=float(evals.min()),
        n_negative=int((evals < -100 * eps * float(evals.abs().max())).sum()),
        residuals=residuals.to(dtype),
        n_hvps=n_hvps,
    )


# the block DDM's top_eigenpairs grows its basis by (benchmarks/eigen_speed.py): at the same 2 x rank
# HVPs 1.3x (digits-mlp-k100) to 1.6x (203k parameters) faster than block 1 (= Arnoldi), the trailing
# pairs slightly less converged (rank-100 operator 5-13% from Arnoldi's), DDM quality unchanged
DEFAULT_BLOCK = 10
_LAST: list[dict] = []


def default_block(model: torch.nn.Module, device: torch.device | str = "cpu") -> int:
    """The block for DDM's eigenpairs: DEFAULT_BLOCK, or 1 (Arnoldi's basis) where the curvature
    products run one vector at a time anyway (engine.choose_strategy 'loop': convolutions on a CPU),
    so that they, not the orthogonalisation, are the cost: measured on fmnist-convnet-k100, block 10
    was no faster there and its trailing pairs 13% further from Arnoldi's."""
    return 1 if choose_strategy(model, torch.device(device)) == "loop" else DEFAULT_BLOCK


def note_solve(pairs: Eigenpairs, curvature: str) -> dict:
    """Record (and log when negative eigenvalues were seen) a summary of a solve; returns it."""
    top = float(pairs.values[0]) if pairs.values.numel() else 0.0
    summary = {
        "curvature": curvature,
        "rank": int(pairs.values.numel()),
        "largest": top,
        "smallest": pairs.smallest,
        "n_negative": pairs.n_negative,
        "n_clipped": int((pairs.values < 0).sum()),
        "n_converged": pairs.n_converged,
        "n_hvps": pairs.n_hvps,
    }
    _LAST[:] = [summary]
    if pairs.smallest < -1e-3 * abs(top):
        log.warning(
            "the %s is indefinite: the Krylov basis saw %d negative eigenvalues, the smallest %.3g "
            "(largest %.3g); %d of the top-%d pairs are negative and enter the metric as 0. "
            "curvature='ggn' is positive semi-definite",
            curvature, pairs.n_negative, pairs.smallest, top, summary["n_clipped"], summary["rank"],
        )  # fmt: skip
    return summary


def last_solve() -> dict | None:
    """Summary of the last eigen solve DDM ran (largest, smallest and negative Ritz values, HVPs)."""
    return dict(_LAST[0]) if _LAST else None
