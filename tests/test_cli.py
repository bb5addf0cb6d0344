"""The `distdm` command: bad input prints one line and exits with status 2, never a traceback."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from distdm.cli import app
from distdm.errors import DistdmError

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


def test_train_again_with_other_settings_says_what_differs(run_dir, monkeypatch):
    import distdm.run

    root = run_dir[0]

    def no_work(*args, **kwargs):
        raise AssertionError("a changed setting must be refused before any data is loaded or trained")

    monkeypatch.setattr(distdm.run, "train_target", no_work)
    monkeypatch.setattr(distdm.run, "load_dataset", no_work)
    monkeypatch.setattr(distdm.run, "make_clusters", no_work)
    result = invoke("train", root, "--epochs", 3)
    assert_user_error(result, "epochs: stored 1, now 3", f"distdm reset {root} train")
    assert_user_error(invoke("cluster", root, "--per-class", 3), "per_class: stored 2, now 3", "reset")
    assert_user_error(invoke("cluster", root, "--kind", "classwise"), "kind: stored 'kmeans'", "reset")
    monkeypatch.undo()
    # the same settings (given again, or not given: the run's own) reuse the stored stages
    again = invoke("train", root)
    assert again.exit_code == 0 and "test accuracy" in again.output, again.output
    assert invoke("train", root, "--epochs", 1, "--batch-size", 64).exit_code == 0
    assert invoke("train", root, "--model", "mlp", "--dataset", "digits").exit_code == 0
    assert "20 clusters" in invoke("cluster", root, "--per-class", 2).output
    assert_user_error(invoke("train", root, "--model", "logreg"), "model")


def test_train_a_run_made_in_python_without_training(tmp_path):
    from distdm.run import Run

    Run(tmp_path / "run", "digits", "mlp")
    assert_user_error(invoke("train", tmp_path / "run", "--epochs", 1), "give its --dataset or --data")
    result = invoke("train", tmp_path / "run", "--dataset", "digits", "--epochs", 1)
    assert result.exit_code == 0, result.output
    assert Run.open(tmp_path / "run").train_config.epochs == 1


def test_train_exclusive_and_missing_user_data(tmp_path):
    data = tmp_path / "d.npz"
    assert_user_error(invoke("train", tmp_path / "r", "--dataset", "digits", "--data", data), "exclusive")
    assert_user_error(invoke("train", tmp_path / "r", "--data", data), "no such file")
    assert_user_error(invoke("train", tmp_path / "r", "--data", tmp_path / "d.csv"), ".npz", ".safetensors")
    assert not (tmp_path / "r").exists()


def test_regression_prints_the_test_mse(tmp_path):
    result = invoke("train", tmp_path / "diabetes", "--dataset", "diabetes", "--epochs", 2, "--lr", 0.01)
    assert result.exit_code == 0, result.output
    assert "test MSE" in result.output and "accuracy" not in result.output


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


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("evaluate", "--seeds", "abc"), ("--seeds must be comma-separated integers", "abc")),
        (("evaluate", "--seeds", "0,-1"), ("--seeds must be distinct seeds >= 0",)),
        (("evaluate", "--methods", "ddm,shapley"), ("unknown method 'shapley' in --methods",)),
        (("evaluate", "--methods", "ddm:fastest"), ("unknown preset 'fastest'",)),
        (("evaluate", "--methods", "grad-dot:paper"), ("only ddm takes a preset",)),
        (("evaluate", "--lds-subsets", 1), ("--lds-subsets must be 0 (no LDS) or >= 2",)),
        (("evaluate", "--queries", 0), ("--queries",)),
        (("evaluate", "--format", "xml"), ("--format must be one of", "markdown")),
        (("evaluate", "--executor", "dask"), ("unknown executor 'dask'",)),
        (("evaluate", "--compare", "mlp,vit", "--compare-method", "shapley"), ("unknown method 'shapley'",)),
        (("evaluate", "--gold", "further-training", "--lr", -1), ("--lr must be a finite number > 0",)),
        (("evaluate", "--gold", "further-training", "--left-out", 0), ("--left-out must be >= 1",)),
        (("evaluate", "--gold", "further-training", "--objective", "top1"), ("unknown objective 'top1'",)),
        (("attribute", "--preset", "fastest"), ("unknown preset 'fastest'",)),
        (("attribute", "--top", 0), ("--top must be >= 1",)),
        (("distill", "--memory-budget", "nan"), ("--memory-budget",)),
        (("diagnose", "--validation-fraction", 1.5), ("--validation-fraction must lie in (0, 1)",)),
        (("diagnose", "--inject-noise", 0.1, "--noise-norm", 0), ("--noise-norm must be",)),
        (("transfer", "--validation-fraction", 0), ("--validation-fraction must lie in (0, 1)",)),
    ],
)
def test_bad_options_are_refused_before_the_run_is_opened(run_dir, monkeypatch, args, fragments):
    import distdm.run

    def opened(*a, **k):
        raise AssertionError("the run was opened before the options were checked")

    monkeypatch.setattr(distdm.run.Run, "open", opened)
    command, *rest = args
    assert_user_error(invoke(command, run_dir[0], *rest), *fragments)


class _FakeRemote:
    """Runs chunks in this process but, like a Ray executor, is not in-process and must be shut down."""

    in_process = False

    def __init__(self):
        self.maps = self.shutdowns = 0

    def map(self, fn, items):
        self.maps += 1
        return [fn(item) for item in items]

    def shutdown(self):
        self.shutdowns += 1


def test_an_executor_made_by_a_command_is_shut_down_when_it_ends(run_dir, tmp_path, monkeypatch):
    from distdm import executors

    made = []

    def get_executor(name=None, address=None):
        made.append(_FakeRemote())
        return made[-1]

    monkeypatch.setattr(executors, "get_executor", get_executor)
    copy = tmp_path / "copy"
    shutil.copytree(run_dir[0], copy)
    common = ("--method", "exact", "--queries", 3, "--objective", "margin", "--executor", "ray")
    # a command that fails after the executor was made (1 kB holds no model) shuts it down too
    assert_user_error(invoke("attribute", copy, *common, "--memory-budget", 0.001), "memory_budget_bytes")
    assert (made[0].maps, made[0].shutdowns) == (0, 1)
    result = invoke("attribute", copy, *common)
    assert result.exit_code == 0, result.output
    assert made[1].maps >= 1 and made[1].shutdowns == 1  # it did the retraining, then was shut down


@pytest.mark.ray
@pytest.mark.slow
def test_ray_started_by_a_command_is_stopped_when_it_ends(run_dir, tmp_path):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    copy = tmp_path / "copy"
    shutil.copytree(run_dir[0], copy)
    common = ("--method", "exact", "--queries", 3, "--objective", "margin", "--executor", "ray")
    result = invoke("attribute", copy, *common)
    assert result.exit_code == 0, (result.output, result.exception)
    assert (copy / "attribution" / "exact-margin-q3s0.safetensors").is_file()
    assert not ray.is_initialized()  # the command's own Ray instance is gone


def test_missing_run_and_stage_before_its_prerequisite(tmp_path):
    from distdm.run import Run

    fresh = tmp_path / "fresh"
    assert_user_error(invoke("cluster", fresh), "no such run", f"create it with `distdm train {fresh}`")
    assert not fresh.exists()  # a command on a missing run leaves nothing behind
    Run(tmp_path / "untrained", "digits", "mlp")
    assert_user_error(invoke("cluster", tmp_path / "untrained"), "no trained model yet", "train")


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
    task = r.task()  # it carries no store: the gold standard below is trained afresh, not read back
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


@pytest.fixture(scope="module")
def evaluated(run_dir, tmp_path_factory):
    """`distdm evaluate` (two cheap methods against 2-seed exact retraining) on a copy of the run; its
    output is not a terminal, so it prints markdown."""
    root = tmp_path_factory.mktemp("evaluate") / "run"
    shutil.copytree(run_dir[0], root)
    args = ("--methods", "grad-dot,random", "--seeds", "0,1", "--lds-subsets", 4, "--queries", 6)
    result = invoke("evaluate", root, *args)
    assert result.exit_code == 0, (result.output, result.exception)
    return root, result


@pytest.mark.slow
def test_evaluate_prints_an_unwrapped_markdown_table_and_explains_every_column(evaluated):
    from distdm.evaluate import COLUMN_HELP

    root, result = evaluated
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:3] == ["method", "dist1_x100", "dist2"] and "drop_at_10" in cols
    for method in ("grad-dot", "random", "noise-ceiling"):
        row = next(line for line in lines if line.startswith(f"| {method} |"))  # one line, however long
        assert row.count("|") == len(cols) + 1
    legend = [line for line in lines if ": " in line and not line.startswith("|")]
    drops = [c for c in cols if c.startswith("drop_at_")]
    for name in [c for c in cols if c not in drops] + [", ".join(drops)]:
        assert sum(line.startswith(f"{name}: ") for line in legend) == 1, name  # explained once
    for key, text in COLUMN_HELP.items():
        assert text in result.stdout, key
    assert "mean over 6 queries [95% Student-t interval" in result.stdout
    assert (root / "evaluation" / "quality.csv").is_file()


@pytest.mark.slow
def test_evaluate_intervals_stay_in_each_metrics_range(evaluated):
    import csv

    root, _ = evaluated
    with open(root / "evaluation" / "quality.csv") as f:
        rows = list(csv.DictReader(f))
    ranges = {"spearman": (-1, 1), "spearman_class": (-1, 1), "pearson": (-1, 1), "lds": (-1, 1),
              "top1_in_top3": (0, 1), "dist3": (1 / 3, 1), "dist1_x100": (0, 200)}  # fmt: skip
    checked = 0
    for r in rows:
        for key, (lo, hi) in ranges.items():
            if r.get(f"{key}_lo") not in (None, "", "nan"):
                low, mean, high = (float(r[f"{key}{end}"]) for end in ("_lo", "", "_hi"))
                assert lo - 1e-9 <= low <= mean <= high <= hi + 1e-9, (r["method"], key)
                checked += 1
    assert checked >= 15


@pytest.mark.slow
def test_evaluate_table_on_a_terminal_fits_its_width(evaluated, monkeypatch):
    import csv
    import io
    import re

    from rich.console import Console

    import distdm.cli

    root, _ = evaluated
    with open(root / "evaluation" / "quality.csv") as f:
        rows = [
            {k: (float(v) if k != "method" else v) for k, v in r.items() if v != ""}
            for r in csv.DictReader(f)
        ]
    for width in (80, 120):
        out = io.StringIO()
        monkeypatch.setattr(distdm.cli, "console", Console(file=out, width=width, force_terminal=True))
        distdm.cli._print_evaluation(rows, "auto")
        text = out.getvalue()
        assert "┃" in text or "│" in text  # a drawn table, not markdown
        visible = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in text.splitlines()]
        assert max(len(line) for line in visible) <= width, max(visible, key=len)
        assert "grad-dot" in text and "noise-ceiling" in text and "lds:" in text


@pytest.mark.slow
def test_evaluate_csv_output_and_an_lds_setting_other_than_the_cached_one(evaluated, monkeypatch):
    import csv
    import io

    import distdm.run

    root, _ = evaluated
    args = ("--methods", "grad-dot,random", "--seeds", "0,1", "--queries", 6)
    result = invoke("evaluate", root, *args, "--lds-subsets", 4, "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["method"] for r in rows] == ["grad-dot", "random", "noise-ceiling"]

    def fitted(*a, **k):
        raise AssertionError("a method was fitted before the LDS settings were checked")

    monkeypatch.setattr(distdm.run.Run, "attributor", fitted)
    refused = invoke("evaluate", root, *args, "--lds-subsets", 6)
    assert_user_error(refused, "--lds-subsets 4", f"distdm reset {root} retrain/lds/seed0")
    assert invoke("reset", root, "retrain/lds/seed0").exit_code == 0
    monkeypatch.undo()
    again = invoke("evaluate", root, *args, "--lds-subsets", 6, "--format", "csv")
    assert again.exit_code == 0, again.output


def test_attribute_names_the_queries_used_and_clamps_top(run_dir):
    root = run_dir[0]
    many = invoke("attribute", root, "--method", "grad-dot", "--queries", 1000, "--top", 1)
    assert many.exit_code == 0, many.output
    assert "--queries 1000 is more than the 360 test samples: using all 360" in many.output
    assert (root / "attribution" / "grad-dot-dist1-q360s0.safetensors").is_file()
    top = invoke("attribute", root, "--method", "grad-dot", "--queries", 2, "--top", 25)
    assert top.exit_code == 0, top.output
    assert "--top 25 is more than the run's 20 clusters: listing all 20" in top.output
    ranks = [line.split("│")[4].strip() for line in top.output.splitlines() if line.count("│") == 9]
    assert ranks == [str(k) for k in range(1, 21)] * 2  # every cluster of both queries, ranked


USER_MODEL = '''
from torch import nn


def build(input_shape, num_classes):
    """A small MLP for flat inputs."""
    return nn.Sequential(nn.Linear(input_shape[0], 16), nn.ReLU(), nn.Linear(16, num_classes))
'''


def _blobs(path, seed=0):
    """Three Gaussian blobs in 8 dimensions: 150 training and 60 test samples, saved as .npz."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = 2.0 * rng.standard_normal((3, 8))
    y_train, y_test = np.arange(150) % 3, np.arange(60) % 3
    x_train = (centers[y_train] + rng.standard_normal((150, 8))).astype(np.float32)
    x_test = (centers[y_test] + rng.standard_normal((60, 8))).astype(np.float32)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


@pytest.mark.slow
def test_user_data_and_model_through_every_stage(tmp_path, monkeypatch):
    from distdm.run import Run

    _blobs(tmp_path / "blobs.npz")
    (tmp_path / "usermodel.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    root = tmp_path / "run"

    def ok(*args):
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.output, result.exception)
        return result.output

    trained = ok("train", root, "--data", tmp_path / "blobs.npz", "--model", "usermodel:build",
                 "--epochs", 6, "--batch-size", 32)  # fmt: skip
    assert "test accuracy" in trained
    assert "6 clusters" in ok("cluster", root, "--per-class", 2)
    assert "distillation diagnostics" in ok("distill", root, "--preset", "paper")
    ok("attribute", root, "--preset", "paper", "--queries", 5, "--objective", "margin")
    ok("attribute", root, "--method", "grad-dot", "--queries", 5)
    assert (root / "attribution" / "ddm-margin-q5s0.safetensors").is_file()
    # reopened without passing the data or the model again
    r = Run.open(root)
    assert r.data.n_train == 150 and len(r.data.y_test) == 60
    assert r.store.is_done("distill-paper") and r.clusters().n_clusters == 6
    assert sum(p.numel() for p in r.model.parameters()) == 8 * 16 + 16 + 16 * 3 + 3
    again = ok("train", root)  # resumes: nothing retrained, the same quality
    assert again.split(":")[1].split(" in ")[0] == trained.split(":")[1].split(" in ")[0]
    # the same file, another content: refused, not silently used
    _blobs(tmp_path / "blobs.npz", seed=1)
    assert_user_error(invoke("attribute", root, "--method", "grad-dot", "--queries", 5), "holds other data")


def test_user_model_given_as_a_file_path(tmp_path):
    _blobs(tmp_path / "blobs.npz")
    (tmp_path / "usermodel.py").write_text(USER_MODEL)
    spec = f"{tmp_path / 'usermodel.py'}:build"
    data = tmp_path / "blobs.npz"
    result = invoke("train", tmp_path / "run", "--data", data, "--model", spec, "--epochs", 2)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "test accuracy" in result.output
    assert_user_error(invoke("train", tmp_path / "r2", "--data", data, "--model", f"{spec}x"), "buildx")


def test_diagnosis_names_the_targets_own_seed_in_words():
    from distdm.applications.diagnose import seeds_text

    assert seeds_text([None]) == "the target's own seed"
    assert seeds_text([3]) == "seed 3"
    assert seeds_text([None, 1, 2]) == "the target's own seed and seeds 1, 2"


@pytest.fixture(scope="module")
def packed(tmp_path_factory, digits):
    """A tiny run (300 digits, MLP 64-16-10, 3 epochs, 2 clusters per class), its pack with a cheap
    synset, the target's weights file, a validation file and a copy of the weights one value off."""
    import numpy as np
    from safetensors.torch import save_file

    from distdm.config import TrainConfig
    from distdm.pack import export_pack
    from distdm.run import Run

    root = tmp_path_factory.mktemp("cli-pack")
    data = root / "d.npz"
    np.savez(data, x_train=digits.x_train[:300].numpy(), y_train=digits.y_train[:300].numpy(),
             x_test=digits.x_test[:40].numpy(), y_test=digits.y_test[:40].numpy())  # fmt: skip
    r = Run(root / "run", data, "mlp", train=TrainConfig(epochs=3, lr=0.1, batch_size=32),
            model_kwargs={"hidden": [16]})  # fmt: skip
    r.train()
    r.cluster(per_class=2, n_init=2)
    pack = export_pack(
        r, root / "pack", distill={"hessian_rank": 20, "input_steps": 6}, labels={3: "round threes"}
    )
    final = {k: v.contiguous() for k, v in r.task().final.items()}
    weights = root / "target.safetensors"
    save_file(final, str(weights))
    other = root / "other.safetensors"
    first = next(iter(final))
    save_file({**final, first: final[first] + 1e-3}, str(other))
    x, y, _ = r.queries(16, seed=3)
    validation = root / "val.npz"
    np.savez(validation, x=x.numpy(), y=y.numpy())
    return r, pack, weights, other, validation, (x, y)


def _target_model(r):
    m = r.model
    m.load_state_dict(r.task().final)
    return m


@pytest.mark.slow
def test_diagnose_from_a_pack_matches_the_python_api(packed):
    import numpy as np
    from safetensors.torch import load_file

    from distdm.pack import load_pack

    r, pack, weights, other, validation, (x, y) = packed
    res = invoke("diagnose", "--pack", pack, "--model", weights, "--validation-file", validation, "--top", 4)
    assert res.exit_code == 0, res.output
    want = load_pack(pack).diagnose(_target_model(r), x, y)
    got = load_file(str(validation.with_suffix(".diagnose.safetensors")))["scores"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # the table lists the 4 most harmful clusters (most negative first), with their pack metadata
    rows = [line.split("│") for line in res.output.splitlines() if line.count("│") == 7]
    assert [int(row[2]) for row in rows] == np.argsort(want, kind="stable")[:4].tolist()
    assert "validation loss" in res.output
    refused = invoke("diagnose", "--pack", pack, "--model", other, "--validation-file", validation)
    assert_user_error(refused, "not those of the target model")
    assert_user_error(invoke("diagnose", "--pack", pack, "--model", weights), "--validation-file")


@pytest.mark.slow
def test_unlearn_from_a_pack_matches_the_python_api(packed, tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from distdm.pack import load_pack

    r, pack, weights, other, _, _ = packed
    out = tmp_path / "forgot.safetensors"
    res = invoke("unlearn", "--pack", pack, "--model", weights, "--cluster", 3, "--out", out)
    assert res.exit_code == 0, res.output
    p = load_pack(pack)
    about = f"removed clusters: 3 (class {p.cluster_class[3]}, n={p.cluster_size[3]}, 'round threes')"
    assert about in res.output
    want = p.unlearn(_target_model(r), [3])
    got = load_file(str(out))
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(got[k], r.task().final[k]) for k in got)  # the clusters' effect is removed
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["removed_clusters"] == "[3]"
    # without --out the weights go beside --model
    assert invoke("unlearn", "--pack", pack, "--model", weights, "--clusters", "0,5").exit_code == 0
    assert (weights.parent / "target-unlearned-0-5.safetensors").is_file()
    assert_user_error(
        invoke("unlearn", "--pack", pack, "--model", other, "--cluster", 3), "not those of the target"
    )
    assert_user_error(invoke("unlearn", "--pack", pack, "--model", weights, "--cluster", 99), "do not exist")
    assert_user_error(invoke("unlearn", r.path, "--pack", pack, "--cluster", 3), "not both")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("transfer", "--fractions", "0.1,x"), ("--fractions must be comma-separated numbers", "0.1,x")),
        (("unlearn", "--clusters", "1,x"), ("--clusters must be comma-separated integers",)),
        (("unlearn", "--cluster", ","), ("--clusters must list at least one integer",)),
        (("unlearn", "--all", "--lr-scales", "1,-2"), ("--lr-scales must be numbers > 0",)),
        (("privacy", "--presets", "paper,paper"), ("--presets names a synset twice",)),
        (("diagnose", "--methods", "grad-dot:paper"), ("only ddm takes a preset",)),
        (("evaluate", "--methods", " , "), ("--methods must list at least one name",)),
    ],
)
def test_every_list_option_is_parsed_by_one_type_before_the_run_is_opened(
    tmp_path, monkeypatch, args, fragments
):
    import distdm.run

    monkeypatch.setattr(distdm.run.Run, "open", lambda *a, **k: pytest.fail("the run was opened first"))
    command, *rest = args
    assert_user_error(invoke(command, tmp_path / "run", *rest), *fragments)


def test_list_options_ignore_spaces_and_empty_items(run_dir, monkeypatch):
    import distdm.run

    seen = {}

    def evaluate(self, methods, queries, **settings):
        seen.update(methods=methods, **settings)
        raise DistdmError("stop here")

    monkeypatch.setattr(distdm.run.Run, "evaluate", evaluate)
    result = invoke(
        "evaluate", run_dir[0], "--methods", " grad-dot, random,", "--seeds", "2, 0", "--queries", 2
    )
    assert_user_error(result, "stop here")
    assert seen["methods"] == ["grad-dot", "random"] and seen["seeds"] == [2, 0]
