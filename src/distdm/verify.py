"""A trust check on one answer: retrain a few randomly chosen clusters out, with two seeds, and say
whether the method's scores agree with those exact effects and whether the effects agree with
themselves.

`verify(task, scores, x, y, m=8, store=run.store)` draws m clusters, retrains the model without each
of them (and once with everything) for each seed through the batched engine (`retrain_masks`;
cached in the run store, so a second call retrains nothing; when the run already holds complete
leave-one-out retrains for a seed, those are reused instead), and reports:

- agreement: per query, Spearman over the m clusters between the method's scores and the exact
  effects of the first seed (the explained model's own seed), and the share of the m clusters on
  which their signs agree; means over queries with 95% t-intervals (distdm.intervals.t_interval);
- reproducibility: the same two numbers between the first seed's exact effects and the mean of the
  other seeds': how far exact retraining agrees with itself, i.e. the ceiling any method can reach
  against a truth that varies with the seed.

Verdict rules (`VERDICT_RULES`, thresholds on the mean per-query Spearman), checked in this order:
reproducibility < REPRODUCIBLE -> "the question itself is noisy"; agreement interval missing or
wider than INCONCLUSIVE_WIDTH -> "inconclusive"; agreement >= TRUSTWORTHY, or >= CEILING_SHARE of
the reproducibility -> "trustworthy"; agreement >= PARTLY -> "partly trustworthy"; agreement <=
-PARTLY -> "the method's scores run opposite to retraining"; else "the method disagrees with
retraining". Sign convention (scores.py): score[k, q] = f(without k)(q) - f(all)(q), the same as
the exact effects, so signs are compared as they are.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .attribution.retrain import (
    job_name,
    leave_one_out_masks,
    objective_values,
    recorded_seconds,
    retrain_masks,
)
from .engine import State
from .errors import DistdmError
from .intervals import CORRELATION, SHARE, Interval, t_interval
from .metrics import MIN_UNITS, spearman_per_query
from .objectives import Objective, objective_name
from .progress import Progress, progress_bar
from .scores import Scores
from .store import ChunkedJob, RunStore, check_store, digest
from .task import Task, store_of

log = logging.getLogger(__name__)

DEFAULT_M = 8  # clusters retrained out: enough for a per-query rank correlation, cheap to retrain
REPRODUCIBLE = 0.5  # seed-to-seed Spearman below this: the question itself is noisy
TRUSTWORTHY = 0.5  # method-to-retraining Spearman at or above this: trustworthy
CEILING_SHARE = 0.8  # ... or at least this share of the seed-to-seed Spearman (as good as a retrain)
PARTLY = 0.2  # at or above: partly trustworthy; at or below minus this: opposite signs
INCONCLUSIVE_WIDTH = 0.8  # an agreement interval wider than this says too little
VERDICT_RULES = (
    f"the question itself is noisy: seed-to-seed Spearman of exact retraining < {REPRODUCIBLE}; "
    f"inconclusive: the agreement's 95% interval is missing or wider than {INCONCLUSIVE_WIDTH}; "
    f"trustworthy: agreement Spearman >= {TRUSTWORTHY} or >= {CEILING_SHARE} x the seed-to-seed "
    f"Spearman; partly trustworthy: >= {PARTLY}; opposite: <= -{PARTLY}; otherwise the method "
    f"disagrees with retraining"
)
VERIFY_DIR = "verify"  # where a run stores its checks, one JSON per check


@dataclasses.dataclass
class Verification:
    """The result of `verify`: agreement of a method with exact retraining on m random clusters,
    the reproducibility of that retraining across seeds, a verdict, and what it cost."""

    method: str
    objective: str
    clusters: list[int]  # the m clusters retrained out
    seeds: list[int]  # seeds[0]: the explained model's seed
    n_queries: int
    agreement: Interval  # per-query Spearman, method vs seeds[0]'s exact effects
    sign_agreement: Interval  # per-query share of the m clusters with the same sign
    reproducibility: Interval  # per-query Spearman, seeds[0] vs the mean of the other seeds
    sign_reproducibility: Interval
    verdict: str  # the short verdict: trustworthy, partly trustworthy, noisy question, ...
    explanation: str  # one plain-language sentence saying why
    seconds: float  # what the retrains cost when they were computed (cached: their recorded cost)
    seconds_this_call: float  # what this call took (near 0 when everything was cached)
    train_seconds: float | None  # one training run of the target, where the run records it
    models_retrained: int  # seeds x (m + 1)
    reused: str  # 'computed', 'cached' or 'leave-one-out' (reused from the exact method's retrains)

    @property
    def training_runs(self) -> float | None:
        """The cost as a multiple of one training run of the target (None where that is unknown)."""
        if not self.train_seconds or not np.isfinite(self.seconds):
            return None
        return self.seconds / self.train_seconds

    def cost(self) -> str:
        """The cost in words: seconds, models retrained and multiples of one training run."""
        runs = self.training_runs
        as_runs = f" = {runs:.1f}x one training run" if runs is not None else ""
        note = {
            "computed": "",
            "cached": f"; loaded from the run's cache in {self.seconds_this_call:.1f} s",
            "leave-one-out": f"; reused the run's leave-one-out retrains in {self.seconds_this_call:.1f} s",
        }[self.reused]
        return f"{self.seconds:.1f} s for {self.models_retrained} models retrained{as_runs}{note}"

    def summary(self) -> str:
        """Several plain lines: the verdict, the two measurements and the cost."""
        return "\n".join(
            [
                f"verdict for {self.method} ({self.objective}): {self.verdict}: {self.explanation}",
                f"  agreement with exact retraining over {len(self.clusters)} random clusters, "
                f"{self.n_queries} queries: Spearman {self.agreement}, signs agree {self.sign_agreement}",
                f"  exact retraining seed {self.seeds[0]} vs seed{'s' if len(self.seeds) > 2 else ''} "
                f"{', '.join(map(str, self.seeds[1:]))}: Spearman {self.reproducibility}, "
                f"signs agree {self.sign_reproducibility}",
                f"  cost: {self.cost()}",
            ]
        )

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record (intervals as mean/low/high/n; NaN as None)."""

        def iv(i: Interval) -> dict[str, Any]:
            return {"mean": _num(i.mean), "low": _num(i.low), "high": _num(i.high), "n": i.n}

        return {
            "method": self.method,
            "objective": self.objective,
            "clusters": self.clusters,
            "seeds": self.seeds,
            "n_queries": self.n_queries,
            "agreement": iv(self.agreement),
            "sign_agreement": iv(self.sign_agreement),
            "reproducibility": iv(self.reproducibility),
            "sign_reproducibility": iv(self.sign_reproducibility),
            "verdict": self.verdict,
            "explanation": self.explanation,
            "seconds": _num(self.seconds),
            "seconds_this_call": _num(self.seconds_this_call),
            "train_seconds": _num(self.train_seconds),
            "training_runs": _num(self.training_runs),
            "models_retrained": self.models_retrained,
            "reused": self.reused,
            "cost": self.cost(),
            "rules": VERDICT_RULES,
        }


def _num(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def sign_agreement_per_query(scores: np.ndarray, effects: np.ndarray) -> np.ndarray:
    """Per query (Q,), the share of units whose score has the sign of their exact effect (units with
    an effect of exactly 0 are left out; NaN where none remains)."""
    a, b = np.asarray(scores, dtype=np.float64), np.asarray(effects, dtype=np.float64)
    if a.shape != b.shape:
        raise DistdmError(f"scores and effects must have the same shape, got {a.shape} and {b.shape}")
    counted = b != 0
    same = (np.sign(a) == np.sign(b)) & counted
    n = counted.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, same.sum(0) / np.maximum(n, 1), np.nan)


def judge(agreement: Interval, reproducibility: Interval) -> tuple[str, str]:
    """The verdict and a sentence saying why, from the two Spearman intervals (rules: VERDICT_RULES)."""
    a, r = agreement.mean, reproducibility.mean
    if not np.isfinite(r) or r < REPRODUCIBLE:
        return (
            "the question itself is noisy",
            f"exact retraining disagrees with itself (seed-to-seed Spearman {r:.2f} < {REPRODUCIBLE}), so "
            f"no method can agree much better than that with any one retrain; the method's agreement "
            f"{a:.2f} is to be read against that ceiling. Train the model longer or to a lower loss, or use "
            f"larger clusters, to make the question answerable",
        )
    if not (np.isfinite(agreement.low) and np.isfinite(agreement.high)) or (
        agreement.high - agreement.low > INCONCLUSIVE_WIDTH
    ):
        return (
            "inconclusive",
            f"the agreement {agreement} is too uncertain to tell; check more clusters (--verify) or queries",
        )
    if a >= TRUSTWORTHY or a >= CEILING_SHARE * r:
        return (
            "trustworthy",
            f"the scores rank the clusters as exact retraining does (Spearman {a:.2f}; retraining with "
            f"another seed agrees with itself at {r:.2f})",
        )
    if a >= PARTLY:
        return (
            "partly trustworthy",
            f"the scores agree only partly with exact retraining (Spearman {a:.2f}, while retraining "
            f"agrees with itself at {r:.2f}): trust the strongest clusters, not the full ranking",
        )
    if a <= -PARTLY:
        return (
            "the method's scores run opposite to retraining",
            f"Spearman {a:.2f}: the scores rank the clusters in reverse (a sign convention mismatch? "
            f"scores must be f(without unit) - f(all))",
        )
    return (
        "the method disagrees with retraining",
        f"its scores carry no information about the exact effects (Spearman {a:.2f}) although "
        f"retraining agrees with itself at {r:.2f}: choose another method or setting",
    )


def choose_clusters(n_clusters: int, m: int, seed: int = 0) -> np.ndarray:
    """m distinct cluster ids drawn at random with a seed, in increasing order."""
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
        raise DistdmError(f"the number of clusters to verify must be an integer, got {m!r}")
    if m < MIN_UNITS:
        raise DistdmError(
            f"verify needs at least {MIN_UNITS} clusters to rank, got {m}: ask for {DEFAULT_M} (the default)"
        )
    if m > n_clusters:
        raise DistdmError(
            f"cannot verify {m} clusters: the run has only {n_clusters}; ask for at most {n_clusters}"
        )
    return np.sort(np.random.default_rng(seed).choice(n_clusters, size=m, replace=False))


def _loo_cached(task: Task, seed: int, store: RunStore | None) -> int | None:
    """The chunk size of complete cached leave-one-out retrains for a seed (None if not all there)."""
    if store is None:
        return None
    k = task.clusters.n_clusters
    job = ChunkedJob.recorded(store, job_name("loo", seed), k + 1)
    if job is None or job.identity.get("unit") != "cluster" or not job.complete(store):
        return None
    return job.chunk_size


def _states(
    task: Task, chosen: np.ndarray, seed: int, tag: str, progress: Any, store: RunStore | None
) -> tuple[State, float | None, str]:
    """Stacked states (1 + m) for a seed: all kept, then without each chosen cluster; their
    recorded cost and where they came from."""
    k = task.clusters.n_clusters
    loo_chunk = _loo_cached(task, seed, store)
    if loo_chunk is not None:
        states = retrain_masks(
            task, leave_one_out_masks(k), seed=seed, tag="loo", chunk_size=loo_chunk, store=store
        )
        rows = torch.as_tensor(np.concatenate([[0], chosen + 1]))
        spent = recorded_seconds(task, "loo", seed, store)
        share = None if spent is None else spent * len(rows) / (k + 1)
        return {n: v[rows] for n, v in states.items()}, share, "leave-one-out"
    keep = torch.ones(1 + len(chosen), k)
    keep[torch.arange(1, 1 + len(chosen)), torch.as_tensor(chosen)] = 0.0
    cached = store is not None and recorded_seconds(task, tag, seed, store) is not None
    t = time.perf_counter()
    states = retrain_masks(task, keep, seed=seed, tag=tag, progress=progress, store=store)
    spent = recorded_seconds(task, tag, seed, store)
    if spent is None:  # no store: what it took now
        spent = time.perf_counter() - t
    return states, spent, "cached" if cached else "computed"


def _effects(task: Task, states: State, x: torch.Tensor, y: torch.Tensor, objective: Any) -> np.ndarray:
    """Exact effects (m, Q): f(without k) - f(all), the reference outputs those of the all-kept model
    (row 0) of the same seed, as in the exact method."""
    v = objective_values(task, states, x, y, objective)
    return v[1:] - v[:1]


def _train_seconds(store: RunStore | None) -> float | None:
    if store is None or not store.is_done("train"):
        return None
    s = store.stage_info("train").get("seconds")
    return float(s) if s else None


def verify(
    task: Task,
    scores: Scores,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    m: int = DEFAULT_M,
    seeds: Sequence[int] | None = None,
    draw_seed: int = 0,
    objective: str | Objective | None = None,
    progress: Progress = False,
    save: bool = True,
    store: RunStore | None = None,
) -> Verification:
    """Check one answer against exact retraining of m random clusters with two seeds: the method's
    agreement, retraining's own reproducibility, a verdict and the cost (module docstring).

    scores: the method's Scores for the queries (x, y) (cluster units, or samples summed to clusters).
    seeds: retraining seeds, the explained model's first (default: the task's seed and the next).
    objective: the objective the scores explain (default: the one they record).
    store: the run's RunStore (default the task's deprecated `store`): the retrains are cached and
    reused there (also a run's complete leave-one-out retrains) and, with save=True, the result is
    stored in it as JSON under verify/.
    """
    check_store(store)
    store = store_of(task, store)
    if not isinstance(scores, Scores):
        raise DistdmError(
            f"verify needs the method's Scores (attributor.scores(x, y)), got {type(scores).__name__}"
        )
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y)
    if scores.unit == "sample":
        scores = scores.to_clusters(task.clusters.assignment, task.clusters.n_clusters)
    k = task.clusters.n_clusters
    # an objective over all queries at once ('global') gives one column
    if scores.values.ndim != 2 or scores.values.shape[0] != k or scores.values.shape[1] not in (len(y), 1):
        raise DistdmError(
            f"scores must be ({k} clusters, {len(y)} queries) for these queries, got {scores.values.shape}"
        )
    obj = objective if objective is not None else scores.objective
    s0 = task.schedule.seed
    seeds_t = (s0, s0 + 1) if seeds is None else tuple(int(s) for s in seeds)
    if len(seeds_t) < 2 or len(set(seeds_t)) != len(seeds_t):
        raise DistdmError(f"verify needs at least two distinct retraining seeds, got {list(seeds_t)}")
    chosen = choose_clusters(k, m, draw_seed)
    tag = f"verify-{digest(np.asarray(chosen), length=12)}"
    t = time.perf_counter()
    effects, spent, sources = [], [], []
    with progress_bar(len(seeds_t) * (1 + m) * task.schedule.epochs, "verify: retraining", progress) as bar:
        for s in seeds_t:
            states, sec, src = _states(task, chosen, s, tag, bar, store)
            effects.append(_effects(task, states, x, y, obj))
            spent.append(sec)
            sources.append(src)
    this_call = time.perf_counter() - t
    if effects[0].shape[1] != scores.values.shape[1]:
        raise DistdmError(
            f"the scores have {scores.values.shape[1]} columns but objective {objective_name(obj)!r} gives "
            f"{effects[0].shape[1]}: pass the objective the scores were computed for"
        )
    method_scores = np.asarray(scores.values, dtype=np.float64)[chosen]
    others = np.mean(effects[1:], axis=0)
    agreement = t_interval(spearman_per_query(method_scores, effects[0]), bounds=CORRELATION)
    reproducibility = t_interval(spearman_per_query(effects[0], others), bounds=CORRELATION)
    sign_a = t_interval(sign_agreement_per_query(method_scores, effects[0]), bounds=SHARE)
    sign_r = t_interval(sign_agreement_per_query(effects[0], others), bounds=SHARE)
    verdict, why = judge(agreement, reproducibility)
    # one seed computed now makes the check's cost a fresh one; else say where the states came from
    reused = next((src for src in ("computed", "leave-one-out") if src in sources), "cached")
    result = Verification(
        method=scores.method,
        objective=objective_name(obj),
        clusters=[int(c) for c in chosen],
        seeds=list(seeds_t),
        n_queries=len(y),
        agreement=agreement,
        sign_agreement=sign_a,
        reproducibility=reproducibility,
        sign_reproducibility=sign_r,
        verdict=verdict,
        explanation=why,
        seconds=float(sum(spent)) if None not in spent else float("nan"),
        seconds_this_call=this_call,
        train_seconds=_train_seconds(store),
        models_retrained=len(seeds_t) * (1 + m),
        reused=reused,
    )
    if save and store is not None:
        name = verification_name(result, x)
        store.save_json(name, result.to_dict())
        log.info("verification stored as %s", name)
    return result


def verification_name(v: Verification, x: torch.Tensor) -> str:
    """The run-store name of a check: verify/<method>-<objective>-m<m>-<hash of queries, clusters, seeds>."""
    h = digest(x.detach().cpu().numpy(), np.asarray(v.clusters), np.asarray(v.seeds), length=10)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{v.method}-{v.objective}")
    return f"{VERIFY_DIR}/{safe}-m{len(v.clusters)}-{h}.json"


__all__ = [
    "DEFAULT_M",
    "VERDICT_RULES",
    "Verification",
    "choose_clusters",
    "judge",
    "sign_agreement_per_query",
    "verify",
]
