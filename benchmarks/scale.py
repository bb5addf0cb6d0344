"""Cost and peak memory of every stage as N, P and K grow, and the Ray executor (issue 14).

    .venv/bin/python benchmarks/scale.py --out benchmarks/out/scale           # default axes N,P,K,ray
    .venv/bin/python benchmarks/scale.py --quick --out /tmp/scale-quick       # 1-2 minute smoke run
    .venv/bin/python benchmarks/scale.py --report-only --out benchmarks/out/scale  # tables from the cache

The ray axis runs under --ray-python (default /tmp/scale-venv/bin/python), an interpreter with ray and
distdm's dependencies, made once with
    python3.11 -m venv /tmp/scale-venv && /tmp/scale-venv/bin/pip install -c constraints.txt \
        torch==2.13.0 numpy scipy scikit-learn safetensors typer rich matplotlib filelock ray
(distdm itself comes from src/ via PYTHONPATH); without it that cell records the error and the rest runs.

Stages: one training run of the target (`train`), the exact leave-one-cluster-out sweep (`sweep`,
K + 1 retrains batched by distdm.attribution.retrain.retrain_masks), DDM `default` offline split into
curvature / influence target / distillation (benchmarks/ddm_cost.run_ddm), DDM online (fit + 50 queries
on the cached synset) and if-cg / if-ekfac / if-arnoldi (fit + 50 queries). Every stage of every
setting runs in its own subprocess (one torch thread), so its peak RSS is that process's kernel
high-water mark (VmHWM, reset on entry to the stage: it includes the data and task the stage reads).

Axes: N (Fashion-MNIST 1k / 10k / 60k images, MLP 784-32-10), P (MLP and ConvNet from 10k to 1M
parameters on Fashion-MNIST 1k, and ResNet-18-AP, 11M, on 500 generated 32x32x3 images), K (100,
1000 on Fashion-MNIST 10k), ray (the 1k sweep in-process against distdm.executors.RayExecutor with 1
and 2 local workers, run by --ray-python, which must import ray). Where a full stage is too slow on 2
cores a cell measures a stated part (a subset of the sweep's variants, of the clusters distilled, a
subsample for the Hessian) and scales the seconds by the stated factor: columns `measured on` and
`extrapolated x` of the table. Cells are cached as JSON in <out>/cells (a rerun resumes; --force
reruns); trained targets and synsets in <out>/tasks. Output: <out>/scale.md, <out>/scale.json and
benchmarks/figures/scale-{N,P,K}.png (log-log, slopes fitted with numpy.polyfit on the logs).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parent.parent
FIGURES = Path(__file__).resolve().parent / "figures"
STAGES = (
    "train",
    "sweep",
    "ddm-offline",
    "ddm-offline-ekfac",
    "ddm-online",
    "if-cg",
    "if-ekfac",
    "if-arnoldi",
)
N_QUERIES = 50
GB8 = 8 * 2**30


# ----------------------------------------------------------------------------------------------------
# pure helpers


def fit_slope(xs: list[float], ys: list[float]) -> float | None:
    """Slope of log(y) against log(x) by least squares (None with fewer than two positive points)."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if x and y and x > 0 and y > 0 and math.isfinite(y)]
    if len(set(p[0] for p in pts)) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def setting_id(setting: dict[str, Any]) -> str:
    """A short stable name of a setting (data, size, model, width, K, epochs)."""
    s = setting
    return f"{s['data']}{s['n']}-{s['model']}{s['width']}-k{s['k']}-e{s['epochs']}"


def cell_id(setting: dict[str, Any], stage: str, extra: dict[str, Any]) -> str:
    """The cache name of one (setting, stage, stage options) cell."""
    tail = hashlib.sha1(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8] if extra else ""
    return f"{setting_id(setting)}--{stage}" + (f"--{tail}" if tail else "")


# ----------------------------------------------------------------------------------------------------
# settings and axes


def _s(data: str, n: int, model: str, width: int, k: int = 100, epochs: int = 2, **kw: Any) -> dict[str, Any]:
    return {"data": data, "n": n, "model": model, "width": width, "k": k, "epochs": epochs, **kw}


def axes(quick: bool) -> dict[str, list[tuple[dict[str, Any], dict[str, dict[str, Any]]]]]:
    """axis -> [(setting, stage -> options)]; options say which part of a slow stage is measured."""
    all_if = {"if-cg": {}, "if-ekfac": {}, "if-arnoldi": {}}
    if quick:
        small = {"train": {}, "sweep": {"variants": 11}, "ddm-offline": {}, "ddm-online": {}, **all_if}
        return {
            "N": [(_s("fmnist", n, "mlp", 16, k=20, epochs=1), small) for n in (500, 1000)],
            "P": [(_s("fmnist", 500, "mlp", w, k=20, epochs=1), small) for w in (12, 40)],
            "K": [(_s("fmnist", 1000, "mlp", 16, k=k, epochs=1), small) for k in (20, 50)],
            "ray": [(_s("fmnist", 500, "mlp", 16, k=20, epochs=1), {"ray": {"workers": [1, 2], "chunk": 6}})],
        }
    full = {"train": {}, "sweep": {"variants": 11}, "ddm-offline": {}, "ddm-online": {}, **all_if}
    n_axis = [(_s("fmnist", n, "mlp", 32), full) for n in (1000, 10000, 60000)]
    p_axis = [(_s("fmnist", 1000, "mlp", w), full) for w in (12, 128, 1260)]
    p_axis += [(_s("fmnist", 1000, "convnet", w), {**full, "sweep": {"variants": 3}}) for w in (32, 128)]
    # ResNet-18-AP: 11M parameters; one epoch, 2 of the 101 sweep variants, 2 of the 100 clusters
    # distilled (the rest lumped into one), the Arnoldi HVPs and the EK-FAC fit on 16 samples
    rn = _s("gen32", 500, "resnet18ap", 64, epochs=1)
    p_axis.append(
        (
            rn,
            {
                "train": {},
                "sweep": {"variants": 2},
                "ddm-offline": {"clusters": 1, "hessian_subsample": 16, "memory_budget_gb": 8},
                "ddm-offline-ekfac": {"clusters": 1, "hessian_subsample": 16, "memory_budget_gb": 8},
                "if-ekfac": {"hessian_samples": 16, "queries": 10, "memory_budget_gb": 8},
            },
        )
    )
    k_axis = [(_s("fmnist", 10000, "mlp", 32, k=k), full) for k in (100, 1000)]
    k_axis[1][1]["sweep"] = {"variants": 11}
    return {
        "N": n_axis,
        "P": p_axis,
        "K": k_axis,
        "ray": [(_s("fmnist", 1000, "mlp", 32), {"ray": {"workers": [1, 2], "chunk": 26}})],
    }


# ----------------------------------------------------------------------------------------------------
# inside a cell's subprocess


def make_data(setting: dict[str, Any]) -> Any:
    """The setting's training data: Fashion-MNIST (first n/10 images per class) or generated images."""
    from distdm.data import TensorData, load_fashion_mnist

    n = setting["n"]
    if setting["data"] == "fmnist":
        return load_fashion_mnist(per_class=None if n >= 60000 else n // 10)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 3, 32, 32, generator=g)

    def sample(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(m) % 10
        return centres[y] + 2.0 * torch.randn(m, 3, 32, 32, generator=g), y

    (xtr, ytr), (xte, yte) = sample(n), sample(200)
    return TensorData(xtr, ytr, xte, yte, 10, f"generated32-{n}")


def make_model(setting: dict[str, Any], data: Any) -> torch.nn.Module:
    """The setting's model: MLP with one hidden layer of `width`, ConvNet of `width` (depth 3) or ResNet."""
    from distdm.models import build_model

    m, w = setting["model"], setting["width"]
    if m == "mlp":
        return build_model("mlp", data.input_shape, 10, seed=0, hidden=(w,))
    if m == "convnet":
        return build_model("convnet", data.input_shape, 10, seed=0, width=w, depth=3)
    return build_model("resnet18-ap", data.input_shape, 10, seed=0, width=w)


def schedule_of(setting: dict[str, Any]) -> Any:
    """The training schedule of a setting (SGD, batch 128; lr 0.05, ResNet 0.01)."""
    from distdm.engine import Schedule

    lr = 0.01 if setting["model"] == "resnet18ap" else 0.05
    return Schedule(epochs=setting["epochs"], lr=lr, batch_size=128, seed=0)


def task_path(out: Path, setting: dict[str, Any]) -> Path:
    """Where the trained target of a setting is cached (safetensors + JSON)."""
    return out / "tasks" / setting_id(setting)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save

    from distdm.store import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta).encode())
    atomic_write_bytes(
        path.with_suffix(".safetensors"), save({k: v.contiguous() for k, v in tensors.items()})
    )


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    from safetensors.torch import load_file

    if not path.with_suffix(".safetensors").exists():
        return None
    return load_file(str(path.with_suffix(".safetensors"))), json.loads(path.with_suffix(".json").read_text())


def train_and_cache(setting: dict[str, Any], out: Path, stage: Any) -> Any:
    """Train the target (timed by `stage`), cluster it, and cache [theta_0, theta_tau] and the clusters."""
    from distdm.clusters import kmeans_per_class, penultimate_features
    from distdm.task import train_target

    data = make_data(setting)
    model = make_model(setting, data)
    with stage:
        task = train_target(model, data, schedule_of(setting))
    feats = penultimate_features(model, data.x_train, state=task.final)
    clusters = kmeans_per_class(feats, data.y_train, setting["k"] // 10, seed=0, n_init=3)
    tensors = {f"init.{k}": v for k, v in task.init.items()} | {
        f"final.{k}": v for k, v in task.final.items()
    }
    meta = {"assignment": clusters.assignment.tolist(), "cluster_class": clusters.cluster_class.tolist()}
    _save_tensors(task_path(out, setting), tensors, meta)
    return dataclasses.replace(task, clusters=clusters)


def load_task(setting: dict[str, Any], out: Path) -> Any:
    """The cached target of a setting as a Task with endpoints [theta_0, theta_tau]."""
    from distdm.clusters import Clusters
    from distdm.errors import DistdmError
    from distdm.task import Task

    got = _load_tensors(task_path(out, setting))
    if got is None:
        raise DistdmError(f"no trained target for {setting_id(setting)}: run its 'train' cell first")
    tensors, meta = got
    data = make_data(setting)
    model = make_model(setting, data)
    init = {k[5:]: v for k, v in tensors.items() if k.startswith("init.")}
    final = {k[6:]: v for k, v in tensors.items() if k.startswith("final.")}
    model.load_state_dict(final)
    clusters = Clusters(np.array(meta["assignment"]), np.array(meta["cluster_class"]))
    return Task(model, data, clusters, schedule_of(setting), [init, final])


def lumped(clusters: Any, m: int) -> Any:
    """The first m clusters kept, every other sample in one extra cluster (of its commonest class)."""
    from distdm.clusters import Clusters

    a = np.where(clusters.assignment < m, clusters.assignment, m)
    rest = np.bincount(clusters.cluster_class[clusters.assignment[clusters.assignment >= m]]).argmax()
    return Clusters(a, np.concatenate([clusters.cluster_class[:m], [rest]]), clusters.kind)


def queries(task: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n test points."""
    return task.data.x_test[:n], task.data.y_test[:n]


def run_cell(setting: dict[str, Any], stage: str, opts: dict[str, Any], out: Path) -> dict[str, Any]:
    """Measure one stage of one setting in this process: seconds, peak RSS and what was measured."""
    from ddm_cost import Stage, run_ddm

    from distdm.attribution import make_attributor
    from distdm.attribution.ddm import DDM
    from distdm.attribution.retrain import leave_one_out_masks, retrain_masks
    from distdm.presets import preset
    from distdm.synset import Synset

    row: dict[str, Any] = {"measured_on": "all", "extrapolated_x": 1.0}
    if stage == "train":
        s = Stage()
        task = train_and_cache(setting, out, s)
        row.update(seconds=s.seconds, peak_mb=s.peak_mb, rss_before_mb=s.rss_before)
        row["params"] = sum(v.numel() for v in task.final.values())
        return row
    task = load_task(setting, out)
    k = task.clusters.n_clusters
    row["params"] = sum(v.numel() for v in task.final.values())
    if stage == "sweep":
        masks = leave_one_out_masks(k)
        v = min(opts.get("variants", k + 1), k + 1)
        with Stage() as s:
            retrain_masks(task, masks[:v], unit="cluster")
        row.update(seconds=s.seconds * (k + 1) / v, peak_mb=s.peak_mb, rss_before_mb=s.rss_before)
        row.update(measured_on=f"{v} of {k + 1} variants", extrapolated_x=(k + 1) / v)
        return row
    if stage in ("ddm-offline", "ddm-offline-ekfac"):
        cfg = preset("default", epochs=task.schedule.epochs)[0]
        notes = []
        if stage == "ddm-offline-ekfac":  # the default with EK-FAC as the influence curvature and metric
            cfg = cfg.replace(curvature="ekfac")
        if "hessian_subsample" in opts:
            cfg = cfg.replace(hessian_subsample=opts["hessian_subsample"])
            notes.append(f"curvature on {opts['hessian_subsample']} of {task.data.n_train} samples")
        if "memory_budget_gb" in opts:
            task = dataclasses.replace(task, memory_budget_bytes=int(opts["memory_budget_gb"] * 1e9))
            notes.append(f"memory_budget_bytes {opts['memory_budget_gb']} GB")
        if "clusters" in opts:
            task = dataclasses.replace(task, clusters=lumped(task.clusters, opts["clusters"]))
            notes.append(f"{opts['clusters'] + 1} of {k} clusters distilled")
        m = task.clusters.n_clusters
        if cfg.curvature != "ekfac" and cfg.hessian_rank:
            from distdm import eigen

            need = eigen.block_krylov_bytes(
                row["params"], cfg.hessian_rank, eigen.DEFAULT_BLOCK, 2 * cfg.hessian_rank
            )
            row["krylov_basis_mb"] = need / 2**20
        try:
            syn, r = run_ddm(task, cfg)
        except Exception as e:  # noqa: BLE001 - a refusal (e.g. over the budget) is a result here
            row.update(error=f"{type(e).__name__}: {e}"[:400], measured_on="; ".join(notes) or "all")
            return row
        x_curv = task.data.n_train / opts["hessian_subsample"] if "hessian_subsample" in opts else 1.0
        x_dist = k / m
        row.update(
            curvature_s=r["curvature_s"] * x_curv, target_s=r["target_s"], distill_s=r["distill_s"] * x_dist,
            peak_curvature_mb=r["rss_curvature_mb"], peak_target_distill_mb=r["rss_target_distill_mb"],
            rss_before_mb=r["rss_before_mb"], clusters_per_chunk=r.get("clusters_per_chunk"),
        )  # fmt: skip
        row["seconds"] = row["curvature_s"] + row["target_s"] + row["distill_s"]
        row["peak_mb"] = max(r["rss_curvature_mb"], r["rss_target_distill_mb"])
        row["measured_on"] = "; ".join(notes) or "all"
        row["extrapolated_x"] = f"curvature x{x_curv:.3g}, distillation x{x_dist:.3g}"
        if m == k and stage == "ddm-offline":
            tensors = syn.to_tensors()
            _save_tensors(out / "tasks" / (setting_id(setting) + "-synset"), tensors, syn.info)
        return row
    x, y = queries(task, opts.get("queries", N_QUERIES))
    if stage == "ddm-online":
        got = _load_tensors(out / "tasks" / (setting_id(setting) + "-synset"))
        if got is None:
            row["error"] = "no synset: the ddm-offline cell did not finish"
            return row
        syn = Synset.from_tensors(*got)
        with Stage() as s:
            DDM("default", synset=syn).fit(task).scores(x, y, "margin")
        row.update(seconds=s.seconds, peak_mb=s.peak_mb, rss_before_mb=s.rss_before)
        return row
    settings = {k2: v for k2, v in opts.items() if k2 == "hessian_samples"}
    if "memory_budget_gb" in opts:
        task = dataclasses.replace(task, memory_budget_bytes=int(opts["memory_budget_gb"] * 1e9))
    with Stage() as s:
        method = make_attributor(stage, **settings).fit(task)
        fit_s = time.perf_counter() - s.t
        method.scores(x, y, "margin")
    row.update(seconds=s.seconds, fit_s=fit_s, query_s=s.seconds - fit_s, peak_mb=s.peak_mb)
    row["rss_before_mb"] = s.rss_before
    if settings or len(y) != N_QUERIES:
        row["measured_on"] = (
            f"{len(y)} queries"
            + (f", Hessian on {settings['hessian_samples']} samples" if settings else "")
            + (f", memory_budget_bytes {opts['memory_budget_gb']} GB" if "memory_budget_gb" in opts else "")
        )
    return row


def run_ray_cell(setting: dict[str, Any], opts: dict[str, Any], out: Path) -> dict[str, Any]:
    """The exact sweep in-process (1 and 2 torch threads) and on Ray with 1 and 2 local workers."""
    from ddm_cost import Stage

    from distdm.attribution.retrain import leave_one_out_masks, retrain_masks
    from distdm.executors import RayExecutor, import_ray

    task = load_task(setting, out)
    masks = leave_one_out_masks(task.clusters.n_clusters)
    chunk = opts["chunk"]
    row: dict[str, Any] = {"chunk_size": chunk, "variants": len(masks)}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with Stage() as s:
            ref = retrain_masks(task, masks, unit="cluster", chunk_size=chunk)
        row[f"local_{threads}t_s"] = s.seconds
    torch.set_num_threads(1)
    ray = import_ray()
    for w in opts["workers"]:
        t = time.perf_counter()
        ex = RayExecutor(num_cpus=w)
        ex._ray()  # start the local instance: its start-up is reported apart from the sweep
        row[f"ray_{w}w_start_s"] = time.perf_counter() - t
        with Stage() as s:
            got = retrain_masks(task, masks, unit="cluster", chunk_size=chunk, executor=ex)
        row[f"ray_{w}w_s"] = s.seconds
        row[f"ray_{w}w_same"] = all(torch.allclose(got[k], ref[k], atol=1e-5) for k in ref)
        ex.shutdown()
        assert not ray.is_initialized()
    return row


def cell_main(spec: dict[str, Any]) -> None:
    """Entry of a cell's subprocess: print its row as the last line of JSON."""
    torch.set_num_threads(1)
    out = Path(spec["out"])
    if spec["stage"] == "ray":
        row = run_ray_cell(spec["setting"], spec["opts"], out)
    else:
        row = run_cell(spec["setting"], spec["stage"], spec["opts"], out)
    print("CELL " + json.dumps(row, default=float), flush=True)


# ----------------------------------------------------------------------------------------------------
# the driver


def run_subprocess(spec: dict[str, Any], python: str, timeout: float) -> dict[str, Any]:
    """Run one cell in a fresh interpreter; its row, or an error / timeout row."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [python, str(Path(__file__).resolve()), "--cell", json.dumps(spec)]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s", "wall_s": time.perf_counter() - t}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("CELL ")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:400], "rc": p.returncode}
    row = json.loads(lines[-1][5:])
    row["wall_s"] = time.perf_counter() - t
    return row


def axis_value(axis: str, setting: dict[str, Any], row: dict[str, Any]) -> float:
    """The x of a row on its axis: N, P (parameters) or K."""
    return {"N": setting["n"], "P": row.get("params") or 0, "K": setting["k"]}[axis]


def figure(axis: str, rows: list[dict[str, Any]], path: Path) -> dict[str, dict[str, float | None]]:
    """Log-log seconds and peak RSS against the axis, one line per stage (and model family on P)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    slopes: dict[str, dict[str, float | None]] = {}
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["axis"] == axis and "seconds" in r and "error" not in r:
            fam = f" ({r['model']})" if axis == "P" else ""
            groups.setdefault(r["stage"] + fam, []).append(r)
    for name, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["x"])
        xs = [r["x"] for r in rs]
        extra = [stage_mb(r) for r in rs]
        st, sm = fit_slope(xs, [r["seconds"] for r in rs]), fit_slope(xs, extra)
        slopes[name] = {"time": st, "memory": sm}
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        ax_t.plot(xs, [r["seconds"] for r in rs], "o-", label=f"{name}: slope {fmt(st)}")
        ax_m.plot(xs, extra, "o-", label=f"{name}: slope {fmt(sm)}")
    label = {"N": "training images N", "P": "parameters P", "K": "clusters K"}[axis]
    for a, y in ((ax_t, "seconds (extrapolated where stated)"), (ax_m, "peak RSS - RSS at stage entry (MB)")):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel(label)
        a.set_ylabel(y)
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"distdm cost against {label} (1 torch thread; slopes: polyfit on log-log)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return slopes


def stage_mb(row: dict[str, Any]) -> float | None:
    """The memory a stage adds: its peak RSS less the RSS on entry (the interpreter, data and task)."""
    if row.get("peak_mb") is None or row.get("rss_before_mb") is None:
        return None
    return max(float(row["peak_mb"]) - float(row["rss_before_mb"]), 1e-3)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def main() -> None:
    """Run the chosen axes cell by cell (cached), then write the tables and figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--axes", default="N,P,K,ray")
    ap.add_argument("--quick", action="store_true", help="tiny settings: a 1-2 minute smoke run")
    ap.add_argument("--out", default="benchmarks/out/scale")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per cell (subprocess)")
    ap.add_argument("--force", action="store_true", help="rerun cached cells")
    ap.add_argument("--ray-python", default="/tmp/scale-venv/bin/python", help="an interpreter with ray")
    ap.add_argument("--figures", default=str(FIGURES), help="where scale-{N,P,K}.png go")
    ap.add_argument("--only", default="", help="run only settings whose name contains this, e.g. resnet")
    ap.add_argument("--stages", default="", help="run only these stages (comma-separated)")
    ap.add_argument("--report-only", action="store_true", help="tables and figures from cached cells only")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        cell_main(json.loads(args.cell))
        return
    from distdm.store import atomic_write_bytes

    out = Path(args.out).resolve()
    (out / "cells").mkdir(parents=True, exist_ok=True)
    chosen = [a for a in args.axes.split(",") if a]
    plan = axes(args.quick)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for axis in chosen:
        for setting, stages in plan[axis]:
            if args.only not in setting_id(setting):
                continue
            for stage, opts in stages.items():
                if args.stages and stage not in args.stages.split(","):
                    continue
                cid = cell_id(setting, stage, opts)
                path = out / "cells" / f"{cid}.json"
                if args.report_only and not path.exists():
                    continue
                trained = (out / "tasks" / f"{setting_id(setting)}.safetensors").exists()
                if stage != "train" and not trained and not args.report_only:
                    # the target is needed: train it (cached as its own cell)
                    tid = cell_id(setting, "train", {})
                    tpath = out / "cells" / f"{tid}.json"
                    spec = {"setting": setting, "stage": "train", "opts": {}, "out": str(out)}
                    atomic_write_bytes(
                        tpath, json.dumps(run_subprocess(spec, sys.executable, args.timeout)).encode()
                    )
                cached = path.exists() and (args.report_only or "error" not in json.loads(path.read_text()))
                if cached and not args.force:
                    row = json.loads(path.read_text())
                else:
                    python = args.ray_python if stage == "ray" else sys.executable
                    spec = {"setting": setting, "stage": stage, "opts": opts, "out": str(out)}
                    row = run_subprocess(spec, python, args.timeout * (3 if stage == "ray" else 1))
                    row["load_after"] = os.getloadavg()
                    atomic_write_bytes(path, json.dumps(row, default=float).encode())
                row = {"axis": axis, "setting": setting_id(setting), "stage": stage, **setting, **row}
                row["x"] = axis_value(axis, setting, row) if axis != "ray" else None
                row["stage_mb"] = stage_mb(row)
                rows.append(row)
                short = {k: _cell(v) for k, v in row.items() if k in ("seconds", "peak_mb", "error")}
                print(
                    f"[{time.perf_counter() - t0:6.0f}s] {axis} {row['setting']} {stage} {short}", flush=True
                )
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "command": "python " + " ".join(sys.argv),
        "load_average": os.getloadavg(),
        "cores": os.cpu_count(),
        "wall_s": time.perf_counter() - t0,
    }
    slopes = {}
    for axis in [a for a in chosen if a in ("N", "P", "K")]:
        slopes[axis] = figure(
            axis, rows, Path(args.figures) / f"scale-{axis}{'-quick' if args.quick else ''}.png"
        )
    cols = [
        "axis", "setting", "params", "stage", "seconds", "peak_mb", "rss_before_mb", "stage_mb",
        "curvature_s", "target_s", "distill_s", "peak_curvature_mb", "peak_target_distill_mb", "fit_s",
        "query_s", "measured_on", "extrapolated_x", "error",
    ]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows if r["axis"] != "ray"]
    ray_rows = [r for r in rows if r["axis"] == "ray"]
    if ray_rows:
        keys = [k for k in ray_rows[0] if k.startswith(("local_", "ray_", "chunk", "variants", "error"))]
        lines += ["", "| setting | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
        lines += [
            "| " + r["setting"] + " | " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in ray_rows
        ]
    lines += ["", "Fitted log-log slopes (time, memory):", ""]
    for axis, per in slopes.items():
        for name, s in per.items():
            t, m = (_cell(s[k]) or "n/a (< 2 points)" for k in ("time", "memory"))
            lines.append(f"- {axis} / {name}: time {t}, memory above stage entry {m}")
    text = json.dumps(meta) + "\n\n" + "\n".join(lines) + "\n"
    atomic_write_bytes(out / "scale.md", text.encode())
    atomic_write_bytes(
        out / "scale.json",
        json.dumps({**meta, "rows": rows, "slopes": slopes}, default=float, indent=1).encode(),
    )
    print(text)


if __name__ == "__main__":
    main()
