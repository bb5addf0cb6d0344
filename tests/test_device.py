"""The device policy: `device` on Task / Run / the CLI, and a check that no tensor leaves the chosen
device before the Scores and storage boundaries.

How the check works without a GPU, and why this way. On a CPU-only machine every tensor is on the
CPU, so a real second device cannot be used. The `meta` device cannot run the pipeline either: the
engine and the methods branch on values (active variants, thresholds, argmax), which meta tensors
do not have. So `DeviceGuard`, a `torch.overrides.TorchFunctionMode`, runs the real pipeline on the
CPU and simulates where each tensor would live on an accelerator: it tags tensors as *device* or
*host* by their provenance and records what would fail (or silently copy) on a GPU:

- a tensor is *device* when it comes from `.to(d)` / a factory called with `device=d` where `d` is a
  torch.device object (the chosen device: what `resolve_device` returns, or `t.device` of a device
  tensor), or from an op with a device input; it is *host* when it comes from a factory without
  `device=`, from `.cpu()`, `.to("cpu")`, `torch.as_tensor(ndarray)`, or from ops on host tensors only;
  tensors the mode never saw made (outputs of autograd and vmap internals) are *unknown*;
- R1 (a crash on a GPU): `.numpy()` or `np.asarray(t)` of a device or unknown tensor, anywhere;
- R2 (a crash on a GPU): an op whose inputs mix device tensors with host tensors of one or more
  dimensions (CUDA allows only 0-dim CPU tensors there); indexing with host index tensors and
  `copy_` / `to` are allowed, as they are on CUDA;
- R3 (a leave before the boundary): `.cpu()`, `.to("cpu")` or `.tolist()` of a device or unknown
  tensor outside the boundary modules (`BOUNDARY`: scores, store, figures, report, data loaders,
  clustering with scikit-learn, metrics on NumPy arrays) and the documented boundaries inside
  algorithms (`DOCUMENTED`).
Scalar reads (`float(t)`, `.item()`) are not leaves: they work on every device (a sync, no copy).
The guard is tested on itself: a stray `.numpy()` in an algorithm module is caught
(`test_the_guard_catches_a_stray_numpy_in_an_algorithm_module`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import distdm.engine
from distdm.clusters import kmeans_per_class
from distdm.data import TensorData
from distdm.engine import Schedule, available_devices, resolve_device
from distdm.errors import DistdmError
from distdm.models import build_model
from distdm.task import Task, train_target

DEVICE, HOST = "device", "host"
BOUNDARY = (
    "distdm.scores",
    "distdm.store",
    "distdm.figures",
    "distdm.report",
    "distdm.data",
    "distdm.userdata",
    "distdm.clusters",  # k-means runs in scikit-learn on NumPy features
    "distdm.metrics",  # the metrics compare Scores (NumPy) with each other
    "distdm.cli",
)
# boundaries inside algorithms, each with its reason
DOCUMENTED = {
    # the engine decides per batch which variants are active from a small bool mask on the CPU, so
    # that no step waits for the device (one copy per chunk, not per batch)
    ("distdm.engine", "_train_chunk"),
    # DDM's datamodel (distdm.datamodel) fits its least squares in NumPy on (masks x queries) outcomes
    ("distdm.attribution.ddm", "outcomes"),
    # its hierarchical search picks clusters through NumPy index arrays (Q argmaxes)
    ("distdm.attribution.ddm", "hierarchical"),
    # exact retraining returns its raw objective values (seeds, 1 + units, queries) as NumPy, as Scores
    ("distdm.attribution.retrain", "values"),
    ("distdm.attribution.retrain", "<listcomp>"),
    ("distdm.attribution.retrain", "objective_values"),
    # the eigenpair cache is keyed by a hash of theta_tau and the training inputs (bytes on the host)
    ("distdm.distill_influence", "top_eigenpairs"),
    # the influence methods memoise solves by a hash of the query rows' bytes (on the host)
    ("distdm.attribution.influence", "solve_rows"),
    # Lanczos for the damping rule keeps its small (iters x iters) tridiagonal on the host
    ("distdm.damping", "lanczos"),
    # the predict- and clustering-based baselines compute their similarities in NumPy
    ("distdm.attribution.simple", "_fit"),
    ("distdm.attribution.simple", "_scores"),
    ("distdm.attribution.simple", "_embed"),
    # further training's gold scores are returned as NumPy, as Scores are
    ("distdm.attribution.further", "gold_from_values"),
}


def _caller() -> tuple[str, str, int]:
    """The innermost distdm frame below the guard: (module, function, line)."""
    f = sys._getframe(2)
    while f is not None:
        mod = f.f_globals.get("__name__", "")
        if mod.startswith("distdm"):
            return mod, f.f_code.co_name, f.f_lineno
        f = f.f_back
    return "", "", 0


class DeviceGuard(TorchFunctionMode):
    """Tags tensors device / host by provenance and records R1-R3 violations (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        self.device_objs: dict[int, tuple[torch.device, str]] = {}  # kept alive: ids stay unique
        self.violations: list[str] = []
        self.leaves: list[tuple[str, str]] = []  # (module, function) of every allowed leave
        self.origin: dict[int, str] = {}  # where a host tensor was made (id -> module:function:line)

    # --- tags ------------------------------------------------------------------------------------
    def tag(self, t: torch.Tensor) -> str | None:
        e = self.tags.get(id(t))
        return e[1] if e is not None and e[0]() is t else None

    def set_tag(self, t: torch.Tensor, tag: str | None) -> None:
        if tag is None:
            return
        key = id(t)

        def gone(_ref: Any, key: int = key) -> None:
            e = self.tags.get(key)
            if e is not None and e[0]() is None:
                del self.tags[key]

        self.tags[key] = (weakref.ref(t, gone), tag)

    def mark_device(self, d: torch.device) -> torch.device:
        self.device_objs[id(d)] = (d, DEVICE)
        return d

    def device_tag(self, d: Any) -> str:
        """The tag a tensor placed on `d` gets: strings name the CPU, device objects the chosen device
        unless they are known to be the host's."""
        if d is None or isinstance(d, str):
            return HOST
        if isinstance(d, torch.device):
            e = self.device_objs.get(id(d))
            return e[1] if e is not None else DEVICE
        return HOST

    # --- the mode --------------------------------------------------------------------------------
    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        tags = [self.tag(t) for t in tensors]
        first = tensors[0] if tensors and args and args[0] is tensors[0] else None
        first_tag = self.tag(first) if first is not None else None
        suspect = first is not None and first_tag != HOST
        if name in ("numpy", "__array__") and suspect:
            self.violations.append(f"R1 .{name}() of a {first_tag or 'unknown'} tensor at {_caller()}")
        elif name in ("cpu", "tolist") or (name == "to" and self._target(args, kwargs)[1] == HOST):
            if suspect:
                mod, fn, line = _caller()
                if not mod:
                    pass  # the test's own code
                elif mod.startswith(BOUNDARY) or (mod, fn) in DOCUMENTED:
                    self.leaves.append((mod, fn))
                else:
                    self.violations.append(
                        f"R3 .{name}() of a {first_tag or 'unknown'} tensor at {mod}:{fn}:{line}"
                    )
        elif name not in ("__getitem__", "__setitem__", "copy_", "to", "device", "__get__", "__set__"):
            dev = any(g == DEVICE for g in tags)
            host = [t for t, g in zip(tensors, tags, strict=True) if g == HOST and t.ndim > 0]
            if dev and host:
                shapes = [tuple(t.shape) for t in host][:3]
                made = sorted({self.origin.get(id(t), "?") for t in host})[:3]
                self.violations.append(
                    f"R2 {name} mixes device and host tensors {shapes} made at {made} at {_caller()}"
                )
        out = func(*args, **kwargs)
        leaving = name == "cpu" or (name == "to" and self._target(args, kwargs)[1] == HOST)
        if leaving and out is first and first_tag != HOST:
            # on a GPU this is a new host tensor; on the CPU torch hands back the same object, so an
            # alias stands for the copy (the device tensor keeps its tag)
            out = out.view_as(out)
        if name == "__get__" and isinstance(out, torch.device) and first is not None:
            self.device_objs[id(out)] = (out, first_tag or DEVICE)  # t.device names t's place
            return out
        self._tag_outputs(name, out, args, kwargs, tensors, tags, first_tag)
        return out

    def _target(self, args: tuple, kwargs: dict) -> tuple[bool, str | None]:
        """(whether .to() names a place, the tag of that place)."""
        cands = list(args[1:]) + [kwargs.get("device"), kwargs.get("other")]
        for c in cands:
            if isinstance(c, (str, torch.device)):
                return True, self.device_tag(c)
            if isinstance(c, torch.Tensor):
                return True, self.tag(c)
        return False, None

    def _tag_outputs(
        self, name: str, out: Any, args: tuple, kwargs: dict, tensors: list, tags: list, first_tag: str | None
    ) -> None:
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs:
            return
        if name == "cpu":
            tag: str | None = HOST
        elif name in ("to", "type_as"):
            named, where = self._target(args, kwargs)
            tag = where if named else first_tag
        elif "device" in kwargs and kwargs["device"] is not None:
            tag = self.device_tag(kwargs["device"])
        elif not tensors:
            tag = HOST  # a factory without device=: the CPU on every machine
        elif any(g == DEVICE for g in tags):
            tag = DEVICE
        elif all(g == HOST for g in tags):
            tag = HOST
        else:
            tag = None
        made = None
        if tag == HOST:
            made = self.origin.get(id(tensors[0]), None) if tensors else None
            made = made or ":".join(map(str, _caller()))
        for t in outs:
            self.set_tag(t, tag)
            if made is not None:
                self.origin[id(t)] = made


def _sites(violations: list[str]) -> list[str]:
    """One line per rule and place (the first message of each)."""
    import re

    seen: dict[str, str] = {}
    for v in violations:
        seen.setdefault(re.sub(r"\[\(.*?\)\]", "", v), v)
    return list(seen.values())


@pytest.fixture
def guard(monkeypatch) -> Iterator[DeviceGuard]:
    """A DeviceGuard active for the test; resolve_device's answers are the chosen device."""
    g = DeviceGuard()
    real = distdm.engine.resolve_device

    def tagged(device: Any = "cpu") -> torch.device:
        return g.mark_device(real(device))

    for mod in ("distdm.engine", "distdm.task", "distdm.run"):
        monkeypatch.setattr(f"{mod}.resolve_device", tagged)
    with g:
        yield g


# --- resolve_device -----------------------------------------------------------------------------


def test_cpu_and_auto_resolve_to_the_cpu_here(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert available_devices() == ["cpu"]


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(
        DistdmError, match=r"2 CUDA GPU\(s\), use one of \['cpu', 'cuda:0', 'cuda:1', 'mps'\]"
    ):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("mps")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cuda", r"'cuda' is not available on this machine .*sees no CUDA GPU\): use one of \['cpu'\]"),
        ("cuda:0", r"use one of \['cpu'\], or 'auto'"),
        ("mps", r"'mps' \(Apple MPS\) is not available here: use one of \['cpu'\]"),
        ("gpu", r"device must be one of cpu, cuda, mps, auto or cuda:N, got 'gpu'"),
        ("meta", r"device 'meta' is not supported: use one of cpu, cuda, mps, auto"),
    ],
)
def test_an_unavailable_device_is_refused_naming_the_available_ones(monkeypatch, spec, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DistdmError, match=message):
        resolve_device(spec)


def test_a_task_refuses_an_unavailable_device_before_moving_anything(digits, monkeypatch):
    data = _small(digits)
    model = build_model("mlp", data.input_shape, 10, seed=0, hidden=(8,))
    clusters = kmeans_per_class(data.x_train, data.y_train, 2, seed=0, n_init=1)
    task = train_target(model, data, Schedule(epochs=1, seed=0), clusters)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DistdmError, match="not available"):
        dataclasses.replace(task, device="cuda")
    assert task.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in task.model.parameters())


# --- the pipeline with device="cpu" explicitly -----------------------------------------------------


def _small(digits: TensorData) -> TensorData:
    return TensorData(
        digits.x_train[:300], digits.y_train[:300], digits.x_test[:60], digits.y_test[:60], 10, "d300"
    )


def _pipeline(root: Any, data: TensorData, **device: Any) -> dict[str, Any]:
    """Train, cluster, distil (DDM), attribute (DDM, if-cg, exact) on a run; every result as NumPy."""
    from distdm.config import TrainConfig
    from distdm.run import Run

    model = build_model("mlp", data.input_shape, 10, seed=0, hidden=(16,))
    run = Run(root, data, model, train=TrainConfig(epochs=3, lr=0.1, batch_size=64, seed=0), **device)
    traj = run.train()
    clusters = run.cluster(per_class=2, n_init=2)
    x, y, _ = run.queries(8)
    ddm = run.attributor("ddm", preset="default", distill={"hessian_rank": 10, "input_steps": 6})
    out = {
        "trajectory": np.concatenate([v.detach().cpu().numpy().ravel() for s in traj for v in s.values()]),
        "assignment": clusters.assignment,
        "synset": ddm.synset_.x.detach().cpu().numpy(),
        "ddm": ddm.scores(x, y, "margin").values,
        "if-cg": run.attributor("if-cg", damping=0.1).scores(x, y, "margin").values,
        "exact": run.attributor("exact").scores(x, y, "margin").values,
        "stages": json.loads((root / "manifest.json").read_text())["stages"],
    }
    return out


def test_the_pipeline_with_device_cpu_explicitly_gives_the_same_results(digits, tmp_path):
    """Explicit device='cpu' and the default give identical results at every stage, and each stage
    records the device it ran on."""
    data = _small(digits)
    default = _pipeline(tmp_path / "default", data)
    explicit = _pipeline(tmp_path / "explicit", data, device="cpu")
    for key in ("trajectory", "assignment", "synset", "ddm", "if-cg", "exact"):
        if default[key] is None:
            continue
        np.testing.assert_array_equal(default[key], explicit[key], err_msg=key)
    for stage in ("train", "cluster"):
        assert explicit["stages"][stage]["device"] == "cpu"
    assert any(k.startswith("distill") and v.get("device") == "cpu" for k, v in explicit["stages"].items())


def test_train_target_and_task_take_a_device(digits):
    data = _small(digits)
    model = build_model("mlp", data.input_shape, 10, seed=0, hidden=(8,))
    clusters = kmeans_per_class(data.x_train, data.y_train, 2, seed=0, n_init=2)
    task = train_target(copy.deepcopy(model), data, Schedule(epochs=2, seed=0), clusters, device="cpu")
    assert task.device == torch.device("cpu")
    again = Task(task.model, data, clusters, task.schedule, task.trajectory, device="cpu")
    assert again.data is data  # already on the device: no copy
    assert all(
        a is b for a, b in zip(again.trajectory[-1].values(), task.trajectory[-1].values(), strict=True)
    )
    assert all(t.dtype == torch.float32 for t in task.final.values() if t.is_floating_point())


# --- no tensor leaves the device before the boundary -------------------------------------------------


def test_no_tensor_leaves_the_device_before_the_scores_boundary(digits, tmp_path, guard):
    """Training, clustering, DDM distillation and attribution, if-cg and exact retraining under the
    guard: nothing that would fail on a GPU, and leaves only at the boundaries."""
    data = _small(digits)
    first = _pipeline(tmp_path / "run", data, device="cpu")
    # again: now every stage is read from the run directory (stored on the CPU) onto the device
    again = _pipeline(tmp_path / "run", data, device="cpu")
    np.testing.assert_array_equal(first["exact"], again["exact"])
    assert not guard.violations, "\n".join(_sites(guard.violations))
    assert guard.leaves, "the guard saw no leave at all: it is not watching"
    assert {m for m, _ in guard.leaves} <= set(BOUNDARY) | {m for m, _ in DOCUMENTED}


@pytest.mark.parametrize(
    "method",
    ["grad-dot", "grad-cos", "tracin", "if-exact", "if-arnoldi", "if-ekfac", "fastif",
     "further-training", "predict", "clustering", "random"],
)  # fmt: skip
def test_every_other_method_keeps_its_tensors_on_the_device(digits, method, guard):
    """Each remaining registered method, fitted and asked on the chosen device under the guard."""
    from distdm.attribution import make_attributor

    data = _small(digits)
    model = build_model("mlp", data.input_shape, 10, seed=0, hidden=(8,))
    clusters = kmeans_per_class(data.x_train, data.y_train, 2, seed=0, n_init=2)
    task = train_target(
        model, data, Schedule(epochs=2, lr=0.1, batch_size=64, seed=0), clusters, device="cpu"
    )
    settings = {  # small enough to be quick; LiSSA converges with this scale on this task
        "fastif": {"scale": 1000.0, "depth": 50, "k": 20},
        "further-training": {"epochs": 2, "seeds": 1},
    }.get(method, {})
    scores = make_attributor(method, **settings).fit(task).scores(data.x_test[:4], data.y_test[:4], "margin")
    assert np.isfinite(scores.values).all()
    assert not guard.violations, "\n".join(_sites(guard.violations))


def test_the_guard_catches_a_stray_numpy_in_an_algorithm_module(guard):
    """Code in an algorithm module that calls .numpy() / .cpu() on a device tensor, or mixes a device
    tensor with a host one, is reported; the same code in a boundary module may leave."""
    dev = guard.mark_device(torch.device("cpu"))
    t = torch.ones(3).to(dev)

    def run_as(module: str, code: str) -> None:
        exec(compile(code, f"<{module}>", "exec"), {"__name__": module, "t": t, "torch": torch})

    run_as("distdm.attribution.simple", "t.sum(0, keepdim=True).numpy()")
    assert any(v.startswith("R1 .numpy()") for v in guard.violations)
    run_as("distdm.attribution.simple", "t.cpu()")
    assert any(v.startswith("R3 .cpu()") and "distdm.attribution.simple" in v for v in guard.violations)
    run_as("distdm.attribution.simple", "t + torch.zeros(3)")
    assert any(v.startswith("R2 ") for v in guard.violations), guard.violations
    n = len(guard.violations)
    run_as("distdm.scores", "t.cpu().numpy()")
    run_as(
        "distdm.attribution.simple", "t + torch.zeros(3, device=t.device); float(t.sum()); t[torch.arange(2)]"
    )
    assert len(guard.violations) == n, guard.violations[n:]


# --- the command line ----------------------------------------------------------------------------------


def test_the_cli_takes_device_and_refuses_an_unavailable_one(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from distdm.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runner = CliRunner()
    bad = runner.invoke(app, ["train", str(tmp_path / "r"), "--epochs", "1", "--device", "cuda"])
    assert bad.exit_code == 2 and "not available" in bad.stderr and "['cpu']" in bad.stderr
    assert not (tmp_path / "r").exists()
    ok = runner.invoke(app, ["train", str(tmp_path / "r"), "--epochs", "1", "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["stages"]["train"]["device"] == "cpu"
    clustered = runner.invoke(app, ["cluster", str(tmp_path / "r"), "--per-class", "2", "--device", "auto"])
    assert clustered.exit_code == 0, clustered.output
