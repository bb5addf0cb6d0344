"""Privacy of synsets: nearest-real similarity and the membership-inference attack, on closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from distdm.applications.privacy import (
    Standardiser,
    membership_auc,
    nearest_real,
    privacy_figure_png,
    privacy_metrics,
)
from distdm.cli import app
from distdm.data import TensorData
from distdm.errors import DistdmError
from distdm.synset import Synset


def test_nearest_real_closed_form():
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # mean 0, std sqrt(1/2)
    syn = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]])
    near = nearest_real(syn, real)
    s = math.sqrt(2.0)  # 1 / std
    # a copy of real[1]: cosine 1, distance 0
    assert near.cosine[0] == pytest.approx(1.0) and near.distance[0] == pytest.approx(0.0, abs=1e-9)
    assert near.cosine_index[0] == 1 and near.distance_index[0] == 1
    # (2, 0) -> standardised (2s, 0); nearest (s, 0) at distance s; cosine 1 with it
    assert near.distance[1] == pytest.approx(s) and near.distance_index[1] == 0
    assert near.cosine[1] == pytest.approx(1.0)
    # (1, 1) -> (s, s); nearest real at distance sqrt(s^2 + 0) ... e.g. (s, 0): distance s; cosine 1/sqrt2
    assert near.distance[2] == pytest.approx(s)
    assert near.cosine[2] == pytest.approx(1 / math.sqrt(2.0))


def test_constant_features_keep_scale_one():
    real = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    std = Standardiser.fit(real)
    assert std.scale.tolist() == [1.0, 1.0]
    assert std(torch.tensor([[2.0, 2.0]])).tolist() == [[2.0, 0.0]]


def test_membership_auc_is_half_for_unrelated_data_and_one_for_copies():
    g = torch.Generator().manual_seed(0)
    members, non = torch.randn(600, 16, generator=g), torch.randn(600, 16, generator=g)
    noise = torch.randn(200, 16, generator=g)
    assert abs(membership_auc(noise, members, non)["mia_auc"] - 0.5) < 0.06
    copies = membership_auc(members, members, non)
    assert copies["mia_auc"] == pytest.approx(1.0) and copies["mia_tpr_at_5pct_fpr"] == pytest.approx(1.0)
    # copying half of the members: those rank first, the rest like non-members -> AUC about 0.75
    half = membership_auc(members[:300], members, non)["mia_auc"]
    assert abs(half - 0.75) < 0.05


def _data(n: int = 120) -> TensorData:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = torch.arange(n) % 3
    return TensorData(x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :], 3, "toy")


def test_privacy_metrics_of_a_copied_synset():
    data = _data()
    idx = torch.tensor([0, 5, 7])
    syn = Synset(
        data.x_train[idx].clone(), torch.eye(3)[data.y_train[idx]], torch.arange(3), torch.ones(3), 0.1
    )
    m = privacy_metrics(syn, data)
    assert m["n_synthetic"] == 3
    assert m["cos_nearest_mean"] == pytest.approx(1.0) and m["l2_nearest_min"] == pytest.approx(0.0, abs=1e-9)
    assert m["frac_near_copies"] == 1.0
    assert m["test_l2_nearest_median"] > 1.0  # fresh random images are far from the training set
    assert 0.5 < m["mia_auc"] <= 1.0  # 3 of 60 members copied: a small but real leak
    far = privacy_metrics(syn.x + 100.0, data)
    assert far["frac_near_copies"] == 0.0 and far["l2_nearest_min"] > 50


def test_privacy_figure_and_bad_inputs():
    data = _data()
    syn = Synset(data.x_train[:3].clone() + 0.1, torch.eye(3), torch.arange(3), torch.ones(3), 0.1)
    png = privacy_figure_png({"a": syn, "b": syn}, data, np.array([0, 1, 2]))
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    flat = TensorData(
        torch.randn(10, 3), torch.arange(10) % 2, torch.randn(4, 3), torch.arange(4) % 2, 2, "f"
    )
    flat_syn = Synset(torch.randn(2, 3), torch.eye(2), torch.arange(2), torch.ones(2), 0.1)
    assert privacy_figure_png({"a": flat_syn}, flat, np.array([0, 1])) is None
    with pytest.raises(DistdmError, match="NaN"):
        nearest_real(torch.full((1, 2), float("nan")), torch.zeros(3, 2))
    with pytest.raises(DistdmError, match="differ"):
        nearest_real(torch.zeros(1, 3), torch.zeros(3, 2))


runner = CliRunner()


@pytest.mark.parametrize(
    "args, fragment", [(["--presets", "nope"], "--presets"), (["--rows", "0"], "--rows")]
)
def test_cli_bad_input_is_one_line(tmp_path, args, fragment):
    res = runner.invoke(app, ["privacy", str(tmp_path / "run"), *args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


@pytest.mark.slow
def test_cli_privacy_prints_and_draws(tmp_path):
    root = tmp_path / "run"
    assert runner.invoke(app, ["train", str(root), "--epochs", "2"]).exit_code == 0
    assert runner.invoke(app, ["cluster", str(root), "--per-class", "2"]).exit_code == 0
    res = runner.invoke(app, ["privacy", str(root), "--presets", "paper-match", "--rows", "3"])
    assert res.exit_code == 0, res.output
    assert "mia_auc" in res.output
    assert (root / "applications/privacy/nearest-real.png").is_file()


def test_attack_summary_closed_form():
    from distdm.applications.privacy import attack_summary

    sep = attack_summary(np.arange(100.0) + 1000, np.arange(100.0), "a")
    assert sep == {"a_auc": 1.0, "a_tpr_at_1pct_fpr": 1.0, "a_tpr_at_5pct_fpr": 1.0}
    rng = np.random.default_rng(0)
    rand = attack_summary(rng.normal(size=4000), rng.normal(size=4000), "b")
    assert abs(rand["b_auc"] - 0.5) < 0.03 and rand["b_tpr_at_1pct_fpr"] < 0.03
    assert rand["b_tpr_at_1pct_fpr"] <= rand["b_tpr_at_5pct_fpr"]


def test_input_range():
    from distdm.applications.privacy import input_range

    r = input_range(torch.tensor([[-2.0, 0.5], [0.0, 3.0]]), torch.tensor([[0.0, 1.0], [-1.0, 2.0]]))
    assert r["input_min"] == -2.0 and r["input_max"] == 3.0 and r["data_min"] == -1.0 and r["data_max"] == 2.0
    assert r["range_ratio"] == pytest.approx(5 / 3) and r["frac_outside_range"] == pytest.approx(0.5)


def test_loss_attacks_see_copied_members_and_not_copied_strangers(tiny_task):
    from distdm.applications.privacy import loss_attacks

    data = tiny_task.data
    k = tiny_task.clusters.n_clusters

    def removal_copies(x: torch.Tensor, y: torch.Tensor) -> Synset:
        # copies with negated one-hot labels: fine-tuning on them raises their own loss, as a synset
        # that emulates removing them does
        n = (len(x) // k) * k
        return Synset(x[:n].clone(), -torch.eye(10)[y[:n]], torch.arange(n) % k, torch.ones(k), 0.002)

    members = loss_attacks(tiny_task, removal_copies(data.x_train, data.y_train))
    strangers = loss_attacks(tiny_task, removal_copies(data.x_test, data.y_test))
    assert members["target_loss_auc"] == pytest.approx(strangers["target_loss_auc"])  # the model alone
    assert members["ft_delta_auc"] > strangers["ft_delta_auc"] + 0.02
    assert set(members) >= {"ft_delta_tpr_at_1pct_fpr", "ft_loss_auc", "ft_loss_tpr_at_5pct_fpr"}


@pytest.mark.parametrize("how", ["cluster-mean", "gaussian", "between", "noise"])
def test_private_inits_start_from_no_member_within_range(tiny_task, how):
    from distdm.config import DistillConfig
    from distdm.distill_influence import init_inputs

    DistillConfig(target="influence", solver="closed-form", init=how)  # a valid setting
    x, onehot, cl = init_inputs(tiny_task, tiny_task.clusters, 3, 0, how)
    xt = tiny_task.data.x_train
    k = tiny_task.clusters.n_clusters
    assert x.shape == (3 * k, *xt.shape[1:]) and cl.tolist() == np.repeat(np.arange(k), 3).tolist()
    assert onehot.argmax(1).tolist() == np.repeat(tiny_task.clusters.cluster_class, 3).tolist()
    assert float(x.min()) >= float(xt.min()) and float(x.max()) <= float(xt.max())
    d = torch.cdist(x.flatten(1).double(), xt.flatten(1).double()).min(1).values
    assert bool((d > 1e-3).all())  # no synthetic input starts as a copy of a member
    again, _, _ = init_inputs(tiny_task, tiny_task.clusters, 3, 0, how)
    assert torch.equal(x, again)
    other, _, _ = init_inputs(tiny_task, tiny_task.clusters, 3, 1, how)
    assert not torch.equal(x, other)
    if how == "cluster-mean":  # near the cluster's own mean, not the class's
        m0 = xt[torch.as_tensor(tiny_task.clusters.members(0))].mean(0)
        assert float((x[:3] - m0).flatten(1).norm(dim=1).max()) < float(
            (x[:3] - xt.mean(0)).flatten(1).norm(dim=1).min()
        )


def test_between_init_is_the_class_noise_moved_halfway_to_the_cluster_mean(tiny_task):
    from distdm.distill_influence import init_inputs

    xt, ipc = tiny_task.data.x_train, 3
    noise, _, _ = init_inputs(tiny_task, tiny_task.clusters, ipc, 0, "noise")
    between, _, _ = init_inputs(tiny_task, tiny_task.clusters, ipc, 0, "between")
    lo, hi = float(xt.min()), float(xt.max())
    y = np.asarray(tiny_task.data.y_train)
    checked = 0
    for k in range(tiny_task.clusters.n_clusters):
        members = tiny_task.clusters.members(k)
        a, b = noise[k * ipc : (k + 1) * ipc], between[k * ipc : (k + 1) * ipc]
        if len(members) < 5:  # too small to have a mean of its own: the class's draws
            assert torch.equal(a, b)
            continue
        shift = (
            xt[torch.as_tensor(members)].mean(0)
            - xt[torch.as_tensor(np.flatnonzero(y == tiny_task.clusters.cluster_class[k]))].mean(0)
        ) / 2
        free = (a > lo) & (a < hi) & (b > lo) & (b < hi)  # neither draw clipped there
        torch.testing.assert_close((b - a)[free], shift.expand_as(a)[free], rtol=0, atol=1e-5)
        checked += int(free.sum())
    assert checked > 0


def test_unknown_init_is_refused():
    from distdm.config import DistillConfig

    with pytest.raises(DistdmError, match="init"):
        DistillConfig(init="members-copy")
