"""The `distdm` command: bad input prints one line and exits with status 2, never a traceback."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from distdm.cli import app

runner = CliRunner()


def invoke(*args: object):
    """Run `distdm ARGS` in-process."""
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> None:
    """Exit status 2, one line on stderr that starts with 'error:' and names the problem, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run trained for 1 epoch and clustered (2 per class); a failed clustering attempt first."""
    root = tmp_path_factory.mktemp("cli") / "run"
    trained = invoke("train", root, "--epochs", 1, "--batch-size", 64)
    too_many = invoke("cluster", root, "--per-class", 1000)
    clustered = invoke("cluster", root, "--per-class", 2)
    return root, trained, too_many, clustered


def test_train_and_cluster_succeed_after_a_failed_attempt(run_dir):
    root, trained, too_many, clustered = run_dir
    assert trained.exit_code == 0, trained.output
    assert "test accuracy" in trained.output and (root / "manifest.json").exists()
    assert_user_error(too_many, "1000 clusters", "lower per_class")
    assert clustered.exit_code == 0, clustered.output  # the failed attempt did not bind its settings
    assert "20 clusters" in clustered.output


def test_methods_lists_the_registry():
    result = invoke("methods")
    assert result.exit_code == 0
    names = {line.split()[0] for line in result.output.splitlines() if line.strip()}
    assert {"ddm", "exact", "grad-dot"} <= names


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("--dataset", "imagenet"), ("unknown dataset 'imagenet'", "digits")),
        (("--model", "gpt"), ("unknown model 'gpt'", "mlp")),
        (("--lr", -1), ("lr must be a finite number > 0", "-1")),
        (("--lr", "nan"), ("lr must be a finite number > 0",)),
        (("--epochs", 0), ("epochs must be a finite number > 0",)),
        (("--batch-size", 0), ("batch_size must be",)),
        (("--seed", -3), ("seed must be an integer >= 0",)),
    ],
)
def test_train_with_bad_settings(tmp_path, args, fragments):
    result = invoke("train", tmp_path / "new", *args)
    assert_user_error(result, *fragments)


def test_train_again_with_other_settings_says_what_differs(run_dir):
    root = run_dir[0]
    assert_user_error(invoke("train", root, "--epochs", 3, "--batch-size", 64), "epochs: stored 1, now 3")
    assert_user_error(invoke("cluster", root, "--per-class", 3), "per_class: stored 2, now 3")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("cluster", "--per-class", 0), ("per_class must be",)),
        (("cluster", "--kind", "spectral"), ("kind must be one of",)),
        (("cluster", "--features", "pixels"), ("features must be one of",)),
        (("distill", "--preset", "fastest"), ("unknown preset 'fastest'",)),
        (("attribute", "--method", "shapley"), ("unknown method 'shapley'", "grad-dot")),
        (("attribute", "--method", "grad-dot", "--objective", "top1"), ("unknown objective 'top1'",)),
        (("attribute", "--method", "grad-dot", "--queries", 0), ("number of queries",)),
        (("attribute", "--method", "exact", "--executor", "dask"), ("unknown executor 'dask'", "ray")),
        (("attribute", "--method", "exact", "--address", "auto"), ("--executor ray",)),
        (("attribute", "--method", "exact", "--memory-budget", -1), ("--memory-budget", "> 0")),
        (("attribute", "--method", "grad-dot", "--executor", "ray"), ("grad-dot trains no models",)),
        (("evaluate", "--gold", "loo"), ("--gold must be exact or further-training",)),
        (("evaluate", "--gold", "further-training", "--unit", "class"), ("--unit must be",)),
        (("evaluate", "--gold", "further-training", "--optimizer", "lbfgs"), ("--optimizer must be",)),
        (("evaluate", "--gold", "further-training", "--epochs", "1,two"), ("--epochs must be", "1,two")),
        (("evaluate", "--gold", "further-training", "--epochs", "-1"), ("--epochs must be integers >= 0",)),
        (("evaluate", "--gold", "further-training", "--seeds", "0,0"), ("--seeds must be distinct",)),
        (
            ("evaluate", "--gold", "further-training", "--unit", "sample", "--methods", "ddm"),
            ("ddm attributes clusters only",),
        ),
    ],
)
def test_bad_options_on_a_run(run_dir, args, fragments):
    command, *rest = args
    assert_user_error(invoke(command, run_dir[0], *rest), *fragments)


def test_stage_before_its_prerequisite(tmp_path):
    assert_user_error(invoke("cluster", tmp_path / "fresh"), "no trained model yet", "train")


def test_not_a_run_directory(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("x")
    assert_user_error(invoke("train", busy, "--epochs", 1), "not empty and has no manifest.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{ half a manif")
    assert_user_error(invoke("cluster", broken), "manifest.json is corrupt")
    (tmp_path / "file").write_text("x")
    assert_user_error(invoke("train", tmp_path / "file", "--epochs", 1), "is a file")


def test_tampered_run_is_refused_naming_the_file(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir[0], copy)
    traj = copy / "trajectory.safetensors"
    traj.write_bytes(traj.read_bytes()[:-16])
    result = invoke("attribute", copy, "--method", "grad-dot", "--queries", 3)
    assert_user_error(result, "trajectory.safetensors", "checksum")


def test_attribute_writes_scores_and_a_heatmap(run_dir):
    root = run_dir[0]
    result = invoke("attribute", root, "--method", "grad-dot", "--queries", 4, "--objective", "margin")
    assert result.exit_code == 0, result.output
    assert (root / "attribution" / "grad-dot-margin-q4s0.safetensors").is_file()
    assert (root / "figures" / "grad-dot-margin-q4s0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_command_writes_the_html_report(run_dir):
    root = run_dir[0]
    result = invoke("report", root)
    assert result.exit_code == 0, result.output
    text = (root / "report.html").read_text()
    assert '<section id="clusters">' in text and "not computed yet" in text  # no synsets yet


def test_exact_retraining_honours_the_memory_budget(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir[0], copy)
    # 1 kB cannot hold one model: the budget reaches the engine, which says so before training
    result = invoke("attribute", copy, "--method", "exact", "--queries", 3, "--memory-budget", 0.001)
    assert_user_error(result, "memory_budget_bytes=1048 is below the estimated")


@pytest.mark.slow
def test_evaluate_against_further_training(run_dir):
    import csv

    import numpy as np

    from distdm.attribution import make_attributor
    from distdm.attribution.further import agreement
    from distdm.run import Run

    root = run_dir[0]
    args = ("--gold", "further-training", "--methods", "grad-dot,random", "--epochs", "1,2")
    result = invoke("evaluate", root, *args, "--seeds", "0,1", "--queries", 5)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "cosine vs further-training epochs, 2 seeds averaged" in result.output
    out = root / "evaluation"
    stem = "further-agreement-sgd-cluster-margin"
    with open(out / f"{stem}.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2  # methods x epochs x seeds averaged (1, 2)
    assert {(r["method"], r["epochs"], r["n_seeds"]) for r in rows} >= {("grad-dot", "2", "2")}
    assert (out / f"{stem}-cosine.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| random |" in (out / f"{stem}.md").read_text()
    # the same number by hand: further training from the final model without each cluster
    r = Run.open(root)
    x, y, _ = r.queries(5)
    task = r.task()
    task.store = None
    gold = make_attributor("further-training", epochs=1, seeds=[0, 1]).fit(task).scores(x, y).values
    dot = make_attributor("grad-dot").fit(task).scores(x, y).values
    row = next(r for r in rows if (r["method"], r["epochs"], r["n_seeds"]) == ("grad-dot", "1", "2"))
    assert float(row["cosine"]) == pytest.approx(np.mean(agreement(dot, gold)["cosine"]), abs=1e-6)
    assert -1 <= float(row["spearman_lo"]) <= float(row["spearman"]) <= float(row["spearman_hi"]) <= 1

    sample = invoke(
        "evaluate", root, "--gold", "further-training", "--methods", "grad-dot", "--epochs", 1,
        "--seeds", 0, "--queries", 3, "--unit", "sample", "--optimizer", "adam", "--left-out", 6,
    )  # fmt: skip
    assert sample.exit_code == 0, (sample.output, sample.exception)
    assert "6 left-out samples" in sample.output
    assert (out / "further-agreement-adam-sample-margin.csv").is_file()
