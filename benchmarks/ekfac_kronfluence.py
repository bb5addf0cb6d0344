"""distdm's `if-ekfac` against kronfluence's EK-FAC on the same quantity, in one run.

    /tmp/kfvenv/bin/python benchmarks/ekfac_kronfluence.py --setting digits-mlp-k100 --threads 1 \
        --out benchmarks/out/ekfac-kronfluence.json

kronfluence is a benchmark-only dependency (install it in a separate venv, see RESULTS.md); the
library never imports it. Same model (the setting's seed-0 target), same training data, same 50
queries, same measurement (the margin log p_y / (1 - p_y)), same damping (kronfluence's heuristic
0.1 x the mean corrected eigenvalue per layer, distdm's default), once with the empirical Fisher
(both deterministic: the comparison checks the implementation) and once with sampled labels (each
library draws its own labels, so the agreement is bounded by the sampling noise: the script also
compares each library with itself under another seed, and the means over --draws seeds).

Scale: kronfluence scores g_q^T (F + damping)^-1 g_i; distdm's influence functions divide by N (the
parameter change of removing one of N samples), so distdm's per-sample scores are multiplied by N
before comparing. Per cluster = the sum of the per-sample scores over the cluster's members.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import SETTINGS, build_task, pick_queries  # noqa: E402

from distdm.attribution import make_attributor  # noqa: E402
from distdm.objectives import margin  # noqa: E402
from distdm.store import atomic_write_bytes  # noqa: E402


def kronfluence_scores(task, x, y, fisher: str, batch: int, seed: int = 0) -> tuple[np.ndarray, float, float]:
    """kronfluence's EK-FAC pairwise scores (N, Q) on the task's final model, its factor-fitting
    time and its scoring time (seconds); seed: torch's global generator (its label draws)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KTask

    class MarginTask(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), -1)
                    labels = torch.multinomial(probs, 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return margin(model(inputs), None, labels).sum()

    model = copy.deepcopy(task.model)
    model.load_state_dict(task.final)
    model.eval()
    ktask = MarginTask()
    model = prepare_model(model, ktask)
    train = torch.utils.data.TensorDataset(task.data.x_train, task.data.y_train)
    query = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("distdm", model, ktask, cpu=True, disable_tqdm=True, output_dir=tmp)
        t = time.perf_counter()
        analyzer.fit_all_factors(
            "ekfac",
            train,
            per_device_batch_size=batch,
            factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=fisher == "empirical"),
            overwrite_output_dir=True,
        )
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "scores",
            "ekfac",
            query,
            train,
            per_device_query_batch_size=len(y),
            per_device_train_batch_size=batch,
            score_args=ScoreArguments(damping_factor=None),
            overwrite_output_dir=True,
        )
        score_s = time.perf_counter() - t
        values = analyzer.load_pairwise_scores("scores")["all_modules"]  # (Q, N)
    return values.T.double().numpy(), fit_s, score_s


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Agreement of a (distdm) with b (kronfluence), both units x queries."""
    diff = np.abs(a - b)
    big = np.abs(b) >= 0.01 * np.abs(b).max()
    return {
        "pearson": float(pearsonr(a.ravel(), b.ravel())[0]),
        "spearman_per_query": float(np.mean([spearmanr(a[:, q], b[:, q])[0] for q in range(a.shape[1])])),
        "rel_frobenius": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "max_abs_diff_over_max_abs": float(diff.max() / np.abs(b).max()),
        "max_rel_diff_entries_over_1pct": float((diff[big] / np.abs(b[big])).max()),
        "norm_ratio": float(np.linalg.norm(a) / np.linalg.norm(b)),
    }


def main(argv: list[str] | None = None) -> int:
    """Run both implementations and print the agreement table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=SETTINGS, default="digits-mlp-k100")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--fishers", default="empirical,sampled")
    ap.add_argument("--batch", type=int, default=256, help="samples per batch in both libraries")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--draws", type=int, default=5, help="label draws (seeds) per library for 'sampled'")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import kronfluence

    task = build_task(args.setting)
    x, y = pick_queries(task, args.queries)
    n = task.data.n_train
    k = task.clusters.n_clusters
    ind = task.clusters.indicator().double().numpy()  # (K, N)
    rows = []
    for fisher in [f for f in args.fishers.split(",") if f]:
        t = time.perf_counter()
        method = make_attributor(
            "if-ekfac", fisher=fisher, damping="kronfluence", unit="sample", chunk=args.batch
        ).fit(task)
        d_fit = time.perf_counter() - t
        t = time.perf_counter()
        ours = method.scores(x, y, "margin").values * n  # (N, Q), kronfluence's scale
        d_score = time.perf_counter() - t
        theirs, k_fit, k_score = kronfluence_scores(task, x, y, fisher, args.batch)
        row = {
            "fisher": fisher,
            "compared": "distdm vs kronfluence",
            "per_sample": agreement(ours, theirs),
            "per_cluster": agreement(ind @ ours, ind @ theirs),
            "distdm_seconds": {"fit": d_fit, "scores": d_score},
            "kronfluence_seconds": {"fit": k_fit, "scores": k_score},
            "distdm_damping": method.damping_,
        }
        rows.append(row)
        if fisher == "sampled" and args.draws > 1:
            # the noise floor: each library against itself with another draw of the labels, and the
            # means over `draws` draws of each (the sampling noise averages out, a bias would not)
            more = [
                make_attributor(
                    "if-ekfac", fisher=fisher, damping="kronfluence", unit="sample", chunk=args.batch, seed=s
                ).fit(task).scores(x, y, "margin").values * n
                for s in range(1, args.draws)
            ]  # fmt: skip
            theirs_more = [kronfluence_scores(task, x, y, fisher, args.batch, seed=s)[0]
                           for s in range(1, args.draws)]  # fmt: skip
            mean_ours = np.mean([ours, *more], 0)
            mean_theirs = np.mean([theirs, *theirs_more], 0)
            for label, a, b in (
                ("distdm seed 1 vs seed 0", more[0], ours),
                ("kronfluence seed 1 vs seed 0", theirs_more[0], theirs),
                (f"distdm vs kronfluence, means of {args.draws} draws", mean_ours, mean_theirs),
            ):
                rows.append({**row, "compared": label, "per_sample": agreement(a, b),
                             "per_cluster": agreement(ind @ a, ind @ b)})  # fmt: skip
    meta = {
        "setting": args.setting,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kronfluence": kronfluence.__version__,
        "n_train": n,
        "clusters": k,
        "queries": len(y),
    }
    print(f"# if-ekfac vs kronfluence EK-FAC, {meta}")
    print("| Fisher | compared | unit | Pearson | mean Spearman per query | rel. Frobenius diff |"
          " max diff / max | max rel. diff (entries >= 1% of max) | norm ratio | distdm fit + scores (s) |"
          " kronfluence fit + scores (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for unit in ("per_sample", "per_cluster"):
            a = r[unit]
            ds, ks = r["distdm_seconds"], r["kronfluence_seconds"]
            print(
                f"| {r['fisher']} | {r['compared']} | {unit.replace('per_', '')} | {a['pearson']:.6f} | "
                f"{a['spearman_per_query']:.6f} | {a['rel_frobenius']:.2e} | "
                f"{a['max_abs_diff_over_max_abs']:.2e} | {a['max_rel_diff_entries_over_1pct']:.2e} | "
                f"{a['norm_ratio']:.4f} | {ds['fit']:.2f} + {ds['scores']:.2f} | "
                f"{ks['fit']:.2f} + {ks['scores']:.2f} |"
            )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, json.dumps({"meta": meta, "rows": rows}, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
