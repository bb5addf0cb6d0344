"""DDM's offline cost against the truth it replaces, in one run on one machine (issue 14).

    python benchmarks/ddm_cost.py --settings digits-mlp-k100,probe-mlp-203k \
        --presets fast,default --quality digits-mlp-k100 --threads 1 --out benchmarks/out

For each setting: one training run of the target, the exact K-cluster sweep (all K leave-one-cluster-
out retrains, batched as the `exact` method does, nothing cached), and DDM offline for each preset or
variant, split by stage (curvature, influence target, distillation), as ratios DDM / sweep and DDM /
one training run; peak RSS per stage (the kernel's high-water mark, reset before each stage). With
--quality on a setting: Spearman (all clusters, within the query's class) and LDS of each preset
against exact leave-cluster-out retraining (BENCHMARKS.md: truth seeds 0, 1, 2, 50 queries, 100 LDS
subsets), retrains cached in <out>/run-<setting> as benchmarks/quality.py does.

Settings: digits-mlp-k100 (BENCHMARKS.md) and probe-mlp-<H> (BENCHMARKS.md's probe-mlp-203k with
hidden width H: 2,000 generated 784-feature samples, 10 classes, SGD lr 0.05, batch 128, 30 epochs,
10 k-means clusters per class on penultimate features); probe-mlp-203k is probe-mlp-256.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from quality import FMNIST_PER_CLASS, build_task, pick_queries, run_name  # noqa: E402

from distdm import metrics  # noqa: E402
from distdm.attribution.ddm import DDM  # noqa: E402
from distdm.attribution.retrain import ExactRetrain, leave_one_out_masks, retrain_masks  # noqa: E402
from distdm.clusters import kmeans_per_class, penultimate_features  # noqa: E402
from distdm.config import DistillConfig  # noqa: E402
from distdm.data import TensorData  # noqa: E402
from distdm.distill import distill  # noqa: E402
from distdm.distill_influence import _EIGEN_CACHE, make_curvature, top_eigenpairs  # noqa: E402
from distdm.engine import Schedule  # noqa: E402
from distdm.evaluate import retrained_values  # noqa: E402
from distdm.models import build_model  # noqa: E402
from distdm.presets import preset  # noqa: E402
from distdm.store import RunStore  # noqa: E402
from distdm.task import Task, train_target  # noqa: E402


def probe_task(hidden: int) -> Task:
    """BENCHMARKS.md's probe-mlp-203k with hidden width `hidden` (203,530 parameters at 256)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 784, generator=g)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 10
        return centres[y] + 2.0 * torch.randn(n, 784, generator=g), y

    (xtr, ytr), (xte, yte) = sample(2000), sample(500)
    data = TensorData(xtr, ytr, xte, yte, 10, f"probe-{hidden}")
    model = build_model("mlp", data.input_shape, 10, seed=0, hidden=(hidden,))
    task = train_target(model, data, Schedule(epochs=30, lr=0.05, batch_size=128, seed=0))
    feats = penultimate_features(model, data.x_train, state=task.final)
    return dataclasses.replace(task, clusters=kmeans_per_class(feats, data.y_train, 10, seed=0, n_init=10))


def make_task(setting: str, per_class: int = FMNIST_PER_CLASS) -> Task:
    """The task of a setting name (per_class: Fashion-MNIST training images per class)."""
    if setting.startswith("probe-mlp-"):
        tail = setting.removeprefix("probe-mlp-")
        return probe_task(256 if tail == "203k" else int(tail))
    return build_task(setting, per_class=per_class)


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the heap stays as it is
        pass


def _proc_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


class Stage:
    """Wall time and peak RSS (MB) of a block, the kernel's high-water mark reset on entry."""

    def __enter__(self) -> Stage:
        _trim()
        self.rss_before = _proc_kb("VmRSS") / 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # no reset: the peak is the process's so far
            pass
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t
        self.peak_mb = _proc_kb("VmHWM") / 1024


def ddm_configs(
    epochs: int, presets: list[str], variants: dict[str, dict[str, Any]]
) -> dict[str, DistillConfig]:
    """name -> distillation settings: the named presets, then variants (changes to the 'default'
    preset)."""
    out = {p: preset(p, epochs=epochs)[0] for p in presets}
    fast = preset("default", epochs=epochs)[0]
    for name, changes in variants.items():
        out[name] = fast.replace(**changes)
    return out


def run_ddm(task: Task, cfg: DistillConfig) -> tuple[Any, dict[str, Any]]:
    """Distil one synset, curvature first as its own stage; the row of timings and memory."""
    _EIGEN_CACHE.clear()
    with Stage() as s_curv:
        if cfg.solver == "closed-form":
            curv = make_curvature(task, cfg)
        else:  # the adam pipeline reads the cached eigenpairs
            top_eigenpairs(
                task, cfg.hessian_rank, cfg.curvature, cfg.hessian_subsample, cfg.residual_subsample
            )
            curv = None
    with Stage() as s_rest:
        if curv is not None:
            from distdm.distill_influence import distill_closed_form

            syn = distill_closed_form(task, cfg, curvature=curv)
        else:
            syn = distill(task, cfg)
    info = syn.info
    target = info.get("seconds_target", 0.0)
    row = {
        "curvature_s": s_curv.seconds,
        "target_s": target,
        "distill_s": s_rest.seconds - target,
        "offline_s": s_curv.seconds + s_rest.seconds,
        "rss_curvature_mb": s_curv.peak_mb,
        "rss_target_distill_mb": s_rest.peak_mb,
        "rss_before_mb": s_curv.rss_before,
        "rel_error": info.get("relative_error_median"),
        "loss_history": [round(v, 4) for v in info.get("loss_history", [])][:8],
        "clusters_per_chunk": info.get("clusters_per_chunk"),
        "factored": info.get("factored"),
        "target_curvature_share": info.get("target_curvature_share"),
    }
    del curv
    return syn, row


def quality(
    task: Task, run_dir: Path, n_queries: int, lds_subsets: int, seeds: tuple[int, ...] = (0, 1, 2)
) -> Any:
    """Truth, LDS retrains and the queries of a setting: a function synset -> quality row."""
    store = RunStore(run_dir, fingerprint=task.data.fingerprint())
    x, y = pick_queries(task, n_queries)
    effects = list(ExactRetrain(seeds=seeds, store=store).fit(task).per_seed_scores(x, y, "margin"))
    truth = np.mean(effects, 0)
    keep = metrics.lds_masks(task.clusters.n_clusters, lds_subsets, 0.5, seed=1)
    actual = retrained_values(task, keep, x, y, objective="margin", tag="lds", store=store)
    cc = task.clusters.cluster_class

    def score(syn: Any) -> dict[str, float]:
        values = DDM("default", synset=syn).fit(task).scores(x, y, "margin").values
        return {
            "spearman_all": metrics.spearman(values, truth).mean,
            "spearman_within": metrics.spearman_within_class(values, truth, cc, y).mean,
            "lds": metrics.lds(values, keep, actual).mean,
        }

    return score


def main() -> None:
    """Measure every setting and preset; print JSON rows and write a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="digits-mlp-k100")
    ap.add_argument("--presets", default="fast,default")
    ap.add_argument("--variants", default="{}", help="JSON name -> changes to the 'default' preset")
    ap.add_argument("--quality", default="", help="settings (comma-separated) to measure quality on")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--lds-subsets", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-class", type=int, default=FMNIST_PER_CLASS, help="Fashion-MNIST images per class")
    ap.add_argument("--truth-seeds", default="0,1,2", help="seeds of the exact truth (BENCHMARKS.md: 0,1,2)")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument(
        "--distill-budget-mb", type=int, default=0, help="distillation working memory without a task budget"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.distill_budget_mb:
        import distdm.distill_influence as di

        di.DISTILL_MEMORY_BUDGET = args.distill_budget_mb * 2**20
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quality_on = {s for s in args.quality.split(",") if s}
    presets = [p for p in args.presets.split(",") if p]
    variants = json.loads(args.variants)
    rows = []
    t_start = time.perf_counter()
    for setting in [s for s in args.settings.split(",") if s]:
        task = make_task(setting, args.per_class)
        k = task.clusters.n_clusters
        n_params = sum(v.numel() for v in task.final.values())
        seeds = tuple(int(s) for s in args.truth_seeds.split(","))
        run_dir = out / f"run-{run_name(setting, args.per_class)}"
        score = None
        if setting in quality_on:
            score = quality(task, run_dir, args.queries, args.lds_subsets, seeds)
        with Stage() as s_one:
            retrain_masks(task, torch.ones(1, k), unit="cluster")
        with Stage() as s_sweep:
            retrain_masks(task, leave_one_out_masks(k), unit="cluster")
        base = {"setting": setting, "params": n_params, "clusters": k}
        head = {
            **base,
            "one_run_s": s_one.seconds,
            "sweep_s": s_sweep.seconds,
            "rss_sweep_mb": s_sweep.peak_mb,
        }
        print(json.dumps(head), flush=True)
        for name, cfg in ddm_configs(task.schedule.epochs, presets, variants).items():
            syn, row = run_ddm(task, cfg)
            row = {
                **base,
                "ddm": name,
                **row,
                "ddm_over_sweep": row["offline_s"] / s_sweep.seconds,
                "ddm_over_one_run": row["offline_s"] / s_one.seconds,
                "one_run_s": s_one.seconds,
                "sweep_s": s_sweep.seconds,
                "rss_sweep_mb": s_sweep.peak_mb,
            }
            if score is not None:
                row.update(score(syn))
            rows.append(row)
            print(
                json.dumps({a: round(b, 4) if isinstance(b, float) else b for a, b in row.items()}),
                flush=True,
            )
            del syn
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "command": "python " + " ".join(sys.argv),
        "wall_s": time.perf_counter() - t_start,
    }
    stem = "ddm-cost"
    (out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str))
    cols = [
        "setting", "params", "ddm", "one_run_s", "sweep_s", "curvature_s", "target_s", "distill_s",
        "offline_s", "ddm_over_sweep", "ddm_over_one_run", "rss_sweep_mb", "rss_curvature_mb",
        "rss_target_distill_mb", "spearman_within", "lds", "spearman_all",
    ]  # fmt: skip

    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    table = "\n".join(lines)
    (out / f"{stem}.md").write_text(json.dumps(meta) + "\n\n" + table + "\n")
    print(json.dumps(meta))
    print(table)


if __name__ == "__main__":
    main()
