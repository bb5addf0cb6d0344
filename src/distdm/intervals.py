"""Means over queries with 95% Student-t intervals, clipped to the range the metric can take."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean over queries with a 95% interval; `method` names how the interval was made."""

    mean: float
    low: float
    high: float
    n: int
    method: str = "t"

    def as_dict(self, name: str) -> dict[str, float]:
        """Flat columns name, name_lo, name_hi."""
        return {name: self.mean, f"{name}_lo": self.low, f"{name}_hi": self.high}

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


# Ranges of bounded per-query metrics: an interval never reaches outside the values the metric can take.
CORRELATION = (-1.0, 1.0)  # Spearman, Pearson, LDS
SHARE = (0.0, 1.0)  # hit rates (top-1 in top-k), shares of flipped predictions


def t_interval(
    values: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
    *,
    bounds: tuple[float, float] | None = None,
) -> Interval:
    """Mean of the finite values with a Student-t confidence interval (NaN bounds if n < 2), clipped
    to `bounds` (the metric's range, e.g. (-1, 1) for a correlation) where given."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    mean = float(v.mean())
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), 1)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * v.std(ddof=1) / np.sqrt(n))
    low, high = mean - half, mean + half
    if bounds is not None:
        # the t-interval is symmetric and ignores the range: near 1 it would claim values above 1
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(mean, low, high, n)


__all__ = ["CONFIDENCE", "CORRELATION", "SHARE", "Interval", "t_interval"]
