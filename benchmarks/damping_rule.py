"""How well the automatic damping rule (damping.py) holds against a sweep, on small settings.

    python benchmarks/damping_rule.py --settings logreg,seq-mlp,cnn-maxpool,digits-mlp-small \
        --queries 30 --per-class 3 --lds-subsets 30 --threads 2 --out benchmarks/out/damping

For each setting: train the target, fit if-exact (and if-ekfac) once, then score at every damping of a
log grid and at every candidate rule's choice through `with_damping` (no refit), against exact
leave-cluster-out retraining with the target's seed (distdm.evaluate: Spearman within the query's
class and LDS on the margin). Prints the spectrum, each rule's damping and its share of the best
damping of the sweep (target: >= 0.9 on both metrics), and writes damping-rule.md / .json to --out.
Retrains are cached in <out>/run-<setting>.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distdm import damping as damping_rule
from distdm.attribution import make_attributor
from distdm.attribution.retrain import ExactRetrain
from distdm.clusters import kmeans_per_class
from distdm.data import from_tensors, load_digits
from distdm.engine import Schedule
from distdm.errors import DistdmError
from distdm.evaluate import evaluate
from distdm.models import build_model
from distdm.store import RunStore, atomic_write_bytes
from distdm.task import Task, train_target

SETTINGS = ("logreg", "seq-mlp", "cnn-maxpool", "digits-mlp-small", "digits-mlp-k100")
GRID = tuple(float(v) for v in np.logspace(-4, 1, 11))


def _sequence_data(n: int = 1500, steps: int = 8, channels: int = 5, seed: int = 0):
    """Generated sequence classification: 10 classes, each a random template sequence (steps x
    channels, flattened to 40 features) shifted in time by a random lag, plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, steps, channels, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    lag = torch.randint(0, 3, (n,), generator=g)
    x = torch.stack([torch.roll(templates[c], int(k), 0) for c, k in zip(y, lag, strict=True)])
    x = x + 1.0 * torch.randn(x.shape, generator=g)
    return from_tensors(x.reshape(n, -1), y, test_fraction=0.2, seed=seed, name="generated-seq")


def _cnn_maxpool() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 16, 10),
    )


def build_task(setting: str, per_class: int) -> Task:
    """The target model, data, schedule and clusters (k-means, per_class clusters per class)."""
    if setting == "seq-mlp":
        data = _sequence_data()
        # few SGD epochs: stopped early, far from a minimum (an indefinite Hessian)
        model = build_model("mlp", data.input_shape, 10, seed=0, hidden=(32,))
        schedule = Schedule(epochs=6, lr=0.1, batch_size=64, seed=0)
    else:
        data = load_digits()
        if setting == "logreg":
            model = build_model("logreg", data.input_shape, 10, seed=0)
            schedule = Schedule(epochs=20, lr=0.1, batch_size=64, seed=0)
        elif setting == "cnn-maxpool":
            model = _cnn_maxpool()
            schedule = Schedule(epochs=15, lr=0.05, batch_size=64, seed=0)
        elif setting == "digits-mlp-small":
            model = build_model("mlp", data.input_shape, 10, seed=0, hidden=(32,))
            schedule = Schedule(epochs=30, lr=0.1, batch_size=64, seed=0)
        elif setting == "digits-mlp-k100":  # benchmarks/quality.py's setting (P = 9,610: slow here)
            model = build_model("mlp", data.input_shape, 10, seed=0, hidden=(128,))
            schedule = Schedule(epochs=30, lr=0.1, batch_size=64, seed=0)
        else:
            raise DistdmError(f"unknown setting {setting!r}; one of {list(SETTINGS)}")
    clusters = kmeans_per_class(data.x_train, data.y_train, per_class, seed=0, n_init=4)
    return train_target(model, data, schedule, clusters)


def _metric(row: dict, key: str) -> float:
    return float(row[key]) if not isinstance(row[key], dict) else float(row[key]["mean"])


def run_setting(setting: str, args: argparse.Namespace, out: Path) -> dict:
    """Sweep and rules on one setting; returns its record."""
    t0 = time.perf_counter()
    task = build_task(setting, args.per_class)
    store = RunStore(out / f"run-{setting}", fingerprint=task.data.fingerprint())
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(task.data.y_test), generator=g)[: args.queries]
    x, y = task.data.x_test[idx], task.data.y_test[idx]

    t = time.perf_counter()
    # the rules read the Hessian's spectrum (the influence functions' default curvature is the GGN)
    base = make_attributor("if-exact", damping="auto", curvature="hessian").fit(task)
    fit_s = time.perf_counter() - t
    if base.fm_.n_params <= args.max_eigh:  # the exact spectrum; every later damping costs O(P^2)
        base.eigendecompose()
    spec = base.spectrum_  # else the Lanczos estimate 'auto' used in fit
    rules = {f"rule:{r}": damping_rule.choose(spec, r).value for r in damping_rule.RULES}
    methods: dict[str, object] = {"if-exact:auto": base.with_damping("auto")}
    t = time.perf_counter()
    grid = [float(v) for v in args.grid.split(",")] if args.grid else GRID
    for d in grid:
        methods[f"if-exact:{d:.3g}"] = base.with_damping(d)
    resolve_s = (time.perf_counter() - t) / len(grid)
    for name, d in rules.items():
        if spec.source == "exact" or d >= -spec.lambda_min:  # else each would need the eigendecomposition
            methods[f"if-exact:{name}"] = base.with_damping(d)
    methods["if-exact:legacy-0.01"] = base.with_damping(0.01)
    if not args.no_ekfac:
        ek = make_attributor("if-ekfac").fit(task)
        methods["if-ekfac:auto"] = ek
        for d in grid:
            methods[f"if-ekfac:{d:.3g}"] = ek.with_damping(d)
    truth = ExactRetrain(seeds=(task.schedule.seed,), store=store)
    ev = evaluate(
        task, methods, (x, y), truth=truth, lds_subsets=args.lds_subsets, removal_ks=(), ceiling=False,
        store=store,
    )  # fmt: skip
    rows = {r["method"]: r for r in ev.rows}
    record: dict = {
        "setting": setting,
        "n_params": base.fm_.n_params,
        "spectrum": dataclasses.asdict(spec),
        "auto_chosen_in_fit": base.damping_,
        "auto_damping": base.with_damping("auto").damping_,
        "rules": rules,
        "fit_s": fit_s,
        "with_damping_s": resolve_s,
        "rows": {k: {"spearman_class": _metric(v, "spearman_class"), "lds": _metric(v, "lds"),
                     "spearman": _metric(v, "spearman")} for k, v in rows.items()},
    }  # fmt: skip
    for family in ("if-exact", "if-ekfac"):
        grid = {
            k: v
            for k, v in record["rows"].items()
            if k.startswith(family + ":") and k[len(family) + 1 :][0].isdigit()
        }
        if not grid:
            continue
        best = {m: max(v[m] for v in grid.values()) for m in ("spearman_class", "lds")}
        best_at = {m: max(grid, key=lambda k, m=m: grid[k][m]) for m in ("spearman_class", "lds")}
        record[f"{family}_best"] = {"value": best, "at": best_at}
        for k, v in record["rows"].items():
            if k.startswith(family + ":"):
                v["share"] = {m: (v[m] / best[m] if best[m] > 0 else float("nan")) for m in best}
    record["wall_s"] = time.perf_counter() - t0
    return record


def to_markdown(records: list[dict]) -> str:
    """One table per setting: damping, within-class Spearman, LDS and share of the sweep's best."""
    lines = []
    for r in records:
        s = r["spectrum"]
        lines.append(
            f"\n### {r['setting']} (P = {r['n_params']}; lambda_min {s['lambda_min']:.4g}, lambda_max "
            f"{s['lambda_max']:.4g}, mean {s['mean']:.4g}; auto damping {r['auto_damping']:.4g}; "
            f"rules {', '.join(f'{k[5:]} {v:.3g}' for k, v in r['rules'].items())}; fit {r['fit_s']:.1f} s, "
            f"with_damping {r['with_damping_s']:.3f} s each; wall {r['wall_s']:.0f} s)\n"
        )
        lines.append("| method | spearman | spearman_class | lds | share class | share lds |")
        lines.append("|---|---|---|---|---|---|")
        for k, v in r["rows"].items():
            sh = v.get("share", {})
            lines.append(
                f"| {k} | {v['spearman']:.3f} | {v['spearman_class']:.3f} | {v['lds']:.3f} | "
                f"{sh.get('spearman_class', float('nan')):.2f} | {sh.get('lds', float('nan')):.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the settings, print and write the tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="logreg,seq-mlp,cnn-maxpool,digits-mlp-small")
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--per-class", type=int, default=3, help="k-means clusters per class")
    ap.add_argument("--lds-subsets", type=int, default=30)
    ap.add_argument("--no-ekfac", action="store_true")
    ap.add_argument("--grid", default="", help="comma-separated dampings (default: 1e-4 .. 10, 11 points)")
    ap.add_argument("--max-eigh", type=int, default=5000, help="eigendecompose H up to this many parameters")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/out/damping")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
        rec = run_setting(setting, args, out)
        records.append(rec)
        print(to_markdown([rec]), flush=True)
    header = (
        f"damping rule; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}; load {open('/proc/loadavg').read().split()[:3]}\n"
        f"command: python {' '.join(sys.argv)}\n"
    )
    atomic_write_bytes(out / "damping-rule.md", (header + to_markdown(records)).encode())
    atomic_write_bytes(out / "damping-rule.json", json.dumps(records, indent=1).encode())
    print(header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
