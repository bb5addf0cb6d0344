import numpy as np
import pytest
import torch

from distdm.attribution import make_attributor
from distdm.attribution.simple import DIRECTION
from distdm.clusters import penultimate_features
from distdm.data import from_tensors
from distdm.engine import Schedule
from distdm.errors import DistdmError
from distdm.models import build_model
from distdm.task import train_target


def test_random_is_reproducible_and_seeded(tiny_task, queries):
    a = make_attributor("random", seed=3).fit(tiny_task).scores(*queries)
    b = make_attributor("random", seed=3).fit(tiny_task).scores(*queries)
    c = make_attributor("random", seed=4).fit(tiny_task).scores(*queries)
    assert a.values.shape == (tiny_task.clusters.n_clusters, len(queries[1]))
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.allclose(a.values, c.values)


def test_predict_is_minus_the_mean_distance_of_member_predictions(tiny_task, queries):
    x, y = queries
    m = make_attributor("predict").fit(tiny_task)
    p_train = torch.softmax(tiny_task.outputs(tiny_task.data.x_train), -1).double()
    p_q = torch.softmax(tiny_task.outputs(x), -1).double()
    cl = tiny_task.clusters
    expected = np.stack(
        [[-((p_train[cl.members(k)] - p_q[q]) ** 2).sum(1).mean().item() for q in range(len(y))]
         for k in range(cl.n_clusters)]
    )  # fmt: skip
    np.testing.assert_allclose(m.scores(x, y, "dist1").values, expected, atol=1e-9)
    np.testing.assert_allclose(m.scores(x, y, "margin").values, -expected, atol=1e-9)
    # the most similar cluster by prediction belongs to the predicted class for nearly every query
    top = m.scores(x, y, "dist1").top(1).indices[0]
    pred = p_q.argmax(1).numpy()
    assert (cl.cluster_class[top] == pred).mean() >= 0.9


def test_clustering_is_minus_the_distance_to_the_centroid(tiny_task, queries):
    x, y = queries
    m = make_attributor("clustering").fit(tiny_task)
    f_train = penultimate_features(tiny_task.model, tiny_task.data.x_train, state=tiny_task.final)
    f_q = penultimate_features(tiny_task.model, x, state=tiny_task.final)
    cl = tiny_task.clusters
    cent = torch.stack([f_train[cl.members(k)].mean(0) for k in range(cl.n_clusters)])
    expected = -torch.cdist(cent.double(), f_q.double()).numpy()
    np.testing.assert_allclose(m.scores(x, y, "dist2").values, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.scores(x, y, "dist3").values, -expected, rtol=1e-5, atol=1e-5)
    # nearest centroid in feature space lies in the query's class for most queries
    top = m.scores(x, y, "dist1").top(1).indices[0]
    assert (cl.cluster_class[top] == y.numpy()).mean() >= 0.7


def test_clustering_on_inputs_picks_the_cluster_whose_centroid_is_the_query(tiny_task):
    m = make_attributor("clustering", features="input").fit(tiny_task)
    cl = tiny_task.clusters
    xq = torch.stack([tiny_task.data.x_train[cl.members(k)].mean(0) for k in (4, 17)])
    s = m.scores(xq, torch.tensor([0, 0]), "dist1")
    np.testing.assert_array_equal(s.top(1).indices[0], [4, 17])
    np.testing.assert_allclose(s.values[[4, 17], [0, 1]], 0.0, atol=1e-5)


def test_directions_and_bad_settings():
    assert DIRECTION["margin"] == -1.0 and DIRECTION["dist1"] == 1.0 and DIRECTION["dist3"] == -1.0
    with pytest.raises(DistdmError, match="features"):
        make_attributor("clustering", features="pixels")
    rng = np.random.default_rng(0)
    data = from_tensors(rng.standard_normal((30, 3)), rng.standard_normal(30), regression=True)
    task = train_target(build_model("logreg", (3,), 1), data, Schedule(epochs=1), loss="mse")
    with pytest.raises(DistdmError, match="classification"):
        make_attributor("predict").fit(task)
