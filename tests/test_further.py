"""The final-model-only gold standard (further training) and the agreement study."""

import numpy as np
import pytest
import torch

from distdm.attribution import further as fmo
from distdm.attribution import make_attributor
from distdm.engine import predict, train_variants
from distdm.errors import DistdmError
from distdm.objectives import margin
from distdm.store import RunStore


def test_zero_epochs_give_zero_attributions(tiny_task, queries):
    x, y = queries
    ft = make_attributor("further-training", epochs=0, seeds=2).fit(tiny_task)
    s = ft.scores(x, y, "margin")
    assert s.values.shape == (tiny_task.clusters.n_clusters, 20)
    assert np.array_equal(s.values, np.zeros_like(s.values))
    assert not np.array_equal(
        make_attributor("further-training", epochs=1, seeds=1).fit(tiny_task).scores(x, y).values,
        np.zeros_like(s.values),
    )


def test_gold_is_mean_over_seeds_of_removed_minus_full(tiny_task, queries):
    # by hand: every variant trained alone (loop strategy), from the final model, per seed
    x, y = queries[0][:5], queries[1][:5]
    ft = make_attributor(
        "further-training", epochs=1, seeds=[3, 7], unit="sample", left_out=[4, 900], lr=0.05
    ).fit(tiny_task)
    gold = ft.scores(x, y, "margin").values
    assert np.isnan(gold[0]).all() and np.isfinite(gold[[4, 900]]).all()
    ref = tiny_task.outputs(x)
    per_seed = []
    for seed in (3, 7):
        f = []
        for drop in (None, 4, 900):
            w = torch.ones(1, tiny_task.data.n_train)
            if drop is not None:
                w[0, drop] = 0.0
            st = train_variants(
                tiny_task.model, tiny_task.data.x_train, tiny_task.data.y_train,
                ft.schedule_for(tiny_task, seed), weights=w, init=tiny_task.final, strategy="loop",
            ).states  # fmt: skip
            f.append(margin(predict(tiny_task.model, st, x), ref, y)[0])
        per_seed.append(torch.stack(f))
    mean = torch.stack(per_seed).double().mean(0)
    np.testing.assert_allclose(gold[[4, 900]], (mean[1:] - mean[:1]).numpy(), rtol=1e-4, atol=1e-6)
    assert ft.schedule_for(tiny_task, 3).lr == 0.05 and ft.schedule_for(tiny_task, 3).seed == 3


def test_centring_and_recorded_epochs(tiny_task, queries):
    x, y = queries
    ft = make_attributor("further-training", epochs=2, record=[1, 2], seeds=2, left_out=range(10)).fit(
        tiny_task
    )
    values = ft.objective_values(x, y, "margin")
    assert values.shape == (2, 2, 11, 20)  # epochs, seeds, 1 + left-out units, queries
    centred = ft.gold_from_values(values, epoch=1, centre=True)
    np.testing.assert_allclose(centred.mean(0), 0.0, atol=1e-12)
    plain = ft.gold_from_values(values, epoch=1, n_seeds=1)
    assert np.abs(plain.mean(0)).max() > 1e-6
    with pytest.raises(DistdmError, match="recorded"):
        ft.gold(x, y, epoch=3)
    with pytest.raises(DistdmError, match="n_seeds"):
        ft.gold_from_values(values, n_seeds=3)
    with pytest.raises(DistdmError, match="left_out"):
        make_attributor("further-training", left_out=[0, 999]).fit(tiny_task)
    with pytest.raises(DistdmError, match="record"):
        make_attributor("further-training", epochs=2, record=[5])
    with pytest.raises(DistdmError, match="optimizer"):
        make_attributor("further-training", optimizer="lbfgs")


def test_store_caches_resumes_and_refuses_other_settings(tiny_task, queries, tmp_path, monkeypatch):
    x, y = queries
    store = RunStore(tmp_path / "run")
    settings = dict(epochs=1, seeds=2, chunk_size=8, stage="ft", optimizer="adam")  # 31 variants: 4 chunks
    expected = make_attributor("further-training", **settings).fit(tiny_task).scores(x, y).values

    calls = []
    real = fmo.FurtherTraining._train

    def killed_after_three(self, *args):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(fmo.FurtherTraining, "_train", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        make_attributor("further-training", **settings, store=store).fit(tiny_task)
    assert store.is_done("ft/seed0/chunk2") and not store.is_done("ft/seed0/chunk3")

    def counting(self, *args):
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(fmo.FurtherTraining, "_train", counting)
    calls.clear()
    resumed = make_attributor("further-training", **settings, store=store).fit(tiny_task).scores(x, y).values
    assert len(calls) == 8 - 3  # only the chunks that were not finished
    np.testing.assert_allclose(resumed, expected, rtol=1e-5, atol=1e-7)
    calls.clear()
    again = make_attributor("further-training", **settings, store=store).fit(tiny_task).scores(x, y).values
    assert calls == [] and np.array_equal(again, resumed)
    with pytest.raises(DistdmError, match="epochs"):
        make_attributor("further-training", **{**settings, "epochs": 2}, store=store).fit(tiny_task)


def test_agreement_metrics():
    rng = np.random.default_rng(0)
    gold = rng.normal(size=(12, 4))
    same = fmo.agreement(2.0 * gold, gold)
    np.testing.assert_allclose(same["cosine"], 1.0)
    np.testing.assert_allclose(same["spearman"], 1.0)
    flipped = fmo.agreement(-gold, gold)
    np.testing.assert_allclose(flipped["cosine"], -1.0)
    np.testing.assert_allclose(flipped["spearman"], -1.0)
    monotone = fmo.agreement(np.exp(gold), gold)  # same order, other values
    np.testing.assert_allclose(monotone["spearman"], 1.0)
    assert (monotone["cosine"] < 1.0).all()
    zero = fmo.agreement(gold, np.zeros_like(gold))
    assert np.isnan(zero["cosine"]).all() and np.isnan(zero["spearman"]).all()
    assert fmo.interval(np.array([0.5, 0.5, 0.5])) == (0.5, 0.5, 0.5)
    mean, lo, hi = fmo.interval(np.array([0.0, 1.0, np.nan]))
    assert mean == 0.5 and lo < 0.5 < hi
    with pytest.raises(DistdmError, match="shape"):
        fmo.agreement(gold[:3], gold)


def test_agreement_study_and_figure(tiny_task, queries, tmp_path):
    x, y = queries
    ft = make_attributor("further-training", epochs=2, record=[0, 1, 2], seeds=2).fit(tiny_task)
    methods = {"grad-dot": make_attributor("grad-dot").fit(tiny_task).scores(x, y, "margin")}
    rows = fmo.agreement_study(ft, methods, x, y, "margin", label="sgd")
    assert len(rows) == 3 * 2  # epochs x seed counts (1, 2)
    by = {(r.epochs, r.n_seeds): r for r in rows}
    assert np.isnan(by[0, 2].cosine)  # zero further training: the gold standard is all zero
    # measured: cosine 0.98, Spearman 0.81 after one epoch (Grad-Dot is the first-order picture)
    assert by[1, 2].cosine > 0.8 and by[1, 2].spearman > 0.5
    assert by[1, 2].cosine_lo <= by[1, 2].cosine <= by[1, 2].cosine_hi
    path = fmo.plot_agreement(rows, tmp_path / "agreement.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sample_scores = make_attributor("grad-dot", unit="sample").fit(tiny_task).scores(x, y)
    with pytest.raises(DistdmError, match="unit"):
        fmo.agreement_study(ft, {"per-sample": sample_scores}, x, y)


def test_regression_leave_one_out(diabetes_task):
    d = diabetes_task.data
    x, y = d.x_test[:20], d.y_test[:20]
    left = list(range(0, 40, 2))
    ft = make_attributor(
        "further-training", epochs=1, seeds=4, optimizer="adam", unit="sample", left_out=left
    ).fit(diabetes_task)
    gold = ft.scores(x, y, "squared_error").values
    assert gold.shape == (d.n_train, 20) and np.isfinite(gold[left]).all() and np.isnan(gold[1]).all()
    dot = make_attributor("grad-dot", unit="sample").fit(diabetes_task).scores(x, y, "squared_error")
    (row,) = fmo.agreement_study(ft, {"grad-dot": dot}, x, y, "squared_error", seed_counts=[4])
    # measured: cosine 0.89 (95% interval 0.85-0.92), Spearman 0.83 after one epoch of Adam
    assert row.cosine > 0.6 and row.spearman > 0.5
