"""The Distilled Datamodel: emulate leave-cluster-out retraining by fine-tuning on synsets."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..clusters import Clusters, classwise, index_order
from ..config import DistillConfig, OnlineConfig
from ..datamodel import Fit, fit_datamodel, sample_deletions
from ..distill import distill, finetune
from ..distill_influence import SHARE_FLOOR, SHARE_TARGET
from ..engine import predict
from ..errors import DistdmError
from ..hessian import gradient_rows
from ..objectives import Objective, get_objective, objective_name
from ..presets import PRESETS
from ..presets import preset as preset_settings
from ..progress import Progress, check_progress
from ..scores import Scores
from ..store import SYNSET, ReadOnlyRunError, RunStore, check_store, digest
from ..synset import Synset
from ..task import Task, store_of
from .base import Attributor, Settings, frozen_value, register

log = logging.getLogger(__name__)


def synset_key(cfg: DistillConfig, clusters: Clusters, lr: float, steps: int) -> str:
    """A stable name for a synset made with these settings on these clusters."""
    ident: list[Any] = [cfg.to_dict(), lr, steps]
    if cfg.damping == "auto":  # the rule's constants choose the damping: a changed rule is another synset
        ident.append({"share_damping": [SHARE_TARGET, SHARE_FLOOR]})
    return f"synset/{clusters.kind}-{digest(ident, clusters.assignment, length=12)}"


def load_or_distill(
    task: Task,
    cfg: DistillConfig,
    clusters: Clusters,
    lr: float,
    steps: int,
    progress: Progress = False,
    store: RunStore | None = None,
) -> Synset:
    """The synset for these settings: from the run store if cached there, else distilled (and cached
    there). store: a run's RunStore (default the task's deprecated `store`; None: not cached)."""
    check_store(store)
    key = synset_key(cfg, clusters, lr, steps)
    store = store_of(task, store)
    files = [key + ".json", key + ".safetensors"]
    identity = {"kind": clusters.kind, "settings": cfg.to_dict(), "lr": lr, "steps": steps,
                "clusters": digest(clusters.assignment)}  # fmt: skip
    if store is not None and all(store.has(f) for f in files):
        stored = store.load_tensors(key)  # on the CPU, wherever it was distilled
        on_device = {k: v if k == "lr_steps" else v.to(task.device) for k, v in stored.items()}
        syn = Synset.from_tensors(on_device, store.load_json(key))
        if store.result(key) is None:  # cached before the results index: list it (unless read-only)
            with contextlib.suppress(ReadOnlyRunError):
                store.record_result(key, SYNSET, files, identity, seconds=syn.info.get("seconds"))
        return syn
    journal = f"{key}/journal"  # the finished chunks of clusters, until the synset is saved whole
    syn = distill(
        task, cfg, clusters=clusters, lr=lr, steps=steps, progress=progress, store=store, journal=journal
    )
    if store is not None:
        store.save_json(key, syn.info)  # info first: the tensors file marks the synset complete
        store.save_tensors(key, syn.to_tensors())
        store.record_result(key, SYNSET, files, identity, seconds=syn.info.get("seconds"))
        store.reset(journal)  # the synset holds all of it now
    return syn


def _settings_arg(
    name: str,
    value: object,
    kind: type[DistillConfig] | type[OnlineConfig],
    base: DistillConfig | OnlineConfig,
) -> None:
    """Refuse a `distill` / `online` argument that is not None, a full config or valid overrides of `base`."""
    if value is None or isinstance(value, kind):
        return
    if not isinstance(value, Mapping):
        raise DistdmError(
            f"{name} must be a full {kind.__name__} or a dict of the preset's settings to change, "
            f"got {type(value).__name__}"
        )
    try:
        base.replace(**dict(value))
    except DistdmError as e:
        raise DistdmError(f"ddm {name}={dict(value)!r}: {e}") from None
    except TypeError as e:  # a key that is not a string
        raise DistdmError(f"ddm {name}={dict(value)!r}: setting names must be strings ({e})") from None


def _apply(value: Any, base: Any) -> Any:
    """The preset's config `base` with `value` applied: a full config replaces it, a dict changes it."""
    if value is None:
        return base
    if isinstance(value, Mapping):
        return base.replace(**dict(value))
    return value


def _canonical(value: Any, kind: type[DistillConfig] | type[OnlineConfig]) -> Any:
    """A `distill` / `online` setting in one form: a dict naming every setting is the full config."""
    if not isinstance(value, Mapping):
        return value
    d = {k: frozen_value(v) for k, v in value.items()}
    if set(d) == {f.name for f in dataclasses.fields(kind)}:
        return kind.from_dict(d)
    return d


@dataclasses.dataclass(frozen=True)
class DDMArgs(Settings):
    """ddm's settings: the preset, overrides of its distillation / online settings, the units."""

    preset: str = "default"
    distill: DistillConfig | Mapping[str, Any] | None = None
    online: OnlineConfig | Mapping[str, Any] | None = None
    clusters: str = "task"

    def validate(self) -> None:
        if not isinstance(self.preset, str) or self.preset not in PRESETS:
            raise DistdmError(f"unknown preset {self.preset!r} for ddm; known presets: {', '.join(PRESETS)}")
        if self.clusters not in ("task", "index"):
            raise DistdmError(f"clusters must be 'task' or 'index', got {self.clusters!r}")
        # overrides are checked against the preset now, not at fit; the epochs only set the paper
        # preset's online steps, which a change of other settings does not depend on
        d, o = preset_settings(self.preset, epochs=1)
        _settings_arg("distill", self.distill, DistillConfig, d)
        _settings_arg("online", self.online, OnlineConfig, o)
        object.__setattr__(self, "distill", _canonical(self.distill, DistillConfig))
        object.__setattr__(self, "online", _canonical(self.online, OnlineConfig))


@register("ddm")
class DDM(Attributor):
    """Distilled Datamodel (Ye et al., CVPR 2024): W[k, q] = change of the objective on query q when
    cluster k is deleted, fitted over random deletion masks emulated by fine-tuning on synsets.

    preset: named settings (distdm.PRESETS, the CLI's --preset). distill / online: a full
    DistillConfig / OnlineConfig, or a dict of the preset's settings to change, e.g.
    online={"perturbations_per_cluster": 8} keeps every other online setting of the preset.
    synset: a ready synset (no distillation). clusters: 'task' (the task's clusters) or 'index' (the
    paper's 'w/o cluster' ablation). progress (distdm.progress): False, True (a bar on stderr) or a
    callable (stage, done, total) -> None, told about the distillation. store: a run's RunStore in
    which synsets are cached and from which they are loaded (default the task's deprecated
    `store`, else none).
    """

    Args = DDMArgs
    execution = ("synset", "progress", "store")  # a ready synset is an input, not a setting
    trains_models = True

    def __init__(
        self,
        preset: str = "default",
        *,
        distill: DistillConfig | Mapping[str, Any] | None = None,
        online: OnlineConfig | Mapping[str, Any] | None = None,
        synset: Synset | None = None,
        clusters: str = "task",
        progress: Progress = False,
        store: RunStore | None = None,
    ):
        super().__init__(preset=preset, distill=distill, online=online, clusters=clusters)
        check_progress(progress)
        check_store(store)
        self.synset = synset
        self.progress = progress
        self.store = store

    @property
    def unit(self) -> str:
        """'cluster', or 'sample' for the 'w/o cluster' ablation (clusters='index')."""
        return "sample" if self.clusters == "index" else "cluster"

    def to_dict(self) -> dict[str, Any]:
        """{'method': 'ddm', 'settings': {...}}; a DDM given a ready synset has no such dict."""
        if self.synset is not None:
            raise DistdmError(
                "a ddm made from a ready synset cannot be written as settings: the synset is data "
                "(save it with Synset.to_tensors, or make the ddm from a preset)"
            )
        return super().to_dict()

    def _settings(self, task: Task) -> tuple[DistillConfig, OnlineConfig]:
        d, o = preset_settings(self.preset, epochs=task.schedule.epochs)
        return _apply(self.distill, d), _apply(self.online, o)

    def _fit(self, task: Task) -> None:
        self._deltas = None
        self.distill_config_, self.online_ = self._settings(task)
        lr = self.online_.lr or task.schedule.lr
        self.units_ = task.clusters
        if self.clusters == "index":
            # the paper's 'w/o cluster' ablation: as many units as the task has clusters, but cut in
            # index order within each class; scores come back per sample (a unit's score shared
            # equally by its members), so they can be compared on the task's own clusters
            per_class = np.bincount(np.asarray(task.clusters.cluster_class)).max()
            self.units_ = index_order(task.data.y_train, int(per_class))
        if self.synset is not None:
            if self.synset.n_clusters != self.units_.n_clusters:
                raise DistdmError(
                    f"the synset covers {self.synset.n_clusters} clusters, "
                    f"the task has {self.units_.n_clusters}"
                )
            self.synset_ = self.synset
        else:
            self.synset_ = load_or_distill(
                task, self.distill_config_, self.units_, lr, self.online_.steps, self.progress, self.store
            )
        # what the distillation cost when it ran, also when this fit loaded the synset from the run
        self.recorded_seconds_ = self.synset_.info.get("seconds")
        # the run-manifest stage of this synset: the preset's name for the preset's own synset, else
        # a digest of what made it, so that two custom settings keep their own diagnostics
        key = synset_key(self.distill_config_, self.units_, lr, self.online_.steps)
        self.synset_key_ = key
        d0, o0 = preset_settings(self.preset, epochs=task.schedule.epochs)
        own = self.synset is None and key == synset_key(
            d0, task.clusters, o0.lr or task.schedule.lr, o0.steps
        )
        self.distill_stage_ = f"distill-{self.preset}" if own else f"distill-custom-{key.rsplit('-', 1)[1]}"

    def outcomes(
        self, delete: np.ndarray, x: torch.Tensor, y: torch.Tensor, objective: str | Objective
    ) -> np.ndarray:
        """Objective values (P, outputs) of the fine-tuned model for every deletion mask."""
        task = self.task_
        fn = get_objective(objective)
        masks = torch.as_tensor(delete, dtype=torch.float32, device=task.device)
        ref = task.outputs(x)
        # the fine-tuned states of a few masks at a time: all of them (masks x P floats) at 1M
        # parameters and 1000 masks would be 4 GB
        n_params = sum(v.numel() for v in task.final.values())
        rows = gradient_rows(n_params, task.memory_budget_bytes, most=max(1, len(masks)))
        parts = []
        for part in masks.split(rows):
            out = predict(task.model, self.finetuned(part), x, strategy=task.strategy)
            parts.append(fn(out, ref, y).detach())
        # the datamodel's least squares (distdm.datamodel) runs in NumPy on these (masks x queries)
        return torch.cat(parts).cpu().numpy()

    def finetuned(self, delete: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stacked states after fine-tuning on the synsets of each row's deleted clusters.

        With one step, the step on a union of synsets is exactly the sum of single-cluster steps,
        so the K single-cluster updates are computed once and every mask costs one matrix product.
        """
        task, syn = self.task_, self.synset_
        if syn.steps != 1:
            return finetune(task, syn, delete)
        if getattr(self, "_deltas", None) is None:
            single = finetune(task, syn, torch.eye(syn.n_clusters, device=task.device))
            self._deltas = {k: v - task.final[k] for k, v in single.items()}
        return {k: task.final[k] + torch.tensordot(delete, d, dims=1) for k, d in self._deltas.items()}

    def _finite_rows(self, q: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ok = np.isfinite(r).all(1)
        if not ok[0] or ok.sum() < max(2, len(ok) // 2):
            raise DistdmError(
                f"fine-tuning on the synsets diverged for {int((~ok).sum())} of {len(ok)} deletion masks "
                f"(outputs are NaN or inf): lower the online lr (now {self.synset_.lr}) or the steps "
                f"(now {self.synset_.steps}), or calibrate the synset"
            )
        if not ok.all():
            log.warning("DDM: %d of %d fine-tunes diverged and are left out of the fit", (~ok).sum(), len(ok))
        return q[ok], r[ok]

    def fit_matrix(self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective) -> Fit:
        """Sample masks, emulate each by fine-tuning, and fit the attribution matrix."""
        k = self.synset_.n_clusters
        o = self.online_
        q = sample_deletions(
            k, int(round(o.perturbations_per_cluster * k)), weighting=o.weighting, seed=o.seed
        )
        q, r = self._finite_rows(q, self.outcomes(q, x, y, objective))
        return fit_datamodel(q, r, weighting=o.weighting, ridge=o.ridge, holdout=o.holdout, seed=o.seed)

    def _scores(self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective) -> Scores:
        fit = self.fit_matrix(x, y, objective)
        self.last_fit_ = fit
        name = f"ddm-{self.preset}"
        if self.clusters == "index":
            a = self.units_.assignment
            share = fit.w[a] / np.bincount(a, minlength=self.units_.n_clusters)[a, None]
            return Scores(share, "sample", objective_name(objective), name + "-index")
        return Scores(fit.w, "cluster", objective_name(objective), name)

    def hierarchical(
        self, x: torch.Tensor, y: torch.Tensor, objective: str | Objective = "dist1"
    ) -> np.ndarray:
        """Top cluster per query by the class-then-cluster search: L class-level fine-tunes with the
        class-wise synset pick the top class, then C single-cluster fine-tunes within it."""
        task = self.task_
        fn = get_objective(objective)
        cw = classwise(task.data.y_train)
        lr = self.online_.lr or task.schedule.lr
        cls_syn = load_or_distill(
            task, self.distill_config_, cw, lr, self.online_.steps, self.progress, self.store
        )
        ref = task.outputs(x)
        base = fn(ref.unsqueeze(0), ref, y)[0]
        cls_out = predict(task.model, finetune(task, cls_syn, torch.eye(cw.n_clusters)), x)
        # the search picks clusters by NumPy index arrays: the Q argmaxes come to the CPU
        top_class = cw.cluster_class[(fn(cls_out, ref, y) - base).argmax(0).cpu().numpy()]
        best = np.empty(len(y), dtype=np.int64)
        for c in np.unique(top_class):
            ks = np.flatnonzero(task.clusters.cluster_class == c)
            delete = np.zeros((len(ks), task.clusters.n_clusters))
            delete[np.arange(len(ks)), ks] = 1.0
            out = predict(task.model, finetune(task, self.synset_, torch.as_tensor(delete)), x)
            pick = ks[(fn(out, ref, y) - base).argmax(0).cpu().numpy()]
            best[top_class == c] = pick[top_class == c]
        return best
