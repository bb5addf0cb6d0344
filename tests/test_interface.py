"""The shared attributor contract, run on every registered method (including ones added later) on
the tiny task: `fit` returns the method; `scores` validates its input, returns Scores of the right
shape with finite values, is deterministic and leaves the fitted state as it was (scoring other
queries in between changes nothing); and its margin scores follow the library's sign convention
(score = f(without unit) - f(all)) against exact leave-cluster-out retraining."""

import numpy as np
import pytest
import torch

from distdm import metrics
from distdm.attribution import ATTRIBUTORS, make_attributor
from distdm.errors import DistdmError
from distdm.scores import Scores

# LiSSA's recursion depth only sets how close it gets to the inverse; 50 steps keep the suite fast
CHEAP = {"if-lissa": {"depth": 50}, "fastif": {"depth": 50}}
# baselines that do not claim to attribute (they carry no sign): exempt from the sign check
BASELINES = {"random", "predict", "clustering"}


def _clusters(s: Scores, task) -> np.ndarray:
    if s.unit == "sample":
        s = s.to_clusters(task.clusters.assignment, task.clusters.n_clusters)
    return s.values


@pytest.mark.parametrize("name", sorted(ATTRIBUTORS))
def test_every_registered_method_keeps_the_attributor_contract(name, tiny_task, queries, tiny_lco):
    x, y = queries
    method = make_attributor(name, **CHEAP.get(name, {}))
    with pytest.raises(DistdmError, match="fit"):
        method.scores(x, y)
    assert method.fit(tiny_task) is method
    assert method.offline_seconds_ >= 0
    final = {k: v.clone() for k, v in tiny_task.final.items()}
    first = {}
    for objective in ("margin", "dist1"):
        s = method.scores(x, y, objective)
        assert isinstance(s, Scores)
        assert isinstance(s.method, str) and s.method and s.objective == objective
        n_units = tiny_task.clusters.n_clusters if s.unit == "cluster" else tiny_task.data.n_train
        assert s.values.shape == (n_units, len(y))
        assert np.isfinite(s.values).all()
        assert _clusters(s, tiny_task).shape == (tiny_task.clusters.n_clusters, len(y))
        assert s.seconds >= 0
        first[objective] = s.values
    method.scores(x[:3].flip(0), y[:3].flip(0), "margin")  # other queries in between
    again = method.scores(x, y, "margin").values
    np.testing.assert_allclose(again, first["margin"], rtol=1e-5, atol=1e-7, err_msg="not deterministic")
    for k, v in tiny_task.final.items():
        assert torch.equal(v, final[k]), f"scores changed the target model's {k}"
    with pytest.raises(DistdmError):
        method.scores(x[:, :5], y)  # inputs of the wrong shape
    with pytest.raises(DistdmError):
        method.scores(x, y[:-1])  # one label short
    if name not in BASELINES:
        values = first["margin"]
        if values.shape[0] != tiny_task.clusters.n_clusters:
            values = _clusters(Scores(values, "sample", "margin", name), tiny_task)
        rho = metrics.spearman(values, tiny_lco["margin"]).mean
        assert rho > 0.05, f"{name}: Spearman {rho:.3f} with exact retraining: sign convention broken?"
