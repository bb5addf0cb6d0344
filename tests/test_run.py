"""A Run on a user's own data file, model spec or nn.Module: reopened without passing them again,
theta_0 recorded and reused, changed data refused saying what differs, and the refusals of things a
run cannot be made from (diverged training, one class, no test set) leaving no directory behind."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import distdm
from distdm.clusters import Clusters, kmeans_per_class
from distdm.config import ClusterConfig, TrainConfig
from distdm.data import TensorData, from_tensors
from distdm.engine import Schedule, model_state
from distdm.errors import DistdmError
from distdm.models import build_model
from distdm.run import Run
from distdm.task import Task, train_target

TC = TrainConfig(epochs=2, lr=0.1, batch_size=32)


@pytest.fixture(scope="module")
def small(digits) -> TensorData:
    return TensorData(
        digits.x_train[:200], digits.y_train[:200], digits.x_test[:40], digits.y_test[:40], 10, "d200"
    )


@pytest.fixture
def npz(tmp_path, small):
    path = tmp_path / "mine.npz"
    np.savez(
        path, x_train=small.x_train.numpy(), y_train=small.y_train.numpy(),
        x_test=small.x_test.numpy(), y_test=small.y_test.numpy(),
    )  # fmt: skip
    return path


MODEL_PY = """
from torch import nn

def make(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 8), nn.ReLU(), nn.Linear(8, num_classes))
"""


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "h2_user_model.py"
    path.write_text(textwrap.dedent(MODEL_PY))
    return path


class Net(nn.Module):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# user data files and model specs -----------------------------------------------------------------


def test_run_from_a_data_file_and_a_file_spec_reopens_without_them(tmp_path, npz, model_file):
    run = Run(tmp_path / "r", npz, f"{model_file}:make", train=TC)
    traj = run.train()
    run.cluster(ClusterConfig(per_class=2, n_init=1))
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["configs"]["data"]["source"] == {"file": str(npz.resolve())}
    assert manifest["configs"]["model"]["spec"] == f"{model_file.resolve()}:make"
    assert "accuracy" in run.store.stage_info("train") and "mse" not in run.store.stage_info("train")

    again = Run.open(tmp_path / "r")  # no data, no model: both come from what the run records
    assert again.data.fingerprint() == run.data.fingerprint() and again.clusters().n_clusters == 20
    torch.testing.assert_close(again.trajectory()[-1], traj[-1])
    assert again.task().final.keys() == traj[-1].keys()


def test_a_module_spec_is_recorded_and_rebuilt(tmp_path, npz, model_file, monkeypatch):
    monkeypatch.chdir(model_file.parent)
    run = Run(tmp_path / "r", str(npz), "h2_user_model:make", train=TC)
    run.train()
    assert run.store.config("model")["spec"] == "h2_user_model:make"
    assert Run.open(tmp_path / "r").store.is_done("train")


def test_changed_data_file_is_refused_saying_what_differs(tmp_path, npz, small):
    run = Run(tmp_path / "r", npz, "mlp", train=TC, model_kwargs={"hidden": (8,)})
    run.train()
    stored = run.data.fingerprint()
    np.savez(npz, x_train=small.x_train.numpy() * 2, y_train=small.y_train.numpy())
    with pytest.raises(DistdmError) as e:
        Run.open(tmp_path / "r")
    msg = str(e.value)
    assert "holds other data" in msg and str(npz.resolve()) in msg and f"fingerprint stored {stored}" in msg
    assert f"now {load(npz).fingerprint()}" in msg
    npz.unlink()
    with pytest.raises(DistdmError, match=r"made from the data file .*mine\.npz, which no longer exists"):
        Run.open(tmp_path / "r")


def load(path):
    from distdm.userdata import load_data_file

    return load_data_file(path)


def test_the_same_data_from_another_place_is_accepted(tmp_path, npz, small):
    Run(tmp_path / "r", npz, "mlp", train=TC, model_kwargs={"hidden": (8,)}).train()
    moved = tmp_path / "elsewhere.npz"
    moved.write_bytes(npz.read_bytes())
    assert Run.open(tmp_path / "r", data=moved).store.is_done("train")
    assert Run.open(tmp_path / "r", data=load(npz)).store.is_done("train")  # the same tensors in memory
    other = TensorData(small.x_train[:150], small.y_train[:150], small.x_test, small.y_test, 10)
    with pytest.raises(DistdmError, match="made from other data"):
        Run.open(tmp_path / "r", data=other)


# nn.Modules and theta_0 ----------------------------------------------------------------------------


def test_run_from_an_nn_module_reopens_with_a_fresh_one_and_its_recorded_theta0(tmp_path, small):
    torch.manual_seed(1)
    first = Net()
    theta0 = model_state(first)
    run = Run(tmp_path / "r", small, first, train=TC)
    traj = run.train()
    assert run.store.has("model-init.safetensors")
    with pytest.raises(DistdmError, match=r"made from your own nn.Module \(Net\).*Run.open\(path, model=Net"):
        Run.open(tmp_path / "r", data=small)

    torch.manual_seed(2)
    fresh = Net()  # another random initialisation of the same architecture
    assert not torch.equal(fresh.head.weight, theta0["head.weight"])
    opened = Run.open(tmp_path / "r", data=small, model=fresh)
    for k, v in theta0.items():
        assert torch.equal(fresh.state_dict()[k], v), k  # the recorded theta_0 was loaded into it
    torch.testing.assert_close(opened.trajectory()[0], traj[0])


def test_a_module_of_another_architecture_is_refused_saying_what_differs(tmp_path, small):
    Run(tmp_path / "r", small, Net(8), train=TC).train()
    before = (tmp_path / "r" / "manifest.json").read_bytes()
    with pytest.raises(DistdmError) as e:
        Run.open(tmp_path / "r", data=small, model=Net(9))
    msg = str(e.value)
    assert (
        "another model" in msg
        and "n_params" in msg
        and "head.weight: shape stored (10, 8), now (10, 9)" in msg
    )
    assert (tmp_path / "r" / "manifest.json").read_bytes() == before


SCRIPT = """
import sys, time, torch, distdm
from torch import nn
from distdm.run import Run

class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU())
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.body(x))

d = distdm.load_dataset("digits")
data = distdm.from_tensors(d.x_train[:200], d.y_train[:200], test=(d.x_test[:40], d.y_test[:40]))
run = Run(sys.argv[1], data, MyNet(), train=distdm.TrainConfig(epochs=2, lr=0.1, batch_size=32))
print("cached" if run.store.is_done("train") else "new")
run.train()
run.cluster(per_class=2, n_init=1)
"""


@pytest.mark.slow
def test_rerunning_a_script_with_a_fresh_module_resumes(tmp_path):
    script = tmp_path / "guide.py"
    script.write_text(textwrap.dedent(SCRIPT))
    outs = [
        subprocess.run(
            [sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True, timeout=300
        )
        for _ in range(2)
    ]
    assert [o.returncode for o in outs] == [0, 0], outs[-1].stderr
    assert [o.stdout.strip() for o in outs] == ["new", "cached"]


# refusals -----------------------------------------------------------------------------------------


def test_missing_run_says_how_to_make_one(tmp_path):
    with pytest.raises(DistdmError, match=r"no such run at .*nope: create it with `distdm train`"):
        Run.open(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_diverged_training_is_refused_naming_the_lr_and_leaves_no_run(tmp_path, small):
    with pytest.raises(
        DistdmError, match=r"training diverged at epoch \d+ \(loss (nan|inf)\): lower the lr below 1000"
    ):
        Run(tmp_path / "r", small, "mlp", train=TrainConfig(epochs=3, lr=1000.0, batch_size=32)).train()
    assert not (tmp_path / "r").exists()
    other = TensorData(small.x_train[:150], small.y_train[:150], small.x_test, small.y_test, 10)
    Run(tmp_path / "r", other, "mlp", train=TC).train()  # not "made from other data"
    with pytest.raises(DistdmError, match="training diverged at epoch"):
        train_target(build_model("mlp", (64,), 10, hidden=(8,)), small, Schedule(epochs=2, lr=1e6))


def test_a_failed_first_training_of_an_existing_run_keeps_the_run(tmp_path, small):
    Run(tmp_path / "r", small, "mlp", train=TC, model_kwargs={"hidden": (8,)}).cluster(
        ClusterConfig(per_class=2, features="inputs", n_init=1)
    )
    with pytest.raises(DistdmError, match="diverged"):
        Run(
            tmp_path / "r", small, "mlp", train=TrainConfig(epochs=2, lr=1e6), model_kwargs={"hidden": (8,)}
        ).train()
    assert Run.open(tmp_path / "r", data=small).store.is_done("cluster")  # finished work is never removed


def test_bad_model_or_data_leaves_no_directory(tmp_path, small, npz):
    for model in (nn.Linear(3, 3), "gpt", "no_such_module_h2:make"):
        with pytest.raises(DistdmError):
            Run(tmp_path / "r", small, model, train=TC)
        assert not (tmp_path / "r").exists()
    with pytest.raises(DistdmError, match="does not exist"):
        Run(tmp_path / "r", tmp_path / "absent.npz", "mlp")
    assert not (tmp_path / "r").exists()
    Run(tmp_path / "r", npz, "mlp", train=TC)  # the path is free for other data


def test_single_class_training_data_is_refused(tmp_path, small):
    one = TensorData(small.x_train[:20], torch.zeros(20, dtype=torch.long), small.x_test, small.y_test * 0, 1)
    with pytest.raises(DistdmError, match=r"one class only \(class 0, 20 samples\).*at least two classes"):
        Run(tmp_path / "r", one, "logreg", train=TC)
    assert not (tmp_path / "r").exists()
    with pytest.raises(DistdmError, match="one class only"):
        train_target(build_model("logreg", (64,), 1), one, Schedule(epochs=1))


def test_data_without_a_test_set_trains_and_says_so_when_queried(tmp_path, small):
    data = from_tensors(small.x_train, small.y_train)
    assert data.n_train == 200 and not data.has_test  # nothing moved out of training unasked
    split = from_tensors(small.x_train, small.y_train, test_fraction=0.2)
    assert split.n_train == 160 and len(split.y_test) == 40
    run = Run(tmp_path / "r", data, "mlp", train=TC, model_kwargs={"hidden": (8,)})
    run.train()
    assert "accuracy" not in run.store.stage_info("train")
    with pytest.raises(DistdmError, match="this data has no test set.*pass test="):
        run.queries(5)
    with pytest.raises(DistdmError, match="not both"):
        from_tensors(small.x_train, small.y_train, test=(small.x_test, small.y_test), test_fraction=0.2)


def test_regression_run_trains_with_mse_and_records_test_mse(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 5)).astype(np.float32)
    y = x @ rng.standard_normal(5) + 0.1 * rng.standard_normal(120)
    data = from_tensors(x[:100], y[:100], test=(x[100:], y[100:]), regression=True)
    run = Run(tmp_path / "r", data, "mlp", train=TrainConfig(epochs=20, lr=0.05, batch_size=20))
    run.train()
    info = run.store.stage_info("train")
    assert "accuracy" not in info and info["loss"] == "mse"
    untrained = run.test_quality(run.trajectory()[0])["mse"]
    assert info["mse"] < 0.5 * untrained  # it did learn (cross-entropy on one output would not)
    assert run.loss == "mse"


# Task and Clusters refusals -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(small):
    model = build_model("mlp", small.input_shape, 10, seed=0, hidden=(8,))
    return train_target(model, small, Schedule(epochs=2, lr=0.1, batch_size=32))


def test_task_trajectory_of_numpy_states_is_converted(trained):
    traj = [{k: v.numpy() for k, v in s.items()} for s in trained.trajectory]
    task = Task(trained.model, trained.data, trained.clusters, trained.schedule, traj)
    assert all(torch.is_tensor(v) for s in task.trajectory for v in s.values())
    torch.testing.assert_close(task.final, trained.final)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda t: [v.numpy() for v in t.final.values()], r"trajectory\[0\] is a ndarray, not a state"),
        (lambda t: t.final, "must be a list of states"),
        (lambda t: [], "empty"),
        (lambda t: t.trajectory[:1], "has 1 states but the schedule trains 2 epochs"),
        (lambda t: t.trajectory + t.trajectory[-1:], "has 4 states"),
        (lambda t: [{"w": torch.zeros(2)}] * 3, r"not a state of this model: it lacks"),
        (lambda t: [{k: v[..., :1] for k, v in s.items()} for s in t.trajectory], "has shape"),
    ],
)
def test_task_with_a_bad_trajectory_is_refused(trained, make, match):
    with pytest.raises(DistdmError, match=match):
        Task(trained.model, trained.data, trained.clusters, trained.schedule, make(trained))


def test_task_endpoints_only_are_accepted_and_foreign_weights_warn(trained):
    Task(trained.model, trained.data, trained.clusters, trained.schedule, [trained.init, trained.final])
    other = build_model("mlp", trained.data.input_shape, 10, seed=5, hidden=(8,))
    with pytest.warns(UserWarning, match="neither trajectory"):
        Task(other, trained.data, trained.clusters, trained.schedule, trained.trajectory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Task(trained.model, trained.data, trained.clusters, trained.schedule, trained.trajectory)  # theta_0


def test_clusters_from_lists_are_converted_and_bad_ones_refused(small):
    c = Clusters([0, 1, 1, 0], [3, 5])
    assert c.assignment.dtype == np.int64 and c.sizes().tolist() == [2, 2] and c.indicator().shape == (2, 4)
    assert Clusters(torch.tensor([0, 0]), np.array([1.0])).cluster_class.tolist() == [1]
    for args, match in [
        (([[0, 1]], [0, 1]), r"1-D array of integers, got shape \(1, 2\)"),
        (([0.5, 1.0], [0, 1]), "must be integers, got an array of dtype float64"),
        ((["a"], [0]), "must be integers"),
        (([0, 2], [0, 1]), r"refers to cluster 2, which does not exist"),
        ((None, [0]), "1-D array of integers"),
    ]:
        with pytest.raises(DistdmError, match=match):
            Clusters(*args)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(DistdmError, match="per_class .* must be an integer >= 1"):
            kmeans_per_class(small.x_train, small.y_train, bad)
    with pytest.raises(DistdmError, match="must be an integer >= 1"):
        distdm.index_order(small.y_train, 0)


def test_a_run_made_before_theta0_was_recorded_takes_it_from_the_trajectory(tmp_path, small):
    torch.manual_seed(1)
    Run(tmp_path / "r", small, Net(), train=TC).train()
    # what older runs look like: no model-init artifact, no 'spec' in the model settings
    path = tmp_path / "r" / "manifest.json"
    m = json.loads(path.read_text())
    del m["artifacts"]["model-init.safetensors"]
    del m["configs"]["model"]["spec"]
    path.write_text(json.dumps(m))
    (tmp_path / "r" / "model-init.safetensors").unlink()
    torch.manual_seed(2)
    fresh = Net()
    opened = Run.open(tmp_path / "r", data=small, model=fresh)
    for k, v in opened.trajectory()[0].items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert opened.store.has("model-init.safetensors")  # recorded now, for the next time


def test_reset_of_a_distill_stage_removes_its_synset_and_the_stage_records_the_distillation_cost(
    tmp_path, small
):
    run = Run(tmp_path / "run", small, "mlp", train=TC, model_kwargs={"hidden": (8,)})
    run.train()
    run.cluster(ClusterConfig(per_class=2, n_init=1))
    settings = {"hessian_rank": 5, "input_steps": 2}
    ddm = run.attributor("ddm", distill=settings)
    stage, key = ddm.distill_stage_, ddm.synset_key_
    recorded = run.store.stage_info(stage)
    assert recorded["seconds"] == ddm.recorded_seconds_  # what distilling cost, not the wall time of fit
    assert run.store.has(f"{key}.safetensors")
    run.store.reset(stage)
    assert not run.store.has(f"{key}.safetensors") and not run.store.is_done(stage)
    again = Run.open(tmp_path / "run", data=small).attributor("ddm", distill=settings)
    assert again.synset_key_ == key and again.recorded_seconds_ != recorded["seconds"]  # distilled anew


def test_pipeline_methods_store_what_they_compute_and_return_the_paths(tmp_path, small):
    from safetensors.torch import load_file

    from distdm import metrics

    run = Run(tmp_path / "run", small, "mlp", train=TC, model_kwargs={"hidden": (8,)})
    run.train()
    run.cluster(ClusterConfig(per_class=2, n_init=1))
    x, y, idx = run.queries(5, seed=1)
    s = run.method("grad-dot").scores(x, y, "margin")
    saved = run.save_scores(s, idx, seed=1)
    assert saved["scores"].endswith("attribution/grad-dot-margin-q5s1.safetensors")
    stored = load_file(saved["scores"])
    np.testing.assert_array_equal(stored["scores"].numpy(), s.values)
    assert stored["queries"].tolist() == idx.tolist()
    assert open(saved["heatmap"], "rb").read(4) == b"\x89PNG"
    with pytest.raises(DistdmError, match="only ddm takes a preset"):
        run.method("grad-dot:paper")
    # evaluate: the rows of distdm.evaluate, its files in the run, no check without verify
    out = run.evaluate(["grad-dot", "random"], (x, y), seeds=[0], lds_subsets=0)
    assert [r["method"] for r in out.value.rows][:2] == ["grad-dot", "random"] and out.checks == []
    assert sorted(p.rsplit("/", 1)[1] for p in out.paths) == ["quality.csv", "quality.md", "quality.png"]
    assert all(run.store.has(f"evaluation/{p.rsplit('/', 1)[1]}") for p in out.paths)
    # its Spearman is metrics.spearman of the method's scores against the truth's
    truth = run.attributor("exact", seeds=[0]).scores(x, y, "margin")
    got = [r for r in out.value.rows if r["method"] == "grad-dot"][0]
    assert np.isclose(got["spearman"], metrics.spearman(out.value.scores["grad-dot"]["margin"], truth).mean)


def test_a_run_takes_one_runtime_and_the_separate_keywords_set_entries_of_it(tmp_path, small):
    from distdm.runtime import Runtime

    def report(stage, done, total):
        pass

    rt = Runtime(memory_budget_bytes=2**24, progress=report)
    run = Run(tmp_path / "r", small, "mlp", train=TC, model_kwargs={"hidden": (8,)}, runtime=rt)
    assert run.runtime is rt and run.memory_budget_bytes == 2**24 and run.progress is report
    assert run.device == torch.device("cpu") and run.executor is None
    run.train()
    run.cluster(ClusterConfig(per_class=2, n_init=1))
    task = run.task()  # the task runs as the run does; the stages report their own progress
    assert task.runtime == rt.replace(progress=False)
    # the older keywords still work, one entry each, over the given runtime's
    old = Run.open(tmp_path / "r", data=small, memory_budget_bytes=2**20, progress=True)
    assert old.runtime == Runtime(memory_budget_bytes=2**20, progress=True)
    mixed = Run.open(tmp_path / "r", data=small, runtime=rt, memory_budget_bytes=2**20)
    assert mixed.runtime == rt.replace(memory_budget_bytes=2**20) and mixed.progress is report
    assert Run.open(tmp_path / "r", data=small, runtime=rt).task().memory_budget_bytes == 2**24
    for bad, match in [
        ({"runtime": "cpu"}, "runtime must be a distdm.Runtime"),
        ({"memory_budget_bytes": 0}, "memory_budget_bytes must be a positive integer"),
        ({"executor": object()}, "executor must be None"),
    ]:
        with pytest.raises(DistdmError, match=match):
            Run.open(tmp_path / "r", data=small, **bad)


def test_a_runs_task_carries_no_store_and_its_methods_cache_in_the_run(tmp_path, small, monkeypatch):
    import warnings

    from distdm.store import CHUNKED_JOB

    run = Run(tmp_path / "run", small, "mlp", train=TC, model_kwargs={"hidden": (8,)})
    run.train()
    run.cluster(ClusterConfig(per_class=1, n_init=1))
    assert run.task().store is None
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"Task\(store", category=DeprecationWarning)
        exact = run.attributor("exact", chunk_size=4)  # 11 models: 3 chunks, cached in the run
        assert exact.store is run.store and run.store.is_done("retrain/loo/seed0/chunk2")
        x, y, _ = run.queries(4)
        check = run.verify(exact.scores(x, y, "margin"), x, y, m=5, seeds=[0, 1])
        assert check.reused == "computed"  # seed 0 from exact's retrains, seed 1 retrained now
        assert any(n.startswith("verify/") for n in run.store.manifest["artifacts"])
        # diagnose's removal retrains are cached in the run, a corrupted copy's in its own run
        diagnosed = run.diagnose(["grad-dot"], fractions=[0.2], random_seeds=1).value
        jobs = {r.name for r in run.store.index(CHUNKED_JOB)}
        assert any(n.startswith("retrain/masks-") for n in jobs), jobs
        flipped = run.corruption("labels", 0.2)
        noisy = run.diagnose(["grad-dot"], fractions=[0.2], random_seeds=1, corruption=flipped).value
        sub = run.corrupted(flipped).store
        assert any(r.name.startswith("retrain/masks-") for r in sub.index(CHUNKED_JOB))
        assert {r.name for r in run.store.index(CHUNKED_JOB)} == jobs  # none of them in the clean run
    # a reopened run loads what it cached: nothing is retrained
    monkeypatch.setattr(Task, "retrain", lambda *a, **k: pytest.fail("retrained"))
    again = Run.open(tmp_path / "run", data=small)
    loaded = again.attributor("exact", chunk_size=4).scores(x, y).values
    np.testing.assert_array_equal(loaded, exact.scores(x, y).values)
    assert again.verify(exact.scores(x, y, "margin"), x, y, m=5, seeds=[0, 1]).reused == "leave-one-out"
    redone = again.diagnose(["grad-dot"], fractions=[0.2], random_seeds=1).value
    np.testing.assert_array_equal(redone.accuracy["grad-dot"], diagnosed.accuracy["grad-dot"])
    renoisy = again.diagnose(["grad-dot"], fractions=[0.2], random_seeds=1, corruption=flipped).value
    np.testing.assert_array_equal(renoisy.diagnosis.val_loss["random"], noisy.diagnosis.val_loss["random"])
