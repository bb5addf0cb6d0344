"""Unlearning with synsets (DDM Table 4) on the tiny task, against exact retraining."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from distdm.applications.unlearn import (
    forgetting_table,
    parse_clusters,
    save_state,
    synset_variant,
    unlearn,
    unlearn_report,
)
from distdm.cli import app
from distdm.distill import distill
from distdm.errors import DistdmError
from distdm.presets import preset

REMOVED = [3, 17]  # a cluster of class 1 (81 samples) and one of class 5 (58 samples)


@pytest.fixture(scope="module")
def default_synset(tiny_task):
    """A cheaper cousin of the default preset (influence target in the low-rank Hessian metric, rank 50
    instead of 200, 300 instead of 1000 steps): the same kind of synset in a third of the time."""
    cfg = preset("default", epochs=tiny_task.schedule.epochs)[0].replace(hessian_rank=50, iterations=300)
    return distill(tiny_task, cfg, lr=tiny_task.schedule.lr, steps=1)


@pytest.mark.slow
def test_unlearning_lowers_removed_margin_and_keeps_the_rest(tiny_task, default_synset):
    rep = unlearn_report(tiny_task, default_synset, REMOVED)
    orig, new, exact = rep.row("original"), rep.row("unlearned"), rep.row("retrained")
    print("\n" + rep.to_markdown())
    # Measured (torch 2.13, CPU): removed-sample margin 3.31 -> 2.29 (exact retraining: -0.77),
    # accuracy on removed samples 0.986 -> 0.871 (exact 0.453), kept accuracy 0.978 -> 0.975
    # (the full default preset: 3.31 -> 2.33, 0.986 -> 0.899, 0.978 -> 0.978).
    # The claim that holds: the removed clusters' margin falls clearly, in the direction of exact
    # retraining but short of it (one influence step), while kept and test accuracy stay put.
    assert exact["margin_removed"] < orig["margin_removed"] - 1.0
    assert new["margin_removed"] < orig["margin_removed"] - 0.5
    assert new["margin_removed"] > exact["margin_removed"]
    assert new["acc_removed"] <= orig["acc_removed"]
    assert abs(new["acc_kept"] - orig["acc_kept"]) <= 0.01
    assert abs(new["acc_test"] - orig["acc_test"]) <= 0.02
    assert abs(new["margin_kept"] - orig["margin_kept"]) < 0.3
    assert rep.n_removed == int(sum((tiny_task.clusters.assignment == k).sum() for k in REMOVED))
    # the returned state is the one `unlearn` computes
    alone = unlearn(tiny_task, default_synset, REMOVED)
    assert all(torch.allclose(alone[k], rep.state[k]) for k in alone)


@pytest.mark.slow
def test_reverse_matching_forgets_more_than_standard_matching(tiny_task):
    """Table 4 on the tiny task: at a tenth of the paper's online lr, fine-tuning on the whole reverse
    synset drives test accuracy towards theta_0 (measured 0.95 -> 0.26) and the standard-matching
    synset barely moves it (0.95 -> 0.84); at the paper's own lr both collapse (0.19 / 0.10)."""
    syns = {n: synset_variant(tiny_task, n) for n in ("paper", "paper-match")}
    rows = forgetting_table(tiny_task, syns, lr_scales=(0.1,))
    by = {r["synset"]: r for r in rows}
    assert by["paper"]["direction"] == "reverse" and by["paper-match"]["direction"] == "match"
    assert by["paper"]["forgotten"] > by["paper-match"]["forgotten"] + 0.3
    assert by["paper"]["test_acc_after_whole_synset"] < 0.5 * by["paper"]["test_acc_target"]
    for r in rows:
        assert r["test_acc_theta0"] < 0.2 < 0.9 < r["test_acc_target"]


def test_save_state_is_atomic_safetensors(tmp_path, tiny_task):
    path = save_state(tmp_path / "m.safetensors", tiny_task.final, {"removed_clusters": [1, 2]})
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["removed_clusters"] == "[1, 2]"
        for k, v in tiny_task.final.items():
            assert torch.equal(f.get_tensor(k), v)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left
    with pytest.raises(DistdmError, match="safetensors"):
        save_state(tmp_path / "m.pt", tiny_task.final)


@pytest.mark.parametrize(
    "text, fragment",
    [("", "at least one"), ("1,x", "comma-separated"), ("30", "do not exist"), ("2,2", "twice")],
)
def test_parse_clusters_rejects_bad_ids(text, fragment):
    with pytest.raises(DistdmError, match=fragment):
        parse_clusters(text, 30)
    assert parse_clusters("3, 17", 30) == [3, 17]
    with pytest.raises(DistdmError, match="every cluster"):
        parse_clusters([0, 1], 2)


runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A digits run trained for 2 epochs, 2 clusters per class."""
    root = tmp_path_factory.mktemp("unlearn") / "run"
    assert runner.invoke(app, ["train", str(root), "--epochs", "2"]).exit_code == 0
    assert runner.invoke(app, ["cluster", str(root), "--per-class", "2"]).exit_code == 0
    return root


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "either --clusters"),
        (["--clusters", "1", "--all"], "either --clusters"),
        (["--clusters", "99"], "do not exist"),
        (["--clusters", "1", "--out", "model.pt"], "--out"),
        (["--clusters", "1", "--preset", "nope"], "--preset"),
        (["--all", "--presets", "paper,nope"], "--presets"),
        (["--all", "--lr-scales", "0,1"], "--lr-scales"),
    ],
)
def test_cli_bad_input_is_one_line(run_dir, args, fragment):
    res = runner.invoke(app, ["unlearn", str(run_dir), *args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


@pytest.mark.slow
def test_cli_unlearn_writes_the_model(run_dir, tmp_path):
    out = tmp_path / "forgot.safetensors"
    res = runner.invoke(
        app, ["unlearn", str(run_dir), "--clusters", "0,5", "--preset", "paper-match", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "retrained" in res.output and "unlearned" in res.output
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["removed_clusters"] == "[0, 5]"
        assert f.metadata()["synset"] == "paper-match"
