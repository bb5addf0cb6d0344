"""The shared interface test: every registered method, including ones added later, returns Scores
of the right shape with finite values on the tiny task."""

import numpy as np
import pytest

from distdm.attribution import ATTRIBUTORS, make_attributor
from distdm.scores import Scores

# LiSSA's recursion depth only sets how close it gets to the inverse; 50 steps keep the suite fast
CHEAP = {"if-lissa": {"depth": 50}, "fastif": {"depth": 50}}


@pytest.mark.parametrize("name", sorted(ATTRIBUTORS))
def test_every_registered_method_returns_finite_scores(name, tiny_task, queries):
    x, y = queries
    method = make_attributor(name, **CHEAP.get(name, {}))
    method.fit(tiny_task)
    assert method.offline_seconds_ >= 0
    for objective in ("margin", "dist1"):
        s = method.scores(x, y, objective)
        assert isinstance(s, Scores)
        assert isinstance(s.method, str) and s.method and s.objective == objective
        n_units = tiny_task.clusters.n_clusters if s.unit == "cluster" else tiny_task.data.n_train
        assert s.values.shape == (n_units, len(y))
        assert np.isfinite(s.values).all()
        if s.unit == "sample":
            s = s.to_clusters(tiny_task.clusters.assignment, tiny_task.clusters.n_clusters)
        assert s.values.shape == (tiny_task.clusters.n_clusters, len(y))
        assert s.seconds >= 0
