"""Robustness of attributions across architectures and initialisations (evaluate --compare)."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from distdm.applications.compare import (
    Variant,
    attribution_matrices,
    compare_heatmaps_png,
    compare_study,
    matrix_similarity,
    parse_variants,
    train_variant,
)
from distdm.cli import app
from distdm.clusters import kmeans_per_class
from distdm.data import TensorData
from distdm.engine import Schedule
from distdm.errors import DistdmError
from distdm.store import RunStore


def test_identical_matrices_agree_perfectly():
    a = np.random.default_rng(0).normal(size=(30, 12))
    sim = matrix_similarity(a, a.copy())
    assert sim == pytest.approx(
        {
            "spearman_flat": 1.0,
            "spearman_per_query": 1.0,
            "top1_agreement": 1.0,
            "top3_overlap": 1.0,
        }
    )
    assert matrix_similarity(a, 3 * a + 1)["spearman_flat"] == pytest.approx(1.0)  # rank-based
    neg = matrix_similarity(a, -a)
    assert neg["spearman_flat"] == pytest.approx(-1.0) and neg["top1_agreement"] == 0.0
    with pytest.raises(DistdmError, match="same"):
        matrix_similarity(a, a[:5])


def test_parse_variants():
    assert parse_variants("mlp,convnet", "mlp") == [Variant("mlp"), Variant("convnet")]
    assert parse_variants("kaiming, xavier", "mlp") == [Variant("mlp", "kaiming"), Variant("mlp", "xavier")]
    got = parse_variants("convnet:normal,mlp@1,:xavier", "vit")
    assert got == [Variant("convnet", "normal"), Variant("mlp", seed=1), Variant("vit", "xavier")]
    assert [v.name for v in got] == ["convnet:normal", "mlp@1", "vit:xavier"]
    for spec, fragment in [("mlp", "two"), ("mlp,foo", "architecture"), ("mlp:he,mlp", "init"),
                           ("mlp,default", "twice"), ("mlp,mlp@x", "seed")]:  # fmt: skip
        with pytest.raises(DistdmError, match=fragment):
            parse_variants(spec, "mlp")


@pytest.fixture(scope="module")
def small():
    """300 digits, 2 clusters per class, 5 queries, a 3-epoch schedule."""
    from distdm.data import load_digits

    d = load_digits()
    data = TensorData(d.x_train[:300], d.y_train[:300], d.x_test, d.y_test, 10, "digits-300")
    clusters = kmeans_per_class(data.x_train, data.y_train, 2, seed=0, n_init=2)
    return data, clusters, (d.x_test[:5], d.y_test[:5]), Schedule(epochs=3, lr=0.1, batch_size=32, seed=0)


def test_class_matrix_is_the_sum_of_its_clusters_and_runs_are_deterministic(small):
    data, clusters, (x, y), sched = small
    task = train_variant(data, Variant("mlp", "xavier"), sched, clusters, model_kwargs={"hidden": (16,)})
    m = attribution_matrices(task, "grad-dot", x, y)
    assert m["class"].values.shape == (10, 5) and m["cluster"].values.shape == (20, 5)
    summed = np.zeros((10, 5))
    np.add.at(summed, clusters.cluster_class, m["cluster"].values)
    assert np.allclose(summed, m["class"].values)
    again = train_variant(data, Variant("mlp", "xavier"), sched, clusters, model_kwargs={"hidden": (16,)})
    m2 = attribution_matrices(again, "grad-dot", x, y)
    same = matrix_similarity(m["cluster"].values, m2["cluster"].values)
    assert same["spearman_flat"] == pytest.approx(1.0)


def test_compare_study_and_cache(small, tmp_path):
    data, clusters, q, sched = small
    store = RunStore(tmp_path / "run")
    variants = [Variant("mlp"), Variant("mlp", "normal"), Variant("logreg")]
    comp = compare_study(
        data, variants, sched, clusters, q, model_kwargs={"mlp": {"hidden": (16,)}}, store=store
    )
    assert set(comp.matrices) == {"mlp", "mlp:normal", "logreg"}
    assert len(comp.rows) == 2 * 3  # two levels x three pairs
    for r in comp.rows:
        assert -1.0 <= r["spearman_flat"] <= 1.0 and 0.0 <= r["top1_agreement"] <= 1.0
    assert comp.accuracy["mlp"] > 0.5 and comp.accuracy["logreg"] > 0.5  # normal (std 0.02) learns slowly
    assert all(0.0 <= a <= 1.0 for a in comp.accuracy.values())
    png = compare_heatmaps_png(comp, clusters, q[1].numpy())
    assert png[:4] == b"\x89PNG"
    # the trained variants are cached in the run store and reused
    cached = train_variant(data, Variant("logreg"), sched, clusters, store=store)
    fresh = train_variant(data, Variant("logreg"), sched, clusters)
    diff = {k: float((cached.final[k] - fresh.final[k]).abs().max()) for k in fresh.final}
    assert max(diff.values()) == 0.0, diff


def test_the_study_caches_each_variant_once_through_the_store_and_gives_the_same_numbers(
    small, tmp_path, monkeypatch
):
    import distdm.applications.compare as compare
    from distdm.store import COMPARE_VARIANT

    data, clusters, q, sched = small
    variants = [Variant("mlp", "xavier"), Variant("logreg")]
    kw = {"model_kwargs": {"mlp": {"hidden": (16,)}}}
    uncached = compare_study(data, variants, sched, clusters, q, **kw)
    store = RunStore(tmp_path / "run")
    first = compare_study(data, variants, sched, clusters, q, store=store, **kw)
    entries = store.index(COMPARE_VARIANT)  # one cached result per variant, named after it
    assert [r.info["variant"] for r in entries] == ["logreg", "mlp:xavier"]
    assert [r.name.split("/")[1].rsplit("-", 1)[0] for r in entries] == ["logreg", "mlp-xavier"]
    assert entries[1].identity["kwargs"] == {"hidden": [16]} and entries[1].identity["seed"] == 0

    def no_training(*args, **kwargs):
        raise AssertionError("a cached variant was trained again")

    monkeypatch.setattr(compare, "train_variants", no_training)
    second = compare_study(data, variants, sched, clusters, q, store=store, **kw)
    for comp in (first, second):
        assert comp.accuracy == uncached.accuracy and comp.rows == uncached.rows
        for v in uncached.matrices:
            for level, m in uncached.matrices[v].items():
                assert np.array_equal(comp.matrices[v][level], m), (v, level)
    with pytest.raises(AssertionError, match="trained again"):  # other settings are not the cached ones
        compare_study(data, variants[:1] + [Variant("logreg", seed=3)], sched, clusters, q, store=store, **kw)


runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A digits run trained for 2 epochs, 2 clusters per class."""
    root = tmp_path_factory.mktemp("compare") / "run"
    assert runner.invoke(app, ["train", str(root), "--epochs", "2"]).exit_code == 0
    assert runner.invoke(app, ["cluster", str(root), "--per-class", "2"]).exit_code == 0
    return root


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--compare", "mlp"], "two variants"),
        (["--compare", "mlp,nonet"], "nonet"),
        (["--compare", "mlp,xavier", "--compare-method", "nope"], "nope"),
    ],
)
def test_cli_bad_input_is_one_line(run_dir, args, fragment):
    res = runner.invoke(app, ["evaluate", str(run_dir), *args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


def test_cli_compare_writes_table_and_figure(run_dir):
    res = runner.invoke(app, ["evaluate", str(run_dir), "--compare", "mlp,xavier", "--queries", "5"])
    assert res.exit_code == 0, res.output
    assert "spearman_flat" in res.output and "mlp:xavier" in res.output
    assert list((run_dir / "figures").glob("compare-grad-dot-*.png"))
