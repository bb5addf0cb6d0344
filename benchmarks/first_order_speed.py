"""First-order methods against their peer: distdm's grad-dot / grad-cos / tracin vs dattri's, side by side.

    /tmp/dvenv/bin/python benchmarks/first_order_speed.py --threads 1 --repeats 5
    python benchmarks/first_order_speed.py --arnoldi-memory --rank 200 --before HEAD

The second form measures instead the peak memory of the Arnoldi step (hessian.arnoldi, 2 x rank
Krylov steps, top rank eigenpairs) on BENCHMARKS.md's probe-mlp-203k model, the current
implementation against the one in git revision --before, each in a fresh process.

dattri is a benchmark-only dependency (its own venv, see RESULTS.md); the library never imports it.
Setting: digits-mlp-k100 (BENCHMARKS.md), built by benchmarks/quality.py; the same target model,
checkpoints (TracIn: trajectory 1..tau, weight lr each) and 50 queries for both libraries; query
objective: the margin log p_y / (1 - p_y). dattri's equivalents are its `TracInAttributor`:
Grad-Dot = one checkpoint (the final model) with weight 1, Grad-Cos = the same with
normalized_grad=True, TracIn-CP = every checkpoint with weight lr. Its default random projection to
512 dimensions is switched off, so both compute the exact dot products and the numbers must agree.

Timed: everything a user waits for from a fitted target model to per-sample scores for the 50
queries (distdm: make_attributor(...).fit(task).scores(...), unit='sample'; dattri: task,
attributor, attribute()), plus distdm's cluster scores (unit='cluster', what its users ask for).
Warm: both run in the same process, after one untimed call of every method of both libraries
(first-use costs: imports, and torch.func's first call imports torch._dynamo, about 1 s); each
timing is the median of --repeats runs, the libraries alternating. Cold: each library's first call
of each method in a fresh process (the task is built and both libraries imported untimed first),
as a user's first score command meets it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's progress bars

import subprocess  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import build_task, pick_queries  # noqa: E402

from distdm.attribution import make_attributor  # noqa: E402
from distdm.objectives import margin  # noqa: E402
from distdm.store import atomic_write_bytes  # noqa: E402

METHODS = ("grad-dot", "grad-cos", "tracin")


def dattri_scores(task, xq: torch.Tensor, yq: torch.Tensor, method: str, batch: int) -> torch.Tensor:
    """dattri's per-sample scores (N, Q) of `method` on the task's model and checkpoints."""
    from dattri.algorithm import TracInAttributor
    from dattri.task import AttributionTask

    model = task.model

    def loss_func(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, y.unsqueeze(0))

    def target_func(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x.unsqueeze(0),))
        return margin(out.unsqueeze(0), out.detach().unsqueeze(0), y.reshape(1)).reshape(())

    if method == "tracin":
        checkpoints = [dict(s) for s in task.trajectory[1:]]
        weights = torch.full((len(checkpoints),), float(task.schedule.lr))
    else:
        checkpoints = [dict(task.final)]
        weights = torch.ones(1)
    dtask = AttributionTask(
        loss_func=loss_func, model=model, checkpoints=checkpoints, target_func=target_func
    )
    attributor = TracInAttributor(
        task=dtask, weight_list=weights, normalized_grad=method == "grad-cos", device="cpu"
    )
    attributor.projector_kwargs = None  # exact gradients: no random projection
    d = task.data
    train = DataLoader(TensorDataset(d.x_train, d.y_train), batch_size=batch, shuffle=False)
    test = DataLoader(TensorDataset(xq, yq), batch_size=len(yq), shuffle=False)
    return attributor.attribute(train, test)


def distdm_scores(task, xq: torch.Tensor, yq: torch.Tensor, method: str, unit: str) -> torch.Tensor:
    """distdm's scores (units, Q) of `method` from a fresh fit."""
    s = make_attributor(method, unit=unit).fit(task).scores(xq, yq, "margin")
    return torch.as_tensor(s.values)


def timed(fn) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Pearson correlation and largest differences of two score matrices."""
    a, b = a.double().flatten(), b.double().flatten()
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    diff = (a - b).abs()
    return {
        "pearson": corr,
        "max_abs_diff_over_max_abs": float(diff.max() / b.abs().max()),
        # elementwise, over entries not near zero (1e-3 of the largest)
        "max_rel_diff": float((diff / b.abs())[b.abs() > 1e-3 * b.abs().max()].max()),
    }


def cold(method: str, library: str, threads: int, batch: int) -> float:
    """Seconds of the first call of `method` of `library` in a fresh process."""
    code = (
        "import sys, time, torch; sys.argv = ['x']; "
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
        "import first_order_speed as b; "
        f"torch.set_num_threads({threads}); task = b.build_task('digits-mlp-k100'); "
        "import dattri.algorithm, dattri.task; "  # both libraries imported before the clock starts
        "xq, yq = b.pick_queries(task, 50); t = time.perf_counter(); "
        + (
            f"b.distdm_scores(task, xq, yq, {method!r}, 'sample'); "
            if library == "distdm"
            else f"b.dattri_scores(task, xq, yq, {method!r}, {batch}); "
        )
        + "print(time.perf_counter() - t)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def probe_mlp_203k(threads: int) -> tuple:
    """BENCHMARKS.md's probe-mlp-203k: the trained MLP 784-256-10 (as a FlatModel) and its data."""
    from distdm import hessian as hs
    from distdm.engine import Schedule, select, train_variants
    from distdm.models import build_model

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 784, generator=g)
    y = torch.arange(2000) % 10
    x = centres[y] + 2.0 * torch.randn(2000, 784, generator=g)
    model = build_model("mlp", (784,), 10, seed=0, hidden=(256,))
    sched = Schedule(epochs=30, lr=0.05, batch_size=128, seed=0)
    state = select(train_variants(model, x, y, sched, loss="ce").states, 0)
    return hs.flat_model(model, state), x, y


def _hessian_module(rev: str | None):
    """distdm.hessian now, or as it was in git revision `rev` (loaded into the distdm package)."""
    import importlib.util

    from distdm import hessian

    if rev is None:
        return hessian
    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(
        ["git", "show", f"{rev}:src/distdm/hessian.py"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    spec = importlib.util.spec_from_loader("distdm._hessian_before", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "distdm"
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    exec(compile(src, f"{rev}:hessian.py", "exec"), mod.__dict__)  # noqa: S102 - the repository's own code
    return mod


def arnoldi_memory_child(rev: str | None, rank: int, threads: int) -> dict:
    """Peak RSS growth and seconds of one Arnoldi step in this (fresh) process."""
    import resource

    from distdm.hessian import hvp

    hs = _hessian_module(rev)  # its arnoldi; the HVP is today's for both
    fm, x, y = probe_mlp_203k(threads)
    hv = hvp(fm, None, x, y, "ce")
    hv(torch.randn(fm.n_params))  # builds and caches the HVP graph before the measurement
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    vals, vecs = hs.arnoldi(hv, fm.n_params, n_iters=2 * rank, top_p=rank)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rev": rev or "working tree", "P": fm.n_params, "rank": rank, "seconds": seconds,
            "rss_before": before, "rss_peak": peak, "growth": peak - before,
            "top_eigenvalues": vals[:5].tolist(), "vecs_dtype": str(vecs.dtype)}  # fmt: skip


def arnoldi_memory(args: argparse.Namespace) -> None:
    """Run arnoldi_memory_child for the revision --before and the working tree, each in a fresh process."""
    rows = []
    for rev in (args.before, None):
        code = (
            f"import sys, json; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            "import first_order_speed as b; "
            f"print(json.dumps(b.arnoldi_memory_child({rev!r}, {args.rank}, {args.threads})))"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        growth, peak = r["growth"] / 2**20, r["rss_peak"] / 2**20
        print(f"| {r['rev']} | {r['P']} | {r['rank']} | {growth:.0f} MiB | {r['growth'] / r['P']:.0f} B | "
              f"{peak:.0f} MiB | {r['seconds']:.1f} |")  # fmt: skip


def main() -> None:
    """Time both libraries on digits-mlp-k100 and write the table as JSON and markdown."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arnoldi-memory", action="store_true", help="measure the Arnoldi step's memory instead")
    ap.add_argument("--rank", type=int, default=200, help="Arnoldi: top eigenpairs (2 x rank steps)")
    ap.add_argument("--before", default="HEAD", help="Arnoldi: the git revision to compare with")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--dattri-batch", type=int, default=256, help="dattri's training batch size")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    if args.arnoldi_memory:
        arnoldi_memory(args)
        return
    torch.set_num_threads(args.threads)
    task = build_task("digits-mlp-k100")
    xq, yq = pick_queries(task, args.queries)
    methods = args.methods.split(",")
    colds = {
        (m, lib): cold(m, lib, args.threads, args.dattri_batch)
        for m in methods
        for lib in ("distdm", "dattri")
    }
    for m in methods:  # warm-up: first-use costs charged to neither library
        distdm_scores(task, xq, yq, m, "sample")
        dattri_scores(task, xq, yq, m, args.dattri_batch)

    rows = []
    for method in methods:
        runs = {"distdm": [], "distdm-cluster": [], "dattri": []}
        for _ in range(args.repeats):
            t, ours = timed(lambda m=method: distdm_scores(task, xq, yq, m, "sample"))
            runs["distdm"].append(t)
            t, ours_c = timed(lambda m=method: distdm_scores(task, xq, yq, m, "cluster"))
            runs["distdm-cluster"].append(t)
            t, theirs = timed(lambda m=method: dattri_scores(task, xq, yq, m, args.dattri_batch))
            runs["dattri"].append(t)
        med = {k: statistics.median(v) for k, v in runs.items()}
        agree = agreement(ours, theirs)
        rows.append({"method": method, **{f"{k}_s": v for k, v in med.items()}, "runs": runs,
                     "ratio_distdm_over_dattri": med["distdm"] / med["dattri"],
                     "cold_distdm_s": colds[method, "distdm"], "cold_dattri_s": colds[method, "dattri"],
                     **agree})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "dattri_batch": args.dattri_batch,
    }
    atomic_write_bytes(
        out / "first_order_speed.json", json.dumps({"meta": meta, "rows": rows}, indent=1).encode()
    )
    lines = [
        "| method | distdm s | dattri s | distdm / dattri | distdm s, clusters | cold distdm s | "
        "cold dattri s | Pearson | max abs diff / max abs | max rel diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['distdm_s']:.3f} | {r['dattri_s']:.3f} | "
            f"{r['ratio_distdm_over_dattri']:.3f} | "
            f"{r['distdm-cluster_s']:.3f} | {r['cold_distdm_s']:.2f} | {r['cold_dattri_s']:.2f} | "
            f"{r['pearson']:.7f} | {r['max_abs_diff_over_max_abs']:.1e} | {r['max_rel_diff']:.1e} |"
        )
    print(json.dumps(meta))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
