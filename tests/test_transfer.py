"""Transferability (DDM Table 7): KL-to-teacher ranking, deletion, knowledge-distilled students."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from distdm.applications.transfer import kd_loss, kd_targets, teacher_kl, train_students, transfer
from distdm.cli import app
from distdm.errors import DistdmError


def test_kd_loss_blends_cross_entropy_and_kl_to_the_teacher():
    g = torch.Generator().manual_seed(0)
    out, teacher = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    t = kd_targets(y, teacher)
    ce = F.cross_entropy(out, y, reduction="none")
    kl = F.kl_div(F.log_softmax(out, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none").sum(
        -1
    )
    torch.testing.assert_close(kd_loss(0.0)(out, t), ce)
    torch.testing.assert_close(kd_loss(1.0)(out, t), kl)
    torch.testing.assert_close(kd_loss(0.3)(out, t), 0.7 * ce + 0.3 * kl)
    assert kd_loss(1.0)(teacher, t).abs().max() < 1e-6  # a student equal to the teacher: no loss
    assert kd_loss(1.0, temperature=2.0)(out, t).shape == (6,)
    with pytest.raises(DistdmError, match="alpha"):
        kd_loss(1.5)
    with pytest.raises(DistdmError, match="temperature"):
        kd_loss(0.5, temperature=0.0)


def test_teacher_kl_is_zero_at_the_teacher_and_positive_elsewhere():
    ref = torch.randn(5, 3)
    y = torch.zeros(5, dtype=torch.long)
    assert teacher_kl(ref.unsqueeze(0), ref, y).abs().max() < 1e-6
    assert (teacher_kl((ref + torch.randn(5, 3)).unsqueeze(0), ref, y) > 0).all()


def test_students_learn_from_the_teacher_on_the_kept_data(tiny_task):
    keep = torch.ones(2, tiny_task.clusters.n_clusters)
    keep[1, tiny_task.clusters.cluster_class == 0] = 0  # drop every cluster of class 0
    (states,) = train_students(tiny_task, keep.numpy(), 0.5, [None])
    from distdm.engine import predict

    out = predict(tiny_task.model, states, tiny_task.data.x_test)
    acc = (out.argmax(-1) == tiny_task.data.y_test).float().mean(-1)
    assert acc[0] > 0.85  # a full-data student is about as good as the teacher
    zeros = tiny_task.data.y_test == 0
    assert (out[1][zeros].argmax(-1) == 0).float().mean() < 0.5  # it cannot learn the deleted class


def test_transfer_returns_sane_numbers(tiny_task):
    res = transfer(tiny_task, ["grad-dot"], fractions=(0.1, 0.5), random_seeds=[0, 1])
    assert set(res.accuracy) == {"grad-dot", "grad-dot (highest removed)", "random"}
    assert res.accuracy["random"].shape == (2, 2, 1) and res.accuracy["grad-dot"].shape == (2, 1, 1)
    for m, acc in res.accuracy.items():
        assert np.all((acc >= 0) & (acc <= 1)), m
        assert np.all(np.abs(res.removed[m] - np.array([[0.1], [0.5]])) < 0.1), (m, res.removed[m])
    assert 0.85 < res.teacher_accuracy <= 1
    assert abs(res.base_accuracy[0] - res.teacher_accuracy) < 0.05  # a full-data student
    assert res.accuracy["random"][1].mean() < res.base_accuracy[0]  # deleting half the data costs
    assert res.scores["grad-dot"].shape == (tiny_task.clusters.n_clusters,)
    md = res.to_markdown()
    assert "| random |" in md and "a = 0.5" in md
    files = res.files()
    assert files["transfer-curve.png"][:4] == b"\x89PNG" and files["transfer.csv"].startswith("method,")


runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--alpha", "1.5"], "alpha must lie in [0, 1]"),
        (["--fractions", "0.5,1"], "fractions must lie in (0, 1)"),
        (["--methods", "nope"], "unknown method 'nope'"),
        (["--random-seeds", "0"], "--random-seeds must be >= 1"),
        (["--student-seeds", "a"], "--student-seeds must be comma-separated integers"),
        (["--methods", "grad-dot"], "no such run"),  # a run that was never made
    ],
)
def test_cli_transfer_rejects_bad_input_in_one_line(tmp_path, args, fragment):
    result = runner.invoke(app, ["transfer", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert "Traceback" not in result.output
