"""Perturbation sampling and the weighted least-squares attribution matrix (SPEC.md section 2)."""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import DistdmError


def mask_weight(z: np.ndarray, k: int, weighting: str) -> np.ndarray:
    """Weight of a mask with z deletions out of k: 'exp' exp(-(z/K)^2 / 0.25^2), 'kernelshap'
    (K - 1) / (C(K, z) z (K - z)), or 'uniform'."""
    z = np.asarray(z, dtype=np.float64)
    if weighting == "exp":
        return np.exp(-((z / k) ** 2) / 0.25**2)
    if weighting == "kernelshap":
        from scipy.special import gammaln

        logc = gammaln(k + 1) - gammaln(z + 1) - gammaln(k - z + 1)
        with np.errstate(divide="ignore"):
            w = np.exp(np.log(k - 1) - logc - np.log(z) - np.log(k - z))
        return np.where((z > 0) & (z < k), w, 1e6)  # the all-kept / all-deleted rows anchor the fit
    if weighting == "uniform":
        return np.ones_like(z)
    raise DistdmError(f"unknown weighting {weighting!r}; one of exp, kernelshap, uniform")


def sample_deletions(k: int, n: int, *, weighting: str = "exp", seed: int = 0) -> np.ndarray:
    """(n + 1, k) 0/1 deletion indicators: the all-kept row first, then n random masks whose number
    of deleted clusters z in 1..K-1 is drawn in proportion to the mask weight (favouring small z)."""
    if k < 2:
        raise DistdmError("attribution needs at least 2 clusters")
    rng = np.random.default_rng(seed)
    zs = np.arange(1, k)
    p = mask_weight(zs, k, weighting if weighting != "kernelshap" else "uniform")
    p = p / p.sum()
    q = np.zeros((n + 1, k))
    for row, z in enumerate(rng.choice(zs, size=n, p=p), start=1):
        q[row, rng.choice(k, size=z, replace=False)] = 1.0
    return q


@dataclasses.dataclass
class Fit:
    """W (K x outputs), intercept c (outputs), and the held-out error of the fit."""

    w: np.ndarray
    c: np.ndarray
    heldout_mse: float  # mean squared error on held-out perturbations (nan if none held out)
    heldout_r2: float  # 1 - MSE / variance of held-out outcomes (nan if none held out)


def weighted_ridge(
    q: np.ndarray, r: np.ndarray, beta: np.ndarray, ridge: float
) -> tuple[np.ndarray, np.ndarray]:
    """[W; c] = (Q^T B Q + eps I)^-1 Q^T B R with an intercept column (the intercept unpenalised)."""
    x = np.hstack([q, np.ones((len(q), 1))])
    xtb = x.T * beta
    reg = ridge * np.eye(x.shape[1])
    reg[-1, -1] = 0.0
    sol = np.linalg.solve(xtb @ x + reg, xtb @ r)
    return sol[:-1], sol[-1]


def fit_datamodel(
    q: np.ndarray,
    r: np.ndarray,
    *,
    weighting: str = "exp",
    ridge: float = 1e-3,
    holdout: float = 0.2,
    seed: int = 0,
) -> Fit:
    """Fit outcomes R (P, outputs) on deletion indicators Q (P, K); report held-out error, then
    refit on every perturbation. W[k, j]: change of output j when cluster k is deleted."""
    q, r = np.asarray(q, float), np.asarray(r, float)
    if r.ndim == 1:
        r = r[:, None]
    if len(q) != len(r):
        raise DistdmError(f"{len(q)} perturbations but {len(r)} outcomes")
    beta = mask_weight(q.sum(1), q.shape[1], weighting)
    mse = r2 = float("nan")
    n_out = int(round(holdout * (len(q) - 1)))
    if n_out >= 1:
        rng = np.random.default_rng(seed)
        test = 1 + rng.choice(len(q) - 1, size=n_out, replace=False)  # never hold out all-kept row
        train = np.setdiff1d(np.arange(len(q)), test)
        w, c = weighted_ridge(q[train], r[train], beta[train], ridge)
        err = r[test] - (q[test] @ w + c)
        mse = float((err**2).mean())
        var = float(((r[test] - r[test].mean(0)) ** 2).mean())
        r2 = 1.0 - mse / var if var > 0 else float("nan")
    w, c = weighted_ridge(q, r, beta, ridge)
    return Fit(w, c, mse, r2)
