"""Robustness of attributions to the architecture and the initialisation (DDM paper, Figures 3 and 8).

The same data, clusters and queries; one target model per variant (an architecture and an
initialisation scheme, trained with the same schedule and seed); per variant the class-wise (K = L
units, `clusters.classwise`) and cluster-wise attribution matrices (units x queries) of one method.
Two matrices are compared by the Spearman rank correlation of their flattened entries, the mean
per-query Spearman over units, the fraction of queries whose top unit agrees, and the mean overlap of
the top-3 units per query.

Variants are written 'ARCH', 'INIT' (the reference architecture with that initialisation) or
'ARCH:INIT'; architectures are the built-in models, inits 'default' (PyTorch's), 'kaiming',
'normal' (std 0.02) and 'xavier' (biases zero for the last three).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from ..attribution import ATTRIBUTORS, make_attributor
from ..clusters import Clusters, classwise
from ..data import TensorData
from ..engine import Schedule, model_state, train_variants
from ..errors import DistdmError
from ..models import INITS, MODELS, build_model
from ..objectives import Objective, accuracy
from ..scores import Scores
from ..store import COMPARE_VARIANT, RunStore, cached_tensors, digest
from ..task import Task


@dataclasses.dataclass(frozen=True)
class Variant:
    """One architecture with one initialisation scheme."""

    arch: str
    init: str = "default"
    seed: int | None = None  # None: the study's seed

    @property
    def name(self) -> str:
        """'arch' for the default init, else 'arch:init'; '@seed' when the seed is set."""
        base = self.arch if self.init == "default" else f"{self.arch}:{self.init}"
        return base if self.seed is None else f"{base}@{self.seed}"


def parse_variants(spec: str, reference_arch: str) -> list[Variant]:
    """Variants from 'mlp,convnet' / 'kaiming,xavier' / 'convnet:xavier' / 'mlp@1' (another seed);
    at least two, all distinct."""
    out: list[Variant] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        token, at, seed_text = token.partition("@")
        seed = None
        if at:
            if not seed_text.isdigit():
                raise DistdmError(f"--compare: the seed after '@' must be an integer >= 0, got {seed_text!r}")
            seed = int(seed_text)
        arch, sep, init = token.partition(":")
        if not arch and sep:
            arch = reference_arch
        if not sep and arch in INITS:
            arch, init = reference_arch, arch
        init = init or "default"
        if arch not in MODELS:
            raise DistdmError(f"--compare: unknown architecture {arch!r}; built-in: {sorted(MODELS)}")
        if init not in INITS:
            raise DistdmError(f"--compare: unknown init {init!r}; one of {list(INITS)}")
        out.append(Variant(arch, init, seed))
    if len(out) < 2:
        raise DistdmError(
            f"--compare needs at least two variants (e.g. mlp,convnet or kaiming,xavier), got {spec!r}"
        )
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise DistdmError(f"--compare names a variant twice: {names}")
    return out


def train_variant(
    data: TensorData,
    variant: Variant,
    schedule: Schedule,
    clusters: Clusters,
    *,
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    store: RunStore | None = None,
    progress: bool = False,
) -> Task:
    """Build and train one variant's target model with the schedule and seed (the variant's own seed, if
    set, replaces both the initialisation and the shuffle seed); theta_0 and theta_tau are kept, and
    theta_tau is cached in `store`."""
    n_out = data.num_classes if data.num_classes > 0 else 1
    kwargs = dict(model_kwargs or {})
    if variant.seed is not None:
        seed = variant.seed
        schedule = dataclasses.replace(schedule, seed=seed)
    model = build_model(variant.arch, data.input_shape, n_out, seed=seed, init=variant.init, **kwargs)
    init = model_state(model)
    identity = {"variant": variant.name, "kwargs": kwargs, "seed": seed,
                "schedule": dataclasses.asdict(schedule), "data": data.fingerprint()}  # fmt: skip

    def compute() -> dict[str, torch.Tensor]:
        try:
            res = train_variants(model, data.x_train, data.y_train, schedule, progress=progress)
        except (ValueError, RuntimeError) as e:  # e.g. instance norm over a 1x1 map on small inputs
            raise DistdmError(
                f"variant {variant.name} cannot be trained on inputs of shape {data.input_shape}: {e}"
            ) from e
        return {k: v[0] for k, v in res.states.items()}

    # one result per variant and settings, so variants trained with other settings stay cached too
    name = f"compare/{_safe(variant.name)}-{digest(identity, length=12)}"
    final = cached_tensors(store, name, identity, compute, kind=COMPARE_VARIANT, variant=variant.name)
    return Task(model, data, clusters, schedule, [init, final])


def _safe(name: str) -> str:
    """A variant's name as part of a file name: 'mlp:xavier@1' -> 'mlp-xavier-s1'."""
    return name.replace(":", "-").replace("@", "-s")


def attribution_matrices(
    task: Task,
    method: str,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: str | Objective = "margin",
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Scores]:
    """{'class': (L, Q), 'cluster': (K, Q)} scores of `method` for the task's model. Per-sample
    methods are fitted once and summed both ways; others are fitted once per partition."""
    if method not in ATTRIBUTORS:
        raise DistdmError(f"unknown method {method!r}; available: {sorted(ATTRIBUTORS)}")
    if task.data.is_regression:
        raise DistdmError("class-wise attribution needs class labels")
    settings = dict(settings or {})
    cw = classwise(task.data.y_train)
    cls = ATTRIBUTORS[method]
    if "sample" in cls.units and "unit" not in settings:
        if "chunk" not in settings and "chunk" in cls.Args.names():
            n_params = sum(v.numel() for v in task.final.values())
            settings["chunk"] = int(max(1, min(256, 2e8 // max(n_params, 1))))  # ~800 MB of gradients
        s = make_attributor(method, unit="sample", **settings).fit(task).scores(x, y, objective)
        return {
            "class": s.to_clusters(cw.assignment, cw.n_clusters),
            "cluster": s.to_clusters(task.clusters.assignment, task.clusters.n_clusters),
        }
    out = {}
    for level, clusters in (("class", cw), ("cluster", task.clusters)):
        t = dataclasses.replace(task, clusters=clusters)
        out[level] = make_attributor(method, **settings).fit(t).scores(x, y, objective)
    return out


def _top(values: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-values, axis=0, kind="stable")[:k]


def matrix_similarity(a: np.ndarray, b: np.ndarray, *, top: int = 3) -> dict[str, float]:
    """Agreement of two attribution matrices (units x queries): Spearman of the flattened entries,
    mean per-query Spearman, top-1 agreement and mean top-`top` overlap per query."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise DistdmError(f"matrices must have the same (units, queries) shape, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DistdmError("attribution matrices contain NaN or inf")
    flat = spearmanr(a.ravel(), b.ravel())[0]
    per_q = [spearmanr(a[:, q], b[:, q])[0] for q in range(a.shape[1])]
    k = min(top, a.shape[0])
    ta, tb = _top(a, k), _top(b, k)
    overlap = [len(set(ta[:, q]) & set(tb[:, q])) / k for q in range(a.shape[1])]
    return {
        "spearman_flat": float(flat),
        "spearman_per_query": float(np.nanmean(per_q)) if not np.isnan(per_q).all() else float("nan"),
        "top1_agreement": float((ta[0] == tb[0]).mean()),
        f"top{k}_overlap": float(np.mean(overlap)),
    }


@dataclasses.dataclass
class Comparison:
    """Attribution matrices per variant and level, test accuracies, and their pairwise agreement."""

    method: str
    objective: str
    matrices: dict[str, dict[str, np.ndarray]]  # variant -> level -> (units, queries)
    accuracy: dict[str, float]  # variant -> test accuracy
    seconds: dict[str, float]  # variant -> training + attribution time
    rows: list[dict[str, Any]]  # one per (level, variant pair)

    def to_markdown(self) -> str:
        """Pairwise agreement and per-variant accuracy as markdown tables."""
        from .unlearn import rows_to_markdown

        acc = [{"variant": v, "test_acc": a, "seconds": self.seconds[v]} for v, a in self.accuracy.items()]
        return rows_to_markdown(acc) + "\n\n" + rows_to_markdown(self.rows)


def compare_matrices(
    matrices: Mapping[str, Mapping[str, np.ndarray]], *, pairs: str = "all"
) -> list[dict[str, Any]]:
    """Pairwise `matrix_similarity` rows per level: all pairs, or 'reference' (first vs each other)."""
    names = list(matrices)
    if pairs not in ("all", "reference"):
        raise DistdmError(f"pairs must be 'all' or 'reference', got {pairs!r}")
    todo = [(names[0], b) for b in names[1:]] if pairs == "reference" else [
        (a, b) for i, a in enumerate(names) for b in names[i + 1 :]
    ]  # fmt: skip
    rows = []
    for level in matrices[names[0]]:
        for a, b in todo:
            rows.append({"level": level, "a": a, "b": b,
                         **matrix_similarity(matrices[a][level], matrices[b][level])})  # fmt: skip
    return rows


def compare_study(
    data: TensorData,
    variants: Sequence[Variant],
    schedule: Schedule,
    clusters: Clusters,
    queries: tuple[torch.Tensor, torch.Tensor],
    *,
    method: str = "grad-dot",
    objective: str = "margin",
    seed: int = 0,
    model_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    method_settings: Mapping[str, Any] | None = None,
    store: RunStore | None = None,
    progress: bool = False,
) -> Comparison:
    """Train every variant with the same schedule and seed, attribute the same queries with the same
    clusters, and compare the class-wise and cluster-wise matrices pairwise."""
    if method not in ATTRIBUTORS:
        raise DistdmError(f"unknown method {method!r}; available: {sorted(ATTRIBUTORS)}")
    x, y = queries
    mats: dict[str, dict[str, np.ndarray]] = {}
    acc: dict[str, float] = {}
    secs: dict[str, float] = {}
    for v in variants:
        t = time.perf_counter()
        kwargs = (model_kwargs or {}).get(v.arch, {})
        task = train_variant(data, v, schedule, clusters, seed=seed, model_kwargs=kwargs, store=store,
                             progress=progress)  # fmt: skip
        out = task.outputs(data.x_test)
        acc[v.name] = float(accuracy(out, data.y_test))
        try:
            scores = attribution_matrices(task, method, x, y, objective, method_settings)
        except (ValueError, RuntimeError) as e:  # e.g. instance norm over a 1x1 map, one sample at a time
            raise DistdmError(f"{method} cannot attribute variant {v.name} on these inputs: {e}") from e
        mats[v.name] = {level: s.values for level, s in scores.items()}
        secs[v.name] = time.perf_counter() - t
    return Comparison(method, objective, mats, acc, secs, compare_matrices(mats))


def compare_heatmaps_png(comparison: Comparison, clusters: Clusters, query_labels: np.ndarray) -> bytes:
    """Side-by-side heatmaps: one column per variant, class-wise (top) and cluster-wise (bottom)
    matrices, queries sorted by label, clusters grouped by class, each scaled to its largest |score|."""
    from ..figures import _png, plt

    names = list(comparison.matrices)
    labels = np.asarray(query_labels)
    order_q = np.argsort(labels, kind="stable")
    order_k = np.argsort(clusters.cluster_class, kind="stable")
    fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 7.5), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 3]})  # fmt: skip
    for j, name in enumerate(names):
        for i, level in enumerate(("class", "cluster")):
            v = comparison.matrices[name][level]
            v = v[np.ix_(order_k if level == "cluster" else np.arange(v.shape[0]), order_q)]
            lim = float(np.abs(v).max()) or 1.0
            ax = axes[i, j]
            ax.imshow(v / lim, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            if level == "cluster":
                for b in np.flatnonzero(np.diff(clusters.cluster_class[order_k])) + 0.5:
                    ax.axhline(b, color="k", lw=0.3)
            if j == 0:
                what = "training class" if level == "class" else "cluster (grouped by class)"
                ax.set_ylabel(what, fontsize=8)
            if i == 0:
                ax.set_title(f"{name}\nacc {comparison.accuracy[name]:.3f}", fontsize=8)
            ax.tick_params(labelsize=6)
        axes[1, j].set_xlabel("query (sorted by class)", fontsize=7)
    title = f"{comparison.method} / {comparison.objective}: attribution matrices per variant"
    fig.suptitle(title, fontsize=9)
    return _png(fig)
