"""Influence functions (Koh & Liang 2017) with several inverse-HVP solvers (SPEC 4).

Removing training sample i moves the parameters by about delta_i = +(1/N) (H + lambda I)^-1 g_i,
with H the curvature of the mean training loss at the final model (plus the schedule's weight
decay): the generalised Gauss-Newton matrix by default, `curvature="hessian"` for the Hessian. g_i is
the gradient of sample i's loss, lambda the damping ('auto' by default: chosen from the curvature's
spectrum and the training time by damping.py, recorded in `damping_` and `damping_choice_`; a number
is used as given). The score of a query objective f is grad f(q)^T delta_i (see gradients.py for
the sign and the 'outputs' expansion used for objectives that are flat at the target model).

Cost split: `fit` caches the training gradients (N x P) and the solver's offline part (the
factorised Hessian for 'if-exact', the Krylov eigenbasis for 'if-arnoldi', the LiSSA scale);
`scores` solves (H + lambda I)^-1 grad f(q) once per query (once per query output for the
'outputs' expansion), never once per training sample, and takes dot products with the cache.
`with_damping(value)` returns the fitted method at another damping without refitting: if-exact
keeps H (and its eigendecomposition once one is needed), if-arnoldi its eigenpairs, if-ekfac its
eigenbases.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from typing import ClassVar

import torch

from .. import damping as damping_rule
from ..clusters import penultimate_features
from ..ekfac import AUTO_DAMPING, FISHERS, HEURISTIC_DAMPING, KRONFLUENCE, fit_ekfac
from ..errors import DistdmError
from ..hessian import (
    CURVATURES,
    HVP,
    arnoldi,
    arnoldi_ihvp,
    cg,
    dense,
    hvp,
    lissa,
    per_sample_grads,
    stochastic_hvp,
    subsample_data,
    top_eigenvalue,
)
from ..objectives import Objective
from ..task import Task
from .base import check_choice, check_int, check_number, register
from .gradients import GradientArgs, GradientAttributor, dot_chunks

log = logging.getLogger(__name__)

SOLVE_MEMO = 4  # inverse-HVP solves kept per fitted method (a few query sets x objectives)


@dataclasses.dataclass(frozen=True)
class InfluenceArgs(GradientArgs):
    """Settings every influence function shares (see InfluenceFunction)."""

    damping: float | str = "auto"
    hessian_samples: int | None = None
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        object.__setattr__(self, "damping", damping_rule.check_damping(self.damping))
        if self.hessian_samples is not None and (
            isinstance(self.hessian_samples, bool)
            or not isinstance(self.hessian_samples, int)
            or self.hessian_samples <= 0
        ):
            raise DistdmError(f"hessian_samples must be > 0 or None, got {self.hessian_samples!r}")
        check_int("seed", self.seed)


@dataclasses.dataclass(frozen=True)
class HessianArgs(InfluenceArgs):
    """Settings of the influence functions that solve with HVPs: the curvature as well."""

    # the Gauss-Newton matrix (positive semi-definite) by default since 2026-12-03: with the damping
    # from the training time it met the damping bar on every robustness-suite setting (RESULTS.md)
    curvature: str = "ggn"

    def validate(self) -> None:
        super().validate()
        check_choice("curvature", self.curvature, CURVATURES)


@dataclasses.dataclass(frozen=True)
class IFExactArgs(HessianArgs):
    """if-exact: refuse models with more than max_params parameters (the dense Hessian)."""

    max_params: int = 10_000

    def validate(self) -> None:
        super().validate()
        check_int("max_params", self.max_params, 1)


@dataclasses.dataclass(frozen=True)
class IFCGArgs(HessianArgs):
    """if-cg: at most max_iter HVPs per solve, relative tolerance tol."""

    max_iter: int = 100
    tol: float = 1e-4

    def validate(self) -> None:
        super().validate()
        ok = isinstance(self.max_iter, int) and not isinstance(self.max_iter, bool) and self.max_iter >= 1
        if not ok or not isinstance(self.tol, (int, float)) or not self.tol > 0:
            raise DistdmError(f"CG needs max_iter >= 1 and tol > 0, got {self.max_iter!r}, {self.tol!r}")


@dataclasses.dataclass(frozen=True)
class IFLiSSAArgs(HessianArgs):
    """if-lissa: recursion depth, samples per stochastic HVP, scale, independent repeats."""

    depth: int = 500
    batch_size: int | None = 128
    scale: float | None = None
    repeat: int = 1

    def validate(self) -> None:
        super().validate()
        ints = [self.depth, self.repeat] + ([] if self.batch_size is None else [self.batch_size])
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ints):
            raise DistdmError(
                f"LiSSA needs depth, repeat, batch_size >= 1; got {self.depth!r}, {self.repeat!r}, "
                f"{self.batch_size!r}"
            )
        check_number("LiSSA scale", self.scale, strict=True, none=True)


@dataclasses.dataclass(frozen=True)
class IFArnoldiArgs(HessianArgs):
    """if-arnoldi: Krylov steps n_iters, eigenpairs kept top_p; no gradient cache by default."""

    n_iters: int = 100
    top_p: int = 20
    cache_grads: bool | str = False  # only the projected gradients (N x top_p) are needed

    def validate(self) -> None:
        super().validate()
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (self.n_iters, self.top_p)):
            raise DistdmError(
                f"Arnoldi needs n_iters >= 1 and top_p >= 1, got {self.n_iters!r}, {self.top_p!r}"
            )


@dataclasses.dataclass(frozen=True)
class IFEKFACArgs(InfluenceArgs):
    """if-ekfac: the Fisher ('sampled' or 'empirical'); damping None means 'auto', 'kronfluence'
    is the heuristic without distdm's floor."""

    damping: float | str | None = "auto"
    fisher: str = "sampled"

    def validate(self) -> None:
        kron = isinstance(self.damping, str) and self.damping == KRONFLUENCE
        object.__setattr__(
            self, "damping", damping_rule.AUTO if self.damping is None or kron else self.damping
        )
        super().validate()
        if kron:
            object.__setattr__(self, "damping", KRONFLUENCE)
        check_choice("fisher", self.fisher, FISHERS)


@dataclasses.dataclass(frozen=True)
class FastIFArgs(IFLiSSAArgs):
    """fastif: LiSSA's settings and the number k of neighbours scored per query."""

    k: int = 100

    def validate(self) -> None:
        super().validate()
        check_int("k", self.k, 1)


class InfluenceFunction(GradientAttributor):
    """Shared part of the influence-function solvers.

    damping: lambda added to the curvature. 'auto' (default): chosen in fit (damping.py): the largest
    of 0.01, 0.5 / the training time (SGD: steps x lr / (1 - momentum)) and, where the curvature is
    indefinite (the Hessian), 1.25 x |smallest eigenvalue| (logged at WARNING); a number >= 0 is used
    as given (with a warning where the spectrum is known and shows H + damping I indefinite). The
    value used is `damping_`, the rule's inputs and reason `damping_choice_`; `with_damping(v)`
    re-solves at another damping without refitting.
    curvature: 'ggn' (default: the generalised Gauss-Newton matrix, positive semi-definite) or
    'hessian' (indefinite away from a minimum).
    hessian_samples: use a fixed random subsample of that many training samples for the Hessian /
    HVPs (None: all). seed: for subsampling, the spectrum estimate and stochastic solvers. Other
    settings as in GradientAttributor (unit, params, expansion, chunk, cache_grads).
    """

    Args = HessianArgs
    linear_in_queries = True

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
        self._prepare_curvature(task)
        self.spectrum_: damping_rule.Spectrum | None = None
        self._set_damping(self.damping)
        self._prepare_solver(task)

    def _prepare_curvature(self, task: Task) -> None:  # noqa: B027 - optional hook
        """Offline work that does not depend on the damping (if-exact: the dense Hessian)."""

    def _prepare_solver(self, task: Task) -> None:  # noqa: B027 - optional hook
        """Solver-specific offline work at damping `damping_`."""

    def _estimate_spectrum(self) -> damping_rule.Spectrum:
        """The curvature's extreme eigenvalues: a few Lanczos steps on the HVP."""
        fm = self.fm_
        return damping_rule.lanczos(self.hvp_, fm.n_params, seed=self.seed, dtype=fm.theta.dtype,
                                    device=fm.theta.device)  # fmt: skip

    def _set_damping(self, damping: float | str) -> None:
        """Resolve the setting to `damping_` / `damping_choice_` (estimating the spectrum for 'auto')."""
        if damping == damping_rule.AUTO:
            if self.spectrum_ is None:
                self.spectrum_ = self._estimate_spectrum()
            time = damping_rule.training_time(self.task_.schedule, self.task_.data.n_train)
            self.damping_choice_ = damping_rule.choose(self.spectrum_, method=self.name, time=time)
        else:
            self.damping_choice_ = damping_rule.given(float(damping), self.spectrum_, method=self.name)
        self.damping_ = self.damping_choice_.value

    def with_damping(self, damping: float | str) -> InfluenceFunction:
        """This fitted method at another damping ('auto' or a number), re-solved from what fit
        cached (no new Hessian, eigenpairs or training gradients); the original is unchanged."""
        if not hasattr(self, "task_"):
            raise DistdmError(f"{self.name}: call fit(task) before with_damping(...)")
        other = copy.copy(self)
        other.args = dataclasses.replace(self.args, damping=damping)  # checked again
        other.solves_ = {}
        other._set_damping(other.damping)
        other._resolve()
        return other

    def _resolve(self) -> None:
        """Redo the damping-dependent part of the solver after `damping_` changed."""

    def ihvp(self, b: torch.Tensor) -> torch.Tensor:
        """(H + damping I)^-1 b for flat vectors b (P,) or (k, P) with this method's solver."""
        raise NotImplementedError

    def solve_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """ihvp(rows), reusing the solve of identical rows from an earlier call on the same fit:
        objectives scored through the output Jacobian (dist1, dist3) share their query rows."""
        host = rows.detach().cpu().contiguous()  # the memo key: the rows' bytes, hashed on the host
        key = hashlib.sha1(host.numpy().tobytes()).hexdigest() + str(tuple(rows.shape))
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

    Args = IFExactArgs

    def _prepare_curvature(self, task: Task) -> None:
        self.hessian_ = dense(
            self.hvp_, self.fm_.n_params, dtype=self.fm_.theta.dtype, max_params=self.max_params,
            device=self.fm_.theta.device,
        )  # fmt: skip
        # one eigendecomposition, shared by every with_damping copy: computed only when needed (a
        # damping leaving H + damping I indefinite, or `eigendecompose()` before a sweep), as it
        # costs about 25x a Cholesky factorisation
        self._eig: dict[str, torch.Tensor] = {}

    def _estimate_spectrum(self) -> damping_rule.Spectrum:
        if "w" in self._eig:
            return damping_rule.exact_spectrum(self._eig["w"])
        h = self.hessian_  # Lanczos on the dense matrix: P^2 per step, negligible next to building H
        return damping_rule.lanczos(
            lambda v: h @ v, h.shape[0], iters=80, seed=self.seed, dtype=h.dtype, device=h.device
        )

    def eigendecompose(self) -> IFExact:
        """Compute and keep the eigendecomposition of H (shared with every with_damping copy), so
        that each later damping costs O(P^2) instead of a Cholesky factorisation; returns self."""
        if not hasattr(self, "hessian_"):
            raise DistdmError("if-exact: call fit(task) before eigendecompose()")
        if "w" not in self._eig:
            w, v = torch.linalg.eigh(self.hessian_.double())
            self._eig.update(w=w, v=v)
        self.spectrum_ = damping_rule.exact_spectrum(self._eig["w"])
        return self

    def _prepare_solver(self, task: Task) -> None:
        self._resolve()

    def _resolve(self) -> None:
        if "w" not in self._eig:
            h = self.hessian_.double()
            eye = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
            chol, info = torch.linalg.cholesky_ex(h + self.damping_ * eye)
            if int(info) == 0:
                self._ihvp = self._cholesky_solver(chol)
                return
            # H + damping I is indefinite: the exact spectrum replaces the estimate and the
            # choice is made (or checked, for a given number) again
            self.eigendecompose()
            self._set_damping(self.damping)
        self._ihvp = self._eig_solver(self._eig["w"], self._eig["v"], self.damping_)

    def _cholesky_solver(self, chol: torch.Tensor) -> HVP:
        dtype, p = self.hessian_.dtype, self.hessian_.shape[0]

        def solve(b: torch.Tensor) -> torch.Tensor:
            rhs = b.double().reshape(-1, p).T
            return torch.cholesky_solve(rhs, chol).T.reshape(b.shape).to(dtype)

        return solve

    def _eig_solver(self, w: torch.Tensor, v: torch.Tensor, damping: float) -> HVP:
        # as hessian.exact_ihvp: directions where H + damping I is singular are dropped
        wd = w + damping
        cutoff = 1e-12 * float(wd.abs().max().clamp_min(1e-300))
        inv = torch.where(wd.abs() > cutoff, 1.0 / wd, torch.zeros_like(wd))
        dtype = self.hessian_.dtype

        def apply(b: torch.Tensor) -> torch.Tensor:
            return (((b.double() @ v) * inv) @ v.T).to(dtype)

        return apply

    def ihvp(self, b: torch.Tensor) -> torch.Tensor:
        """(H + damping I)^-1 b from the cached factorisation."""
        return self._ihvp(b)


@register("if-cg")
class IFCG(InfluenceFunction):
    """Influence function, conjugate gradient per query (max_iter HVPs, relative tolerance tol)."""

    Args = IFCGArgs

    def ihvp(self, b: torch.Tensor) -> torch.Tensor:
        """(H + damping I)^-1 b by batched conjugate gradient."""
        return cg(self.hvp_, b, damping=self.damping_, max_iter=self.max_iter, tol=self.tol)


@register("if-lissa")
class IFLiSSA(InfluenceFunction):
    """Influence function, LiSSA per query.

    depth: recursion steps; batch_size: samples per stochastic HVP (None: the full Hessian data,
    deterministic); scale: s (None: 2 x (largest |Hessian eigenvalue| + damping), from the Lanczos
    steps of damping='auto', else 30 steps of power iteration in fit); repeat: independent runs averaged.
    """

    Args = IFLiSSAArgs

    def _prepare_solver(self, task: Task) -> None:
        if self.scale is not None:
            self.scale_ = float(self.scale)
        else:
            sp = self.spectrum_
            if sp is not None:  # 'auto' already ran Lanczos: its extreme Ritz values bound |H|
                self.top_eigenvalue_ = max(abs(sp.lambda_max), abs(sp.lambda_min))
            else:
                self.top_eigenvalue_ = abs(
                    top_eigenvalue(self.hvp_, self.fm_.n_params, seed=self.seed, dtype=self.fm_.theta.dtype)
                )
            self.scale_ = 2.0 * (self.top_eigenvalue_ + self.damping_)

    def _resolve(self) -> None:
        if self.scale is None:
            self.scale_ = 2.0 * (self.top_eigenvalue_ + self.damping_)

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
        return lissa(hv, b, damping=self.damping_, scale=self.scale_, depth=self.depth, repeat=self.repeat)


@register("if-arnoldi")
class IFArnoldi(InfluenceFunction):
    """Influence function on the top-p Hessian eigenspace from an Arnoldi (Krylov) basis
    (Schioppa et al., "Scaling up influence functions"): score = <L^-1/2 U^T g_q, L^-1/2 U^T g_i> / N
    with L = eigenvalues + damping. Only the projected training gradients (N x p) are kept.
    Eigenpairs with eigenvalue + damping <= 0 are dropped."""

    Args = IFArnoldiArgs

    def _prepare_solver(self, task: Task) -> None:
        vals, vecs = arnoldi(
            self.hvp_, self.fm_.n_params, n_iters=self.n_iters, top_p=self.top_p, seed=self.seed,
            dtype=self.fm_.theta.dtype, memory_budget_bytes=task.memory_budget_bytes,
            device=self.fm_.theta.device,
        )  # fmt: skip
        self.all_eigvals_, self.all_eigvecs_ = vals, vecs
        # U^T g_i for every training sample (N x p), unscaled so that another damping reuses it
        self._projected_all = torch.cat([g @ vecs.T for _, g in self.train_grads()])
        self._resolve()

    def _resolve(self) -> None:
        vals = self.all_eigvals_
        keep = vals + self.damping_ > 0
        if not bool(keep.all()):
            log.info("Arnoldi: dropped %d eigenpairs with eigenvalue + damping <= 0", int((~keep).sum()))
        if not bool(keep.any()):
            raise DistdmError("no Arnoldi eigenvalue is above -damping: raise damping or n_iters")
        self.eigvals_, self.eigvecs_ = vals[keep], self.all_eigvecs_[keep]
        self._ihvp = arnoldi_ihvp(self.eigvals_, self.eigvecs_, self.damping_)
        # L^-1/2 U^T g_i for every training sample (N x p): all the online step needs
        self.projected_ = self._projected_all[:, keep] * (self.eigvals_ + self.damping_).rsqrt()

    def ihvp(self, b: torch.Tensor) -> torch.Tensor:
        """U diag(1 / (lambda + damping)) U^T b on the cached eigenspace."""
        return self._ihvp(b)

    def _products(
        self, x: torch.Tensor, y: torch.Tensor, obj: Objective, ref: torch.Tensor, expansion: str
    ) -> torch.Tensor:
        rows = self._rows(self.fm_, x, y, obj, ref, expansion)
        q = (rows @ self.eigvecs_.T) * (self.eigvals_ + self.damping_).rsqrt()
        return q @ self.projected_.T / self.task_.data.n_train


@register("if-ekfac")
class IFEKFAC(InfluenceFunction):
    """Influence function with the EK-FAC curvature (eigenvalue-corrected Kronecker-factored Fisher).

    ekfac.py (George et al. 2018, Grosse et al. 2023, as kronfluence): per-layer Kronecker
    eigenbases of nn.Linear / nn.Conv2d with corrected eigenvalues, a diagonal Fisher for every
    other parameter. The inverse is of (F + weight decay + damping), F the Fisher of the mean
    training loss, so scores are on the scale of the other influence functions.

    damping: 'auto' (default; None means the same) for the mean corrected eigenvalue of each layer
    (the Fisher is never indefinite); 'kronfluence' for kronfluence's heuristic, 0.1 x that mean,
    which damped too little on 3 of the 9 robustness-suite settings; or a number for every layer;
    the values used are in `damping_` (layer name -> float) after fit, the rule in
    `damping_choice_`; `with_damping(v)` keeps the eigenbases and changes only the damping.
    fisher: 'sampled' (labels drawn from the model, kronfluence's default) or 'empirical'.
    hessian_samples: fit the factors on a fixed random subsample of that many training samples."""

    Args = IFEKFACArgs
    curvature: ClassVar[str] = "ggn"  # the Fisher: the Gauss-Newton matrix in expectation

    def _prepare(self, task: Task) -> None:
        self.solves_ = {}
        x, y = self._hessian_data()
        self.weight_decay_ = float(task.schedule.weight_decay)
        self.ekfac_ = fit_ekfac(
            self.fm_, x, y, task.loss, fisher=self.fisher, damping=self.damping,
            weight_decay=self.weight_decay_, seed=self.seed, chunk=self.chunk,
        )  # fmt: skip
        self._record_damping()
        if self.ekfac_.fallback:
            log.info("if-ekfac: diagonal Fisher for %s", sorted(self.ekfac_.fallback))

    def _record_damping(self) -> None:
        self.damping_ = dict(self.ekfac_.damping)
        if self.damping in (damping_rule.AUTO, KRONFLUENCE):
            factor = AUTO_DAMPING if self.damping == damping_rule.AUTO else HEURISTIC_DAMPING
            reason = f"{factor:g} x the mean corrected eigenvalue of each layer"
            reason += " (kronfluence's heuristic)" if self.damping == KRONFLUENCE else ""
            mean = sum(self.damping_.values()) / max(1, len(self.damping_))
            self.damping_choice_ = damping_rule.Choice(mean, "ekfac-mean", reason)
        else:
            self.damping_choice_ = damping_rule.Choice(float(self.damping), "given", "set by the user")
        log.info("if-ekfac: damping %s", {k: round(v, 6) for k, v in self.damping_.items()})

    def with_damping(self, damping: float | str | None) -> IFEKFAC:
        """This fitted method at another damping ('auto'/None: the per-layer heuristic, or a number),
        from the cached eigenbases and eigenvalues (no pass over the data)."""
        if not hasattr(self, "task_"):
            raise DistdmError(f"{self.name}: call fit(task) before with_damping(...)")
        other = copy.copy(self)
        other.args = dataclasses.replace(self.args, damping=damping)  # checked again (None: 'auto')
        other.solves_ = {}
        other.ekfac_ = self.ekfac_.with_damping(other.damping)
        other._record_damping()
        return other

    def ihvp(self, b: torch.Tensor) -> torch.Tensor:
        """(F + weight decay + damping)^-1 b with the fitted EK-FAC factors."""
        return self.ekfac_.ihvp(b)


@register("fastif")
class FastIF(IFLiSSA):
    """FastIF (Guo et al.): only the k nearest training samples of each query in the final model's
    penultimate feature space are candidates (scored by a LiSSA influence function, one solve per
    query); all other samples score 0. k: number of neighbours."""

    linear_in_queries = False  # the neighbour pick depends on the queries

    Args = FastIFArgs

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
        full = torch.zeros(rows.shape[0], n, dtype=rows.dtype, device=rows.device)
        full[:, cand] = solved @ g.T / n
        per_query = rows.shape[0] // x.shape[0]  # 1 ('linear') or O ('outputs')
        mask = torch.zeros(x.shape[0], n, dtype=torch.bool, device=rows.device)
        mask.scatter_(1, nn, True)
        return full * mask.repeat_interleave(per_query, dim=0)
