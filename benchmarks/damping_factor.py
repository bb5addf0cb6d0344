"""The automatic damping's factors: an influence function at multiples of |lambda_min| (on the
Hessian) or of 1 / the training time (on the Gauss-Newton matrix, the default curvature) on suite settings.

    python benchmarks/damping_factor.py --settings digits-maxpool-cnn,noisy-mlp-sgd --method if-exact \
        --factors 1.1,1.25,1.5,2,3 --out benchmarks/out/robustness
    python benchmarks/damping_factor.py --of training-time --settings digits-maxpool-cnn,noisy-mlp-sgd \
        --method if-exact --factors 0.25,0.5,1,2 --out benchmarks/out/robustness

damping.py's rule damps an indefinite curvature by SAFETY x |lambda_min|; the robustness suite's sweep
(0.001-3, a factor ~3 apart) cannot tell 1.25 x from 2 x. This script fits the method once per setting
of benchmarks/robustness.py (its model, data, units, queries and truth, reused from the suite's cache
in --out when there), takes lambda_min from the method's own spectrum estimate, and scores it at each
factor through `with_damping` (no refit): within-class Spearman, Spearman over all units and LDS
against the suite's truth. Prints one markdown table and writes it to --out/damping-factor-METHOD.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import robustness as rb  # noqa: E402

from distdm import damping as damping_rule  # noqa: E402
from distdm import metrics  # noqa: E402
from distdm.attribution import make_attributor  # noqa: E402
from distdm.attribution.retrain import ExactRetrain  # noqa: E402
from distdm.errors import DistdmError  # noqa: E402
from distdm.evaluate import retrained_values  # noqa: E402
from distdm.store import RunStore, atomic_write_bytes  # noqa: E402


def factor_rows(
    name: str,
    method: str,
    factors: list[float],
    out: Path,
    queries: int,
    lds_subsets: int,
    of: str = "lambda-min",
) -> list[str]:
    """Markdown rows for one setting: the method's default and each factor x |lambda_min| (of
    'lambda-min', on the Hessian) or x 1 / the training time (of 'training-time', on the GGN)."""
    setting = rb.SETTINGS[name]
    subsets = min(lds_subsets, setting.lds_subsets or lds_subsets)
    cfg = {"queries": queries, "lds_subsets": subsets, "seeds": [0, 1], "quick": False}
    key = rb.setting_key(setting, {**cfg, "per_class": None})  # the suite's key: its cached retrains
    task = rb.build_task(setting)
    data = task.data
    store = RunStore(out / f"run-{name}-{key[:8]}", fingerprint=data.fingerprint())
    idx = torch.randperm(len(data.y_test), generator=torch.Generator().manual_seed(0))[:queries]
    x, y = data.x_test[idx], data.y_test[idx]
    truth = ExactRetrain(seeds=(0, 1), store=store).fit(task).per_seed_scores(x, y, "margin").mean(0)
    keep = metrics.lds_masks(task.clusters.n_clusters, subsets, 0.5, 1)
    actual = retrained_values(task, keep, x, y, objective="margin", tag="lds", store=store)
    settings: dict = {"max_params": rb.EXACT_MAX_PARAMS} if method == "if-exact" else {}
    settings.update(dict(dict(setting.overrides).get(method, ())))
    if of == "training-time":
        t = damping_rule.training_time(task.schedule, data.n_train)
        if t is None:
            return [f"| {name} | {method}: no training time (optimizer {task.schedule.optimizer}) | |"]
        base, size = make_attributor(method, **settings).fit(task), 1.0 / t
    else:
        # the factor applies to an indefinite curvature: the Hessian (the default curvature is the GGN)
        base = make_attributor(method, curvature="hessian", **settings).fit(task)
        spectrum = base.damping_choice_.spectrum
        if spectrum is None or spectrum.lambda_min >= 0:
            return [f"| {name} | {method}: curvature not indefinite (damping {base.damping_:.4g}) | |"]
        size = -spectrum.lambda_min
    cells = []
    for f in [None, *factors]:
        m = base if f is None else base.with_damping(f * size)
        s = m.scores(x, y, "margin")
        v = s.to_clusters(task.clusters.assignment, task.clusters.n_clusters).values if (
            s.unit == "sample") else s.values  # fmt: skip
        r = rb.score_row(v, truth, task, y.numpy(), keep, actual)
        cells.append(f"{r['spearman_class']:.3f} / {r['lds']:.3f}")
        print(f"  {name} {method} {'default' if f is None else f'{f:g} x'} ({m.damping_:.4g}): "
              f"{r['spearman_class']:.3f} / {r['spearman']:.3f} / {r['lds']:.3f}", flush=True)  # fmt: skip
    return [f"| {name} | {method} | {size:.4g} | {base.damping_:.4g} | " + " | ".join(cells) + " |"]


def main(argv: list[str] | None = None) -> int:
    """Score one influence function at multiples of |lambda_min| or of 1 / the training time."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", required=True, help=f"comma-separated, of {','.join(rb.SETTINGS)}")
    ap.add_argument("--method", default="if-exact")
    ap.add_argument("--factors", default="1.1,1.25,1.5,2,3")
    ap.add_argument("--of", choices=("lambda-min", "training-time"), default="lambda-min")
    ap.add_argument("--queries", type=int, default=120)
    ap.add_argument("--lds-subsets", type=int, default=60)
    ap.add_argument("--out", default="benchmarks/out/robustness", help="the suite's --out (cached truths)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in rb.SETTINGS]
    if unknown:
        raise DistdmError(f"unknown settings {unknown}; one of {list(rb.SETTINGS)}")
    factors = [float(f) for f in args.factors.split(",")]
    if not factors or min(factors) <= (1.0 if args.of == "lambda-min" else 0.0):
        raise DistdmError(
            f"factors must be > 1 for lambda-min (at 1 x |lambda_min|, H + damping I is singular), > 0 for "
            f"training-time: {factors}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    head = ["default", *(f"{f:g} x" for f in factors)]
    unit, col = (
        ("|lambda_min|", "abs(lambda_min)") if args.of == "lambda-min" else ("1 / training time", "1 / t")
    )
    lines = [
        f"# {args.method} at multiples of {unit} "
        f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()})",
        "",
        "within class / LDS against the robustness suite's truth (mean of 2 seeds); command: "
        f"`python benchmarks/damping_factor.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        f"| setting | method | {col} | default damping | " + " | ".join(head) + " |",
        "|" + "---|" * (len(head) + 4),
    ]
    for n in names:
        lines += factor_rows(n, args.method, factors, out, args.queries, args.lds_subsets, args.of)
    text = "\n".join(lines) + "\n"
    path = out / f"damping-factor-{args.method}-{args.of}.md"
    atomic_write_bytes(path, text.encode())
    print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
