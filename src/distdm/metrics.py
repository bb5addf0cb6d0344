"""How well attribution scores agree with the truth: rank correlations, LDS, the paper's Dist
protocol, top-1 hits, removal masks and the seed-to-seed noise ceiling. Pure functions of scores
and truths: the retraining that produces a truth lives in evaluate.py.

Every metric is computed per query and summarised by its mean and a 95% Student-t interval over
queries (`Interval`, method 't': mean +- t_{0.975, n-1} * sd / sqrt(n), clipped to the metric's
range: [-1, 1] for correlations and LDS, [0, 1] for shares, the objectives' ranges for Dist1-3).
Per-query correlations that are undefined because one side is constant count as 0 (no ranking
information); queries with fewer than 3 units to rank are left out and `Interval.n` says how many
remained.

Sign convention (scores.py): score[k, q] = f(without k)(q) - f(all)(q).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats

from .clusters import Clusters
from .errors import DistdmError
from .intervals import CORRELATION, SHARE, Interval, t_interval
from .scores import Scores

MIN_UNITS = 3  # fewest units a per-query rank correlation is computed over

ArrayLike = np.ndarray | Scores


def _values(s: ArrayLike, clusters: Clusters | None = None) -> np.ndarray:
    if isinstance(s, Scores):
        if s.unit == "sample" and clusters is not None:
            s = s.to_clusters(clusters.assignment, clusters.n_clusters)
        return s.values
    return np.asarray(s, dtype=np.float64)


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 2:
        raise DistdmError(
            f"scores and truth must both be (units, queries) of the same shape, got {a.shape} and {b.shape}"
        )


def _corr(a: np.ndarray, b: np.ndarray, fn: Callable[..., Any]) -> float:
    if len(a) < MIN_UNITS:
        return float("nan")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(fn(a, b).statistic)


def _per_query(
    scores: ArrayLike,
    truth: ArrayLike,
    fn: Callable[..., Any],
    groups: np.ndarray | None,
    labels: np.ndarray | torch.Tensor | None,
) -> np.ndarray:
    a, b = _values(scores), _values(truth)
    _check_pair(a, b)
    out = np.empty(a.shape[1])
    for q in range(a.shape[1]):
        idx = slice(None) if groups is None else np.asarray(groups) == int(np.asarray(labels)[q])
        out[q] = _corr(a[idx, q], b[idx, q], fn)
    return out


def spearman_per_query(
    scores: ArrayLike,
    truth: ArrayLike,
    cluster_class: np.ndarray | None = None,
    y: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """Spearman correlation per query (Q,) over all units, or, given cluster_class and the queries'
    labels y, over the clusters of the query's class only."""
    return _per_query(scores, truth, stats.spearmanr, cluster_class, y)


def pearson_per_query(
    scores: ArrayLike,
    truth: ArrayLike,
    cluster_class: np.ndarray | None = None,
    y: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """Pearson correlation per query (Q,), over all units or within the query's class."""
    return _per_query(scores, truth, stats.pearsonr, cluster_class, y)


def spearman(scores: ArrayLike, truth: ArrayLike) -> Interval:
    """Mean per-query Spearman correlation over all units, with a 95% t-interval."""
    return t_interval(spearman_per_query(scores, truth), bounds=CORRELATION)


def spearman_within_class(
    scores: ArrayLike, truth: ArrayLike, cluster_class: np.ndarray, y: np.ndarray | torch.Tensor
) -> Interval:
    """Mean per-query Spearman over the clusters of the query's class, with a 95% t-interval."""
    return t_interval(spearman_per_query(scores, truth, cluster_class, y), bounds=CORRELATION)


def top1_in_topk(scores: ArrayLike, truth: ArrayLike, k: int = 3, *, largest: bool = True) -> Interval:
    """Fraction of queries whose top-scored unit is among the truth's top k (largest or smallest)."""
    a, b = _values(scores), _values(truth)
    _check_pair(a, b)
    sign = -1.0 if largest else 1.0
    top = np.argsort(sign * a, axis=0, kind="stable")[0]
    true_top = np.argsort(sign * b, axis=0, kind="stable")[:k]
    return t_interval((true_top == top[None, :]).any(0).astype(np.float64), bounds=SHARE)


# LDS -------------------------------------------------------------------------------------------


def lds_masks(n_units: int, m: int = 100, alpha: float = 0.5, seed: int = 1) -> np.ndarray:
    """m random keep-masks (m, n_units) of 0/1, each keeping round(alpha * n_units) units."""
    if not 0 < alpha < 1:
        raise DistdmError(f"alpha (fraction of units kept) must be in (0, 1), got {alpha}")
    if m < 2:
        raise DistdmError(f"LDS needs at least 2 subsets, got m={m}")
    n_keep = int(round(alpha * n_units))
    if not 0 < n_keep < n_units:
        raise DistdmError(
            f"alpha={alpha} keeps {n_keep} of {n_units} units: choose alpha so that 0 < kept < all"
        )
    rng = np.random.default_rng(seed)
    masks = np.zeros((m, n_units))
    for i in range(m):
        masks[i, rng.permutation(n_units)[:n_keep]] = 1.0
    return masks


def lds_predicted(scores: ArrayLike, keep: np.ndarray) -> np.ndarray:
    """The additive prediction (m, Q) of each subset's output, up to a per-query constant.

    With score[k] = f(without k) - f(all), the additive model is f(S) = f(all) + sum over removed k
    of score[k] = f(all) + sum(score) - sum over kept k of score[k]. So the prediction is MINUS the
    sum of the kept units' scores (plus a constant): for subsets of equal size, rank-equivalent to
    the sum of the removed units' scores.
    """
    s = _values(scores)
    keep = np.asarray(keep, dtype=np.float64)
    if keep.ndim != 2 or keep.shape[1] != s.shape[0]:
        raise DistdmError(f"keep masks must be (subsets, {s.shape[0]}), got {keep.shape}")
    return -(keep @ s)


def lds_per_query(scores: ArrayLike, keep: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Per query (Q,): Spearman across subsets between the additive prediction (`lds_predicted`)
    and the actual output (subsets, Q) of the model retrained on each subset."""
    pred = lds_predicted(scores, keep)
    actual = np.asarray(actual, dtype=np.float64)
    if actual.shape != pred.shape:
        raise DistdmError(f"actual outputs must be (subsets, queries) = {pred.shape}, got {actual.shape}")
    return np.array([_corr(pred[:, q], actual[:, q], stats.spearmanr) for q in range(pred.shape[1])])


def lds(scores: ArrayLike, keep: np.ndarray, actual: np.ndarray) -> Interval:
    """Linear datamodeling score: `lds_per_query` averaged over queries, with a 95% t-interval."""
    return t_interval(lds_per_query(scores, keep, actual), bounds=CORRELATION)


# The paper's protocol ----------------------------------------------------------------------------

PAPER_OBJECTIVES = ("dist1", "dist2", "dist3")
# ||p - p'||^2 of two probability vectors lies in [0, 2], so 1 / (1 + it) in [1/3, 1]; CE is >= 0
PAPER_RANGES = {"dist1": (0.0, 2.0), "dist2": (0.0, float("inf")), "dist3": (1.0 / 3.0, 1.0)}


def paper_dist(
    picks: Mapping[str, np.ndarray], removed_values: Mapping[str, np.ndarray]
) -> dict[str, Interval]:
    """DDM Tables 1-2: for each objective, the value of that objective for the model retrained
    without the method's top cluster per query (picks[obj]: (Q,) cluster ids; removed_values[obj]:
    (K, Q) objective values of the leave-one-cluster-out models). Dist1 is reported x100."""
    out = {}
    for obj in PAPER_OBJECTIVES:
        if obj not in picks or obj not in removed_values:
            continue
        vals = np.asarray(removed_values[obj], dtype=np.float64)
        top = np.asarray(picks[obj], dtype=np.int64)
        got = vals[top, np.arange(vals.shape[1])]
        scale = 100.0 if obj == "dist1" else 1.0
        lo, hi = PAPER_RANGES[obj]
        name = "dist1_x100" if obj == "dist1" else obj
        out[name] = t_interval(got * scale, bounds=(lo * scale, hi * scale))
    return out


# Removal curves ---------------------------------------------------------------------------------


def removal_masks(scores: ArrayLike, ks: Sequence[int], *, largest: bool = False) -> np.ndarray:
    """Keep-masks (len(ks), Q, units) dropping each query's top-k units by score (largest=False:
    the most negative, i.e. for the margin the units whose removal should lower it most)."""
    s = _values(scores)
    order = np.argsort(-s if largest else s, axis=0, kind="stable")  # (K, Q)
    if max(ks) > s.shape[0] or min(ks) < 1:
        raise DistdmError(f"removal sizes must lie in 1..{s.shape[0]}, got {list(ks)}")
    masks = np.ones((len(ks), s.shape[1], s.shape[0]))
    for i, k in enumerate(ks):
        for q in range(s.shape[1]):
            masks[i, q, order[:k, q]] = 0.0
    return masks


# Summaries --------------------------------------------------------------------------------------


def compare(
    scores: ArrayLike,
    truth: ArrayLike,
    clusters: Clusters,
    y: np.ndarray | torch.Tensor,
    *,
    top_k: int = 3,
) -> dict[str, Interval]:
    """Agreement of scores with the truth (both units x queries): Spearman and Pearson over all
    clusters and within the query's class, and top-1 in the true top-k."""
    a, b = _values(scores, clusters), _values(truth, clusters)
    _check_pair(a, b)
    cc = np.asarray(clusters.cluster_class)
    if a.shape[0] != len(cc):
        raise DistdmError(f"scores have {a.shape[0]} units but there are {len(cc)} clusters")
    y = np.asarray(y)
    return {
        "spearman": t_interval(spearman_per_query(a, b), bounds=CORRELATION),
        "spearman_class": t_interval(spearman_per_query(a, b, cc, y), bounds=CORRELATION),
        "pearson": t_interval(pearson_per_query(a, b), bounds=CORRELATION),
        "pearson_class": t_interval(pearson_per_query(a, b, cc, y), bounds=CORRELATION),
        f"top1_in_top{top_k}": top1_in_topk(a, b, top_k),
    }


def noise_ceiling(
    per_seed: np.ndarray,
    clusters: Clusters,
    y: np.ndarray | torch.Tensor,
    *,
    top_k: int = 3,
) -> dict[str, Interval]:
    """Seed-to-seed agreement of exact effects (seeds, K, Q): seed 0's effects compared (`compare`)
    with the mean of the other seeds'. Needs at least two seeds."""
    per_seed = np.asarray(per_seed, dtype=np.float64)
    if per_seed.ndim != 3 or per_seed.shape[0] < 2:
        raise DistdmError("the noise ceiling needs exact effects of at least two seeds: (seeds, K, Q)")
    return compare(per_seed[0], per_seed[1:].mean(0), clusters, y, top_k=top_k)
