"""DDM's curvature: old sequential Arnoldi against the block Krylov solver (distdm.eigen), side by side
in one process (issue 14).

    python benchmarks/eigen_speed.py --settings digits-mlp-k100,probe-mlp-203k,fmnist-convnet-k100 \
        --rank 100 --threads 1 --out benchmarks/out/eigen_speed.json

For each setting and curvature (hessian, ggn) the reference is `hessian.arnoldi` with 2 x rank HVPs on
all training data (what `top_eigenpairs` ran before). Each variant: wall time, peak RSS (the kernel's
high-water mark, reset before each variant), HVPs, and its agreement with the reference: the largest
and median relative error of the top-`rank` eigenvalues, the subspace agreement ||U_ref[:k] U^T||_F^2 / k
for k = rank / 2 and rank (1 = the same subspace), and the relative Frobenius error of the low-rank
operator U diag(max(lambda, 0)) U^T that DDM uses as its metric. --hvp-probe K instead times K
curvature products applied one by one against one batched call (per vector).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddm_cost import make_task  # noqa: E402
from quality import build_task  # noqa: E402

from distdm.eigen import block_krylov  # noqa: E402
from distdm.hessian import arnoldi, flat_model, hvp  # noqa: E402


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def agreement(ref: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Eigenvalue errors, subspace agreement and the low-rank operator's relative error."""
    lr, ur = (t.double() for t in ref)
    ln, un = (t.double() for t in new)
    r = min(len(lr), len(ln))
    rel = ((ln[:r] - lr[:r]).abs() / lr[:r].abs().clamp_min(1e-12)).sort().values
    cos2 = (ur @ un.T) ** 2  # (r_ref, r_new)
    half = max(1, r // 2)
    a, b = lr.clamp_min(0), ln.clamp_min(0)
    cross = (a[:, None] * b[None, :] * cos2).sum()
    op_err = float(((a**2).sum() + (b**2).sum() - 2 * cross).clamp_min(0).sqrt() / (a**2).sum().sqrt())
    return {
        "eig_rel_err_max": float(rel[-1]),
        "eig_rel_err_median": float(rel[len(rel) // 2]),
        f"subspace_top{half}": float(cos2[:half].sum() / half),
        f"subspace_top{r}": float(cos2[:r, :r].sum() / r),
        "operator_rel_err": op_err,
    }


def variants(rank: int, n: int) -> list[tuple[str, dict]]:
    """(name, options) of the solvers compared; options: solver, block, krylov_dim, subsample."""
    out = [
        ("arnoldi-2r (old)", {"solver": "arnoldi"}),
        ("block1-2r", {"solver": "block", "block": 1}),
        ("block10-2r", {"solver": "block", "block": 10}),
        ("block10-2.5r", {"solver": "block", "block": 10, "krylov_dim": int(2.5 * rank)}),
        ("block1-1.5r", {"solver": "block", "block": 1, "krylov_dim": int(1.5 * rank)}),
    ]
    for frac in (2, 4):
        if n // frac >= 100:
            out.append((f"block1-2r-sub{n // frac}", {"solver": "block", "block": 1, "subsample": n // frac}))
    return out


def run_setting(setting: str, rank: int, curvatures: list[str], only: list[str] | None) -> list[dict]:
    """All variants of one setting, each curvature against its own full-data Arnoldi reference."""
    t0 = time.perf_counter()
    task = build_task(setting, per_class=100) if setting.startswith("fmnist") else make_task(setting)
    fm = flat_model(task)
    n = len(task.data.y_train)
    print(f"{setting}: P={fm.n_params} n={n} task {time.perf_counter() - t0:.1f} s", flush=True)
    # warm-up (first-call costs of autograd and BLAS, untimed): a rank-5 solve per curvature
    for curvature in curvatures:
        block_krylov(hvp(task, curvature=curvature, subsample=min(n, 200)), fm.n_params, 5, block=5)
    rows = []
    for curvature in curvatures:
        ref = None
        for name, opt in variants(rank, n):
            if ref is not None and only and not any(o in name for o in only):
                continue
            load = open("/proc/loadavg").read().split()[0]
            _reset_peak()
            t = time.perf_counter()
            hv = hvp(task, curvature=curvature, subsample=opt.get("subsample"))
            if opt["solver"] == "arnoldi":
                vals, vecs = arnoldi(hv, fm.n_params, n_iters=2 * rank, top_p=rank)
                info = {"n_hvps": 2 * rank}
            else:
                e = block_krylov(hv, fm.n_params, rank, block=opt["block"], krylov_dim=opt.get("krylov_dim"))
                vals, vecs = e.values, e.vectors
                info = {"n_hvps": e.n_hvps, "smallest": e.smallest, "n_negative": e.n_negative,
                        "n_converged": e.n_converged}  # fmt: skip
            sec = time.perf_counter() - t
            row = {"setting": setting, "P": fm.n_params, "n": n, "curvature": curvature, "variant": name,
                   "seconds": sec, "peak_rss_mb": _peak_mb(), "load1": float(load), **info}  # fmt: skip
            if ref is None:
                ref = (vals, vecs)
                row["top_eigenvalue"] = float(vals[0])
                row["rank_eigenvalue"] = float(vals[-1])
            row.update(agreement(ref, (vals, vecs)))
            rows.append(row)
            print(json.dumps(row), flush=True)
            del hv, vals, vecs
    return rows


def hvp_probe(setting: str, k: int) -> list[dict]:
    """Seconds per vector of one curvature product applied to k vectors one by one and as one batch
    (what decides `block_krylov`'s batched default)."""
    task = build_task(setting, per_class=100) if setting.startswith("fmnist") else make_task(setting)
    fm = flat_model(task)
    rows = []
    for curvature in ("hessian", "ggn"):
        hv = hvp(task, curvature=curvature)
        v = torch.randn(k, fm.n_params, generator=torch.Generator().manual_seed(0))
        hv(v[0])  # builds and caches the graph
        t = time.perf_counter()
        for vi in v:
            hv(vi)
        single = (time.perf_counter() - t) / k
        t = time.perf_counter()
        hv(v)
        batched = (time.perf_counter() - t) / k
        load = float(open("/proc/loadavg").read().split()[0])
        row = {"setting": setting, "curvature": curvature, "k": k, "single_s_per_vector": single,
               "batched_s_per_vector": batched, "load1": load}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    """Parse arguments, run every setting, write the rows as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default="digits-mlp-k100")
    ap.add_argument("--rank", type=int, default=100)
    ap.add_argument("--curvatures", default="hessian,ggn")
    ap.add_argument(
        "--only", default="", help="comma list of variant-name parts to run (the reference always)"
    )
    ap.add_argument("--hvp-probe", type=int, default=0, help="only time k single vs batched products")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = [o for o in args.only.split(",") if o] or None
    rows = []
    for s in args.settings.split(","):
        if args.hvp_probe:
            rows += hvp_probe(s, args.hvp_probe)
        else:
            rows += run_setting(s, args.rank, args.curvatures.split(","), only)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
