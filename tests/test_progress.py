"""Progress reporting: one stage per long loop (not one per chunk), done rising monotonically to the
total, for callbacks, the rich bar and the objects that accept `progress`."""

from __future__ import annotations

import pytest
import torch

from distdm.attribution import make_attributor
from distdm.attribution.further import FurtherTraining
from distdm.attribution.retrain import ExactRetrain, leave_one_out_masks, retrain_masks
from distdm.engine import train_variants
from distdm.errors import DistdmError
from distdm.executors import LocalExecutor
from distdm.progress import StageProgress, progress_bar
from distdm.store import RunStore


class Recorder:
    """A progress callback that keeps every call, to check the stages it was told about."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.calls.append((stage, done, total))

    def stages(self) -> list[str]:
        """Stage names in the order they started (a stage starts with done == 0)."""
        return [s for s, d, _ in self.calls if d == 0]

    def check_one_stage(self, stage: str, total: int) -> None:
        """Exactly one stage was reported, named `stage`, with done rising monotonically to `total`."""
        assert self.stages() == [stage], self.calls[:5]
        assert {s for s, _, _ in self.calls} == {stage}
        assert {t for _, _, t in self.calls} == {total}
        done = [d for _, d, _ in self.calls]
        assert done == sorted(done) and done[0] == 0 and done[-1] == total


class NotInProcess:
    """An executor that runs chunks here but, like Ray, takes no callbacks (no `in_process`)."""

    def map(self, fn, items):
        return [fn(i) for i in items]


def test_a_callback_sees_the_start_then_each_advance():
    rec = Recorder()
    with progress_bar(5, "stage a", rec) as bar:
        bar.advance(2)
        bar.advance(0)  # no work, no report
        bar.advance(3)
    assert rec.calls == [("stage a", 0, 5), ("stage a", 2, 5), ("stage a", 5, 5)]


def test_a_stage_passed_down_is_advanced_not_reopened():
    rec = Recorder()
    with progress_bar(4, "outer", rec) as outer:
        for _ in range(2):
            with progress_bar(2, "inner", outer) as inner:
                assert inner is outer
                inner.advance(2)
    rec.check_one_stage("outer", 4)


@pytest.mark.parametrize("progress", [False, None, True])
def test_silent_and_bar_stages_count_without_callbacks(progress):
    with progress_bar(3, "x", progress) as bar:
        assert isinstance(bar, StageProgress)
        bar.advance(3)
        # a stage opened while a rich bar is up shares its display instead of failing
        with progress_bar(1, "y", progress) as inner:
            inner.advance()
    assert bar.done == 3 and inner.done == 1


def test_a_bar_draws_on_stderr_not_stdout(capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    with progress_bar(2, "drawing", True) as bar:
        bar.advance(2)
    out = capsys.readouterr()
    assert out.out == "" and "drawing" in out.err


@pytest.mark.parametrize("bad", ["yes", 3, [1]])
def test_progress_that_is_neither_flag_nor_callable_is_refused_at_construction(bad):
    for make in (
        lambda: ExactRetrain(progress=bad),
        lambda: FurtherTraining(progress=bad),
        lambda: make_attributor("ddm", progress=bad),
    ):
        with pytest.raises(DistdmError, match="progress must be False, True"):
            make()


def test_chunked_training_is_one_stage_in_variant_epochs(mini_task):
    rec = Recorder()
    t = mini_task
    weights = torch.ones(5, t.data.n_train)
    train_variants(
        t.model, t.data.x_train, t.data.y_train, t.schedule, weights=weights, chunk_size=2, progress=rec
    )
    rec.check_one_stage("training", 5 * t.schedule.epochs)


@pytest.mark.parametrize("executor", [None, LocalExecutor(), NotInProcess()], ids=["none", "local", "remote"])
def test_chunked_exact_retrain_reports_one_stage_to_its_total(mini_task, tmp_path, executor):
    """Without and with a store (first computed, then loaded), every chunk advances one stage."""
    masks = leave_one_out_masks(mini_task.clusters.n_clusters)  # 21 rows: 5 chunks of 5 (the last 1)
    total = len(masks) * mini_task.schedule.epochs
    rec = Recorder()
    plain = retrain_masks(mini_task, masks, chunk_size=5, progress=rec, executor=executor)
    rec.check_one_stage("retraining", total)
    store = RunStore(tmp_path / "run")
    for _ in range(2):  # computed chunk by chunk, then every chunk loaded from the store
        rec = Recorder()
        states = retrain_masks(mini_task, masks, chunk_size=5, progress=rec, executor=executor, store=store)
        rec.check_one_stage("retraining", total)
    torch.testing.assert_close(states, plain)


def test_a_resumed_retrain_counts_cached_chunks_at_once(mini_task, tmp_path):
    masks = leave_one_out_masks(mini_task.clusters.n_clusters)[:15]  # 3 chunks of 5
    epochs = mini_task.schedule.epochs
    store = RunStore(tmp_path / "run")
    retrain_masks(mini_task, masks, chunk_size=5, tag="part", store=store)
    store.reset("retrain/part/seed0/chunk1")  # as if killed while chunk 1 was training
    rec = Recorder()
    retrain_masks(mini_task, masks, chunk_size=5, tag="part", progress=rec, store=store)
    rec.check_one_stage("retraining", 15 * epochs)
    # the two cached chunks count at once, then chunk 1 advances epoch by epoch
    assert [d for _, d, _ in rec.calls] == [
        0,
        10 * epochs,
        *[10 * epochs + 5 * e for e in range(1, epochs + 1)],
    ]


def test_exact_over_seeds_and_chunks_is_one_stage(mini_task):
    rec = Recorder()
    k = mini_task.clusters.n_clusters
    ExactRetrain(seeds=[0, 1], chunk_size=8, progress=rec).fit(mini_task)
    rec.check_one_stage("exact retraining", 2 * (k + 1) * mini_task.schedule.epochs)


def test_further_training_over_seeds_and_chunks_is_one_stage(mini_task, tmp_path):
    store = RunStore(tmp_path / "run")
    total = 2 * 6 * 2  # seeds x (1 + 5 left-out clusters) x epochs
    for _ in range(2):  # trained, then loaded from the store
        rec = Recorder()
        ft = FurtherTraining(epochs=2, seeds=2, left_out=range(5), chunk_size=4, progress=rec, store=store)
        ft.fit(mini_task)
        rec.check_one_stage("further training", total)
    assert len(ft.states_[0]) == 2


def test_ddm_fit_reports_distillation_progress(mini_task):
    rec = Recorder()
    ddm = make_attributor(
        "ddm", preset="paper", distill={"iterations": 3, "starts": 2, "step": 1}, progress=rec
    )
    ddm.fit(mini_task)
    rec.check_one_stage("distilling", 2 * 3)


def test_ddm_fit_reports_influence_distillation_progress(mini_task):
    rec = Recorder()
    make_attributor(
        "ddm", preset="influence-adam", distill={"iterations": 4, "hessian_rank": 5}, progress=rec
    ).fit(mini_task)
    assert "distilling (influence target)" in rec.stages()
    done = [d for s, d, _ in rec.calls if s == "distilling (influence target)"]
    assert done == sorted(done) and done[-1] == 4


def test_a_run_passes_its_progress_to_training_and_to_attributors(digits, tmp_path):
    from distdm import Run
    from distdm.config import ClusterConfig, TrainConfig

    rec = Recorder()
    run = Run(tmp_path / "run", digits, "logreg", train=TrainConfig(epochs=2), progress=rec)
    run.train()
    assert rec.stages() == ["training"]
    run.cluster(ClusterConfig(per_class=1, n_init=1))
    rec.calls.clear()
    run.attributor("exact", chunk_size=4)
    rec.check_one_stage("exact retraining", 11 * 2)
    rec.calls.clear()
    run.attributor("grad-dot")  # trains nothing: no stage, and it takes no progress setting
    assert rec.calls == []
