"""Settings: the type check by annotation (Literal, Optional, ranges), and the one training schedule
that TrainConfig and the engine's Schedule share."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Literal

import numpy as np
import pytest

from distdm.config import ClusterConfig, DistillConfig, OnlineConfig, Schedule, TrainConfig, describe_type
from distdm.engine import Schedule as EngineSchedule
from distdm.engine import batch_order
from distdm.errors import DistdmError
from distdm.store import RunStore

# --- the type check -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ClusterConfig(kind="spectral"), "ClusterConfig.kind must be one of ['kmeans', 'classwise', "
         "'index'], got 'spectral'"),
        (lambda: DistillConfig(solver="lbfgs"), "DistillConfig.solver must be one of ['adam'"),
        (lambda: DistillConfig(init=3), "DistillConfig.init must be one of ['members', 'means'"),
        (lambda: OnlineConfig(lr="fast"), "OnlineConfig.lr must be a finite number or None, got 'fast'"),
        (lambda: OnlineConfig(lr=float("inf")), "OnlineConfig.lr must be a finite number or None, got inf"),
        (lambda: DistillConfig(hessian_rank=2.5), "DistillConfig.hessian_rank must be an integer or None"),
        (lambda: DistillConfig(soft_labels="yes"), "DistillConfig.soft_labels must be true or false"),
        (lambda: TrainConfig(epochs="3"), "TrainConfig.epochs must be an integer >= 0, got '3'"),
        (lambda: TrainConfig(batch_size=0), "TrainConfig.batch_size must be an integer > 0 or None, got 0"),
        (lambda: ClusterConfig(seed=-2), "ClusterConfig.seed must be an integer >= 0, got -2"),
    ],
)  # fmt: skip
def test_a_literal_optional_or_bounded_setting_of_the_wrong_type_is_refused_by_name(make, message):
    with pytest.raises(DistdmError) as e:
        make()
    assert message in str(e.value)


def test_settings_of_the_right_type_are_kept_and_numpy_numbers_become_python_ones():
    assert OnlineConfig(lr=None).lr is None and OnlineConfig(lr=0.5).lr == 0.5
    assert DistillConfig(hessian_rank=None, solver="closed-form").solver == "closed-form"
    cfg = TrainConfig(epochs=np.int64(3), lr=np.float32(0.5), momentum=1, seed=np.int32(7))
    assert (type(cfg.epochs), type(cfg.lr), type(cfg.momentum), type(cfg.seed)) == (int, float, float, int)
    assert json.loads(json.dumps(cfg.to_dict()))["lr"] == 0.5
    assert describe_type(Literal["a", "b"] | None) == "one of ['a', 'b'] or None"


def test_describe_type_reads_real_annotations():
    real = typing.get_type_hints(Schedule, include_extras=True)
    assert describe_type(real["batch_size"]) == "an integer > 0 or None"
    assert describe_type(real["lr"]) == "a finite number > 0"
    assert describe_type(real["optimizer"]) == "one of ['sgd', 'adam']"
    assert describe_type(real["shuffle"]) == "true or false"


# --- one training schedule --------------------------------------------------------------------------


def test_train_config_is_the_engine_schedule_with_at_least_one_epoch():
    assert EngineSchedule is Schedule and issubclass(TrainConfig, Schedule)
    assert [f.name for f in dataclasses.fields(TrainConfig)] == [f.name for f in dataclasses.fields(Schedule)]
    assert Schedule(epochs=0).epochs == 0  # the engine trains zero epochs (the identity)
    with pytest.raises(DistdmError, match="TrainConfig.epochs must be a finite number > 0"):
        TrainConfig(epochs=0)
    full = TrainConfig(epochs=2, batch_size=None, shuffle=False)  # full batch, samples in order
    assert [[b.tolist() for b in epoch] for epoch in batch_order(4, full)] == [[[0, 1, 2, 3]]] * 2
    # a TrainConfig is usable wherever the engine takes a Schedule, with the same fields and values
    assert dataclasses.asdict(TrainConfig(lr=0.3)) == dataclasses.asdict(Schedule(lr=0.3))


def test_settings_recorded_before_shuffle_existed_load_and_keep_their_identity(tmp_path):
    old = {"epochs": 3, "lr": 0.1, "batch_size": 32, "optimizer": "sgd", "momentum": 0.0,
           "weight_decay": 0.0, "seed": 0}  # fmt: skip
    cfg = TrainConfig.from_dict(old)
    assert cfg.shuffle is True and cfg.to_dict() == old  # the default is not written: same settings
    unshuffled = cfg.replace(shuffle=False)
    assert unshuffled.to_dict() == {**old, "shuffle": False}
    assert TrainConfig.from_dict(json.loads(json.dumps(unshuffled.to_dict()))) == unshuffled
    assert Schedule.from_dict(Schedule(batch_size=None).to_dict()) == Schedule(batch_size=None)
    # a run directory that recorded the old dict accepts the same settings again, and refuses a change
    store = RunStore(tmp_path / "run")
    store.check_config("train", old)
    store.check_config("train", TrainConfig.from_dict(store.config("train")).to_dict())
    with pytest.raises(DistdmError, match="shuffle: stored None, now False"):
        store.check_config("train", unshuffled.to_dict())


def test_schedule_keeps_the_engine_wording_and_train_config_the_settings_wording():
    with pytest.raises(DistdmError, match=r"Schedule\.lr: the learning rate must be a finite number > 0"):
        Schedule(lr=0.0)
    with pytest.raises(DistdmError, match=r"TrainConfig\.lr must be a finite number > 0, got 0\.0"):
        TrainConfig(lr=0.0)
    with pytest.raises(DistdmError, match=r"Schedule\.optimizer must be 'sgd' or 'adam', got 'rmsprop'"):
        Schedule(optimizer="rmsprop")
    with pytest.raises(DistdmError, match=r"Schedule: unknown settings \['learning_rate'\]"):
        Schedule().replace(learning_rate=0.1)
