"""Trust: a run killed at any moment resumes to the same result, and bad input of every kind raises
DistdmError with a message that says what to change (never another exception, never a corrupt run)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import distdm
from distdm.config import ClusterConfig, DistillConfig, OnlineConfig, TrainConfig
from distdm.data import TensorData, from_tensors
from distdm.engine import Schedule, batch_order, train_variants
from distdm.errors import DistdmError
from distdm.objectives import get_objective
from distdm.presets import preset
from distdm.run import Run
from distdm.store import RunStore

# Crash safety ------------------------------------------------------------------------------------

# A long-lived helper process imports torch once, then forks one worker per request that runs the
# whole pipeline (train, cluster, distil, exact leave-cluster-out sweep cached in chunks) on a run
# directory; the test kills workers with SIGKILL at random moments. Forking a process that has not
# started any thread pool (one torch thread) is safe, and saves the import time on every restart.
PIPELINE = textwrap.dedent(
    """
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    from distdm.config import ClusterConfig, DistillConfig, TrainConfig
    from distdm.data import TensorData, load_dataset
    from distdm.run import Run

    d = load_dataset("digits")
    data = TensorData(d.x_train[:300], d.y_train[:300], d.x_test[:50], d.y_test[:50], 10, "digits-300")

    def pipeline(path):
        run = Run(path, data, "mlp", train=TrainConfig(epochs=5, lr=0.1, batch_size=32),
                  model_kwargs={"hidden": (16,)})
        run.train()
        run.cluster(ClusterConfig(per_class=2, n_init=1))
        run.distill(config=DistillConfig(target="trajectory", starts=2, iterations=5))
        run.attributor("exact", chunk_size=3)  # 21 retrained models in 7 cached chunks

    print("ready", flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                pipeline(line.strip())
            except BaseException as e:
                print(repr(e), file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        print("pid", pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print("exit", status, time.perf_counter() - start, flush=True)
    """
)


def _progress(root: str) -> set[str]:
    """Stages (and cached chunks) the run directory records as done; empty before the first write."""
    try:
        stages = json.loads(Path(root, "manifest.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return set()
    return {k for k, v in stages.items() if v.get("done")}


class Pipeline:
    """The helper process: `run(path, ...)` runs the pipeline once on a run directory, optionally
    killing it with SIGKILL `delay` seconds after `after(progress)` first holds."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PIPELINE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert self._line() == "ready"

    def _line(self) -> str:
        line = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"pipeline helper died (exit code {self.proc.poll()})")
        return line

    def run(
        self, path: str, after: Callable[[set[str]], bool] | None = None, delay: float = 0.0
    ) -> tuple[bool, set[str]]:
        """(whether the worker was killed before it finished, what was done when the kill was sent)."""
        self.proc.stdin.write(path + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        pid = int(self._line().split()[1])
        seen: set[str] = set()
        if after is not None:
            deadline = time.monotonic() + 120
            while not after(seen := _progress(path)) and time.monotonic() < deadline:
                if not _alive(pid):
                    break
                time.sleep(0.005)
            time.sleep(delay)
            seen = _progress(path)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        status = int(self._line().split()[1])
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed or os.WEXITSTATUS(status) == 0, "the pipeline failed on its own (see its stderr)"
        return killed, seen

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(timeout=60)


def _alive(pid: int) -> bool:
    """Whether the worker is still running (it is the helper's child, so it may linger as a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _check_consistent(root: str) -> RunStore:
    """What a later stage would trust is whole: the manifest parses and is well formed, every
    recorded artifact matches its checksum, and every completed stage has its artifacts."""
    store = RunStore(root, create=False)
    for name in store.manifest["artifacts"]:
        store.load_bytes(name)
    needs = {"train": "trajectory.safetensors", "cluster": "clusters.safetensors"}
    for stage in store.manifest["stages"]:
        if not store.is_done(stage):
            continue
        if stage in needs:
            assert store.has(needs[stage]), stage
        if stage.startswith("retrain/") and "/chunk" in stage:
            assert store.has(stage + ".safetensors"), stage
            store.load_tensors(stage)  # and it is a readable safetensors file
        if stage.startswith("distill-"):
            assert any(a.startswith("synset/") for a in store.manifest["artifacts"]), stage
    return store


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_result(tmp_path):
    helper = Pipeline()
    try:
        assert not helper.run(str(tmp_path / "reference"))[0]
        reference = _check_consistent(str(tmp_path / "reference"))
        secs = {k: float(v.get("seconds", 0.0)) for k, v in reference.manifest["stages"].items()}
        chunk = max(v for k, v in secs.items() if "/chunk" in k)
        distill_stage = next(k for k in secs if k.startswith("distill-custom-"))  # named by a digest

        def chunks(done: set[str]) -> int:
            return sum("/chunk" in d for d in done)

        rng = random.Random(7)
        # (what must be done before the kill, how long the stage that runs then takes): a kill at a
        # random moment in every stage, including right as a retraining chunk is recorded
        plan: list[tuple[Callable[[set[str]], bool], float]] = [
            (lambda d: True, rng.uniform(0.0, 1.0) * secs["train"]),
            (lambda d: True, rng.uniform(0.0, 1.0) * secs["train"]),
            (lambda d: "train" in d, rng.uniform(0.0, 1.0) * secs["cluster"]),
            (lambda d: "cluster" in d, rng.uniform(0.0, 1.0) * secs[distill_stage]),
            (lambda d: distill_stage in d, rng.uniform(0.0, 1.0) * chunk),
            (lambda d: chunks(d) >= 2, rng.uniform(0.0, 1.0) * chunk),
            (lambda d: chunks(d) >= 4, 0.0),
        ]
        crashed = str(tmp_path / "crashed")
        landed = []
        for after, delay in plan:
            killed, seen = helper.run(crashed, after, delay)
            if killed:
                landed.append(len(seen))
            if os.path.exists(os.path.join(crashed, "manifest.json")):
                _check_consistent(crashed)  # nothing a later stage trusts is half-written
        # the kills landed in different stages, and the last ones during the exact retraining sweep
        assert len(landed) >= 4 and len(set(landed)) >= 3, landed
        assert not helper.run(crashed)[0]  # the final resume runs to the end
    finally:
        helper.close()

    resumed = _check_consistent(crashed)
    assert resumed.manifest["configs"] == reference.manifest["configs"]
    done = {s for s in reference.manifest["stages"] if reference.is_done(s)}
    assert {s for s in resumed.manifest["stages"] if resumed.is_done(s)} == done
    tensors = sorted(a for a in reference.manifest["artifacts"] if a.endswith(".safetensors"))
    assert sorted(a for a in resumed.manifest["artifacts"] if a.endswith(".safetensors")) == tensors
    assert any(a.startswith("retrain/") for a in tensors) and any(a.startswith("synset/") for a in tensors)
    for name in tensors:
        a, b = reference.load_tensors(name), resumed.load_tensors(name)
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after resuming"


# Bad input: data ---------------------------------------------------------------------------------

X = np.random.default_rng(0).standard_normal((60, 4))
Y = np.arange(60) % 3


def _nan_x() -> np.ndarray:
    x = X.copy()
    x[5, 2] = np.nan
    return x


def _inf_x() -> np.ndarray:
    x = X.copy()
    x[0, 0] = np.inf
    return x


BAD_DATA = [
    (lambda: from_tensors(_nan_x(), Y), "NaN or inf in 1 samples"),
    (lambda: from_tensors(_inf_x(), Y), "NaN or inf"),
    (lambda: from_tensors(X, Y, test=(_nan_x(), Y)), "test inputs contain NaN"),
    (lambda: from_tensors(X[:, 0], Y), r"shape \(n, ...features\)"),
    (lambda: from_tensors(X, Y[:50]), "60 inputs but labels of shape"),
    (lambda: from_tensors(X, np.stack([Y, Y], 1)), "1-D integer tensor"),
    (lambda: from_tensors(X, Y, test=(X[:, :3], Y)), r"test inputs have shape \(3,\), train \(4,\)"),
    (lambda: from_tensors(X, Y - 1), r"lie in 0\.\.1, found values from -1"),
    (lambda: from_tensors(X, Y, num_classes=2), r"lie in 0\.\.1, found values from 0 to 2"),
    (lambda: from_tensors(X, Y + 10**9), "number the classes 0..L-1"),
    (lambda: from_tensors(X, Y.astype(float)), "labels are floats"),
    (lambda: from_tensors(X, Y, test=(X, Y.astype(float))), "1-D integer tensor of class ids, got dtype"),
    (lambda: from_tensors(X, Y > 0), "got dtype torch.bool"),
    (lambda: from_tensors(X, np.array(["a", "b", "c"] * 20)), "labels must be numbers"),
    (lambda: from_tensors([[1.0, 2.0], [3.0]], [0, 1]), "one shape"),
    (lambda: from_tensors(X.astype(complex), Y), "real numbers"),
    (lambda: from_tensors(np.zeros((0, 4)), np.zeros(0, dtype=int)), "empty"),
    (lambda: from_tensors(X, Y, test=(np.zeros((0, 4)), np.zeros(0, dtype=int))), "test set is empty"),
    (lambda: from_tensors(X[:4], np.array([0, 0, 0, 1]), test_fraction=0.5), "cannot split 4 samples"),
    (lambda: from_tensors(X, Y, test_fraction=1.5), r"test_fraction must be in \(0, 1\)"),
    (lambda: from_tensors(X, Y, num_classes=0), "num_classes must be an integer >= 1"),
    (lambda: from_tensors(X, np.full(60, np.nan), regression=True), "regression targets contain NaN"),
    (lambda: from_tensors(X, Y, test=X), "pair"),
    (lambda: distdm.load_dataset("mnist-but-not-really"), "unknown dataset.*built-in"),
    (lambda: distdm.load_dataset("digits", per_class=3), "does not take the settings"),
]


@pytest.mark.parametrize("make, match", BAD_DATA)
def test_bad_data_raises_distdm_error_saying_what_to_change(make, match):
    with pytest.raises(DistdmError, match=match):
        make()


# Bad input: settings and names -------------------------------------------------------------------

BAD_SETTINGS = [
    (lambda: TrainConfig(lr=-0.1), "lr must be a finite number > 0"),
    (lambda: TrainConfig(lr=float("nan")), "lr must be a finite number > 0"),
    (lambda: TrainConfig(epochs=0), "epochs must be a finite number > 0"),
    (lambda: TrainConfig(epochs=2.5), "epochs must be an integer"),
    (lambda: TrainConfig(batch_size=True), "batch_size must be an integer"),
    (lambda: TrainConfig(seed=-1), "seed must be an integer >= 0"),
    (lambda: TrainConfig(optimizer="rmsprop"), "optimizer must be one of"),
    (
        lambda: TrainConfig.from_dict({"epochs": 3, "learning_rate": 0.1}),
        r"unknown settings \['learning_rate'\]",
    ),
    (lambda: TrainConfig.from_dict([1, 2]), "must be a dict"),
    (lambda: ClusterConfig(per_class=0), "per_class must be"),
    (lambda: ClusterConfig(kind="spectral"), "kind must be one of"),
    (lambda: ClusterConfig().replace(clusters=3), r"unknown settings \['clusters'\]"),
    (lambda: DistillConfig(target="nope"), "target must be one of"),
    (lambda: DistillConfig(iterations=0), "iterations must be"),
    (lambda: DistillConfig(soft_labels="yes"), "soft_labels must be true or false"),
    (lambda: OnlineConfig(holdout=1.0), r"holdout must be in \[0, 1\)"),
    (lambda: Schedule(lr=-1.0), "learning rate must be a finite number > 0"),
    (lambda: Schedule(lr=math.inf), "learning rate must be a finite number > 0"),
    (lambda: Schedule(epochs=-1), "epochs must be an integer >= 0"),
    (lambda: Schedule(batch_size=0), "batch_size must be an integer > 0"),
    (lambda: Schedule(momentum=-0.5), "momentum must be a finite number >= 0"),
    (lambda: Schedule(optimizer="lbfgs"), "optimizer must be 'sgd' or 'adam'"),
    (lambda: distdm.build_model("transformer-xxl", (4,), 3), "unknown model.*built-in"),
    (lambda: distdm.build_model("mlp", (4,), 3, depth=3), "cannot build model 'mlp'"),
    (lambda: distdm.build_model("mlp", (4,), 3, hidden=(-2,)), "cannot build model 'mlp'"),
    (lambda: distdm.build_model("mlp", (4,), 0), "num_outputs must be an integer >= 1"),
    (lambda: distdm.make_attributor("magic"), "unknown method 'magic'; available"),
    (lambda: distdm.make_attributor("exact", sedes=(0,)), "does not take the settings"),
    (lambda: preset("fastest", epochs=3), "unknown preset 'fastest'"),
    (lambda: get_objective("accuracy"), "unknown objective"),
]


@pytest.mark.parametrize("make, match", BAD_SETTINGS)
def test_nonsense_settings_and_unknown_names_raise_distdm_error(make, match):
    with pytest.raises(DistdmError, match=match):
        make()


# Bad input: models, runs, queries ----------------------------------------------------------------


@pytest.fixture(scope="module")
def small(digits) -> TensorData:
    return TensorData(
        digits.x_train[:200], digits.y_train[:200], digits.x_test[:40], digits.y_test[:40], 10, "d200"
    )


TC = TrainConfig(epochs=2, lr=0.1, batch_size=32)


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory):
    run = Run(tmp_path_factory.mktemp("runs") / "r", small, "mlp", train=TC, model_kwargs={"hidden": (8,)})
    run.train()
    run.cluster(ClusterConfig(per_class=2, n_init=1))
    return run


def test_model_with_wrong_output_size_or_inputs_is_refused(small, tmp_path):
    with pytest.raises(DistdmError, match=r"outputs shape \(3,\) per sample but the data has 10 classes"):
        Run(tmp_path / "a", small, nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), train=TC)
    with pytest.raises(DistdmError, match="make its last layer output 10"):
        distdm.train_target(nn.Linear(64, 3), small, Schedule(epochs=1))
    with pytest.raises(DistdmError, match=r"fails on inputs of shape \(64,\)"):
        Run(tmp_path / "b", small, nn.Linear(10, 10), train=TC)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"data": 5}, "data must be a built-in dataset name or a TensorData"),
        ({"data": "cifar-1000"}, "unknown dataset"),
        ({"model": 3}, "model must be a built-in model name or an nn.Module"),
        ({"model": "gpt"}, "unknown model"),
        ({"train": {"epochs": 1}}, "train must be a TrainConfig"),
        ({"model_kwargs": {"width": 3}}, "cannot build model 'mlp'"),
        ({"model": "resnet18-ap"}, "inputs of side >= 9"),  # 8x8 digits: a 1x1 map after 3 strides
    ],
)
def test_run_with_bad_arguments(small, tmp_path, kwargs, match):
    args = {"data": small, "model": "mlp", "train": TC, **kwargs}
    with pytest.raises(DistdmError, match=match):
        Run(tmp_path / "r", **args)


def test_a_path_that_is_a_file_is_not_a_run(small, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DistdmError, match="is a file"):
        Run(tmp_path / "f", small, "mlp", train=TC)


def test_class_with_fewer_samples_than_clusters(trained):
    with pytest.raises(
        DistdmError, match=r"class \d has \d+ training samples but 500 clusters.*lower per_class"
    ):
        distdm.kmeans_per_class(trained.data.x_train, trained.data.y_train, 500)


@pytest.mark.parametrize(
    "x, y, match",
    [
        (lambda d: d.x_test[:3], lambda d: torch.tensor([0, 1, 99]), r"query labels must lie in 0\.\.9"),
        (lambda d: d.x_test[:3], lambda d: torch.tensor([0.0, 1.0, 2.0]), "1-D integer tensor"),
        (lambda d: d.x_test[:3], lambda d: d.y_test[:2], "3 inputs but labels"),
        (lambda d: torch.full((3, 64), float("nan")), lambda d: d.y_test[:3], "NaN or inf"),
        (lambda d: d.x_test[:0], lambda d: d.y_test[:0], "empty"),
        (lambda d: d.x_test[0], lambda d: d.y_test[:1], r"queries have shape \(\), the training inputs"),
        (lambda d: d.x_test[:3, :10], lambda d: d.y_test[:3], r"queries have shape \(10,\)"),
    ],
)
def test_bad_queries(trained, x, y, match):
    method = trained.attributor("grad-dot")
    with pytest.raises(DistdmError, match=match):
        method.scores(x(trained.data), y(trained.data))


def test_bad_query_count_objective_method_and_preset(trained):
    with pytest.raises(DistdmError, match="number of queries must be an integer > 0"):
        trained.queries(0)
    with pytest.raises(DistdmError, match="number of queries"):
        trained.queries("20")  # type: ignore[arg-type]
    x, y, _ = trained.queries(3)
    with pytest.raises(DistdmError, match="unknown objective 'top1'"):
        trained.attributor("grad-dot").scores(x, y, "top1")
    with pytest.raises(DistdmError, match="unknown method"):
        trained.attributor("shapley")
    with pytest.raises(DistdmError, match="unknown preset 'fastest'"):
        trained.distill("fastest")


class BatchNormMLP(nn.Module):
    """A model that cannot be trained under vmap: batch norm in training mode has running buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Branchy(nn.Module):
    """A model with data-dependent control flow, which vmap cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(x)
        return out if out.sum() > 0 else -out


def test_batch_norm_model_falls_back_to_a_loop_with_per_variant_buffers(small):
    torch.manual_seed(0)
    model = BatchNormMLP()
    w = torch.ones(2, small.n_train)
    w[1, :50] = 0.0  # the second variant drops 50 samples
    sched = Schedule(epochs=2, lr=0.1, batch_size=32)
    auto = train_variants(model, small.x_train, small.y_train, sched, weights=w).states
    loop = train_variants(model, small.x_train, small.y_train, sched, weights=w, strategy="loop").states
    for k in loop:
        assert torch.equal(auto[k], loop[k]), k
    mean = auto["body.2.running_mean"]
    assert not torch.equal(mean[0], mean[1])  # each variant keeps its own running statistics
    assert not torch.equal(mean[0], torch.zeros_like(mean[0]))


def test_model_that_vmap_cannot_trace_falls_back_to_a_loop(small, tmp_path):
    torch.manual_seed(0)
    model = Branchy()
    sched = Schedule(epochs=1, lr=0.1, batch_size=50)
    w = torch.ones(2, small.n_train)
    forced = train_variants(model, small.x_train, small.y_train, sched, weights=w, strategy="vmap").states
    loop = train_variants(model, small.x_train, small.y_train, sched, weights=w, strategy="loop").states
    for k in loop:
        torch.testing.assert_close(forced[k], loop[k])
    run = Run(tmp_path / "r", small, Branchy(), train=TC)  # the whole run works with such a model
    assert len(run.train()) == TC.epochs + 1
    assert 0.0 <= run.store.stage_info("train")["accuracy"] <= 1.0


# Property tests: malformed input never escapes as another exception ------------------------------

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

weird_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.integers(-3, 3), max_size=3),
)


@st.composite
def malformed_arrays(draw):
    """Inputs and labels with random shapes, dtypes, NaN/inf, label ranges and lengths."""
    n = draw(st.integers(0, 12))
    d = draw(st.sampled_from([(), (1,), (3,), (2, 2)]))
    x = np.asarray(
        draw(st.lists(st.floats(-1e6, 1e6), min_size=n * int(np.prod(d)), max_size=n * int(np.prod(d))))
    )
    x = x.reshape((n, *d)) if d else x
    if n and draw(st.booleans()):
        x = x.astype(float)
        x.flat[draw(st.integers(0, x.size - 1)) if x.size else 0] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf])
        )
    kind = draw(st.sampled_from(["int", "float", "bool", "str", "neg", "big"]))
    m = n + draw(st.sampled_from([0, 0, 0, -1, 1]))
    m = max(m, 0)
    labels = np.asarray(draw(st.lists(st.integers(0, 3), min_size=m, max_size=m)), dtype=np.int64)
    y: np.ndarray = {
        "int": labels,
        "float": labels.astype(float) + 0.5,
        "bool": labels > 1,
        "str": labels.astype(str),
        "neg": labels - 2,
        "big": labels + 10**10,
    }[kind]
    return x, y


@FAST
@given(data=malformed_arrays(), test_fraction=st.sampled_from([0.2, 0.5, 0.0, 1.0, -1.0, float("nan")]),
       num_classes=st.sampled_from([None, None, 0, 2, 4, -1]), regression=st.booleans())  # fmt: skip
def test_from_tensors_accepts_or_raises_distdm_error(data, test_fraction, num_classes, regression):
    x, y = data
    try:
        d = from_tensors(x, y, test_fraction=test_fraction, num_classes=num_classes, regression=regression)
    except DistdmError as e:
        assert str(e)
        return
    # what is accepted is a well-formed dataset
    assert d.x_train.ndim >= 2 and len(d.x_train) == len(d.y_train) > 0 and len(d.x_test) == len(d.y_test) > 0
    assert torch.isfinite(d.x_train).all() and torch.isfinite(d.x_test).all()
    if not d.is_regression:
        assert (
            d.y_train.dtype == torch.long
            and 0 <= int(d.y_train.min())
            and int(d.y_train.max()) < d.num_classes
        )


@FAST
@given(
    field=st.sampled_from(["epochs", "lr", "batch_size", "optimizer", "momentum", "weight_decay", "seed"]),
    value=weird_scalars,
)
def test_schedule_accepts_or_raises_distdm_error(field, value):
    try:
        s = Schedule(**{field: value})
    except DistdmError:
        return
    # accepted settings are usable: the shuffle order can be made
    assert isinstance(s.epochs, int) and s.epochs >= 0 and math.isfinite(s.lr) and s.lr > 0
    few = dataclasses.replace(s, epochs=min(s.epochs, 2))
    assert len(batch_order(5, few)) == few.epochs


CONFIGS = [TrainConfig, ClusterConfig, DistillConfig, OnlineConfig]


@FAST
@given(
    cls=st.sampled_from(CONFIGS),
    settings_=st.dictionaries(
        st.sampled_from(
            ["epochs", "lr", "batch_size", "per_class", "kind", "ipc", "target", "steps", "holdout", "seed",
             "soft_labels", "hessian_rank", "momentum", "bogus"]
        ),
        weird_scalars,
        max_size=3,
    ),
)  # fmt: skip
def test_configs_accept_or_raise_distdm_error_and_round_trip(cls, settings_):
    try:
        cfg = cls.from_dict(settings_)
    except DistdmError as e:
        assert str(e)
        return
    assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # accepted settings are JSON-safe


@pytest.fixture(scope="module")
def pristine(trained):
    """The trained run's manifest and artifact bytes, to check that nothing below changes them."""
    root = trained.store.root
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    what=st.sampled_from(["data", "model", "train", "model_kwargs", "cluster", "queries"]),
    value=weird_scalars,
    nan_rows=st.integers(0, 3),
)
def test_run_reopened_with_malformed_input_raises_distdm_error_and_leaves_the_run_intact(
    trained, small, pristine, what, value, nan_rows
):
    root = trained.store.root
    try:
        if what == "data":
            x = small.x_train.clone()
            x[:nan_rows] = float("nan")
            data = from_tensors(
                x, small.y_train, test=(small.x_test, value if value is not None else small.y_test)
            )
            Run(root, data, "mlp", train=TC, model_kwargs={"hidden": (8,)})
        elif what == "model":
            Run(root, small, value, train=TC)  # type: ignore[arg-type]
        elif what == "train":
            Run(root, small, "mlp", train=TrainConfig(epochs=value), model_kwargs={"hidden": (8,)}).train()  # type: ignore[arg-type]
        elif what == "model_kwargs":
            Run(root, small, "mlp", train=TC, model_kwargs={"hidden": value})
        elif what == "cluster":
            Run(root, small, "mlp", train=TC, model_kwargs={"hidden": (8,)}).cluster(per_class=value)
        else:
            run = Run(root, small, "mlp", train=TC, model_kwargs={"hidden": (8,)})
            run.queries(value)  # type: ignore[arg-type]
    except DistdmError:
        pass
    # the run directory is exactly as it was: no half-recorded settings, nothing overwritten
    now = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert now == pristine
