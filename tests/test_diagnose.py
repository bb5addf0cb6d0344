"""Data diagnosis (DDM Table 3) and noisy-data detection (Table 6) on the tiny digits task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from distdm.applications.diagnose import (
    Removal,
    diagnose,
    diagnosis_files,
    removal_keep,
    validation_scores,
    validation_split,
)
from distdm.applications.noise import corrupted_task, detection, flip_labels, inject_noise, noisy_diagnosis
from distdm.attribution import make_attributor
from distdm.cli import app
from distdm.errors import DistdmError


@pytest.fixture(scope="module")
def flipped(digits):
    """20% of the digits training labels flipped (seed 0)."""
    return flip_labels(digits, 0.2, seed=0)


@pytest.fixture(scope="module")
def flipped_task(tiny_task, flipped):
    """The tiny task's model retrained from the same theta_0 on the flipped labels, re-clustered."""
    return corrupted_task(tiny_task, flipped)


@pytest.fixture(scope="module")
def flipped_report(flipped_task, flipped):
    """grad-dot's diagnosis of the flipped task at 10% and 20% removal, 5 random draws."""
    return noisy_diagnosis(flipped_task, flipped, ["grad-dot"], fractions=(0.1, 0.2), random_seeds=range(5))


def test_validation_split_is_a_stratified_partition_of_the_test_set(digits):
    s = validation_split(digits, 0.5, seed=0)
    assert len(np.intersect1d(s.validation, s.test)) == 0
    assert len(s.validation) + len(s.test) == len(digits.y_test)
    counts = np.bincount(digits.y_test[torch.as_tensor(s.validation)].numpy(), minlength=10)
    assert counts.min() >= 15  # 180 validation samples, about 18 per class
    assert np.array_equal(validation_split(digits, 0.5, seed=0).validation, s.validation)
    with pytest.raises(DistdmError, match="validation fraction"):
        validation_split(digits, 1.5)


def test_removal_keep_takes_clusters_in_order_up_to_the_fraction():
    sizes = np.array([10, 20, 30, 40])
    keep = removal_keep(np.array([3, 0, 1, 2]), sizes, 0.5)  # 40 -> 0.4, +10 -> 0.5
    assert keep.tolist() == [0, 1, 1, 0]
    assert removal_keep(np.array([2, 0, 1, 3]), sizes, 0.01).tolist() == [1, 1, 0, 1]  # at least one
    order = np.array([3, 2, 0, 1])
    assert removal_keep(order, sizes, 0.5).tolist() == [1, 1, 1, 0]  # 0.4 is closer than 0.7
    r = Removal.from_orders([order], sizes, [0.01, 0.5], np.array([0, 0, 1, 1]))  # classes {0, 1}, {2, 3}
    assert r.keep[0, 0].tolist() == [1, 1, 1, 0]  # the top-ranked cluster alone
    assert r.keep[1, 0].tolist() == [0, 1, 1, 0]  # balanced: then class 0's first, about half of each
    np.testing.assert_allclose(r.removed[:, 0], [0.4, 0.5])


def test_mean_loss_scores_equal_the_mean_of_per_query_scores(tiny_task, digits):
    """The one-solve path for the mean validation loss gives the per-query scores' mean."""
    x, y = digits.x_test[:40], digits.y_test[:40]
    for name in ("grad-dot", "if-exact", "tracin"):  # (CG stopped by negative curvature is not linear)
        att = make_attributor(name).fit(tiny_task)
        fast = validation_scores(att, x, y)
        slow = att.scores(x, y, "loss").values.mean(1)
        np.testing.assert_allclose(fast, slow, rtol=1e-3, atol=1e-6, err_msg=name)
        # the mean-query mode is left again: the next per-query call is unaffected
        np.testing.assert_allclose(att.scores(x, y, "loss").values.mean(1), slow, rtol=1e-6)
    cos = make_attributor("grad-cos").fit(tiny_task)  # not linear in the queries: the per-query path
    np.testing.assert_allclose(validation_scores(cos, x, y), cos.scores(x, y, "loss").values.mean(1))
    with pytest.raises(DistdmError, match="not linear in the queries"):
        cos.mean_query_products(x, y, "loss")


def test_noise_injection_marks_exactly_the_changed_images(digits):
    c = inject_noise(digits, 0.2, 0.1, seed=3)
    changed = np.flatnonzero((c.data.x_train - digits.x_train).flatten(1).abs().amax(1).numpy() > 0)
    np.testing.assert_array_equal(changed, c.indices)
    assert len(c.indices) == round(0.2 * digits.n_train)
    norms = (c.data.x_train - digits.x_train)[torch.as_tensor(c.indices)].flatten(1).norm(dim=1)
    np.testing.assert_allclose(norms.numpy(), 0.1, rtol=1e-4)
    assert torch.equal(c.data.y_train, digits.y_train)
    assert c.mask.sum() == len(c.indices) and c.mask[c.indices].all()
    np.testing.assert_array_equal(inject_noise(digits, 0.2, 0.1, seed=3).indices, c.indices)
    assert not np.array_equal(inject_noise(digits, 0.2, 0.1, seed=4).indices, c.indices)


def test_label_flips_mark_exactly_the_changed_labels(digits, flipped):
    changed = np.flatnonzero((flipped.data.y_train != digits.y_train).numpy())
    np.testing.assert_array_equal(changed, flipped.indices)  # every picked label differs
    assert flipped.data.y_train.min() >= 0 and flipped.data.y_train.max() < 10
    assert torch.equal(flipped.data.x_train, digits.x_train)
    with pytest.raises(DistdmError, match="fraction"):
        flip_labels(digits, 0.0)
    with pytest.raises(DistdmError, match="norm"):
        inject_noise(digits, 0.2, -1.0)


def test_flagged_clusters_lower_validation_loss_more_often_than_random(flipped_report, flipped):
    """On flipped labels, removing the clusters grad-dot flags lowers validation loss (the predicted
    direction) at 10% and 20% removal; random removal of the same share does so in at most 1 of its
    10 draws x fractions. Detection: AUC >= 0.75 against random's <= 0.65; precision at 10% >= 0.5."""
    rep = flipped_report
    d = rep.diagnosis
    base = d.base_val_loss[0]
    ranked_down = (d.val_loss["grad-dot"][:, 0, 0] < base).mean()
    random_down = (d.val_loss["random"][:, :, 0] < base).mean()
    assert ranked_down == 1.0, d.to_markdown()
    assert random_down <= 0.1, d.to_markdown()
    assert np.all(np.abs(d.removed["grad-dot"] - [[0.1], [0.2]]) < 0.05)
    det = rep.detection
    assert det["grad-dot"].auc >= 0.75 and det["random"].auc <= 0.65, rep.to_markdown()
    assert det["grad-dot"].precision[0] >= 0.5 > det["random"].precision[0]
    assert 0 < det["grad-dot"].recall[0] < det["grad-dot"].recall[1] <= 1
    files = diagnosis_files(d, flipped.data.x_train)
    assert files["diagnose-curve.png"][:4] == b"\x89PNG" and "diagnose-flagged-grad-dot.png" in files
    assert "| grad-dot |" in rep.to_markdown() and d.to_csv().count("\n") == len(d.rows()) + 1


def test_bad_settings_raise_before_any_work(flipped_report, flipped_task):
    with pytest.raises(DistdmError, match="mask"):
        detection(flipped_report.diagnosis, np.zeros(5, dtype=bool))
    with pytest.raises(DistdmError, match="random seed"):
        diagnose(flipped_task, ["grad-dot"], random_seeds=[])
    with pytest.raises(DistdmError, match="fractions must lie"):
        diagnose(flipped_task, ["grad-dot"], fractions=(0.1, 1.0))
    with pytest.raises(DistdmError, match="baseline"):
        diagnose(flipped_task, ["random"])


def test_flagged_grid_handles_non_image_inputs(flipped_report):
    d = flipped_report.diagnosis
    files = diagnosis_files(d, torch.randn(len(d.clusters.assignment), 7))  # 7 features: not an image
    assert files["diagnose-flagged-grad-dot.png"][:4] == b"\x89PNG"
    ranking = d.ranking("grad-dot")
    assert [r["rank"] for r in ranking] == list(range(1, d.clusters.n_clusters + 1))
    assert all(a["score"] <= b["score"] for a, b in zip(ranking, ranking[1:], strict=False))


@pytest.mark.slow
def test_ddm_flags_clusters_whose_removal_lowers_validation_loss(tiny_task, digits):
    """Clean tiny task, exact leave-one-cluster-out retraining: DDM's validation-loss scores rank the
    clusters' exact effects (measured Spearman 0.70), and of the clusters it predicts to lower
    validation loss at least twice the base rate (the share of all clusters, i.e. a random pick)
    really do (measured: 2 of 7 against 0.1; one cluster either way moves this by 0.05-0.1)."""
    from scipy.stats import spearmanr

    from distdm.applications.diagnose import accuracy_and_loss
    from distdm.attribution.retrain import leave_one_out_masks

    s = validation_split(digits)
    xv, yv = s.xy(digits, "validation")
    scores = validation_scores(make_attributor("ddm").fit(tiny_task), xv, yv)
    _, loss = accuracy_and_loss(tiny_task, tiny_task.retrain(leave_one_out_masks(30)), xv, yv)
    lowers = loss[1:] < loss[0]
    flagged = scores < 0
    assert flagged.any()
    assert lowers[flagged].mean() >= 2 * lowers.mean(), (lowers[flagged].mean(), lowers.mean())
    assert spearmanr(scores, loss[1:] - loss[0])[0] >= 0.5


runner = CliRunner()


def _user_error(result, fragment: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--fractions", "0,0.5"], "fractions must lie in (0, 1)"),
        (["--fractions", "a,b"], "--fractions must be comma-separated numbers"),
        (["--inject-noise", "0.2", "--flip-labels", "0.2"], "either --inject-noise or --flip-labels"),
        (["--methods", "nope"], "unknown method 'nope'"),
        (["--methods", "random"], "random removal is always the baseline"),
        (["--random-seeds", "0"], "--random-seeds must be >= 1"),
        (["--retrain-seeds", "x"], "--retrain-seeds must be comma-separated integers"),
    ],
)
def test_cli_diagnose_rejects_bad_input_in_one_line(tmp_path, args, fragment):
    _user_error(runner.invoke(app, ["diagnose", str(tmp_path / "run"), *args]), fragment)


def test_cli_diagnose_on_an_untrained_run_says_what_to_do(tmp_path):
    _user_error(
        runner.invoke(app, ["diagnose", str(tmp_path / "run"), "--methods", "grad-dot"]), "no such run"
    )
    bad = runner.invoke(app, ["diagnose", str(tmp_path / "run"), "--flip-labels", "1.5"])
    _user_error(bad, "--flip-labels must lie in (0, 1)")


@pytest.mark.slow
def test_cli_diagnose_and_transfer_end_to_end(tmp_path):
    """A 3-epoch digits run: diagnose (clean and with flipped labels) and transfer write their tables,
    CSVs and figures into the run directory."""
    root = tmp_path / "run"
    assert runner.invoke(app, ["train", str(root), "--epochs", "3"]).exit_code == 0
    assert runner.invoke(app, ["cluster", str(root), "--per-class", "2"]).exit_code == 0
    common = ["--methods", "grad-dot", "--random-seeds", "2"]
    res = runner.invoke(app, ["diagnose", str(root), *common, "--fractions", "0.1,0.3"])
    assert res.exit_code == 0, res.output
    assert "| grad-dot |" in res.output and "| random |" in res.output
    out = root / "applications" / "diagnose"
    for name in (
        "diagnose.md",
        "diagnose.csv",
        "diagnose.json",
        "diagnose-curve.png",
        "diagnose-flagged-grad-dot.png",
    ):
        assert (out / name).is_file(), name
    res = runner.invoke(app, ["diagnose", str(root), *common, "--flip-labels", "0.2", "--fractions", "0.1"])
    assert res.exit_code == 0, res.output
    assert "AUC" in res.output
    assert (root / "applications" / "diagnose-labels0.2-seed0" / "detection.csv").is_file()
    assert (root / "corrupted" / "labels0.2-seed0" / "manifest.json").is_file()
    res = runner.invoke(app, ["transfer", str(root), *common, "--fractions", "0.2"])
    assert res.exit_code == 0, res.output
    assert (root / "applications" / "transfer" / "transfer-curve.png").is_file()


def test_diagnosis_caches_its_retrains_in_the_store_it_is_given(mini_task, tmp_path, monkeypatch):
    """diagnose / noisy_diagnosis with `store=`: the removal retrains and those of a method given by
    name (exact retraining) are cached there, so the same call again retrains nothing; no store on
    the task is needed (none is read: nothing warns)."""
    import warnings

    from distdm.store import CHUNKED_JOB, RunStore
    from distdm.task import Task

    few = dict(fractions=(0.2,), random_seeds=[0])
    flip = flip_labels(mini_task.data, 0.2, seed=0)
    ctask = corrupted_task(mini_task, flip)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        d = diagnose(mini_task, ["grad-dot", "exact"], store=RunStore(tmp_path / "run"), **few)
        rep = noisy_diagnosis(ctask, flip, ["grad-dot"], store=RunStore(tmp_path / "noisy"), **few)
    for name in ("run", "noisy"):
        jobs = {r.name for r in RunStore(tmp_path / name).index(CHUNKED_JOB)}
        assert any(j.startswith("retrain/masks-") for j in jobs), (name, jobs)
    assert any(r.name.startswith("retrain/loo/") for r in RunStore(tmp_path / "run").index(CHUNKED_JOB))
    with pytest.raises(DistdmError, match="RunStore"):
        diagnose(mini_task, ["grad-dot"], store=str(tmp_path / "run"), **few)

    monkeypatch.setattr(Task, "retrain", lambda *a, **k: pytest.fail("retrained"))
    again = diagnose(mini_task, ["grad-dot", "exact"], store=RunStore(tmp_path / "run"), **few)
    for m in ("grad-dot", "exact", "random"):
        np.testing.assert_array_equal(again.accuracy[m], d.accuracy[m])
    np.testing.assert_array_equal(again.scores["exact"], d.scores["exact"])
    re_rep = noisy_diagnosis(ctask, flip, ["grad-dot"], store=RunStore(tmp_path / "noisy"), **few)
    np.testing.assert_array_equal(re_rep.diagnosis.val_loss["random"], rep.diagnosis.val_loss["random"])
