"""A run directory as a Python object: train, cluster, distil and attribute, each stage stored once.

    run = Run("runs/digits", "digits", "mlp")
    run.train(); run.cluster(); run.distill()
    scores = run.attributor("ddm").scores(x, y, "dist1")

Reopening a run with the same data and settings reuses finished stages; with different ones it
raises a DistdmError that says what differs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .applications.noise import Corruption
from .attribution import make_attributor
from .attribution.base import Attributor, accepts
from .clusters import Clusters, make_clusters, penultimate_features
from .config import ClusterConfig, DistillConfig, TrainConfig
from .data import TensorData, load_dataset
from .engine import Schedule, State, model_state, resolve_device, state_to
from .errors import DistdmError
from .models import MODELS, build_model
from .objectives import accuracy
from .presets import preset
from .progress import Progress
from .runtime import UNSET, Runtime, RuntimeEntries, runtime_of
from .store import APPLICATION, DISTILLATION, SCORES, ReadOnlyRunError, RunStore, digest, settings_diff
from .synset import Synset
from .task import Task, check_model, check_training_data, train_target
from .userdata import is_data_path, load_data_file, load_model_spec, normalise_spec

log = logging.getLogger(__name__)

# methods `Run.evaluate` compares by default: against exact retraining, and against further training
EXACT_METHODS = ("ddm", "ddm:paper", "grad-dot", "if-cg", "random")
FURTHER_METHODS = ("grad-dot", "grad-cos", "tracin", "if-cg", "if-lissa", "if-arnoldi")


@dataclasses.dataclass
class Outcome:
    """What a pipeline method computed (`value`), the files it wrote into the run (`paths`), the
    trust checks it ran (`checks`, distdm.verify results; empty without one) and what it chose that
    the caller did not give (`info`, e.g. the cluster ids it removed)."""

    value: Any
    paths: list[str]
    checks: list[Any] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Demo:
    """The demo's results: DDM's and exact retraining's margin scores, their agreement (metrics.spearman
    and spearman_within_class: mean over queries with a 95% interval), stage timings and figures."""

    synset: Synset
    ddm: Any  # Scores
    exact: Any  # Scores
    spearman: Any  # metrics Interval
    within_class: Any  # metrics Interval
    n_queries: int
    timings: dict[str, float]
    figures: dict[str, str]


DEFAULT_TRAIN = {
    "digits": TrainConfig(epochs=30, lr=0.1, batch_size=64),
    "fashion-mnist": TrainConfig(epochs=15, lr=0.05, batch_size=128),
}


def default_train_config(data_name: str) -> TrainConfig:
    """Training settings of BENCHMARKS.md for a built-in dataset; plain SGD defaults otherwise."""
    for prefix, cfg in DEFAULT_TRAIN.items():
        if data_name.startswith(prefix):
            return cfg
    return TrainConfig()


INIT_ARTIFACT = "model-init.safetensors"  # theta_0, recorded when the run is made


def _resolve_data(
    data: TensorData | str | os.PathLike, data_kwargs: dict[str, Any] | None
) -> tuple[TensorData, dict[str, Any] | None]:
    """The dataset and what the run records about where it came from (None: in-memory tensors)."""
    if isinstance(data, TensorData):
        if data_kwargs:
            raise DistdmError("data_kwargs apply to built-in datasets only, not to a TensorData")
        return data, None
    if is_data_path(data):
        if data_kwargs:
            raise DistdmError("data_kwargs apply to built-in datasets only, not to a data file")
        path = Path(data).expanduser().resolve()
        return load_data_file(path), {"file": str(path)}
    assert isinstance(data, str)
    return load_dataset(data, **(data_kwargs or {})), {"dataset": data, "kwargs": data_kwargs or {}}


def _resolve_model(
    model: nn.Module | str, data: TensorData, model_kwargs: dict[str, Any] | None, seed: int
) -> tuple[nn.Module, str, dict[str, Any]]:
    """The module, its display name, and the settings the run records about it."""
    if isinstance(model, nn.Module):
        if model_kwargs:
            raise DistdmError("model_kwargs apply to built-in models and model specs, not to an nn.Module")
        return model, type(model).__name__, {"name": type(model).__name__, "spec": None, "kwargs": {}}
    if ":" in model:
        spec = normalise_spec(model)
        m = load_model_spec(spec, data, seed=seed, model_kwargs=model_kwargs)
        return m, model, {"name": type(m).__name__, "spec": spec, "kwargs": model_kwargs or {}}
    if model not in MODELS:
        raise DistdmError(
            f"unknown model {model!r}; built-in: {sorted(MODELS)}; or your own as package.module:callable "
            f"or path/to/file.py:callable"
        )
    n_out = data.num_classes if data.num_classes > 0 else 1
    m = build_model(model, data.input_shape, n_out, seed=seed, **(model_kwargs or {}))
    return m, model, {"name": model, "spec": None, "kwargs": model_kwargs or {}}


def _without_init(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k != "init"}


def _architecture_diff(stored: State, now: State) -> list[str]:
    """How two states differ in parameter names, shapes and dtypes (at most a few lines)."""
    out = [f"parameter {k} missing" for k in sorted(set(stored) - set(now))]
    out += [f"parameter {k} is new" for k in sorted(set(now) - set(stored))]
    for k in sorted(set(stored) & set(now)):
        if tuple(stored[k].shape) != tuple(now[k].shape):
            out.append(f"{k}: shape stored {tuple(stored[k].shape)}, now {tuple(now[k].shape)}")
        elif stored[k].dtype != now[k].dtype:
            out.append(f"{k}: dtype stored {stored[k].dtype}, now {now[k].dtype}")
    return out[:6] + ([f"and {len(out) - 6} more"] if len(out) > 6 else [])


class Run(RuntimeEntries):
    """A run directory holding one target model's trajectory, clusters, synsets and results.

    data: a built-in dataset name, a TensorData, or a data file (.npz, .pt, .safetensors holding
    x_train, y_train[, x_test, y_test]; see distdm.userdata); the run records a file's absolute path
    and the data's fingerprint, so `Run.open` reloads it and refuses it if its contents changed.
    model: a built-in model name, an nn.Module, or a spec 'package.module:callable' or
    'path/to/file.py:callable' whose callable returns an nn.Module (see distdm.userdata).

    theta_0 rule: the run records the model's initial state (artifact model-init.safetensors) when it
    is made. Reopening it with a freshly constructed module of the same architecture (same parameter
    names, shapes and dtypes) loads that recorded theta_0 into the module, so a script that builds
    `MyNet()` anew on every run resumes instead of being refused for its new random initialisation;
    a module of another architecture is refused, saying what differs.

    runtime (a distdm.Runtime) says how and where the stages run; results do not depend on it. Its
    executor (distdm.executors, e.g. get_executor("ray"); None: in-process) and memory budget set how
    retrains, further training and DDM fine-tunes run; its progress (False, True for bars, or a
    callable; distdm.progress) is what the stages report; its device ('cpu', 'cuda', 'cuda:N', 'mps',
    'auto'; see Task) is where every stage computes: the model is moved there; the stored results are
    on the CPU, so a run computed on one device reads on any other, and each stage records the device
    it ran on in the manifest. The keywords progress, executor, memory_budget_bytes and device set
    those entries of it (over the given runtime's); `run.runtime` holds them, `run.device` etc. read it.
    If making a new run directory fails, or its first training fails, the directory is removed."""

    def __init__(
        self,
        path: str | os.PathLike,
        data: TensorData | str | os.PathLike = "digits",
        model: nn.Module | str = "mlp",
        *,
        train: TrainConfig | None = None,
        model_kwargs: dict[str, Any] | None = None,
        data_kwargs: dict[str, Any] | None = None,
        runtime: Runtime | None = None,
        progress: Progress = UNSET,
        executor: Any = UNSET,
        memory_budget_bytes: int | None = UNSET,
        device: str | torch.device = UNSET,
    ):
        if device is not UNSET:
            device = resolve_device(device)  # a device this machine lacks is refused before any work
        self.runtime = runtime_of(
            runtime, progress=progress, executor=executor, memory_budget_bytes=memory_budget_bytes,
            device=device,
        )  # fmt: skip
        if not isinstance(data, (str, TensorData, os.PathLike)):
            raise DistdmError(
                f"data must be a built-in dataset name or a TensorData (distdm.from_tensors / from_dataset), "
                f"or a .npz/.pt/.safetensors file, got {type(data).__name__}"
            )
        if not isinstance(model, (str, nn.Module)):
            raise DistdmError(
                f"model must be a built-in model name or an nn.Module, or a spec package.module:callable, "
                f"got {type(model).__name__}"
            )
        if train is not None and not isinstance(train, TrainConfig):
            raise DistdmError(f"train must be a TrainConfig, got {type(train).__name__}")
        self.data, source = _resolve_data(data, data_kwargs)
        self.train_config = train or default_train_config(self.data.name)
        self.model, self.model_name, model_cfg = _resolve_model(
            model, self.data, model_kwargs, self.train_config.seed
        )
        self.loss = "mse" if self.data.is_regression else "ce"
        self.model.to(self.device)
        check_model(self.model, self.data)
        check_training_data(self.data)
        self.store = RunStore(path)
        try:
            self._bind_data(source)
            self._bind_model(model_cfg)
        except BaseException:
            self.store.discard()  # a directory made here for a run that cannot be: leave nothing behind
            raise
        self._task: Task | None = None
        self._clusters: Clusters | None = None

    def _bind_data(self, source: dict[str, Any] | None) -> None:
        """Refuse data other than the run's, saying what differs; record it in a new run."""
        fp = self.data.fingerprint()
        stored = self.store.config("data")
        was = (stored or {}).get("source") or {}
        now = source or {}
        if stored is not None and stored.get("fingerprint") != fp and "file" in now and "file" in was:
            raise DistdmError(
                f"data file {now['file']} holds other data than run {self.path} was made from (file "
                f"{was['file']}; fingerprint stored {stored.get('fingerprint')}, now {fp}): restore the "
                f"file, or use a new run directory for the new data"
            )
        self.store.check_fingerprint(fp)
        if stored is None:
            self.store.check_config("data", {"name": self.data.name, "fingerprint": fp, "source": source})
        # the same fingerprint is the same data, wherever it came from this time: the record stays

    def _bind_model(self, cfg: dict[str, Any]) -> None:
        """Refuse another model, saying what differs; load the recorded theta_0 into a fresh module."""
        cfg["n_params"] = sum(p.numel() for p in self.model.parameters())
        cfg["init"] = digest(model_state(self.model))
        cfg = json.loads(json.dumps(cfg))
        stored = self.store.config("model")
        if stored is not None:
            base = settings_diff(_without_init(stored), _without_init(cfg))
            changed = bool(base) or stored.get("init") != cfg["init"]
            theta0 = self._recorded_init(allow_trajectory=not base) if changed else None
            arch = _architecture_diff(theta0, model_state(self.model)) if theta0 is not None else []
            if base or arch:
                raise DistdmError(
                    f"run {self.path} stage 'model' was made with another model ({'; '.join(base + arch)}): "
                    f"pass the model it was made with, or use a new run directory"
                )
            if theta0 is not None:
                self.model.load_state_dict(theta0)
                cfg["init"] = digest(model_state(self.model))
        self.store.check_config("model", cfg)
        if not self.store.has(INIT_ARTIFACT):
            try:
                self.store.save_tensors(INIT_ARTIFACT, model_state(self.model))
            except ReadOnlyRunError:
                if stored is None:
                    raise
                # an older run being read: its trajectory holds theta_0 as well

    def _recorded_init(self, allow_trajectory: bool) -> State | None:
        if self.store.has(INIT_ARTIFACT):
            return self.store.load_tensors(INIT_ARTIFACT)
        if allow_trajectory and self.store.is_done("train"):
            return self.trajectory()[0]  # runs made before theta_0 was recorded on its own
        return None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        data: TensorData | str | os.PathLike | None = None,
        model: nn.Module | str | None = None,
        runtime: Runtime | None = None,
        progress: Progress = UNSET,
        executor: Any = UNSET,
        memory_budget_bytes: int | None = UNSET,
        device: str | torch.device = UNSET,
    ) -> Run:
        """Reopen an existing run directory with the dataset, model and training settings it records.

        data: None reloads what the run records (a built-in dataset, or the data file it was made
        from, refused if its contents changed); a run made from in-memory tensors needs them again.
        model: None rebuilds the recorded built-in model or model spec; a run made from an nn.Module
        needs a freshly constructed one of the same architecture (its recorded theta_0 is loaded into
        it). runtime (or the keywords progress, executor, memory_budget_bytes and device): how and
        where its stages run, as in `Run` (any device reads a run computed on another)."""
        store = RunStore(path, create=False)
        cfg = store.manifest["configs"]
        if "data" not in cfg or "model" not in cfg:
            raise DistdmError(f"run {path} records no data or model settings: it was never initialised")
        source = cfg["data"].get("source")
        data_kwargs = None
        if data is not None:
            data_arg: TensorData | str | os.PathLike = data
        elif source is None:
            raise DistdmError(
                f"run {path} was made from in-memory data ({cfg['data'].get('name')!r}): pass the same data "
                f"to Run.open(path, data=...)"
            )
        elif "file" in source:
            if not Path(source["file"]).is_file():
                raise DistdmError(
                    f"run {path} was made from the data file {source['file']}, which no longer exists: "
                    f"restore it, or pass the same data to Run.open(path, data=...)"
                )
            data_arg = source["file"]
        else:
            data_arg, data_kwargs = source["dataset"], source["kwargs"]
        recorded = cfg["model"]
        model_kwargs = recorded.get("kwargs") or None
        if model is not None:
            model_arg: nn.Module | str = model
            if isinstance(model, nn.Module):
                model_kwargs = None
        elif recorded.get("spec"):
            model_arg = recorded["spec"]
        elif recorded.get("name") in MODELS:
            model_arg = recorded["name"]
        else:
            name = recorded.get("name")
            raise DistdmError(
                f"run {path} was made from your own nn.Module ({name}): pass a freshly constructed one, "
                f"Run.open(path, model={name}(...)); the run's recorded initial weights are loaded into it"
            )
        train = TrainConfig.from_dict(cfg["train"]) if "train" in cfg else None
        rt = runtime_of(
            runtime, progress=progress, executor=executor, memory_budget_bytes=memory_budget_bytes,
            device=device,
        )  # fmt: skip
        return cls(
            path, data_arg, model_arg, train=train, model_kwargs=model_kwargs, data_kwargs=data_kwargs,
            runtime=rt,
        )  # fmt: skip

    # how the stages run: entries of the one runtime -------------------------------------------
    @property
    def progress(self) -> Progress:
        """What the stages report (the runtime's progress: False, True for bars, or a callable)."""
        return self.runtime.progress

    @property
    def path(self) -> str:
        """The run directory."""
        return str(self.store.root)

    @property
    def schedule(self) -> Schedule:
        """The training schedule of the target model (its TrainConfig, which is a Schedule)."""
        return self.train_config

    # stages -----------------------------------------------------------------------------------
    def train(self) -> list[State]:
        """Train the target model and store its trajectory (one state per epoch); reuse if stored."""
        if not self.store.is_done("train"):
            self.store.reset("train")  # settings of an attempt that never finished bind nothing
        self.store.check_config("train", self.train_config.to_dict())
        if self.store.is_done("train"):
            return self.trajectory()
        t = time.perf_counter()
        try:
            task = train_target(
                self.model, self.data, self.schedule, loss=self.loss, progress=self.progress,
                device=self.device,
            )  # fmt: skip
        except BaseException:
            self.store.discard()  # a run made for this training and nothing finished: leave nothing behind
            raise
        tensors = {f"{e}/{k}": v for e, s in enumerate(task.trajectory) for k, v in s.items()}
        self.store.save_tensors("trajectory", tensors)
        self.store.mark_done(
            "train",
            seconds=time.perf_counter() - t,
            loss=self.loss,
            device=str(self.device),
            **self.test_quality(task.final),
        )
        return task.trajectory

    def trajectory(self) -> list[State]:
        """The stored trajectory theta_0..theta_tau."""
        if not self.store.is_done("train"):
            raise DistdmError(f"run {self.path} has no trained model yet: run the 'train' stage first")
        if self.data.is_regression and self.store.stage_info("train").get("loss") != "mse":
            raise DistdmError(
                f"run {self.path} was trained with cross-entropy on regression targets (an earlier distdm), "
                f"which leaves the model untrained: retrain it after `distdm reset {self.path} train`"
            )
        flat = self.store.load_tensors("trajectory")
        epochs = 1 + max(int(k.split("/", 1)[0]) for k in flat)
        traj: list[State] = [{} for _ in range(epochs)]
        for key, v in flat.items():
            e, name = key.split("/", 1)
            traj[int(e)][name] = v
        return traj

    def cluster(self, config: ClusterConfig | None = None, **overrides: Any) -> Clusters:
        """Partition the training data (default: 10 k-means clusters per class on the target model's
        penultimate features) and store the partition; reuse if stored."""
        cfg = (config or ClusterConfig()).replace(**overrides) if overrides else (config or ClusterConfig())
        if not self.store.is_done("cluster"):
            self.store.reset("cluster")  # settings of an attempt that never finished bind nothing
        self.store.check_config("cluster", cfg.to_dict())
        if self.store.is_done("cluster"):
            return self.clusters()
        t = time.perf_counter()
        if self.data.is_regression:
            raise DistdmError("per-class clustering needs class labels; use per-sample units for regression")

        def features() -> torch.Tensor:
            if cfg.features == "inputs":
                return self.data.x_train.flatten(1)
            final = state_to(self.trajectory()[-1], self.device)
            return penultimate_features(self.model, self.data.x_train.to(self.device), final)

        clusters = make_clusters(
            cfg.kind, self.data.y_train, cfg.per_class, features, seed=cfg.seed, n_init=cfg.n_init
        )
        self.store.save_tensors(
            "clusters",
            {
                "assignment": torch.as_tensor(clusters.assignment),
                "cluster_class": torch.as_tensor(clusters.cluster_class),
            },
        )
        self.store.mark_done(
            "cluster", seconds=time.perf_counter() - t, n_clusters=clusters.n_clusters,
            device=str(self.device),
        )  # fmt: skip
        self._clusters = clusters
        return clusters

    def clusters(self) -> Clusters:
        """The stored clusters."""
        if self._clusters is None:
            if not self.store.is_done("cluster"):
                raise DistdmError(f"run {self.path} has no clusters yet: run the 'cluster' stage first")
            t = self.store.load_tensors("clusters")
            kind = (self.store.config("cluster") or {}).get("kind", "kmeans")
            self._clusters = Clusters(t["assignment"].numpy(), t["cluster_class"].numpy(), kind)
        return self._clusters

    def task(self) -> Task:
        """The Task (model, data, clusters, schedule, trajectory) that attributors are fitted on. It
        carries no store: the run's methods pass `self.store` to what caches work (to fit a method
        yourself with the run's caches, pass it: `ExactRetrain(store=run.store).fit(run.task())`)."""
        if self._task is None:
            # the stages pass their own progress: the task's retrains report nothing unless asked
            self._task = Task(
                self.model, self.data, self.clusters(), self.schedule, self.trajectory(), loss=self.loss,
                runtime=self.runtime.replace(progress=False),
            )  # fmt: skip
        return self._task

    def distill(
        self, preset: str = "default", config: DistillConfig | dict[str, Any] | None = None
    ) -> Synset:
        """Distil (or load) the synset of a preset, or of explicit settings."""
        return self._ddm(preset, config).synset_

    def _ddm(self, preset: str, config: DistillConfig | dict[str, Any] | None, **settings: Any) -> Attributor:
        t = time.perf_counter()
        settings = {"progress": self.progress, "store": self.store, **settings}
        ddm = make_attributor("ddm", preset=preset, distill=config, **settings)
        ddm.fit(self.task())
        stage = ddm.distill_stage_  # type: ignore[attr-defined]  # distill-<preset> or distill-custom-<digest>
        key = ddm.synset_key_  # type: ignore[attr-defined]
        if not self.store.is_done(stage):
            info = ddm.synset_.info  # type: ignore[attr-defined]
            recorded = ddm.recorded_seconds_  # type: ignore[attr-defined]
            self.store.mark_done(
                stage,
                # a synset loaded from the cache reports what distilling it cost, not the load
                seconds=time.perf_counter() - t if recorded is None else recorded,
                forgetting=info.get("forgetting"),
                layer_cosine=info.get("layer_cosine"),
                # `distdm reset RUN STAGE` removes the synset too, so the stage really runs again
                artifacts=[f"{key}.safetensors", f"{key}.json"],
                device=str(self.device),
            )
        self._index_distillation(stage, key, ddm)
        return ddm

    def _index_distillation(self, stage: str, key: str, ddm: Attributor) -> None:
        """List a distillation stage in the results index: which synset it made and with what
        settings, so the report names a synset's presets without matching diagnostics. A stage
        finished before the index existed is listed when it is next used (unless the run is read-only)."""
        files = [f"{key}.safetensors", f"{key}.json"]
        if getattr(ddm, "synset", None) is not None:
            return  # a synset given to ddm, not distilled by this stage
        if self.store.result(stage) is not None or not all(self.store.has(f) for f in files):
            return  # indexed already, or the synset is not (or no longer) in the run
        info = self.store.stage_info(stage)
        label = stage.removeprefix("distill-")
        with contextlib.suppress(ReadOnlyRunError):
            self.store.record_result(
                stage, DISTILLATION, files, {"synset": key, "settings": ddm.to_dict()}, label=label,
                seconds=info.get("seconds"), device=info.get("device"),
            )  # fmt: skip

    def attributor(self, name: str = "ddm", **settings: Any) -> Attributor:
        """A fitted attributor of this run's task by name ('ddm', 'exact', 'grad-dot', 'if-cg', ...)."""
        if name == "ddm":
            return self._ddm(
                str(settings.pop("preset", "default")), settings.pop("distill", None), **settings
            )
        if accepts(name, "progress"):
            settings.setdefault("progress", self.progress)
        if accepts(name, "store"):  # methods that cache their work (retrains) cache it in the run
            settings.setdefault("store", self.store)
        return make_attributor(name, **settings).fit(self.task())

    def queries(self, n: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """n test queries drawn with a seed: inputs, labels and their test-set indices."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
            raise DistdmError(f"the number of queries must be an integer > 0, got {n!r}")
        self.data.require_test("drawing test queries")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.data.y_test), generator=g)[: min(n, len(self.data.y_test))]
        return self.data.x_test[idx], self.data.y_test[idx], idx.numpy()

    def test_quality(self, state: State) -> dict[str, float]:
        """A state's quality on the test set: {'accuracy': ...} for classes, {'mse': ...} (test mean
        squared error) for regression, {} when the data has no test set."""
        if not self.data.has_test:
            return {}
        from .engine import predict

        x_test, y_test = self.data.x_test.to(self.device), self.data.y_test.to(self.device)
        out = predict(self.model, {k: v.unsqueeze(0) for k, v in state.items()}, x_test)[0]
        if self.data.is_regression:
            return {"mse": float(((out.squeeze(-1) - y_test) ** 2).mean())}
        return {"accuracy": float(accuracy(out, y_test))}

    def corrupted(self, corruption: Corruption) -> Run:
        """The corrupted copy of this run as a run directory RUN/corrupted/<tag>: trained with this
        run's model, theta_0 and settings, clustered with its cluster settings; reopened if present."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.trajectory()[0])
        sub = Run(
            self.store.root / "corrupted" / corruption.tag,
            corruption.data,
            model,
            train=self.train_config,
            runtime=self.runtime,  # the same device, progress, executor and budget as this run
        )
        sub.train()
        cfg = self.store.config("cluster")
        sub.cluster(ClusterConfig.from_dict(cfg) if cfg else ClusterConfig())
        return sub

    def verify(
        self,
        answer: Any = "ddm",
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        m: int = 8,
        objective: str = "margin",
        seeds: list[int] | None = None,
        draw_seed: int = 0,
    ) -> Any:
        """Check an answer against exact retraining of m random clusters with two seeds: agreement,
        retraining's own reproducibility, a verdict and the cost (distdm.verify); stored under verify/.
        answer: the method's Scores for queries (x, y), or a method name scored on them (default the
        run's 20 random test queries, for `objective`). The retrains are cached in the run."""
        from .scores import Scores
        from .verify import choose_clusters
        from .verify import verify as verify_answer

        choose_clusters(self.clusters().n_clusters, m, draw_seed)  # refuse a bad m before any fitting
        if x is None or y is None:
            if isinstance(answer, Scores):
                raise DistdmError(
                    "pass the queries (x, y) the Scores were computed for: run.verify(scores, x, y)"
                )
            x, y, _ = self.queries()
        scores = (
            answer if isinstance(answer, Scores) else self.attributor(str(answer)).scores(x, y, objective)
        )
        return verify_answer(
            self.task(), scores, x, y, m=m, seeds=seeds, draw_seed=draw_seed, progress=self.progress,
            store=self.store,
        )  # fmt: skip

    def export_pack(
        self,
        out: str | os.PathLike,
        preset: str = "default",
        *,
        distill: DistillConfig | dict[str, Any] | None = None,
        labels: Any = None,
    ) -> Path:
        """Write the synset pack of a preset (distilled if needed) to `out`: synsets, cluster class, size
        and label, the target's fingerprint and the DDM settings, no training data (distdm.pack)."""
        from .pack import export_pack

        return export_pack(self, out, preset, distill=distill, labels=labels)

    # pipeline methods: what the CLI commands compute, store and return --------------------------
    def method(self, spec: str, **settings: Any) -> Attributor:
        """A fitted attributor from a method spec: 'ddm', 'ddm:PRESET' (a DDM preset) or any
        registered method name (with its settings)."""
        name, _, preset_name = spec.partition(":")
        if name == "ddm":
            return self.attributor("ddm", preset=preset_name or "default")
        if preset_name:
            raise DistdmError(f"only ddm takes a preset (ddm:paper), got {spec!r}")
        return self.attributor(name, **settings)

    def _save_files(
        self,
        prefix: str,
        files: Mapping[str, bytes | str | None],
        *,
        application: str,
        name: str | None = None,
        identity: Mapping[str, Any] | None = None,
        **info: Any,
    ) -> list[str]:
        """Named outputs written under RUN/prefix/ (atomically, with checksums) and listed in the
        results index as one result of `application` (name: default the prefix; identity: the
        settings that made them; info: e.g. the corruption); their paths."""
        from .applications.diagnose import save_outputs

        paths = save_outputs(self.store, prefix, files)
        self.store.record_result(
            name or prefix, APPLICATION, [f"{prefix}/{n}" for n in paths], identity,
            application=application, **info,
        )  # fmt: skip
        return list(paths.values())

    def _save_written(self, prefix: str, write: Callable[[str], Mapping[str, Path]]) -> list[str]:
        """Files a writer puts into a directory (e.g. Evaluation.save), stored under RUN/prefix/."""
        with tempfile.TemporaryDirectory() as tmp:
            written = write(tmp)
            return [str(self.store.save_file(f"{prefix}/{p.name}", p.read_bytes())) for p in written.values()]

    def save_scores(
        self, scores: Any, query_indices: np.ndarray, *, method: str | None = None, seed: int = 0,
        attributor: Attributor | None = None,
    ) -> dict[str, str]:  # fmt: skip
        """Store a method's scores for test queries (attribution/<tag>.safetensors, with the queries'
        test-set indices) and their heatmap (figures/<tag>.png), tag <method>-<objective>-q<n>s<seed>
        (method: default the scores'); returns both paths by kind. attributor: the method that made
        them, whose settings (`to_dict()`) are recorded beside them in the manifest's results index."""
        from .figures import heatmap_png

        idx = np.asarray(query_indices)
        method = method or scores.method
        tag = f"{method}-{scores.objective}-q{len(idx)}s{seed}"
        self.store.save_tensors(
            f"attribution/{tag}", {"scores": torch.as_tensor(scores.values), "queries": torch.as_tensor(idx)}
        )
        y = self.data.y_test[torch.as_tensor(idx)].numpy()
        title = f"{method} / {scores.objective}"
        fig = self.store.save_file(
            f"figures/{tag}.png", heatmap_png(scores.values, self.clusters(), y, title)
        )
        # indexed with the settings of the method that made them (only its name where not given)
        identity = attributor.to_dict() if attributor is not None else {"method": method}
        files = [f"attribution/{tag}.safetensors", f"figures/{tag}.png"]
        self.store.record_result(f"attribution/{tag}", SCORES, files, identity,
                                 objective=scores.objective, queries=len(idx))  # fmt: skip
        return {"scores": f"{self.path}/attribution/{tag}.safetensors", "heatmap": str(fig)}

    def save_synset_figures(self, synset: Synset, preset: str) -> dict[str, str]:
        """Store a preset's synset grid (figures/synset-<preset>.png, images only) and its matching
        cosine per layer (figures/matching-<preset>.png); returns their paths by what they show."""
        from .figures import bar_png, synset_grid_png

        out = {}
        png = synset_grid_png(synset, self.data.x_train, self.clusters())
        if png:
            out["synset grid"] = str(self.store.save_file(f"figures/synset-{preset}.png", png))
        cos = synset.info["layer_cosine"]
        bars = bar_png(list(cos), list(cos.values()), "matching cosine per layer", "cosine")
        out["matching cosines"] = str(self.store.save_file(f"figures/matching-{preset}.png", bars))
        return out

    def _queries_of(
        self, queries: int | tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(queries, tuple):
            return queries
        x, y, _ = self.queries(queries)
        return x, y

    def evaluate(
        self,
        methods: Sequence[str] = EXACT_METHODS,
        queries: int | tuple[torch.Tensor, torch.Tensor] = 20,
        *,
        seeds: Sequence[int] = (0, 1, 2),
        lds_subsets: int = 100,
        verify: int = 0,
    ) -> Outcome:
        """Compare methods (specs as in `method`) with exact leave-cluster-out retraining on the run's
        test queries (a number of random ones, or (x, y)): distdm.evaluate's rows and scores as
        `value`, its table, CSV and figure stored under evaluation/; verify M > 0 also runs the trust
        check on M random clusters for each method (reusing the truth's retrains)."""
        from .evaluate import evaluate as run_evaluation
        from .scores import Scores
        from .verify import choose_clusters

        job = f"retrain/lds/seed{self.train_config.seed}"
        stored = self.store.config(job)
        if lds_subsets and stored is not None and stored.get("variants") != lds_subsets:
            n = stored.get("variants")
            raise DistdmError(
                f"run {self.path} retrained its LDS subsets with --lds-subsets {n}: pass --lds-subsets {n}, "
                f"or redo them with {lds_subsets}: distdm reset {self.path} {job}"
            )
        if verify:
            choose_clusters(self.clusters().n_clusters, verify)  # refuse a bad M before any fitting
        x, y = self._queries_of(queries)
        fitted = {spec: self.method(spec) for spec in methods}
        ev = run_evaluation(
            self.task(), fitted, (x, y), truth_seeds=list(seeds), lds_subsets=lds_subsets,
            progress=self.progress, store=self.store,
        )  # fmt: skip
        paths = self._save_written("evaluation", ev.save)
        checks = []
        if verify:
            # the truth's leave-one-out retrains of the first two seeds are in the run: the check reuses them
            vseeds = list(seeds[:2]) if len(seeds) >= 2 else None
            checks = [
                self.verify(Scores(by_obj["margin"], "cluster", "margin", name), x, y, m=verify, seeds=vseeds)
                for name, by_obj in ev.scores.items()
            ]
        return Outcome(ev, paths, checks)

    def evaluate_further(
        self,
        methods: Sequence[str] = FURTHER_METHODS,
        queries: int | tuple[torch.Tensor, torch.Tensor] = 20,
        *,
        seeds: Sequence[int] = (0, 1, 2),
        epochs: Sequence[int] = (1, 2, 20),
        unit: str = "cluster",
        optimizer: str = "sgd",
        lr: float | None = None,
        left_out: int | None = None,
        objective: str = "margin",
    ) -> Outcome:
        """Agreement of each method with the final-model-only further-training gold standard against
        further-training epochs and seeds averaged (attribution.further): the rows as `value`, table,
        CSV and figures under evaluation/. left_out: units left out (default all clusters, 50 random
        samples); info: the number of left-out units and of queries."""
        from .attribution.further import further_agreement, left_out_units, write_agreement

        x, y = self._queries_of(queries)
        task = self.task()
        n = task.clusters.n_clusters if unit == "cluster" else task.data.n_train
        left = left_out_units(n, left_out if left_out is not None else (None if unit == "cluster" else 50))
        settings = {"unit": unit} if unit == "sample" else {}
        scores = {spec: self.method(spec, **settings).scores(x, y, objective) for spec in methods}
        rows = further_agreement(
            task, scores, x, y, objective, epochs=list(epochs), seeds=list(seeds), optimizer=optimizer,
            lr=lr, unit=unit, left_out=None if len(left) == n else left, progress=self.progress,
            store=self.store,
        )  # fmt: skip
        stem = f"further-agreement-{optimizer}-{unit}-{objective}"
        paths = self._save_written("evaluation", lambda tmp: write_agreement(rows, tmp, stem=stem))
        return Outcome(rows, paths, info={"left_out": len(left), "queries": len(y)})

    def compare(
        self, variants: str, method: str = "grad-dot", queries: int | tuple[torch.Tensor, torch.Tensor] = 20
    ) -> Outcome:
        """One method's class-wise and cluster-wise attribution matrices (margin) under model variants
        ARCH, INIT or ARCH:INIT[@SEED] (applications.compare), their pairwise agreement as `value`;
        matrices, table and side-by-side heatmap stored under evaluation/ and figures/."""
        from .applications.compare import compare_heatmaps_png, compare_study, parse_variants
        from .attribution import ATTRIBUTORS

        parsed = parse_variants(variants, self.model_name)
        if method not in ATTRIBUTORS:
            raise DistdmError(f"unknown --compare-method {method!r}; available: {sorted(ATTRIBUTORS)}")
        x, y = self._queries_of(queries)
        clusters = self.clusters()
        kwargs = {self.model_name: (self.store.config("model") or {}).get("kwargs", {})}
        comp = compare_study(
            self.data, parsed, self.schedule, clusters, (x, y), method=method, seed=self.train_config.seed,
            model_kwargs=kwargs, store=self.store, progress=self.progress,
        )  # fmt: skip
        tag = f"compare-{method}-" + "-".join(v.name.replace(":", "_").replace("@", "s") for v in parsed)
        mats = {f"{v}/{lvl}": torch.as_tensor(m) for v, d in comp.matrices.items() for lvl, m in d.items()}
        self.store.save_tensors(f"evaluation/{tag}", mats)
        body = json.dumps({"accuracy": comp.accuracy, "rows": comp.rows}, indent=2).encode()
        paths = [
            str(self.store.save_file(f"evaluation/{tag}.json", body)),
            str(self.store.save_file(f"figures/{tag}.png", compare_heatmaps_png(comp, clusters, y.numpy()))),
        ]
        return Outcome(comp, paths)

    def corruption(self, kind: str, share: float, *, seed: int = 0, norm: float = 0.1) -> Corruption:
        """A corrupted copy of the run's training data: Gaussian noise of L2 norm `norm` on a share of
        the images (kind 'noise') or a share of labels flipped ('labels'), samples chosen with `seed`."""
        from .applications.noise import corrupt

        return corrupt(self.data, kind, share, seed=seed, norm=norm)

    def diagnose(
        self,
        methods: Sequence[str] = ("ddm", "if-cg"),
        *,
        fractions: Sequence[float] | None = None,
        random_seeds: int = 5,
        retrain_seeds: Sequence[int | None] = (None,),
        validation_fraction: float = 0.5,
        balanced: bool = False,
        corruption: Corruption | None = None,
    ) -> Outcome:
        """Rank clusters by validation loss with each method, remove the most harmful data, retrain and
        compare with random removal (DDM Table 3): the Diagnosis as `value`, tables, rankings and
        figures under applications/diagnose/. With a `corruption` (Run.corruption): train and cluster
        the corrupted copy, diagnose it and measure how well each method finds the corrupted samples
        (DDM Table 6; a NoiseReport, under applications/diagnose-<tag>/). Retrain seed None: the
        target's own initialisation and order."""
        from .applications.diagnose import (
            DEFAULT_FRACTIONS,
            check_fractions,
            diagnosis_files,
            validation_split,
        )
        from .applications.diagnose import diagnose as run_diagnosis
        from .applications.noise import NOISE_FRACTIONS, noisy_diagnosis

        default = NOISE_FRACTIONS if corruption is not None else DEFAULT_FRACTIONS
        settings = dict(
            fractions=check_fractions(list(fractions) if fractions is not None else default),
            random_seeds=list(range(random_seeds)), retrain_seeds=list(retrain_seeds), balanced=balanced,
            progress=self.progress,
        )  # fmt: skip
        identity = {"methods": list(methods), "validation_fraction": validation_fraction,
                    **{k: v for k, v in settings.items() if k != "progress"}}  # fmt: skip
        if corruption is None:
            fitted = {spec: self.method(spec) for spec in methods}
            d = run_diagnosis(
                self.task(), fitted, validation_fraction=validation_fraction, store=self.store, **settings
            )
            files = diagnosis_files(d, self.data.x_train)
            return Outcome(
                d, self._save_files("applications/diagnose", files, application="diagnose", identity=identity)
            )
        sub = self.corrupted(corruption)
        split = validation_split(self.data, validation_fraction)
        xt, yt = split.xy(self.data, "test")
        clean = float(accuracy(self.task().outputs(xt), yt))
        fitted = {spec: sub.method(spec) for spec in methods}
        rep = noisy_diagnosis(
            sub.task(), corruption, fitted, clean_accuracy=clean, split=split, store=sub.store, **settings
        )
        files = diagnosis_files(rep.diagnosis, corruption.data.x_train, stem="diagnose")
        files["detection.csv"] = rep.to_csv()
        files["corruption.json"] = json.dumps(rep.to_json(), indent=2)
        files["report.md"] = rep.to_markdown()
        saved = self._save_files(
            f"applications/diagnose-{corruption.tag}", files, application="noise", identity=identity,
            corruption=corruption.tag,
        )  # fmt: skip
        return Outcome(rep, saved)

    def transfer(
        self,
        methods: Sequence[str] = ("ddm",),
        *,
        fractions: Sequence[float] = (0.1, 0.2, 0.5),
        alpha: float = 0.5,
        temperature: float = 1.0,
        random_seeds: int = 3,
        student_seeds: Sequence[int | None] = (None,),
        validation_fraction: float = 0.5,
        balanced: bool = False,
    ) -> Outcome:
        """Delete the data the target rests on least by the KL objective, train students with
        (1 - alpha) CE + alpha KL on the rest and compare with random deletion (DDM Table 7): the
        TransferResult as `value`, its files under applications/transfer/."""
        from .applications.diagnose import check_fractions
        from .applications.transfer import transfer as run_transfer

        fitted = {spec: self.method(spec) for spec in methods}
        res = run_transfer(
            self.task(), fitted, fractions=check_fractions(list(fractions)), alpha=alpha,
            temperature=temperature, random_seeds=list(range(random_seeds)),
            student_seeds=list(student_seeds), validation_fraction=validation_fraction, balanced=balanced,
            progress=self.progress,
        )  # fmt: skip
        identity = {"methods": list(methods), "fractions": list(fractions), "alpha": alpha,
                    "temperature": temperature, "random_seeds": random_seeds,
                    "student_seeds": list(student_seeds), "validation_fraction": validation_fraction,
                    "balanced": balanced}  # fmt: skip
        saved = self._save_files(
            "applications/transfer", res.files(), application="transfer", identity=identity
        )
        return Outcome(res, saved)

    def unlearn(
        self,
        clusters: str | Sequence[int],
        synset: str = "default",
        *,
        retrain: bool = True,
        out: str | os.PathLike | None = None,
    ) -> Outcome:
        """Remove clusters' effect by fine-tuning on their synsets (synset variant 'default', 'paper' or
        'paper-match'), compared with the original model and (retrain) exact retraining without them:
        the UnlearnReport as `value`, its table under applications/unlearn/; out: also the unlearned
        model's weights (.safetensors); info['clusters']: the removed cluster ids."""
        from .applications.unlearn import parse_clusters, save_state, synset_variant, unlearn_report

        ids = parse_clusters(clusters, self.clusters().n_clusters)
        task = self.task()
        syn = synset_variant(task, synset, progress=self.progress, store=self.store)
        rep = unlearn_report(task, syn, ids, retrain=retrain)
        table = rep.to_markdown()
        tag = "-".join(str(k) for k in ids)
        stem = f"clusters-{tag}-{synset}"
        paths = self._save_files(
            "applications/unlearn", {f"{stem}.md": table + "\n"}, application="unlearn",
            name=f"applications/unlearn/{stem}",
            identity={"clusters": ids, "synset": synset, "retrain": retrain},
        )  # fmt: skip
        if out is not None:
            meta = {"removed_clusters": ids, "synset": synset, "run": self.path, "model": self.model_name}
            paths.append(str(save_state(out, rep.state, meta)))
        return Outcome(rep, paths, info={"clusters": ids})

    def forgetting(self, synsets: Sequence[str], lr_scales: Sequence[float] = (0.01, 0.1, 1.0)) -> Outcome:
        """Test accuracy after fine-tuning on the whole synset of each variant at multiples of its
        online lr, reverse vs standard matching (DDM Table 4): the markdown table as `value`, stored
        as applications/unlearn/forgetting.md."""
        from .applications.unlearn import forgetting_table, rows_to_markdown, synset_variant

        task = self.task()
        syns = {n: synset_variant(task, n, progress=self.progress, store=self.store) for n in synsets}
        table = rows_to_markdown(forgetting_table(task, syns, lr_scales=list(lr_scales)))
        saved = self._save_files(
            "applications/unlearn", {"forgetting.md": table + "\n"}, application="unlearn",
            name="applications/unlearn/forgetting",
            identity={"synsets": list(synsets), "lr_scales": list(lr_scales)},
        )  # fmt: skip
        return Outcome(table, saved)

    def privacy(
        self, synsets: Sequence[str] = ("paper", "paper-match", "default"), rows: int = 10
    ) -> Outcome:
        """How close each synset variant's samples are to real training images, with membership-inference
        attacks (applications.privacy): the table rows as `value`, metrics.json and a figure of synsets
        beside their nearest real images (`rows` clusters) under applications/privacy/."""
        from .applications.privacy import privacy_figure_png, privacy_table
        from .applications.unlearn import synset_variant

        task = self.task()
        syns = {n: synset_variant(task, n, progress=self.progress, store=self.store) for n in synsets}
        table = privacy_table(syns, self.data)
        files: dict[str, bytes | str | None] = {
            "metrics.json": json.dumps(table, indent=2),
            "nearest-real.png": privacy_figure_png(syns, self.data, task.clusters.cluster_class, n_rows=rows),
        }
        saved = self._save_files(
            "applications/privacy",
            files,
            application="privacy",
            identity={"synsets": list(synsets), "rows": rows},
        )
        return Outcome(table, saved)

    def demo(
        self,
        queries: int = 20,
        *,
        on_start: Callable[[str], None] | None = None,
        on_done: Callable[[str, Any], None] | None = None,
    ) -> Demo:
        """Every stage with defaults (train, 10 clusters per class, the default preset's synset, DDM's
        margin scores for random test queries) checked against exact leave-cluster-out retraining with
        the rules of `distdm evaluate` (metrics.spearman, spearman_within_class); figures under
        figures/demo-*.png. on_start(stage) / on_done(stage, result) are called around each stage."""
        from . import metrics
        from .figures import bar_png, heatmaps_png, synset_grid_png

        timings: dict[str, float] = {}

        def stage(name: str, fn: Callable[[], Any]) -> Any:
            if on_start is not None:
                on_start(name)
            t = time.perf_counter()
            res = fn()
            timings[name] = time.perf_counter() - t
            if on_done is not None:
                on_done(name, res)
            return res

        stage("train", self.train)
        clusters = stage("cluster", lambda: self.cluster(ClusterConfig(per_class=10)))
        syn = stage("distill", lambda: self.distill("default"))
        x, y, _ = self.queries(queries)
        ddm = self.attributor("ddm")
        s = stage("attribute (DDM)", lambda: ddm.scores(x, y, "margin"))
        exact = stage(
            "exact leave-cluster-out retraining", lambda: self.attributor("exact").scores(x, y, "margin")
        )
        # the same per-query rules as `distdm evaluate`: a constant side counts 0, < 3 clusters is left out
        rho = metrics.spearman(s, exact)
        within = metrics.spearman_within_class(s, exact, clusters.cluster_class, y)
        cos = syn.info["layer_cosine"]
        heat = heatmaps_png(
            [(s.values, "DDM (default preset)"), (exact.values, "exact leave-cluster-out retraining")],
            clusters, y.numpy(), title="margin scores on one colour scale",
        )  # fmt: skip
        figs = {
            "heatmaps": str(self.store.save_file("figures/demo-heatmaps.png", heat)),
            "matching": str(
                self.store.save_file(
                    "figures/demo-matching.png",
                    bar_png(list(cos), list(cos.values()), "matching cosine", "cosine"),
                )
            ),
        }
        grid = synset_grid_png(syn, self.data.x_train, clusters)
        if grid:
            figs["synsets"] = str(self.store.save_file("figures/demo-synsets.png", grid))
        return Demo(syn, s, exact, rho, within, len(y), timings, figs)

    def summary(self) -> dict[str, Any]:
        """Stage completion and timings recorded in the manifest."""
        return {k: v for k, v in self.store.manifest["stages"].items()}


__all__ = ["Demo", "Outcome", "Run", "default_train_config", "preset"]
