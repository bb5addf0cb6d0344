"""The one result type every attribution method returns, and a readable view of its top units."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DistdmError

SIGN_CONVENTION = (
    "score[u, q] = objective(model trained without unit u)(q) - objective(model trained on all)(q): "
    "positive means removing the unit increases the objective"
)

SCORES_FORMAT = "distdm.scores"
SCORES_VERSION = 1
_META_KEY = "distdm"
PRINT_QUERIES = 20  # queries shown when a TopUnits is printed; to_rows() has them all


def _optional_ints(a: Any, n: int, what: str) -> np.ndarray | None:
    if a is None:
        return None
    out = np.asarray(a)
    if out.shape != (n,):
        raise DistdmError(f"{what} must have one entry per unit ({n}), got shape {out.shape}")
    if not np.issubdtype(out.dtype, np.integer):
        raise DistdmError(f"{what} must hold integers, got dtype {out.dtype}")
    return out.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class TopUnits:
    """The k top units per query: `indices` and `scores` are (k, queries), rank 1 first.

    `unit_class` / `unit_size` are (k, queries) like `indices`, or None when the Scores did not know
    them (e.g. built by hand). Prints as a table; `to_rows()` gives one dict per (query, rank).
    """

    indices: np.ndarray
    scores: np.ndarray
    unit: str
    largest: bool
    method: str
    objective: str
    unit_class: np.ndarray | None = None
    unit_size: np.ndarray | None = None

    @property
    def k(self) -> int:
        """Units listed per query."""
        return self.indices.shape[0]

    @property
    def n_queries(self) -> int:
        """Number of queries (columns)."""
        return self.indices.shape[1]

    @property
    def columns(self) -> tuple[str, ...]:
        """Column names of `to_rows()`: query, rank, the unit ('cluster' or 'sample'), class, size, score."""
        return ("query", "rank", self.unit, "class", "size", "score")

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per (query, rank), query-major; class and size are None where unknown."""
        rows = []
        for q in range(self.n_queries):
            for r in range(self.k):
                rows.append(
                    {
                        "query": q,
                        "rank": r + 1,
                        self.unit: int(self.indices[r, q]),
                        "class": None if self.unit_class is None else int(self.unit_class[r, q]),
                        "size": None if self.unit_size is None else int(self.unit_size[r, q]),
                        "score": float(self.scores[r, q]),
                    }
                )
        return rows

    def _title(self) -> str:
        which = "largest" if self.largest else "smallest"
        return (
            f"top {self.k} {self.unit}s per query by {which} score "
            f"({self.method}, objective {self.objective})"
        )

    def _cells(self, limit: int | None) -> tuple[list[list[str]], int]:
        shown = self.n_queries if limit is None else min(limit, self.n_queries)
        cells = []
        for row in self.to_rows()[: shown * self.k]:
            cells.append(
                [
                    str(row["query"]),
                    str(row["rank"]),
                    str(row[self.unit]),
                    "?" if row["class"] is None else str(row["class"]),
                    "?" if row["size"] is None else str(row["size"]),
                    f"{row['score']:+.4g}",
                ]
            )
        return cells, self.n_queries - shown

    def __str__(self) -> str:
        cells, hidden = self._cells(PRINT_QUERIES)
        head = list(self.columns)
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(head)]
        lines = [self._title(), "  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
        if hidden:
            lines.append(f"... {hidden} more queries (to_rows() lists all {self.n_queries})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def __rich__(self) -> Any:
        """A rich Table (used by rich.print and the CLI's console)."""
        from rich.table import Table

        cells, hidden = self._cells(PRINT_QUERIES)
        t = Table(title=self._title(), caption=f"... {hidden} more queries" if hidden else None)
        for c in self.columns:
            t.add_column(c, justify="right")
        for i, cell in enumerate(cells):
            t.add_row(*cell, end_section=(i + 1) % self.k == 0 and i + 1 < len(cells))
        return t


@dataclasses.dataclass
class Scores:
    """Attribution scores, units x queries. Sign: positive means removing the unit increases the
    objective (for 'margin': removing it makes the true class more likely).

    `unit_class` and `unit_size` (one int per unit) describe the units when known: a cluster's class
    (-1 when it mixes classes) and member count, or a sample's training label and 1. `Attributor.scores`
    fills them from the task; they are None for Scores built by hand.
    """

    values: np.ndarray  # (units, queries)
    unit: str  # "cluster" | "sample"
    objective: str
    method: str
    seconds: float = 0.0  # online time to compute these scores
    unit_class: np.ndarray | None = None  # (units,) int, -1 = mixed / no class
    unit_size: np.ndarray | None = None  # (units,) int

    def __post_init__(self) -> None:
        if hasattr(self.values, "detach"):  # a tensor, on any device: scores live on the CPU
            self.values = self.values.detach().cpu().double().numpy()
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.ndim != 2:
            raise DistdmError(f"scores must be (units, queries), got shape {self.values.shape}")
        if self.unit not in ("cluster", "sample"):
            raise DistdmError(f"unit must be 'cluster' or 'sample', got {self.unit!r}")
        self.unit_class = _optional_ints(self.unit_class, self.n_units, "unit_class")
        self.unit_size = _optional_ints(self.unit_size, self.n_units, "unit_size")

    @property
    def n_units(self) -> int:
        """Number of attribution units (rows)."""
        return self.values.shape[0]

    @property
    def n_queries(self) -> int:
        """Number of queries (columns)."""
        return self.values.shape[1]

    def attach_units(self, clusters: Any, train_labels: Any = None) -> Scores:
        """Fill in unit_class / unit_size from the task's clusters (unit 'cluster') or training labels
        (unit 'sample', size 1) where they are unknown and fit the number of units; returns self."""
        if self.unit == "cluster" and clusters is not None and clusters.n_clusters == self.n_units:
            if self.unit_class is None:
                self.unit_class = np.asarray(clusters.cluster_class, dtype=np.int64)
            if self.unit_size is None:
                self.unit_size = np.asarray(clusters.sizes(), dtype=np.int64)
        elif self.unit == "sample" and train_labels is not None and len(train_labels) == self.n_units:
            labels = np.asarray(train_labels.cpu() if hasattr(train_labels, "cpu") else train_labels)
            if self.unit_class is None and np.issubdtype(labels.dtype, np.integer):
                self.unit_class = labels.astype(np.int64)
            if self.unit_size is None:
                self.unit_size = np.ones(self.n_units, dtype=np.int64)
        return self

    def top(self, k: int = 1, *, largest: bool = True) -> TopUnits:
        """The k units with the largest (or smallest) score per query, with their class and size;
        `.indices` is the (k, queries) index array."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise DistdmError(f"k must be an integer >= 1, got {k!r}")
        if k > self.n_units:
            raise DistdmError(
                f"k={k} is more than the {self.n_units} {self.unit}s scored: use k <= {self.n_units}"
            )
        order = np.argsort(-self.values if largest else self.values, axis=0, kind="stable")[: int(k)]
        cols = np.arange(self.n_queries)[None, :]
        return TopUnits(
            indices=order,
            scores=self.values[order, cols],
            unit=self.unit,
            largest=largest,
            method=self.method,
            objective=self.objective,
            unit_class=None if self.unit_class is None else self.unit_class[order],
            unit_size=None if self.unit_size is None else self.unit_size[order],
        )

    def to_clusters(self, assignment: np.ndarray, n_clusters: int) -> Scores:
        """Per-sample scores summed into clusters (a cluster's score is the sum over its members)."""
        if self.unit != "sample":
            raise DistdmError("only per-sample scores can be summed into clusters")
        if len(assignment) != self.n_units:
            raise DistdmError(f"{len(assignment)} assignments for {self.n_units} sample scores")
        assignment = np.asarray(assignment)
        out = np.zeros((n_clusters, self.n_queries))
        np.add.at(out, assignment, self.values)
        sizes = np.bincount(assignment, minlength=n_clusters)
        cls = None
        if self.unit_class is not None:  # a cluster's class is its members' label when they all share one
            lo = np.full(n_clusters, np.iinfo(np.int64).max)
            hi = np.full(n_clusters, np.iinfo(np.int64).min)
            np.minimum.at(lo, assignment, self.unit_class)
            np.maximum.at(hi, assignment, self.unit_class)
            cls = np.where((lo == hi) & (sizes > 0), lo, -1)
        return Scores(out, "cluster", self.objective, self.method, self.seconds, cls, sizes)

    def to_pandas(self, *, wide: bool = False) -> Any:
        """A pandas DataFrame: long format by default, one row per (unit, query) with columns
        unit ('cluster' or 'sample'), query, score, class, size; `wide=True` gives units x queries.
        Needs the pandas extra (`pip install 'distdm[pandas]'`)."""
        try:
            import pandas as pd
        except ImportError:
            raise DistdmError("Scores.to_pandas needs pandas: pip install 'distdm[pandas]'") from None
        if wide:
            df = pd.DataFrame(self.values, columns=pd.RangeIndex(self.n_queries, name="query"))
            df.index.name = self.unit
            return df
        units = np.repeat(np.arange(self.n_units), self.n_queries)
        cols: dict[str, Any] = {
            self.unit: units,
            "query": np.tile(np.arange(self.n_queries), self.n_units),
            "score": self.values.reshape(-1),
        }
        for name, a in (("class", self.unit_class), ("size", self.unit_size)):
            cols[name] = (
                pd.array(a[units], dtype="Int64")
                if a is not None
                else pd.array([pd.NA] * len(units), dtype="Int64")
            )
        return pd.DataFrame(cols)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the scores to one safetensors file (arrays, plus method, objective, unit, seconds and
        the sign convention as JSON metadata); written atomically. Returns the path."""
        from safetensors.numpy import save

        from .store import atomic_write_bytes

        arrays = {"values": np.ascontiguousarray(self.values)}
        for name in ("unit_class", "unit_size"):
            a = getattr(self, name)
            if a is not None:
                arrays[name] = np.ascontiguousarray(a, dtype=np.int64)
        meta = {
            "format": SCORES_FORMAT,
            "version": SCORES_VERSION,
            "unit": self.unit,
            "objective": self.objective,
            "method": self.method,
            "seconds": float(self.seconds),
            "sign_convention": SIGN_CONVENTION,
        }
        target = Path(path)
        atomic_write_bytes(target, save(arrays, metadata={_META_KEY: json.dumps(meta)}))
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        """Scores written by `Scores.save`; a missing, corrupt or foreign file raises DistdmError."""
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise DistdmError(f"no scores file at {p}")
        try:
            with safe_open(str(p), framework="np") as f:
                header = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
        except Exception as e:  # safetensors raises its own error types for a damaged header or body
            raise DistdmError(
                f"{p} is not a readable safetensors file ({e}): was it written by Scores.save?"
            ) from e
        try:
            meta = json.loads(header.get(_META_KEY, "null"))
        except json.JSONDecodeError:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != SCORES_FORMAT:
            raise DistdmError(
                f"{p} holds no distdm scores (no '{SCORES_FORMAT}' metadata): write it with Scores.save"
            )
        if meta.get("version") != SCORES_VERSION:
            raise DistdmError(
                f"{p} is a version {meta.get('version')} scores file; "
                f"this distdm reads version {SCORES_VERSION}"
            )
        if "values" not in arrays or set(arrays) - {"values", "unit_class", "unit_size"}:
            raise DistdmError(f"{p} has tensors {sorted(arrays)}, expected values[, unit_class, unit_size]")
        try:
            return cls(
                arrays["values"],
                str(meta["unit"]),
                str(meta["objective"]),
                str(meta["method"]),
                float(meta.get("seconds", 0.0)),
                arrays.get("unit_class"),
                arrays.get("unit_size"),
            )
        except KeyError as e:
            raise DistdmError(f"{p}: scores metadata lacks {e}") from None
