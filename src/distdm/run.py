"""A run directory as a Python object: train, cluster, distil and attribute, each stage stored once.

    run = Run("runs/digits", "digits", "mlp")
    run.train(); run.cluster(); run.distill()
    scores = run.attributor("ddm").scores(x, y, "dist1")

Reopening a run with the same data and settings reuses finished stages; with different ones it
raises a DistdmError that says what differs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from .attribution import make_attributor
from .attribution.base import Attributor
from .clusters import Clusters, make_clusters, penultimate_features
from .config import ClusterConfig, DistillConfig, TrainConfig
from .data import TensorData, load_dataset
from .engine import Schedule, State, model_state
from .errors import DistdmError
from .models import build_model
from .presets import preset
from .store import RunStore
from .synset import Synset
from .task import Task, check_memory_budget, check_model, train_target

log = logging.getLogger(__name__)

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


def _state_hash(state: State) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Run:
    """A run directory holding one target model's trajectory, clusters, synsets and results.

    executor (distdm.executors, e.g. get_executor("ray"); None: in-process) and memory_budget_bytes
    set how its retrains, further training and DDM fine-tunes run; results do not depend on them."""

    def __init__(
        self,
        path: str | os.PathLike,
        data: TensorData | str = "digits",
        model: nn.Module | str = "mlp",
        *,
        train: TrainConfig | None = None,
        model_kwargs: dict[str, Any] | None = None,
        data_kwargs: dict[str, Any] | None = None,
        progress: bool = False,
        executor: Any = None,
        memory_budget_bytes: int | None = None,
    ):
        check_memory_budget(memory_budget_bytes)
        if not isinstance(data, (str, TensorData)):
            raise DistdmError(
                f"data must be a built-in dataset name or a TensorData (distdm.from_tensors / from_dataset), "
                f"got {type(data).__name__}"
            )
        if not isinstance(model, (str, nn.Module)):
            raise DistdmError(
                f"model must be a built-in model name or an nn.Module, got {type(model).__name__}"
            )
        if train is not None and not isinstance(train, TrainConfig):
            raise DistdmError(f"train must be a TrainConfig, got {type(train).__name__}")
        source = {"dataset": data, "kwargs": data_kwargs or {}} if isinstance(data, str) else None
        self.data = load_dataset(data, **(data_kwargs or {})) if isinstance(data, str) else data
        self.progress = progress
        # how retrains, further training and fine-tunes run (see Task); results do not depend on them
        self.executor = executor
        self.memory_budget_bytes = memory_budget_bytes
        self.train_config = train or default_train_config(self.data.name)
        n_out = self.data.num_classes if self.data.num_classes > 0 else 1
        if isinstance(model, str):
            self.model_name = model
            self.model = build_model(
                model, self.data.input_shape, n_out, seed=self.train_config.seed, **(model_kwargs or {})
            )
        else:
            self.model_name = type(model).__name__
            self.model = model
        check_model(self.model, self.data)
        self.store = RunStore(path, fingerprint=self.data.fingerprint())
        self.store.check_config(
            "data", {"name": self.data.name, "fingerprint": self.data.fingerprint(), "source": source}
        )
        self.store.check_config(
            "model",
            {
                "name": self.model_name,
                "kwargs": model_kwargs or {},
                "n_params": sum(p.numel() for p in self.model.parameters()),
                "init": _state_hash(model_state(self.model)),
            },
        )
        self._task: Task | None = None
        self._clusters: Clusters | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        data: TensorData | None = None,
        progress: bool = False,
        executor: Any = None,
        memory_budget_bytes: int | None = None,
    ) -> Run:
        """Reopen an existing run directory with the dataset, model and training settings it records
        (executor and memory_budget_bytes: how its training jobs run, as in `Run`)."""
        store = RunStore(path, create=False)
        cfg = store.manifest["configs"]
        if "data" not in cfg or "model" not in cfg:
            raise DistdmError(f"run {path} records no data or model settings: it was never initialised")
        source = cfg["data"].get("source")
        if data is None and source is None:
            raise DistdmError(
                f"run {path} was made from user data: pass the same data to Run.open(..., data=)"
            )
        model = cfg["model"]["name"]
        if data is None:
            data_arg: TensorData | str = source["dataset"]
            data_kwargs = source["kwargs"]
        else:
            data_arg, data_kwargs = data, None
        train = TrainConfig.from_dict(cfg["train"]) if "train" in cfg else None
        return cls(
            path, data_arg, model, train=train, model_kwargs=cfg["model"]["kwargs"],
            data_kwargs=data_kwargs, progress=progress, executor=executor,
            memory_budget_bytes=memory_budget_bytes,
        )  # fmt: skip

    @property
    def path(self) -> str:
        """The run directory."""
        return str(self.store.root)

    @property
    def schedule(self) -> Schedule:
        """The training schedule of the target model."""
        c = self.train_config
        return Schedule(
            epochs=c.epochs, lr=c.lr, batch_size=c.batch_size, optimizer=c.optimizer,
            momentum=c.momentum, weight_decay=c.weight_decay, seed=c.seed,
        )  # fmt: skip

    # stages -----------------------------------------------------------------------------------
    def train(self) -> list[State]:
        """Train the target model and store its trajectory (one state per epoch); reuse if stored."""
        if not self.store.is_done("train"):
            self.store.reset("train")  # settings of an attempt that never finished bind nothing
        self.store.check_config("train", self.train_config.to_dict())
        if self.store.is_done("train"):
            return self.trajectory()
        t = time.perf_counter()
        task = train_target(self.model, self.data, self.schedule, progress=self.progress)
        tensors = {f"{e}/{k}": v for e, s in enumerate(task.trajectory) for k, v in s.items()}
        self.store.save_tensors("trajectory", tensors)
        self.store.mark_done("train", seconds=time.perf_counter() - t, accuracy=self._accuracy(task.final))
        return task.trajectory

    def trajectory(self) -> list[State]:
        """The stored trajectory theta_0..theta_tau."""
        if not self.store.is_done("train"):
            raise DistdmError(f"run {self.path} has no trained model yet: run the 'train' stage first")
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
            return penultimate_features(self.model, self.data.x_train, self.trajectory()[-1])

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
        self.store.mark_done("cluster", seconds=time.perf_counter() - t, n_clusters=clusters.n_clusters)
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
        """The Task (model, data, clusters, schedule, trajectory) that attributors are fitted on."""
        if self._task is None:
            self._task = Task(
                self.model, self.data, self.clusters(), self.schedule, self.trajectory(), store=self.store,
                executor=self.executor, memory_budget_bytes=self.memory_budget_bytes,
            )  # fmt: skip
        return self._task

    def distill(self, preset_name: str = "default", config: DistillConfig | None = None) -> Synset:
        """Distil (or load) the synset of a preset, or of explicit settings."""
        return self._ddm(preset_name, config).synset_

    def _ddm(self, preset_name: str, config: DistillConfig | None) -> Attributor:
        t = time.perf_counter()
        ddm = make_attributor("ddm", preset_name=preset_name, distill_config=config, progress=self.progress)
        ddm.fit(self.task())
        stage = f"distill-{preset_name}" if config is None else "distill-custom"
        if not self.store.is_done(stage):
            info = ddm.synset_.info  # type: ignore[attr-defined]
            self.store.mark_done(
                stage,
                seconds=time.perf_counter() - t,
                forgetting=info.get("forgetting"),
                layer_cosine=info.get("layer_cosine"),
            )
        return ddm

    def attributor(self, name: str = "ddm", **settings: Any) -> Attributor:
        """A fitted attributor of this run's task by name ('ddm', 'exact', 'grad-dot', 'if-cg', ...)."""
        if name == "ddm":
            return self._ddm(
                str(settings.pop("preset_name", "default")), settings.pop("distill_config", None)
            )
        return make_attributor(name, **settings).fit(self.task())

    def queries(self, n: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """n test queries drawn with a seed: inputs, labels and their test-set indices."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
            raise DistdmError(f"the number of queries must be an integer > 0, got {n!r}")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.data.y_test), generator=g)[: min(n, len(self.data.y_test))]
        return self.data.x_test[idx], self.data.y_test[idx], idx.numpy()

    def _accuracy(self, state: State) -> float:
        with torch.no_grad():
            from .engine import predict

            out = predict(self.model, {k: v.unsqueeze(0) for k, v in state.items()}, self.data.x_test)[0]
        if self.data.is_regression:
            return float(((out.squeeze(-1) - self.data.y_test) ** 2).mean())
        return float((out.argmax(-1) == self.data.y_test).float().mean())

    def summary(self) -> dict[str, Any]:
        """Stage completion and timings recorded in the manifest."""
        return {k: v for k, v in self.store.manifest["stages"].items()}


__all__ = ["Run", "default_train_config", "preset"]
