"""Applications of synsets and attributions: unlearning (DDM Table 4), privacy, robustness (Figs 3, 8).

    python benchmarks/unlearn_privacy.py --setting digits --threads 1

On the benchmark setting (digits-mlp-k100, or fmnist-convnet-k100 with --setting fmnist):
1. Table 4: test accuracy after fine-tuning theta_tau on the whole synset, for reverse matching (the
   `paper` preset), standard matching (`paper` with direction match) and the `default` preset, at
   several multiples of each synset's online lr.
2. Unlearning chosen clusters by synset fine-tuning beside exact retraining without them.
3. Privacy of each synset: nearest-real cosine / L2 distance and the membership-inference AUC, and a
   figure of synsets beside their nearest real images.
4. Robustness: class-wise and cluster-wise attribution matrices under several architectures and
   initialisations, pairwise Spearman and top-cluster agreement, side-by-side heatmaps.
Writes unlearn_privacy-<setting>.md and figures under --out (synsets cached in <out>/run-<setting>).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quality import build_task, pick_queries, run_name  # noqa: E402

from distdm.applications.compare import Variant, compare_heatmaps_png, compare_study  # noqa: E402
from distdm.applications.privacy import privacy_figure_png, privacy_table  # noqa: E402
from distdm.applications.unlearn import (  # noqa: E402
    SYNSET_VARIANTS,
    forgetting_table,
    rows_to_markdown,
    synset_variant,
    unlearn_report,
)
from distdm.store import RunStore, atomic_write_bytes  # noqa: E402

SETTINGS = {"digits": "digits-mlp-k100", "fmnist": "fmnist-convnet-k100"}
# resnet18-ap is left out on digits: its last stage sees a 1x1 map, which instance norm sends to 0
ARCHS = {"digits": "mlp,convnet,alexnet-in,vit", "fmnist": "convnet,mlp,alexnet-in"}
MODEL_KWARGS = {"mlp": {"hidden": (128,)}, "convnet": {"width": 16, "depth": 3}}


def main() -> int:
    """Run every part and write the markdown tables and figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="digits")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--presets", default=",".join(SYNSET_VARIANTS))
    ap.add_argument("--lr-scales", default="0.01,0.1,1")
    ap.add_argument("--unlearn", default="3,17;42;0,1,2,3,4", help="';'-separated cluster sets")
    ap.add_argument("--archs", default=None, help="architectures compared (default per setting)")
    ap.add_argument("--inits", default="default,kaiming,normal,xavier")
    ap.add_argument("--compare-methods", default="grad-dot,if-cg")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--skip", default="", help="parts to skip: table4,unlearn,privacy,compare")
    ap.add_argument("--per-class", type=int, default=200, help="Fashion-MNIST training images per class")
    ap.add_argument("--out", default="benchmarks/out/unlearn_privacy")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setting = SETTINGS[args.setting]
    skip = set(args.skip.split(","))
    task = build_task(setting, per_class=args.per_class)
    setting = run_name(setting, args.per_class)
    store = RunStore(out / f"run-{setting}", fingerprint=task.data.fingerprint())
    acc = float((task.outputs(task.data.x_test).argmax(1) == task.data.y_test).float().mean())
    print(f"{setting}: target test accuracy {acc:.4f}, K = {task.clusters.n_clusters}", flush=True)
    md = [
        f"setting {setting}; {datetime.date.today()}; {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}; target test accuracy {acc:.4f}",
        f"command: python {' '.join(sys.argv)}",
    ]
    names = [n for n in args.presets.split(",") if n]
    syns, secs = {}, {}
    for n in names:
        t = time.perf_counter()
        syns[n] = synset_variant(task, n, store=store)
        secs[n] = time.perf_counter() - t
        print(f"synset {n}: {secs[n]:.1f} s (0 if cached)", flush=True)

    if "table4" not in skip:
        scales = [float(s) for s in args.lr_scales.split(",")]
        t = time.perf_counter()
        rows = forgetting_table(task, syns, lr_scales=scales)
        md += ["", "## Table 4: fine-tuning theta_tau on the whole synset", "", rows_to_markdown(rows)]
        md.append(f"\n({time.perf_counter() - t:.1f} s)")
        print(md[-2], flush=True)

    if "unlearn" not in skip:
        md += ["", "## Unlearning chosen clusters vs exact retraining"]
        for text in args.unlearn.split(";"):
            ids = [int(v) for v in text.split(",")]
            sizes = task.clusters.sizes()
            desc = ", ".join(f"{k} (class {task.clusters.cluster_class[k]}, n={sizes[k]})" for k in ids)
            for n in names:
                t = time.perf_counter()
                rep = unlearn_report(task, syns[n], ids)
                md += ["", f"clusters {desc}; synset `{n}` ({time.perf_counter() - t:.1f} s)", "",
                       rep.to_markdown()]  # fmt: skip
                print(md[-3], "\n", md[-1], flush=True)

    if "privacy" not in skip:
        t = time.perf_counter()
        rows = privacy_table(syns, task.data)
        md += ["", "## Privacy of the synsets", "", rows_to_markdown(rows)]
        md.append(f"\n({time.perf_counter() - t:.1f} s)")
        print(md[-2], flush=True)
        png = privacy_figure_png(syns, task.data, task.clusters.cluster_class)
        if png is not None:
            atomic_write_bytes(out / f"privacy-{setting}.png", png)
        (out / f"privacy-{setting}.json").write_text(json.dumps(rows, indent=2))

    if "compare" not in skip:
        x, y = pick_queries(task, args.queries)
        base = (args.archs or ARCHS[args.setting]).split(",")[0]
        archs = [Variant(a) for a in (args.archs or ARCHS[args.setting]).split(",")]
        inits = [Variant(base, i) for i in args.inits.split(",")] + [Variant(base, seed=1)]
        studies = {"archs": archs, "inits": inits}
        for method in args.compare_methods.split(","):
            for label, variants in studies.items():
                if method != "grad-dot" and label == "archs":
                    continue  # the slow methods only on the reference architecture
                t = time.perf_counter()
                comp = compare_study(task.data, variants, task.schedule, task.clusters, (x, y), method=method,
                                     model_kwargs=MODEL_KWARGS, store=store)  # fmt: skip
                md += ["", f"## Robustness: {method}, {label} ({time.perf_counter() - t:.0f} s)", "",
                       comp.to_markdown()]  # fmt: skip
                print(md[-1], flush=True)
                atomic_write_bytes(out / f"compare-{setting}-{method}-{label}.png",
                                   compare_heatmaps_png(comp, task.clusters, y.numpy()))  # fmt: skip
    md.append(f"\nwall {time.perf_counter() - start:.0f} s")
    atomic_write_bytes(out / f"unlearn_privacy-{setting}.md", ("\n".join(md) + "\n").encode())
    print(f"wrote {out}/unlearn_privacy-{setting}.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
