"""The pure helpers of benchmarks/scale.py: the log-log slope fit and the cell names."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import scale  # noqa: E402


def test_slope_recovers_power_laws() -> None:
    xs = [10.0, 100.0, 1000.0, 10000.0]
    assert scale.fit_slope(xs, [3 * x for x in xs]) == pytest.approx(1.0)
    assert scale.fit_slope(xs, [0.5 * x**2 for x in xs]) == pytest.approx(2.0)
    assert scale.fit_slope(xs, [7.0] * 4) == pytest.approx(0.0, abs=1e-12)


def test_slope_ignores_missing_points_and_needs_two_x() -> None:
    xs = [1.0, 10.0, 100.0]
    assert scale.fit_slope(xs, [1.0, None, 100.0]) == pytest.approx(1.0)  # type: ignore[list-item]
    assert scale.fit_slope(xs, [1.0, float("nan"), 100.0]) == pytest.approx(1.0)
    assert scale.fit_slope([5.0, 5.0], [1.0, 2.0]) is None
    assert scale.fit_slope([1.0], [1.0]) is None


def test_cell_ids_differ_by_stage_and_options() -> None:
    s = scale._s("fmnist", 1000, "mlp", 32)
    ids = {
        scale.cell_id(s, "sweep", {}),
        scale.cell_id(s, "sweep", {"variants": 11}),
        scale.cell_id(s, "train", {}),
        scale.cell_id({**s, "k": 1000}, "sweep", {}),
    }
    assert len(ids) == 4
    assert scale.cell_id(s, "sweep", {"variants": 11}) == scale.cell_id(s, "sweep", {"variants": 11})


def test_lumped_keeps_first_clusters_and_merges_the_rest() -> None:
    import numpy as np

    from distdm.clusters import Clusters

    c = Clusters(np.array([0, 1, 2, 3, 3, 2]), np.array([0, 0, 1, 1]))
    got = scale.lumped(c, 1)
    assert got.n_clusters == 2
    assert got.assignment.tolist() == [0, 1, 1, 1, 1, 1]
    assert got.cluster_class.tolist() == [0, 1]  # the merged samples are mostly of class 1
