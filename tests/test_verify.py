"""The trust check: agreement of an answer with exact retraining of a few random clusters, and the
reproducibility of that retraining across seeds, with a verdict and its cost."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import distdm.task
from distdm.attribution import make_attributor
from distdm.clusters import kmeans_per_class
from distdm.data import TensorData
from distdm.engine import Schedule
from distdm.errors import DistdmError
from distdm.intervals import Interval
from distdm.models import build_model
from distdm.scores import Scores
from distdm.store import RunStore
from distdm.task import Task, train_target
from distdm.verify import judge, sign_agreement_per_query, verify


@pytest.fixture(scope="module")
def noisy_task(digits) -> Task:
    """A question without a stable answer: 60 digits, half of the labels replaced at random, an MLP
    trained with a huge learning rate on batches of 8, one cluster per class (K = 10)."""
    n = 60
    y = digits.y_train[:n].clone()
    g = torch.Generator().manual_seed(1)
    flip = torch.rand(n, generator=g) < 0.5
    y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    data = TensorData(digits.x_train[:n], y, digits.x_test, digits.y_test, 10, "digits-60-noisy")
    model = build_model("mlp", data.input_shape, 10, seed=0, hidden=(16,))
    clusters = kmeans_per_class(data.x_train, data.y_train, 1, seed=0, n_init=1)
    return train_target(model, data, Schedule(epochs=5, lr=1.0, batch_size=8, seed=0), clusters)


@pytest.fixture(scope="module")
def exact_scores(mini_task, queries) -> Scores:
    """The exact method's margin scores on the queries (its own seed only)."""
    return make_attributor("exact").fit(mini_task).scores(*queries, "margin")


def _scores(task, name, queries, objective="margin"):
    return make_attributor(name).fit(task).scores(*queries, objective)


def test_exact_agrees_fully_and_random_not_at_all(mini_task, queries, exact_scores):
    exact = verify(mini_task, exact_scores, *queries)
    assert exact.agreement.mean > 0.97 and exact.agreement.low > 0.9
    assert exact.sign_agreement.mean > 0.95
    assert exact.verdict == "trustworthy"
    # a convex model: retraining with another seed agrees with itself
    assert exact.reproducibility.mean > 0.5
    assert exact.models_retrained == 2 * 9 and len(exact.clusters) == 8
    assert len(set(exact.clusters)) == 8 and exact.seeds == [0, 1]

    rnd = verify(mini_task, _scores(mini_task, "random", queries), *queries)
    assert abs(rnd.agreement.mean) < 0.25
    assert rnd.agreement.low < 0 < rnd.agreement.high
    assert 0.35 < rnd.sign_agreement.mean < 0.65  # chance
    assert rnd.verdict == "the method disagrees with retraining"
    # the same clusters and seeds: the exact effects, hence reproducibility, are those of the first check
    assert rnd.reproducibility == exact.reproducibility
    assert "disagrees" in rnd.summary() and "cost:" in rnd.summary()


def test_a_noisy_question_is_reported_as_such(noisy_task, queries):
    v = verify(noisy_task, _scores(noisy_task, "grad-dot", queries), *queries)
    assert v.reproducibility.mean < 0.3 and v.reproducibility.high < 0.5
    assert v.verdict == "the question itself is noisy"
    assert "exact retraining disagrees with itself" in v.explanation


def test_flipped_scores_are_called_opposite(mini_task, queries, exact_scores):
    flipped = dataclasses.replace(exact_scores, values=-exact_scores.values, method="exact-flipped")
    v = verify(mini_task, flipped, *queries)
    assert v.agreement.mean < -0.9 and v.sign_agreement.mean < 0.05
    assert v.verdict == "the method's scores run opposite to retraining"


@pytest.mark.parametrize("m, fragment", [(21, "only 20"), (2, "at least 3"), (-1, "at least 3")])
def test_m_outside_the_clusters_is_refused(mini_task, queries, m, fragment):
    s = Scores(np.zeros((20, len(queries[1]))), "cluster", "margin", "zeros")
    with pytest.raises(DistdmError, match=fragment):
        verify(mini_task, s, *queries, m=m)


def test_bad_scores_and_seeds_are_refused(mini_task, queries):
    with pytest.raises(DistdmError, match="20 clusters, 20 queries"):
        verify(mini_task, Scores(np.zeros((19, 20)), "cluster", "margin", "x"), *queries)
    with pytest.raises(DistdmError, match="two distinct"):
        verify(mini_task, Scores(np.zeros((20, 20)), "cluster", "margin", "x"), *queries, seeds=[0, 0])
    with pytest.raises(DistdmError, match="Scores"):
        verify(mini_task, np.zeros((20, 20)), *queries)


def test_cached_retrains_are_reused_and_the_check_is_stored(mini_task, queries, tmp_path, monkeypatch):
    s = _scores(mini_task, "grad-dot", queries)
    first = verify(mini_task, s, *queries, m=5, draw_seed=3, store=RunStore(tmp_path / "run"))
    assert first.reused == "computed" and first.seconds > 0

    def no_retraining(*args, **kwargs):
        raise AssertionError("retrained although the retrains are cached")

    monkeypatch.setattr(distdm.task.Task, "retrain", no_retraining)
    again = verify(mini_task, s, *queries, m=5, draw_seed=3, store=RunStore(tmp_path / "run"))
    assert again.reused == "cached"
    assert again.agreement == first.agreement and again.reproducibility == first.reproducibility
    # the cost stated is what the retrains cost when computed, not the load
    assert again.seconds == pytest.approx(first.seconds)
    assert "loaded from the run's cache" in again.cost()
    stored = sorted((tmp_path / "run" / "verify").glob("*.json"))
    assert len(stored) == 1
    record = json.loads(stored[0].read_text())
    assert record["verdict"] == again.verdict and record["clusters"] == first.clusters
    assert record["agreement"]["mean"] == pytest.approx(first.agreement.mean)


def test_the_exact_methods_leave_one_out_retrains_are_reused(mini_task, queries, tmp_path, monkeypatch):
    store = RunStore(tmp_path / "run")
    exact = make_attributor("exact", seeds=(0, 1), store=store).fit(mini_task)
    s = exact.scores(*queries, "margin")
    monkeypatch.setattr(distdm.task.Task, "retrain", lambda *a, **k: pytest.fail("retrained"))
    v = verify(mini_task, s, *queries, store=store)
    assert v.reused == "leave-one-out" and "reused the run's leave-one-out retrains" in v.cost()
    # exact averaged over the two seeds the check uses: it agrees with the first seed at least as well
    # as the second seed alone does
    assert v.agreement.mean >= v.reproducibility.mean - 0.05


def test_sign_agreement_and_judge_rules():
    a = np.array([[1.0, -1.0], [2.0, 1.0], [-1.0, 0.5]])
    b = np.array([[3.0, 1.0], [1.0, 0.0], [1.0, 2.0]])
    # query 0: signs agree on units 0, 1, not 2; query 1: unit 1 has no effect and is left out
    np.testing.assert_allclose(sign_agreement_per_query(a, b), [2 / 3, 1 / 2])

    def iv(mean, half=0.1):
        return Interval(mean, mean - half, mean + half, 20)

    assert judge(iv(0.9), iv(0.3))[0] == "the question itself is noisy"
    assert judge(iv(0.4), iv(0.45, half=0.01))[0] == "the question itself is noisy"
    assert judge(iv(0.45), iv(0.52))[0] == "trustworthy"  # at the ceiling retraining allows
    assert judge(iv(0.6), iv(0.9))[0] == "trustworthy"
    assert judge(iv(0.3), iv(0.9))[0] == "partly trustworthy"
    assert judge(iv(0.0), iv(0.9))[0] == "the method disagrees with retraining"
    assert judge(iv(-0.5), iv(0.9))[0] == "the method's scores run opposite to retraining"
    assert judge(iv(0.6, half=0.5), iv(0.9))[0] == "inconclusive"
    assert judge(Interval(0.6, float("nan"), float("nan"), 1), iv(0.9))[0] == "inconclusive"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A run trained for 2 epochs and clustered (2 per class, K = 20) through the CLI."""
    from typer.testing import CliRunner

    from distdm.cli import app

    root = tmp_path_factory.mktemp("verify-cli") / "run"
    runner = CliRunner()
    for args in (["train", root, "--epochs", 2], ["cluster", root, "--per-class", 2]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    return root, lambda *args: runner.invoke(app, [str(a) for a in args])


def test_cli_attribute_prints_the_verdict_and_stores_the_check(cli_run):
    root, invoke = cli_run
    result = invoke("attribute", root, "--method", "grad-dot", "--queries", 6, "--objective", "margin",
                    "--verify", 5)  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    assert "verdict for grad-dot (margin):" in result.output and "cost:" in result.output
    assert "x one training run" in result.output  # the run records what training took
    assert "verdict rules:" in result.output
    assert len(list((root / "verify").glob("grad-dot-margin-m5-*.json"))) == 1
    assert invoke("report", root).exit_code == 0
    section = (
        (root / "report.html").read_text().split('<section id="verification">')[1].split("</section>")[0]
    )
    assert "grad-dot" in section and "verdict rules" in section and "x one training run" in section


def test_run_verify_scores_a_method_by_name_and_refuses_a_bad_m_first(cli_run, monkeypatch):
    from distdm.run import Run
    from distdm.verify import Verification

    root, _ = cli_run
    run = Run.open(root)
    v = run.verify("grad-dot", m=4, draw_seed=1)
    assert isinstance(v, Verification) and v.method == "grad-dot" and v.n_queries == 20
    assert v.train_seconds is not None and v.training_runs is not None and v.training_runs > 0
    monkeypatch.setattr(Run, "attributor", lambda *a, **k: pytest.fail("fitted before checking m"))
    with pytest.raises(DistdmError, match="only 20"):
        run.verify("grad-dot", m=50)


@pytest.mark.slow
def test_cli_evaluate_prints_the_verdict_and_the_report_shows_it(cli_run):
    root, invoke = cli_run
    result = invoke("evaluate", root, "--methods", "random", "--seeds", "0,1", "--lds-subsets", 0,
                    "--queries", 6, "--verify", 5)  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    assert "verdict for random (margin):" in result.output
    assert "reused the run's leave-one-out retrains" in result.output

    assert invoke("report", root).exit_code == 0
    html = (root / "report.html").read_text()
    assert '<section id="verification">' in html and "verdict rules" in html
    assert "random" in html.split('<section id="verification">')[1].split("</section>")[0]


def test_cli_refuses_more_clusters_than_the_run_has_before_fitting(cli_run):
    root, invoke = cli_run
    result = invoke("attribute", root, "--method", "grad-dot", "--queries", 3, "--verify", 21)
    assert result.exit_code == 2 and "only 20" in result.stderr
    result = invoke("evaluate", root, "--methods", "random", "--verify", 2)
    assert result.exit_code == 2 and "at least 3" in result.stderr
