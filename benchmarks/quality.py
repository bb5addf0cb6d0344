"""Attribution quality on the fixed benchmark settings of BENCHMARKS.md.

    python benchmarks/quality.py --setting digits-mlp-k100 --methods exact,random,predict,clustering \
        --seeds 0,1,2 --queries 50 --out benchmarks/out

Builds the setting exactly as BENCHMARKS.md describes, takes every method by name from the
ATTRIBUTORS registry (default: all registered, so methods added later join automatically), uses
exact leave-cluster-out retraining with --seeds as the truth (mean over seeds; noise ceiling: first
seed against the mean of the others), and writes quality-<setting>.md / .csv / .png to --out.
Retrains are cached in <out>/run-<setting>, so a second run (or one after a kill) reuses them.
A method can appear twice with different settings as NAME@LABEL, e.g. `--methods if-cg,if-cg@ggn
--settings '{"if-cg@ggn": {"curvature": "ggn"}}'`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from distdm.attribution import ATTRIBUTORS, make_attributor
from distdm.attribution.ddm import DDM
from distdm.attribution.retrain import ExactRetrain
from distdm.clusters import kmeans_per_class, penultimate_features
from distdm.data import load_digits, load_fashion_mnist
from distdm.engine import Schedule
from distdm.errors import DistdmError
from distdm.evaluate import evaluate
from distdm.models import build_model
from distdm.presets import preset
from distdm.store import RunStore
from distdm.task import Task, train_target

SETTINGS = ("digits-mlp-k100", "fmnist-convnet-k100")
FMNIST_PER_CLASS = 100  # BENCHMARKS.md: the first 100 training images of each class


def build_task(setting: str, progress: bool = False, per_class: int = FMNIST_PER_CLASS) -> Task:
    """The target model, data, clusters and schedule of one benchmark setting (per_class: training
    images per class of the Fashion-MNIST subset; BENCHMARKS.md fixes 100)."""
    if setting == "digits-mlp-k100":
        data = load_digits()
        model = build_model("mlp", data.input_shape, 10, seed=0, hidden=(128,))
        schedule = Schedule(epochs=30, lr=0.1, batch_size=64, seed=0)
        clusters = kmeans_per_class(data.x_train, data.y_train, 10, seed=0, n_init=10)
        return train_target(model, data, schedule, clusters, progress=progress)
    if setting == "fmnist-convnet-k100":
        data = load_fashion_mnist(per_class=per_class)
        model = build_model("convnet", data.input_shape, 10, seed=0, width=16, depth=3)
        schedule = Schedule(epochs=15, lr=0.05, batch_size=128, seed=0)
        task = train_target(model, data, schedule, progress=progress)
        feats = penultimate_features(model, data.x_train, state=task.final)
        clusters = kmeans_per_class(feats, data.y_train, 10, seed=0, n_init=10)
        return dataclasses.replace(task, clusters=clusters)
    raise DistdmError(f"unknown setting {setting!r}; one of {list(SETTINGS)}")


def run_name(setting: str, per_class: int) -> str:
    """The setting's name for run directories and output files: '-pcN' marks a Fashion-MNIST subset
    other than 200 images per class (BENCHMARKS.md's first choice, whose caches keep the bare name)."""
    return f"{setting}-pc{per_class}" if setting.startswith("fmnist") and per_class != 200 else setting


def pick_queries(task: Task, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n test points drawn with `seed`."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(task.data.y_test), generator=g)[:n]
    return task.data.x_test[idx], task.data.y_test[idx]


# DDM variants of the paper's Table 1 (SPEC.md section 4), by name
DDM_VARIANTS = (
    "default", "default-ggn", "default-auto", "default-ggn-auto", "thorough", "private", "fast",
    "influence-adam", "paper", "paper-lr0.01", "wo-cluster", "match",
)  # fmt: skip


def ddm_variant(name: str, epochs: int, store: RunStore | None = None) -> DDM:
    """A DDM configured as one of DDM_VARIANTS: the presets, `default` on the Gauss-Newton curvature and
    with its target's damping chosen from the curvature ('auto'),
    the paper at a 10x lower online lr
    (its own lr diverges on digits), index-order units ('w/o cluster') and standard gradient
    matching ('DDM-match'), the last two otherwise as the paper writes them. `store`: where its
    synsets are cached."""
    paper_d, paper_o = preset("paper", epochs=epochs)
    if name in ("default", "thorough", "private", "fast", "influence-adam", "paper"):
        return DDM(name, store=store)
    if name == "default-ggn":
        return DDM("default", distill={"curvature": "ggn"}, store=store)
    if name == "default-auto":
        return DDM("default", distill={"damping": "auto"}, store=store)
    if name == "default-ggn-auto":
        return DDM("default", distill={"curvature": "ggn", "damping": "auto"}, store=store)
    if name == "paper-lr0.01":
        return DDM("paper", online=paper_o.replace(lr=0.01), store=store)
    if name == "wo-cluster":
        return DDM("paper", online=paper_o.replace(lr=0.01), clusters="index", store=store)
    if name == "match":
        match = paper_d.replace(direction="match")
        return DDM("paper", distill=match, online=paper_o.replace(lr=0.01), store=store)
    raise DistdmError(f"unknown DDM variant {name!r}; one of {list(DDM_VARIANTS)}")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=SETTINGS, default="digits-mlp-k100")
    ap.add_argument(
        "--methods",
        default="all",
        help="comma-separated registered names (NAME@LABEL for a second setting), or 'all'",
    )
    ap.add_argument("--ddm-variants", default="", help=f"comma-separated, of {','.join(DDM_VARIANTS)}")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the exact truth; the first is the target's")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--lds-subsets", type=int, default=100)
    ap.add_argument("--removal-ks", default="1,3,10")
    ap.add_argument("--settings", default="{}", help='JSON per-method settings, e.g. \'{"ddm": {"ipc": 4}}\'')
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--per-class", type=int, default=FMNIST_PER_CLASS, help="Fashion-MNIST images per class")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    names = sorted(ATTRIBUTORS) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    unknown = [n for n in names if n.partition("@")[0] not in ATTRIBUTORS]
    if unknown:
        raise DistdmError(f"unknown methods {unknown}; registered: {sorted(ATTRIBUTORS)}")
    settings = json.loads(args.settings)
    seeds = _ints(args.seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    task = build_task(args.setting, args.progress, args.per_class)
    if seeds[0] != task.schedule.seed:
        raise DistdmError(f"the first truth seed must be the target's seed {task.schedule.seed}, got {seeds}")
    name = run_name(args.setting, args.per_class)
    store = RunStore(out / f"run-{name}", fingerprint=task.data.fingerprint())
    x, y = pick_queries(task, args.queries)
    acc = float((task.outputs(task.data.x_test).argmax(1) == task.data.y_test).float().mean())
    print(f"{args.setting}: target test accuracy {acc:.4f}, K = {task.clusters.n_clusters}", flush=True)

    truth = ExactRetrain(seeds=seeds, progress=args.progress, store=store, **settings.get("exact", {}))
    methods = {}
    for n in names:
        # NAME@LABEL: the registered method NAME, with its own settings under "NAME@LABEL"
        methods[n] = truth if n == "exact" else make_attributor(n.partition("@")[0], **settings.get(n, {}))
    failed = {}
    for v in [v.strip() for v in args.ddm_variants.split(",") if v.strip()]:
        ddm = ddm_variant(v, task.schedule.epochs, store)
        try:  # a variant whose fine-tunes diverge is reported, not dropped silently
            ddm.fit(task).scores(x[:1], y[:1])
            methods[f"ddm:{v}"] = ddm
        except DistdmError as e:
            failed[f"ddm:{v}"] = str(e)
            print(f"ddm:{v} failed: {e}", flush=True)
    ev = evaluate(
        task, methods, (x, y), truth=truth, lds_subsets=args.lds_subsets,
        removal_ks=_ints(args.removal_ks), progress=args.progress, store=store,
    )  # fmt: skip
    stem = f"quality-{name}"
    paths = ev.save(out, stem)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    header = (
        f"setting {args.setting}; {datetime.date.today()}; {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}; target accuracy {acc:.4f}; queries {len(y)}; truth seeds {seeds}; "
        f"LDS subsets {args.lds_subsets}; wall {wall:.0f} s; peak RSS {peak_mb:.0f} MB\n"
        f"command: python {' '.join(sys.argv)}\n"
    )
    notes = "".join(f"\n- {k}: {v}" for k, v in failed.items())
    paths["md"].write_text(header + "\n" + ev.to_markdown() + "\n" + notes + "\n")
    print(header)
    print(ev.to_markdown() + notes)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
