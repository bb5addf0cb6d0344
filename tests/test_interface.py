"""The shared attributor contract, run on every registered method (including ones added later) on
the tiny task: `fit` returns the method; `scores` validates its input, returns Scores of the right
shape with finite values, is deterministic and leaves the fitted state as it was (scoring other
queries in between changes nothing); and its margin scores follow the library's sign convention
(score = f(without unit) - f(all)) against exact leave-cluster-out retraining. Settings are typed:
they round-trip through JSON (`to_dict` / `from_dict`), a nonsense or unknown one raises a
DistdmError naming it, and a run records them beside the scores it stores; capabilities are class
attributes that agree with the constructor."""

import inspect
import json

import numpy as np
import pytest
import torch

from distdm import metrics
from distdm.attribution import ATTRIBUTORS, make_attributor
from distdm.attribution.base import Attributor, accepts
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
    # the scores of the queries' mean objective are the mean of the scores (one solve where linear)
    mean = method.mean_scores(x, y, "loss")
    full = method.scores(x, y, "loss").values
    assert mean.values.shape == (full.shape[0], 1)
    tol = 1e-3 * float(np.abs(full).max()) + 1e-9  # CG and LiSSA solve only to a tolerance
    np.testing.assert_allclose(mean.values[:, 0], full.mean(1), atol=tol, err_msg=name)
    # fitting leaves the settings as they were, and they make an equal unfitted method
    assert method.to_dict() == make_attributor(name, **CHEAP.get(name, {})).to_dict()
    assert not hasattr(Attributor.from_dict(method.to_dict()), "task_")


# settings: typed, JSON round-trip, refused when nonsense, recorded beside results ------------------

# settings other than the defaults, per method (a method added later is checked at its defaults)
CHANGED = {
    "grad-dot": {"unit": "sample", "params": ["fc.weight"], "chunk": 64},
    "grad-cos": {"expansion": "linear", "cache_grads": False},
    "tracin": {"checkpoints": [0, -1], "unit": "sample"},
    "if-exact": {"damping": 0.1, "max_params": 500, "params": "last"},
    "if-cg": {"damping": 0.1, "unit": "sample", "max_iter": 7, "tol": 1e-3, "curvature": "ggn"},
    "if-lissa": {"depth": 20, "batch_size": None, "scale": 50.0, "repeat": 2, "seed": 3},
    "if-arnoldi": {"n_iters": 30, "top_p": 5, "hessian_samples": 100},
    "if-ekfac": {"damping": None, "fisher": "empirical"},
    "fastif": {"k": 5, "depth": 20},
    "exact": {"seeds": [0, 1], "unit": "sample", "chunk_size": 8},
    "further-training": {"epochs": 2, "record": [2, 1], "seeds": [3, 4], "left_out": np.arange(3)},
    "random": {"seed": 7},
    "clustering": {"features": "input"},
    "ddm": {"preset": "paper", "online": {"perturbations_per_cluster": 8}, "clusters": "index"},
}


@pytest.mark.parametrize("name", sorted(ATTRIBUTORS))
def test_settings_round_trip_through_json(name):
    cls = ATTRIBUTORS[name]
    for settings in ({}, CHANGED.get(name, {})):
        method = make_attributor(name, **settings)
        d = method.to_dict()
        assert d["method"] == name and set(d["settings"]) == set(cls.Args.names())
        text = json.dumps(d, allow_nan=False)  # plain JSON: no tuples, arrays or configs left
        again = Attributor.from_dict(json.loads(text))
        assert type(again) is cls and not hasattr(again, "task_")
        assert again.to_dict() == d and again.args == method.args
        assert cls.from_dict(json.loads(text)).args == method.args
        for key in settings:  # each setting reads as an attribute
            assert key in d["settings"] and hasattr(method, key)
        if settings:
            assert d != make_attributor(name).to_dict(), "the changed settings were not recorded"


def test_settings_are_kept_as_given_and_resolved_where_used():
    ft = make_attributor("further-training", seeds=3, record=[2, 1], epochs=2, left_out=np.arange(2))
    assert ft.args.seeds == 3 and ft.args.record == (2, 1) and ft.args.left_out == (0, 1)
    assert ft.seeds == [0, 1, 2] and ft.record == [1, 2] and ft.left_out == [0, 1]
    cg = make_attributor("if-cg", damping=0.1, unit="sample")
    assert cg.damping == 0.1 and cg.unit == "sample" and cg.args.max_iter == 100
    cg.unit = "cluster"  # setting a setting checks it again and keeps the record true
    assert cg.to_dict()["settings"]["unit"] == "cluster"
    with pytest.raises(DistdmError, match="unit"):
        cg.unit = "batch"
    with pytest.raises(DistdmError, match="ready synset"):
        make_attributor("ddm", synset=object()).to_dict()  # data, not a setting


def _bad_value_cases():
    for name in sorted(ATTRIBUTORS):
        for field in ATTRIBUTORS[name].Args.names():
            yield name, field


@pytest.mark.parametrize(("name", "field"), list(_bad_value_cases()))
def test_a_nonsense_setting_raises_a_distdm_error_naming_it(name, field):
    with pytest.raises(DistdmError, match=field):
        make_attributor(name, **{field: object()})
    d = make_attributor(name).to_dict()
    d["settings"][field] = {"not": "a setting"}
    with pytest.raises(DistdmError, match=field):
        Attributor.from_dict(d)


@pytest.mark.parametrize("name", sorted(ATTRIBUTORS))
def test_unknown_settings_and_malformed_dicts_are_refused(name):
    with pytest.raises(DistdmError, match="does not take the settings \\['colour'\\]"):
        make_attributor(name, colour="red")
    d = make_attributor(name).to_dict()
    with pytest.raises(DistdmError, match="colour"):
        Attributor.from_dict({"method": name, "settings": {**d["settings"], "colour": "red"}})
    with pytest.raises(DistdmError, match="unknown method"):
        Attributor.from_dict({"method": name + "-not", "settings": {}})
    with pytest.raises(DistdmError, match="'method' and 'settings'"):
        Attributor.from_dict(d["settings"])


@pytest.mark.parametrize("name", sorted(ATTRIBUTORS))
def test_capabilities_are_class_attributes_that_match_the_constructor(name):
    cls = ATTRIBUTORS[name]
    # the constructor takes exactly the settings and the execution keywords, nothing unlisted
    assert set(inspect.signature(cls).parameters) == set(cls.keywords())
    assert not set(cls.execution) & set(cls.Args.names())
    assert all(accepts(name, k) for k in cls.keywords()) and not accepts(name, "colour")
    assert isinstance(cls.trains_models, bool) and isinstance(cls.linear_in_queries, bool)
    assert set(cls.units) <= {"cluster", "sample"} and cls.units[0] == "cluster"
    # a choice of units exactly where there is a `unit` setting
    assert (len(cls.units) > 1) == ("unit" in cls.Args.names())
    method = make_attributor(name)
    assert method.unit == "cluster"
    for unit in cls.units[1:]:
        assert make_attributor(name, unit=unit).unit == unit
    # methods that train models are those that take an executor or a progress bar for it
    assert cls.trains_models == bool({"executor", "progress"} & set(cls.execution))


def test_run_records_the_settings_beside_stored_scores(tmp_path, digits):
    from distdm.config import ClusterConfig, TrainConfig
    from distdm.data import TensorData
    from distdm.run import Run

    small = TensorData(
        digits.x_train[:120], digits.y_train[:120], digits.x_test[:30], digits.y_test[:30], 10, "d120"
    )
    run = Run(tmp_path / "r", small, "mlp", train=TrainConfig(epochs=1, lr=0.1, batch_size=32))
    run.train()
    run.cluster(ClusterConfig(per_class=2, n_init=1))
    x, y, idx = run.queries(4)
    att = run.attributor("grad-dot", unit="sample", params="last")
    run.save_scores(att.scores(x, y, "margin"), idx, attributor=att)
    (entry,) = run.store.index("scores")
    assert entry.identity == att.to_dict()
    assert entry.identity["settings"]["unit"] == "sample"
    on_disk = json.loads((tmp_path / "r" / "manifest.json").read_text())
    rebuilt = Attributor.from_dict(on_disk["results"][entry.name]["identity"])
    assert rebuilt.args == att.args


@pytest.mark.parametrize("name", sorted(ATTRIBUTORS))
def test_attributors_are_equal_by_method_and_settings_and_unhashable(name):
    cls = ATTRIBUTORS[name]
    a, b = make_attributor(name), make_attributor(name)
    assert a == b and not (a != b)
    assert a == Attributor.from_dict(a.to_dict())
    changed = CHANGED.get(name)
    if changed:
        assert make_attributor(name, **changed) != a
        assert make_attributor(name, **changed) == Attributor.from_dict(
            make_attributor(name, **changed).to_dict()
        )
    if "progress" in cls.execution:  # how it runs does not count
        assert make_attributor(name, progress=True) == a
    other = next(n for n in sorted(ATTRIBUTORS) if n != name)
    assert a != make_attributor(other) and a != a.to_dict() and a is not None
    with pytest.raises(TypeError, match="unhashable"):
        hash(a)
    # a setting changed afterwards changes the value
    if "seed" in cls.Args.names():
        b.seed = 12345
        assert a != b


def test_a_fitted_attributor_equals_an_unfitted_one_and_a_ready_synset_only_itself(tiny_task):
    fitted = make_attributor("grad-dot").fit(tiny_task)
    assert fitted == make_attributor("grad-dot")  # fitted state does not count
    with_synset = make_attributor("ddm", synset=object())  # data, not settings: no dict to compare
    assert with_synset == with_synset and with_synset != make_attributor("ddm", synset=object())
    assert with_synset != make_attributor("ddm")
