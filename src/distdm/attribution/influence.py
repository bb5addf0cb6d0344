"""Influence functions (Koh & Liang 2017) with several inverse-HVP solvers (SPEC 4).

Removing training sample i moves the parameters by about delta_i = +(1/N) (H + lambda I)^-1 g_i,
with H the Hessian of the mean training loss at the final model (plus the schedule's weight decay),
g_i the gradient of sample i's loss, lambda the damping (default 0.01, SPEC 7). The score of a
query objective f is grad f(q)^T delta_i (see gradients.py for the sign and the 'outputs'
expansion used for objectives that are flat at the target model).

Cost split: `fit` caches the training gradients (N x P) and the solver's offline part (the
factorised Hessian for 'if-exact', the Krylov eigenbasis for 'if-arnoldi', the LiSSA scale);
`scores` solves (H + lambda I)^-1 grad f(q) once per query (once per query output for the
'outputs' expansion), never once per training sample, and takes dot products with the cache.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence

import torch

from ..clusters import penultimate_features
from ..ekfac import FISHERS, fit_ekfac
from ..errors import DistdmError
from ..hessian import (
    CURVATURES,
    HVP,
    arnoldi,
    arnoldi_ihvp,
    cg,
    dense,
    exact_ihvp,
    hvp,
    lissa,
    per_sample_grads,
    stochastic_hvp,
    subsample_data,
    top_eigenvalue,
)
from ..objectives import Objective
from ..task import Task
from .base import register
from .gradients import GradientAttributor, dot_chunks

log = logging.getLogger(__name__)

SOLVE_MEMO = 4  # inverse-HVP solves kept per fitted method (a few query sets x objectives)


class InfluenceFunction(GradientAttributor):
    """Shared part of the influence-function solvers.

    damping: lambda added to the Hessian (>= 0); it must exceed the most negative Hessian eigenvalue
    of a not fully converged model (a warning says so), or use curvature='ggn' (the generalised
    Gauss-Newton matrix, positive semi-definite) instead of 'hessian'. hessian_samples: use a
    fixed random subsample of that many training samples for the Hessian / HVPs (None: all).
    seed: for subsampling and stochastic solvers. Other settings as in GradientAttributor (unit,
    params, expansion, chunk, cache_grads).
    """

    linear_in_queries = True

    def __init__(
        self,
        *,
        damping: float = 0.01,
        hessian_samples: int | None = None,
        curvature: str = "hessian",
        seed: int = 0,
        unit: str = "cluster",
        params: str | Sequence[str] = "all",
        expansion: str = "auto",
        chunk: int = 256,
        cache_grads: bool | str = "auto",
    ):
        super().__init__(unit=unit, params=params, expansion=expansion, chunk=chunk, cache_grads=cache_grads)
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
            raise DistdmError(f"damping must be a finite number >= 0, got {damping!r}")
        if hessian_samples is not None and hessian_samples <= 0:
            raise DistdmError(f"hessian_samples must be > 0 or None, got {hessian_samples}")
        if curvature not in CURVATURES:
            raise DistdmError(f"curvature must be one of {list(CURVATURES)}, got {curvature!r}")
        self.damping = float(damping)
        self.curvature = curvature
        self.hessian_samples = hessian_samples
        self.seed = seed

    def _hessian_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.task_.data
        return subsample_data(d.x_train, d.y_train, self.hessian_samples, self.seed)

    def _prepare(self, task: Task) -> None:
        self.solves_: dict[str, torch.Tensor] = {}
        x, y = self._hessian_data()
        self.weight_decay_ = float(task.schedule.weight_decay)
        self.hvp_: HVP = hvp(
            self.fm_, None, x, y, task.loss, weight_decay=self.weight_decay_, curvature=self.curvature,
            memory_budget_bytes=task.memory_budget_bytes,
        )  # fmt: skip
        self._prepare_solver(task)

    def _prepare_solver(self, task: Task) -> None:  # noqa: B027 - optional hook
        """Solver-specific offline work."""

    def ihvp(self, b: torch.Tensor) -> torch.Tensor:
        """(H + damping I)^-1 b for flat vectors b (P,) or (k, P) with this method's solver."""
        raise NotImplementedError

    def solve_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """ihvp(rows), reusing the solve of identical rows from an earlier call on the same fit:
        objectives scored through the output Jacobian (dist1, dist3) share their query rows."""
        key = hashlib.sha1(rows.detach().contiguous().numpy().tobytes()).hexdigest() + str(tuple(rows.shape))
        solves = self.solves_
        if key not in solves:
            if len(solves) >= SOLVE_MEMO:
                solves.pop(next(iter(solves)))
            solves[key] = self.ihvp(rows)
        return solves[key]

    def _products(
        self, x: torch.Tensor, y: torch.Tensor, obj: Objective, ref: torch.Tensor, expansion: str
    ) -> torch.Tensor:
        rows = self._rows(self.fm_, x, y, obj, ref, expansion)
        n = self.task_.data.n_train
        return dot_chunks(self.solve_rows(rows), self.train_grads(), n) / n


@register("if-exact")
class IFExact(InfluenceFunction):
    """Influence function with the exact damped Hessian (dense, factorised once in fit).

    max_params: refuse models with more parameters (memory P^2 floats); use params='last'."""

    def __init__(
        self,
        *,
        max_params: int = 10_000,
        damping: float = 0.01,
        hessian_samples: int | None = None,
        curvature: str = "hessian",
        seed: int = 0,
        unit: str = "cluster",
        params: str | Sequence[str] = "all",
        expansion: str = "auto",
        chunk: int = 256,
        cache_grads: bool | str = "auto",
    ):
        super().__init__(
            damping=damping,
            hessian_samples=hessian_samples,
            curvature=curvature,
            seed=seed,
            unit=unit,
            params=params,
            expansion=expansion,
            chunk=chunk,
            cache_grads=cache_grads,
        )
        self.max_params = max_params

    def _prepare_solver(self, task: Task) -> None:
        self.hessian_ = dense(
            self.hvp_, self.fm_.n_params, dtype=self.fm_.theta.dtype, max_params=self.max_params
        )
        self._ihvp = exact_ihvp(self.hessian_, self.damping)

    def ihvp(self, b: torch.Tensor) -> torch.Tensor:
        """(H + damping I)^-1 b from the cached factorisation."""
        return self._ihvp(b)


@register("if-cg")
class IFCG(InfluenceFunction):
    """Influence function, conjugate gradient per query (max_iter HVPs, relative tolerance tol)."""

    def __init__(
        self,
        *,
        max_iter: int = 100,
        tol: float = 1e-4,
        damping: float = 0.01,
        hessian_samples: int | None = None,
        curvature: str = "hessian",
        seed: int = 0,
        unit: str = "cluster",
        params: str | Sequence[str] = "all",
        expansion: str = "auto",
        chunk: int = 256,
        cache_grads: bool | str = "auto",
    ):
        super().__init__(
            damping=damping,
            hessian_samples=hessian_samples,
            curvature=curvature,
            seed=seed,
            unit=unit,
            params=params,
            expansion=expansion,
            chunk=chunk,
            cache_grads=cache_grads,
        )
        if max_iter < 1 or not tol > 0:
            raise DistdmError(f"CG needs max_iter >= 1 and tol > 0, got {max_iter}, {tol}")
        self.max_iter = max_iter
        self.tol = tol

    def ihvp(self, b: torch.Tensor) -> torch.Tensor:
        """(H + damping I)^-1 b by batched conjugate gradient."""
        return cg(self.hvp_, b, damping=self.damping, max_iter=self.max_iter, tol=self.tol)


@register("if-lissa")
class IFLiSSA(InfluenceFunction):
    """Influence function, LiSSA per query.

    depth: recursion steps; batch_size: samples per stochastic HVP (None: the full Hessian data,
    deterministic); scale: s (None: 2 x (largest Hessian eigenvalue + damping), from 30 steps of
    power iteration in fit); repeat: independent runs averaged.
    """

    def __init__(
        self,
        *,
        depth: int = 500,
        batch_size: int | None = 128,
        scale: float | None = None,
        repeat: int = 1,
        damping: float = 0.01,
        hessian_samples: int | None = None,
        curvature: str = "hessian",
        seed: int = 0,
        unit: str = "cluster",
        params: str | Sequence[str] = "all",
        expansion: str = "auto",
        chunk: int = 256,
        cache_grads: bool | str = "auto",
    ):
        super().__init__(
            damping=damping,
            hessian_samples=hessian_samples,
            curvature=curvature,
            seed=seed,
            unit=unit,
            params=params,
            expansion=expansion,
            chunk=chunk,
            cache_grads=cache_grads,
        )
        if depth < 1 or repeat < 1 or (batch_size is not None and batch_size < 1):
            raise DistdmError(
                f"LiSSA needs depth, repeat, batch_size >= 1; got {depth}, {repeat}, {batch_size}"
            )
        if scale is not None and not scale > 0:
            raise DistdmError(f"LiSSA scale must be > 0, got {scale}")
        self.depth = depth
        self.batch_size = batch_size
        self.scale = scale
        self.repeat = repeat

    def _prepare_solver(self, task: Task) -> None:
        if self.scale is not None:
            self.scale_ = float(self.scale)
        else:
            lam = top_eigenvalue(self.hvp_, self.fm_.n_params, seed=self.seed, dtype=self.fm_.theta.dtype)
            self.scale_ = 2.0 * (abs(lam) + self.damping)

    def ihvp(self, b: torch.Tensor) -> torch.Tensor:
        """(H + damping I)^-1 b by LiSSA (same minibatch sequence on every call: reproducible)."""
        if self.batch_size is None:
            hv = self.hvp_
        else:
            x, y = self._hessian_data()
            hv = stochastic_hvp(
                self.fm_, x, y, self.task_.loss, batch_size=self.batch_size, seed=self.seed,
                weight_decay=self.weight_decay_, curvature=self.curvature,
                memory_budget_bytes=self.task_.memory_budget_bytes,
            )  # fmt: skip
        return lissa(hv, b, damping=self.damping, scale=self.scale_, depth=self.depth, repeat=self.repeat)


@register("if-arnoldi")
class IFArnoldi(InfluenceFunction):
    """Influence function on the top-p Hessian eigenspace from an Arnoldi (Krylov) basis
    (Schioppa et al., "Scaling up influence functions"): score = <L^-1/2 U^T g_q, L^-1/2 U^T g_i> / N
    with L = eigenvalues + damping. Only the projected training gradients (N x p) are kept.
    Eigenpairs with eigenvalue + damping <= 0 are dropped."""

    def __init__(
        self,
        *,
        n_iters: int = 100,
        top_p: int = 20,
        damping: float = 0.01,
        hessian_samples: int | None = None,
        curvature: str = "hessian",
        seed: int = 0,
        unit: str = "cluster",
        params: str | Sequence[str] = "all",
        expansion: str = "auto",
        chunk: int = 256,
        cache_grads: bool | str = False,
    ):
        super().__init__(
            damping=damping,
            hessian_samples=hessian_samples,
            curvature=curvature,
            seed=seed,
            unit=unit,
            params=params,
            expansion=expansion,
            chunk=chunk,
            cache_grads=cache_grads,
        )
        if n_iters < 1 or top_p < 1:
            raise DistdmError(f"Arnoldi needs n_iters >= 1 and top_p >= 1, got {n_iters}, {top_p}")
        self.n_iters = n_iters
        self.top_p = top_p

    def _prepare_solver(self, task: Task) -> None:
        vals, vecs = arnoldi(
            self.hvp_, self.fm_.n_params, n_iters=self.n_iters, top_p=self.top_p, seed=self.seed,
            dtype=self.fm_.theta.dtype, memory_budget_bytes=task.memory_budget_bytes,
        )  # fmt: skip
        keep = vals + self.damping > 0
        if not bool(keep.all()):
            log.info("Arnoldi: dropped %d eigenpairs with eigenvalue + damping <= 0", int((~keep).sum()))
        if not bool(keep.any()):
            raise DistdmError("no Arnoldi eigenvalue is above -damping: raise damping or n_iters")
        self.eigvals_, self.eigvecs_ = vals[keep], vecs[keep]
        self._ihvp = arnoldi_ihvp(self.eigvals_, self.eigvecs_, self.damping)
        scale = (self.eigvals_ + self.damping).rsqrt()
        # L^-1/2 U^T g_i for every training sample (N x p): all the online step needs
        self.projected_ = torch.cat([(g @ self.eigvecs_.T) * scale for _, g in self.train_grads()])

    def ihvp(self, b: torch.Tensor) -> torch.Tensor:
        """U diag(1 / (lambda + damping)) U^T b on the cached eigenspace."""
        return self._ihvp(b)

    def _products(
        self, x: torch.Tensor, y: torch.Tensor, obj: Objective, ref: torch.Tensor, expansion: str
    ) -> torch.Tensor:
        rows = self._rows(self.fm_, x, y, obj, ref, expansion)
        q = (rows @ self.eigvecs_.T) * (self.eigvals_ + self.damping).rsqrt()
        return q @ self.projected_.T / self.task_.data.n_train


@register("if-ekfac")
class IFEKFAC(InfluenceFunction):
    """Influence function with the EK-FAC curvature (eigenvalue-corrected Kronecker-factored Fisher).

    ekfac.py (George et al. 2018, Grosse et al. 2023, as kronfluence): per-layer Kronecker
    eigenbases of nn.Linear / nn.Conv2d with corrected eigenvalues, a diagonal Fisher for every
    other parameter. The inverse is of (F + weight decay + damping), F the Fisher of the mean
    training loss, so scores are on the scale of the other influence functions.

    damping: None (default) for kronfluence's heuristic, 0.1 x the mean corrected eigenvalue per
    layer, or a number for every layer; the values used are in `damping_` after fit.
    fisher: 'sampled' (labels drawn from the model, kronfluence's default) or 'empirical'.
    hessian_samples: fit the factors on a fixed random subsample of that many training samples."""

    def __init__(
        self,
        *,
        damping: float | None = None,
        fisher: str = "sampled",
        hessian_samples: int | None = None,
        seed: int = 0,
        unit: str = "cluster",
        params: str | Sequence[str] = "all",
        expansion: str = "auto",
        chunk: int = 256,
        cache_grads: bool | str = "auto",
    ):
        super().__init__(
            damping=0.0 if damping is None else damping,
            hessian_samples=hessian_samples,
            curvature="ggn",  # the Fisher: the Gauss-Newton matrix in expectation
            seed=seed,
            unit=unit,
            params=params,
            expansion=expansion,
            chunk=chunk,
            cache_grads=cache_grads,
        )
        if fisher not in FISHERS:
            raise DistdmError(f"fisher must be one of {list(FISHERS)}, got {fisher!r}")
        self.damping = None if damping is None else float(damping)
        self.fisher = fisher

    def _prepare(self, task: Task) -> None:
        self.solves_ = {}
        x, y = self._hessian_data()
        self.weight_decay_ = float(task.schedule.weight_decay)
        self.ekfac_ = fit_ekfac(
            self.fm_, x, y, task.loss, fisher=self.fisher, damping=self.damping,
            weight_decay=self.weight_decay_, seed=self.seed, chunk=self.chunk,
        )  # fmt: skip
        self.damping_ = dict(self.ekfac_.damping)
        if self.ekfac_.fallback:
            log.info("if-ekfac: diagonal Fisher for %s", sorted(self.ekfac_.fallback))

    def ihvp(self, b: torch.Tensor) -> torch.Tensor:
        """(F + weight decay + damping)^-1 b with the fitted EK-FAC factors."""
        return self.ekfac_.ihvp(b)


@register("fastif")
class FastIF(IFLiSSA):
    """FastIF (Guo et al.): only the k nearest training samples of each query in the final model's
    penultimate feature space are candidates (scored by a LiSSA influence function, one solve per
    query); all other samples score 0. k: number of neighbours."""

    linear_in_queries = False  # the neighbour pick depends on the queries

    def __init__(
        self,
        *,
        k: int = 100,
        depth: int = 500,
        batch_size: int | None = 128,
        scale: float | None = None,
        repeat: int = 1,
        damping: float = 0.01,
        hessian_samples: int | None = None,
        curvature: str = "hessian",
        seed: int = 0,
        unit: str = "cluster",
        params: str | Sequence[str] = "all",
        expansion: str = "auto",
        chunk: int = 256,
        cache_grads: bool | str = "auto",
    ):
        super().__init__(
            depth=depth,
            batch_size=batch_size,
            scale=scale,
            repeat=repeat,
            damping=damping,
            hessian_samples=hessian_samples,
            curvature=curvature,
            seed=seed,
            unit=unit,
            params=params,
            expansion=expansion,
            chunk=chunk,
            cache_grads=cache_grads,
        )
        if k < 1:
            raise DistdmError(f"k (neighbours) must be >= 1, got {k}")
        self.k = k

    def _prepare_solver(self, task: Task) -> None:
        super()._prepare_solver(task)
        self.features_ = penultimate_features(task.model, task.data.x_train, task.final)

    def _products(
        self, x: torch.Tensor, y: torch.Tensor, obj: Objective, ref: torch.Tensor, expansion: str
    ) -> torch.Tensor:
        n = self.task_.data.n_train
        fq = penultimate_features(self.task_.model, x, self.task_.final)
        k = min(self.k, n)
        nn = torch.cdist(fq, self.features_).topk(k, dim=1, largest=False).indices  # (Q, k)
        cand = torch.unique(nn)
        rows = self._rows(self.fm_, x, y, obj, ref, expansion)
        solved = self.solve_rows(rows)
        if self.grads_ is not None:
            g = self.grads_[cand]
        else:
            d = self.task_.data
            g = per_sample_grads(
                self.fm_, d.x_train[cand], d.y_train[cand], self.task_.loss, chunk=self.chunk
            )
        full = torch.zeros(rows.shape[0], n, dtype=rows.dtype)
        full[:, cand] = solved @ g.T / n
        per_query = rows.shape[0] // x.shape[0]  # 1 ('linear') or O ('outputs')
        mask = torch.zeros(x.shape[0], n, dtype=torch.bool)
        mask.scatter_(1, nn, True)
        return full * mask.repeat_interleave(per_query, dim=0)
