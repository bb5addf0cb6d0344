"""Privacy of DDM synsets beside their attribution quality, per variant (issue 17).

    python benchmarks/privacy_synsets.py --setting digits-mlp-k100 \
        --variants paper,default,'private={"init": "gaussian"}' --seeds 0,1,2 --queries 50

A variant is a preset name, or LABEL={JSON overrides of the default preset's DistillConfig}; a JSON
override key "input_box" is passed through only where DistillConfig has that field. Per variant: the
membership-inference attacks of distdm.applications.privacy (nearest-synthetic distance; loss rise and
loss after fine-tuning the target on the whole synset; the target model's own loss as a reference),
TPR at 1% / 5% FPR, near copies, input range, and quality against exact leave-cluster-out retraining
(within-class Spearman, LDS) from distdm.evaluate, with the ratio to the `default` variant. Retrains are
cached in <out>/run-<setting> (shared with benchmarks/quality.py). Writes privacy-<setting>.md / .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import FMNIST_PER_CLASS, build_task, ddm_variant, pick_queries, run_name  # noqa: E402

from distdm.applications.privacy import privacy_metrics  # noqa: E402
from distdm.attribution.ddm import DDM  # noqa: E402
from distdm.attribution.retrain import ExactRetrain  # noqa: E402
from distdm.config import DistillConfig  # noqa: E402
from distdm.errors import DistdmError  # noqa: E402
from distdm.evaluate import evaluate  # noqa: E402
from distdm.store import RunStore  # noqa: E402

ATTACKS = ("mia_auc", "ft_delta_auc", "ft_loss_auc")


def parse_variants(text: str) -> dict[str, dict | None]:
    """'paper,default,priv={"init": "noise"}' -> {label: overrides of 'default' or None (a preset)}."""
    out: dict[str, dict | None] = {}
    depth, cur, parts = 0, "", []
    for ch in text:  # split on commas outside braces
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    for part in (p.strip() for p in parts if p.strip()):
        label, eq, js = part.partition("=")
        out[label] = json.loads(js) if eq else None
    return out


def make_ddm(label: str, overrides: dict | None, epochs: int, store: RunStore | None = None) -> DDM:
    """The DDM of a variant: a quality.py variant by name, or the default preset with overrides
    (its synset cached in `store`)."""
    if overrides is None:
        return ddm_variant(label, epochs, store)
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise DistdmError(f"variant {label}: DistillConfig has no field {unknown} (in this checkout)")
    return DDM("default", distill=overrides, store=store)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="digits-mlp-k100")
    ap.add_argument("--variants", default='paper-lr0.01,default,gaussian={"init": "gaussian"}')
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--lds-subsets", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--per-class", type=int, default=FMNIST_PER_CLASS, help="Fashion-MNIST images per class")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = build_task(args.setting, per_class=args.per_class)
    name = run_name(args.setting, args.per_class)
    store = RunStore(out / f"run-{name}", fingerprint=task.data.fingerprint())
    x, y = pick_queries(task, args.queries)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    truth = ExactRetrain(seeds=seeds, store=store)
    variants = parse_variants(args.variants)
    methods, priv, failed = {}, {}, {}
    for label, over in variants.items():
        ddm = make_ddm(label, over, task.schedule.epochs, store)
        t = time.perf_counter()
        try:
            ddm.fit(task).scores(x[:1], y[:1])
            try:
                priv[label] = privacy_metrics(ddm.synset_, task.data, task)
            except DistdmError as e:  # the loss attacks' fine-tune diverged: the distance attack still holds
                print(f"{label}: loss attacks not measured: {e}", flush=True)
                priv[label] = privacy_metrics(ddm.synset_, task.data)
                failed[f"{label} (loss attacks)"] = str(e)
            methods[label] = ddm
            print(f"{label}: distilled and measured in {time.perf_counter() - t:.0f} s", flush=True)
            print(f"{label} privacy: {json.dumps(priv[label])}", flush=True)
        except DistdmError as e:
            failed[label] = str(e)
            print(f"{label} failed: {e}", flush=True)
    ev = evaluate(
        task, methods, (x, y), truth=truth, lds_subsets=args.lds_subsets, removal_ks=(), store=store
    )
    quality = {r["method"]: r for r in ev.rows}
    ref = quality.get("default")
    rows = []
    for label in methods:
        q, p = quality[label], priv[label]
        row = {
            "variant": label,
            "overrides": variants[label],
            "spearman_class": q.get("spearman_class"),
            "lds": q.get("lds"),
            **{k: v for k, v in p.items()},
        }
        if ref is not None:
            row["spearman_class_vs_default"] = q["spearman_class"] / ref["spearman_class"]
            row["lds_vs_default"] = q["lds"] / ref["lds"]
        row["max_attack_auc"] = max(max(p[a], 1 - p[a]) for a in ATTACKS if a in p)
        rows.append(row)
    cols = [
        ("variant", "variant"), ("spearman_class", "within-class"), ("lds", "LDS"),
        ("spearman_class_vs_default", "wc/def"), ("lds_vs_default", "LDS/def"),
        ("mia_auc", "AUC dist"), ("ft_delta_auc", "AUC ft-rise"), ("ft_loss_auc", "AUC ft-loss"),
        ("max_attack_auc", "max AUC"), ("target_loss_auc", "AUC target (ref)"),
        ("mia_tpr_at_1pct_fpr", "TPR@1% dist"),
        ("mia_tpr_at_5pct_fpr", "TPR@5% dist"), ("ft_delta_tpr_at_1pct_fpr", "TPR@1% ft"),
        ("ft_delta_tpr_at_5pct_fpr", "TPR@5% ft"), ("frac_near_copies", "near copies"),
        ("input_min", "min"), ("input_max", "max"), ("frac_outside_range", "outside range"),
    ]  # fmt: skip

    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    md = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r.get(c[0], "")) for c in cols) + " |" for r in rows]
    head = (
        f"setting {args.setting}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"queries {len(y)}; truth seeds {seeds}; LDS subsets {args.lds_subsets}; "
        f"wall {time.perf_counter() - t0:.0f} s; load {open('/proc/loadavg').read().split()[:3]}\n"
        f"command: python {' '.join(sys.argv)}\n"
        "variants: " + "; ".join(f"{k} = {v if v is not None else 'preset'}" for k, v in variants.items())
    )
    text = head + "\n\n" + "\n".join(md) + "".join(f"\n- {k} failed: {v}" for k, v in failed.items()) + "\n"
    (out / f"privacy-{name}.md").write_text(text)
    (out / f"privacy-{name}.json").write_text(json.dumps(rows, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
