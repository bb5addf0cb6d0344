"""Agreement of gradient methods and influence functions with the final-model-only gold standard
(further training, Wei et al.) on scikit-learn's diabetes regression set, per-sample units.

For SGD and Adam further training, over several further-training epoch counts and numbers of seeds
averaged, it prints per-query cosine and Spearman (mean over test queries, 95% interval) between
each method's leave-one-out scores and the gold standard on a random subset of left-out training
samples, and writes the tables (markdown), the rows (CSV) and the figures (PNG) under --out; the
study itself is distdm.attribution.further.further_agreement, as in `distdm evaluate --gold
further-training`.

    python benchmarks/further_training.py --out benchmarks/out/further_training
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from distdm.attribution import make_attributor
from distdm.attribution.further import (
    AgreementRow,
    agreement_to_markdown,
    further_agreement,
    left_out_units,
    write_agreement,
)
from distdm.data import load_diabetes
from distdm.engine import Schedule
from distdm.models import build_model
from distdm.objectives import squared_error
from distdm.task import train_target


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def main() -> None:
    """Run the study and write table, JSON and figure."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the tables, rows and figures")
    p.add_argument("--hidden", type=int, default=32, help="MLP hidden width")
    p.add_argument("--train-epochs", type=int, default=300, help="target training epochs (SGD)")
    p.add_argument("--lr", type=float, default=0.01, help="target SGD learning rate (also further SGD)")
    p.add_argument("--adam-lr", type=float, default=1e-3, help="further-training Adam learning rate")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--epochs", type=_ints, default=[1, 2, 5, 10, 20, 50, 100, 200], help="further-training epochs"
    )
    p.add_argument("--seeds", type=int, default=8, help="further-training shuffle seeds")
    p.add_argument("--left-out", type=int, default=50, help="left-out training samples")
    p.add_argument("--queries", type=int, default=0, help="test queries (0: all)")
    p.add_argument("--damping", type=float, default=0.1, help="influence-function damping (Hessian)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    data = load_diabetes()
    model = build_model("mlp", data.input_shape, 1, seed=0, hidden=(args.hidden,))
    sched = Schedule(epochs=args.train_epochs, lr=args.lr, batch_size=args.batch, seed=0)
    task = train_target(model, data, sched, loss="mse")
    x, y = data.x_test, data.y_test
    if args.queries:
        x, y = x[: args.queries], y[: args.queries]
    ref = task.outputs(x)
    train_mse = float(squared_error(task.outputs(data.x_train)[None], None, data.y_train).mean())
    test_mse = float(squared_error(ref[None], None, y).mean())
    print(
        f"diabetes: {data.n_train} train, {len(y)} queries; MLP 10-{args.hidden}-1 trained "
        f"{args.train_epochs} epochs SGD lr {args.lr} batch {args.batch}: train MSE {train_mse:.3f}, "
        f"test MSE {test_mse:.3f} (standardised target) [{time.perf_counter() - t0:.1f}s]"
    )

    lam = args.damping
    methods = {
        "grad-dot": ("grad-dot", {}),
        "grad-cos": ("grad-cos", {}),
        "tracin": ("tracin", {}),
        f"if-exact (H, {lam:g})": ("if-exact", {"damping": lam}),
        "if-exact (GGN, 0.01)": ("if-exact", {"damping": 0.01, "curvature": "ggn"}),
        f"if-cg (H, {lam:g})": ("if-cg", {"damping": lam}),
        f"if-lissa (H, {lam:g})": ("if-lissa", {"damping": lam}),
        f"if-arnoldi (H, {lam:g}, p=20)": ("if-arnoldi", {"damping": lam}),
    }
    scores = {}
    for label, (name, kw) in methods.items():
        t = time.perf_counter()
        a = make_attributor(name, unit="sample", **kw).fit(task)
        scores[label] = a.scores(x, y, "squared_error")
        print(f"  {label:28s} offline {a.offline_seconds_:6.2f}s  online {scores[label].seconds:6.2f}s")

    rows: list[AgreementRow] = []
    left = left_out_units(data.n_train, args.left_out, seed=0)
    for opt, lr in (("sgd", args.lr), ("adam", args.adam_lr)):
        t = time.perf_counter()
        rows += further_agreement(
            task, scores, x, y, "squared_error", epochs=args.epochs, seeds=args.seeds, optimizer=opt,
            lr=lr, unit="sample", left_out=left,
        )  # fmt: skip
        print(
            f"further training ({opt}, lr {lr:g}): {len(left) + 1} variants x {args.seeds} seeds x "
            f"{max(args.epochs)} epochs in {time.perf_counter() - t:.1f}s"
        )

    e_mid = args.epochs[len(args.epochs) // 2]
    print()
    print(agreement_to_markdown(rows, seeds_at_epoch=e_mid))
    written = write_agreement(rows, args.out, stem="agreement", seeds_at_epoch=e_mid)
    print(f"wrote {', '.join(str(p) for p in written.values())}; total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
