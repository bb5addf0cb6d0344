"""Speed and scale on the fixed benchmark settings of BENCHMARKS.md, side by side in one process.

    python benchmarks/speed.py --setting digits-mlp-k100 --out benchmarks/out

Prints and writes (speed-<setting>.md / .json in --out):
1. engine: the K leave-one-cluster-out variants trained batched (one engine call) vs the same
   variants trained one by one (one engine call each) vs a plain PyTorch loop (nn.Module,
   F.cross_entropy, torch.optim.SGD) on the same batches; one-by-one times are measured on the first
   --sequential-sample variants and scaled to K (say 0 to time all K);
2. methods: target training (one run), DDM offline (distillation) and online (one query batch),
   exact leave-cluster-out retraining of all K clusters, grad-dot and if-cg (fit + one query batch),
   with ratios and each stage's peak memory (resident set size above the stage's start, sampled
   every 5 ms from /proc after handing freed heap back to the OS; memory the allocator still holds
   from an earlier stage can hide part of a peak; the process's ru_maxrss at the end);
3. scaling: the same methods' costs for K = 50, 100, 200 (k-means with 5, 10, 20 clusters per class)
   and for training sets x1, x2, x4 (the training set repeated with N(0, noise^2) added to copies).

Timings depend on the load of the machine: the header gives the core count, torch threads and the
load average before and after.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import datetime
import gc
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import SETTINGS, build_task, pick_queries  # noqa: E402

from distdm.attribution import make_attributor  # noqa: E402
from distdm.attribution.ddm import DDM  # noqa: E402
from distdm.clusters import kmeans_per_class  # noqa: E402
from distdm.config import DistillConfig  # noqa: E402
from distdm.data import TensorData  # noqa: E402
from distdm.engine import batch_order, train_variants  # noqa: E402
from distdm.presets import preset  # noqa: E402
from distdm.task import Task, train_target  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    """Current resident set size in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


@dataclasses.dataclass
class Stage:
    """Wall time and peak resident memory (above the stage's start) of one measured stage."""

    name: str
    seconds: float = 0.0
    peak_mb: float = 0.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so that a stage's RSS peak is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def measure(name: str, log: list[Stage]) -> Iterator[Stage]:
    """Time a block and sample its peak RSS every 5 ms in a background thread."""
    stage = Stage(name)
    gc.collect()
    _trim()
    start_rss = _rss()
    peak = [start_rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            stop.wait(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    try:
        yield stage
    finally:
        stage.seconds = time.perf_counter() - t
        stop.set()
        th.join()
        stage.peak_mb = (max(peak[0], _rss()) - start_rss) / 2**20
        log.append(stage)
        print(f"  {name:<44s} {stage.seconds:9.2f} s   peak +{stage.peak_mb:7.1f} MB", flush=True)


def loco_weights(task: Task) -> torch.Tensor:
    """Sample weights (K, N) of the K leave-one-cluster-out variants."""
    k = task.clusters.n_clusters
    return task.clusters.keep_weights(torch.ones(k, k) - torch.eye(k))


def plain_torch_train(task: Task, keep: torch.Tensor) -> None:
    """The textbook loop for one variant: same batches (dropped samples removed), torch.optim.SGD."""
    s = task.schedule
    m = copy.deepcopy(task.model)
    m.load_state_dict(task.init)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    x, y = task.data.x_train, task.data.y_train
    for batches in batch_order(len(y), s):
        for idx in batches:
            idx = idx[keep[idx]]
            if len(idx) == 0:
                continue
            loss = torch.nn.functional.cross_entropy(m(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def engine_stage(task: Task, sample: int, log: list[Stage]) -> dict[str, float]:
    """Batched engine vs one-by-one engine calls vs a plain PyTorch loop on the K LOCO variants."""
    w = loco_weights(task)
    k = w.shape[0]
    n_seq = k if sample <= 0 else min(sample, k)
    x, y = task.data.x_train, task.data.y_train

    def engine(rows: torch.Tensor, strategy: str = "auto") -> None:
        train_variants(
            task.model, x, y, task.schedule, weights=rows, init=task.init,
            loss=task.loss, reduction=task.reduction, strategy=strategy,
        )  # fmt: skip

    # interleaved, so that a change in the machine's load hits every path alike: batched before and
    # after, one-by-one engine calls alternating with plain PyTorch runs of the same variants
    with measure(f"engine: {k} variants batched (auto), 1st", log) as st:
        engine(w)
    batched = [st.seconds]
    seq = plain = 0.0
    with measure(f"{n_seq} variants one by one: engine and plain PyTorch, alternating", log):
        for v in range(n_seq):
            t = time.perf_counter()
            engine(w[v : v + 1])
            seq += time.perf_counter() - t
            t = time.perf_counter()
            plain_torch_train(task, w[v] > 0)
            plain += time.perf_counter() - t
    with measure(f"engine: {k} variants batched (auto), 2nd", log) as st:
        engine(w)
    batched.append(st.seconds)
    batched_s = sum(batched) / 2
    seq, plain = seq * k / n_seq, plain * k / n_seq
    out = {"variants": k, "batched_s": batched_s, "one_by_one_s": seq, "plain_torch_s": plain}
    out["speedup_vs_one_by_one"] = seq / batched_s
    out["speedup_vs_plain_torch"] = plain / batched_s
    print(
        f"  => {k} variants: batched {batched_s:.1f} s (mean of {batched[0]:.1f}, {batched[1]:.1f}); "
        f"one by one {seq:.1f} s ({'measured' if n_seq == k else f'scaled from {n_seq}'}): "
        f"x{seq / batched_s:.1f}; plain PyTorch {plain:.1f} s: x{plain / batched_s:.1f}",
        flush=True,
    )
    return out


def ddm_for(task: Task, preset_name: str, overrides: dict[str, Any]) -> DDM:
    """A DDM attributor with the preset's settings and DistillConfig overrides."""
    d, o = preset(preset_name, epochs=task.schedule.epochs)
    return DDM(preset_name, distill=d.replace(**overrides) if overrides else None, online=o)


def methods_stage(
    task: Task, queries: tuple[torch.Tensor, torch.Tensor], train_seconds: float, args: argparse.Namespace,
    overrides: dict[str, Any], log: list[Stage], tag: str = "",
) -> dict[str, float]:  # fmt: skip
    """Offline and online cost of DDM, exact retraining, grad-dot and if-cg on one task."""
    x, y = queries
    res: dict[str, float] = {"train_s": train_seconds}
    if "ddm" in args.methods:
        ddm = ddm_for(task, args.ddm_preset, overrides)
        with measure(f"{tag}ddm offline (distil K synsets)", log) as st:
            ddm.fit(task)
        res["ddm_offline_s"] = st.seconds
        with measure(f"{tag}ddm online ({len(y)} queries)", log) as st:
            ddm.scores(x, y)
        res["ddm_online_s"] = st.seconds
    if "exact" in args.methods:
        exact = make_attributor("exact")
        with measure(f"{tag}exact LOCO retraining (K + 1 models)", log) as st:
            exact.fit(task).scores(x, y)
        res["exact_s"] = st.seconds
    for name in ("grad-dot", "if-cg"):
        if name not in args.methods:
            continue
        a = make_attributor(name)
        with measure(f"{tag}{name} fit", log) as st:
            a.fit(task)
        res[f"{name}_fit_s"] = st.seconds
        with measure(f"{tag}{name} scores ({len(y)} queries)", log) as st:
            a.scores(x, y)
        res[f"{name}_online_s"] = st.seconds
    if "ddm_online_s" in res:
        on = res["ddm_online_s"]
        line = [f"ddm offline = {res['ddm_offline_s'] / train_seconds:.1f} x one training run"]
        if "exact_s" in res:
            line.append(f"exact / ddm online = {res['exact_s'] / on:.1f}")
        for name in ("grad-dot", "if-cg"):
            if f"{name}_fit_s" in res:
                both = res[f"{name}_fit_s"] + res[f"{name}_online_s"]
                line.append(f"{name} (fit + scores) / ddm online = {both / on:.2f}")
        print("  => " + "; ".join(line), flush=True)
    return res


def digits_variant(base: Task, per_class: int, copies: int, noise: float) -> tuple[Task, float]:
    """The digits task with per_class k-means clusters per class and the training set repeated
    `copies` times (copies after the first get N(0, noise^2) added); retrains the target."""
    d = base.data
    xs, ys = [d.x_train], [d.y_train]
    g = torch.Generator().manual_seed(1)
    for _ in range(copies - 1):
        xs.append(d.x_train + noise * torch.randn(d.x_train.shape, generator=g))
        ys.append(d.y_train)
    data = TensorData(torch.cat(xs), torch.cat(ys), d.x_test, d.y_test, d.num_classes, f"{d.name}-x{copies}")
    clusters = kmeans_per_class(data.x_train, data.y_train, per_class, seed=0, n_init=10)
    model = copy.deepcopy(base.model)
    model.load_state_dict(base.init)
    t = time.perf_counter()
    task = train_target(model, data, base.schedule, clusters)
    return task, time.perf_counter() - t


def _fmt_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|\n"
    body = ""
    for r in rows:
        cells = [f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def main(argv: list[str] | None = None) -> int:
    """Run the speed benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=SETTINGS, default="digits-mlp-k100")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--sequential-sample", type=int, default=20, help="one-by-one variants timed (0: all)")
    ap.add_argument("--methods", default="ddm,exact,grad-dot,if-cg")
    ap.add_argument("--ddm-preset", default="default")
    ap.add_argument(
        "--ddm-settings", default="{}", help="JSON DistillConfig overrides, e.g. '{\"iterations\": 200}'"
    )
    ap.add_argument("--stages", default="engine,methods,scaling", help="comma-separated subset")
    ap.add_argument("--scale-k", default="5,10,20", help="clusters per class for the K sweep (digits)")
    ap.add_argument("--scale-n", default="1,2,4", help="training-set multiples for the size sweep (digits)")
    ap.add_argument("--noise", type=float, default=0.1, help="noise added to repeated training copies")
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    stages = {s.strip() for s in args.stages.split(",")}
    overrides = json.loads(args.ddm_settings)
    DistillConfig().replace(**overrides)  # validate early
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    log: list[Stage] = []
    report: dict[str, Any] = {"setting": args.setting, "date": str(datetime.date.today())}
    print(
        f"{args.setting}: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"load average {load0[0]:.1f}",
        flush=True,
    )

    with measure("build task (data, target training, clusters)", log) as st:
        task = build_task(args.setting)
    with measure("one training run (target schedule)", log) as st:
        model = copy.deepcopy(task.model)
        model.load_state_dict(task.init)
        train_variants(model, task.data.x_train, task.data.y_train, task.schedule, loss=task.loss)
    train_s = st.seconds
    report["train_s"] = train_s
    queries = pick_queries(task, args.queries)
    print(f"K = {task.clusters.n_clusters}, N = {task.data.n_train}, one training run {train_s:.2f} s")

    if "engine" in stages:
        print("engine", flush=True)
        report["engine"] = engine_stage(task, args.sequential_sample, log)
    if "methods" in stages:
        print("methods", flush=True)
        report["methods"] = methods_stage(task, queries, train_s, args, overrides, log)
    if "scaling" in stages and args.setting == "digits-mlp-k100":
        print("scaling with K", flush=True)
        report["scaling_k"] = []
        base = {"K": task.clusters.n_clusters, "N": task.data.n_train, **report.get("methods", {})}
        for per_class in (int(v) for v in args.scale_k.split(",")):
            if per_class == 10 and "methods" in report:  # the setting itself: measured above
                report["scaling_k"].append(base)
                continue
            t, tr = digits_variant(task, per_class, 1, args.noise)
            r = methods_stage(t, queries, tr, args, overrides, log, tag=f"K={t.clusters.n_clusters}: ")
            report["scaling_k"].append({"K": t.clusters.n_clusters, "N": t.data.n_train, **r})
        print("scaling with the training-set size (K = 100)", flush=True)
        report["scaling_n"] = []
        for copies in (int(v) for v in args.scale_n.split(",")):
            if copies == 1 and "methods" in report:
                report["scaling_n"].append(base)
                continue
            t, tr = digits_variant(task, 10, copies, args.noise)
            r = methods_stage(t, queries, tr, args, overrides, log, tag=f"N x{copies}: ")
            report["scaling_n"].append({"N": t.data.n_train, "K": t.clusters.n_clusters, **r})

    wall = time.perf_counter() - t_all
    load1 = os.getloadavg()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    header = (
        f"setting {args.setting}; {report['date']}; {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}; load average {load0[0]:.1f} before, {load1[0]:.1f} after; "
        f"wall {wall:.0f} s; process peak RSS {peak:.0f} MB; ddm preset {args.ddm_preset} {overrides}\n"
        f"command: python {' '.join(sys.argv)}\n"
    )
    md = (
        header
        + "\n## Stages\n\n"
        + _fmt_table(
            [{"stage": s.name, "seconds": s.seconds, "peak MB above start": s.peak_mb} for s in log],
            ["stage", "seconds", "peak MB above start"],
        )
    )
    if "engine" in report:
        md += "\n## Engine\n\n" + _fmt_table([report["engine"]], list(report["engine"]))
    cols = ["K", "N", "train_s", "ddm_offline_s", "ddm_online_s", "exact_s", "grad-dot_fit_s",
            "grad-dot_online_s", "if-cg_fit_s", "if-cg_online_s"]  # fmt: skip
    if "methods" in report:
        md += "\n## Methods\n\n" + _fmt_table([report["methods"]], cols[2:])
    for key, title in (("scaling_k", "Scaling with K"), ("scaling_n", "Scaling with N")):
        if key in report:
            md += f"\n## {title}\n\n" + _fmt_table(report[key], cols)
    report["stages"] = [dataclasses.asdict(s) for s in log]
    report["header"] = header
    (out / f"speed-{args.setting}.md").write_text(md)
    (out / f"speed-{args.setting}.json").write_text(json.dumps(report, indent=2))
    print("\n" + md)
    print(f"wrote {out / f'speed-{args.setting}.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
