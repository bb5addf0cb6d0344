"""The one result type every attribution method returns."""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import DistdmError

SIGN_CONVENTION = (
    "score[u, q] = objective(model trained without unit u)(q) - objective(model trained on all)(q): "
    "positive means removing the unit increases the objective"
)


@dataclasses.dataclass
class Scores:
    """Attribution scores, units x queries. Sign: positive means removing the unit increases the
    objective (for 'margin': removing it makes the true class more likely)."""

    values: np.ndarray  # (units, queries)
    unit: str  # "cluster" | "sample"
    objective: str
    method: str
    seconds: float = 0.0  # online time to compute these scores

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.ndim != 2:
            raise DistdmError(f"scores must be (units, queries), got shape {self.values.shape}")
        if self.unit not in ("cluster", "sample"):
            raise DistdmError(f"unit must be 'cluster' or 'sample', got {self.unit!r}")

    @property
    def n_units(self) -> int:
        """Number of attribution units (rows)."""
        return self.values.shape[0]

    @property
    def n_queries(self) -> int:
        """Number of queries (columns)."""
        return self.values.shape[1]

    def top(self, k: int = 1, *, largest: bool = True) -> np.ndarray:
        """Indices (k, queries) of the units with the largest (or smallest) score per query."""
        order = np.argsort(-self.values if largest else self.values, axis=0, kind="stable")
        return order[:k]

    def to_clusters(self, assignment: np.ndarray, n_clusters: int) -> Scores:
        """Per-sample scores summed into clusters (a cluster's score is the sum over its members)."""
        if self.unit != "sample":
            raise DistdmError("only per-sample scores can be summed into clusters")
        if len(assignment) != self.n_units:
            raise DistdmError(f"{len(assignment)} assignments for {self.n_units} sample scores")
        out = np.zeros((n_clusters, self.n_queries))
        np.add.at(out, np.asarray(assignment), self.values)
        return Scores(out, "cluster", self.objective, self.method, self.seconds)
