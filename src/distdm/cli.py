"""The `distdm` command: train, cluster, distill, attribute, evaluate, report, demo."""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from .errors import DistdmError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Print a DistdmError as one line and exit with status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DistdmError as e:
            err_console.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what each stage does.")) -> None:
    """Training data attribution: which training data drive a model's predictions."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )


def _open(run: Path, dataset: str | None = None, model: str | None = None, **train: Any):
    from .config import TrainConfig
    from .run import Run, default_train_config

    if (run / "manifest.json").exists() and dataset is None:
        return Run.open(run, progress=True)
    dataset = dataset or "digits"
    base = default_train_config(dataset).to_dict()
    base.update({k: v for k, v in train.items() if v is not None})
    return Run(run, dataset, model or "mlp", train=TrainConfig.from_dict(base), progress=True)


RUN = typer.Argument(..., help="Run directory (created if missing).")


@app.command()
@user_errors
def train(
    run: Path = RUN,
    dataset: str = typer.Option("digits", help="Built-in dataset: digits, fashion-mnist."),
    model: str = typer.Option(
        "mlp", help="Built-in model: mlp, logreg, convnet, alexnet-in, resnet18-ap, vit."
    ),
    epochs: int = typer.Option(None, help="Epochs (default: the dataset's benchmark setting)."),
    lr: float = typer.Option(None, help="Learning rate of plain SGD."),
    batch_size: int = typer.Option(None, help="Batch size."),
    seed: int = typer.Option(None, help="Seed of initialisation and shuffle order."),
) -> None:
    """Train the target model and record its trajectory (one checkpoint per epoch)."""
    r = _open(run, dataset, model, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    r.train()
    info = r.store.stage_info("train")
    console.print(f"trained {r.model_name} on {r.data.name}: test accuracy {info['accuracy']:.3f} "
                  f"in {info['seconds']:.1f}s -> {r.path}")  # fmt: skip


@app.command()
@user_errors
def cluster(
    run: Path = RUN,
    per_class: int = typer.Option(10, help="Clusters per class (C)."),
    features: str = typer.Option("penultimate", help="penultimate (target model) or inputs."),
    kind: str = typer.Option("kmeans", help="kmeans, classwise or index (the paper's 'w/o cluster')."),
) -> None:
    """Partition the training data into attribution units."""
    from .config import ClusterConfig

    r = _open(run)
    c = r.cluster(ClusterConfig(per_class=per_class, features=features, kind=kind))
    sizes = c.sizes()
    console.print(
        f"{c.n_clusters} clusters, sizes {sizes.min()}..{sizes.max()} (median {int(np.median(sizes))})"
    )


@app.command()
@user_errors
def distill(
    run: Path = RUN,
    preset: str = typer.Option("default", help="default (measured best) or paper (literal)."),
) -> None:
    """Distil one synthetic set per cluster; prints matching diagnostics and saves a synset grid."""
    from .figures import bar_png, synset_grid_png

    r = _open(run)
    syn = r.distill(preset)
    _print_synset(syn)
    png = synset_grid_png(syn, r.data.x_train, r.clusters())
    if png:
        console.print(f"synset grid: {r.store.save_file(f'figures/synset-{preset}.png', png)}")
    cos = syn.info["layer_cosine"]
    path = r.store.save_file(
        f"figures/matching-{preset}.png",
        bar_png(list(cos), list(cos.values()), "matching cosine per layer", "cosine"),
    )
    console.print(f"matching cosines: {path}")


def _print_synset(syn: Any) -> None:
    t = Table(title="distillation diagnostics")
    t.add_column("layer")
    t.add_column("matching cosine", justify="right")
    for k, v in syn.info["layer_cosine"].items():
        t.add_row(k, f"[red]{v:.3f}[/]" if v <= 0 else f"{v:.3f}")
    console.print(t)
    f = syn.info.get("forgetting", {})
    if f:
        console.print(
            f"test accuracy: theta_0 {f['acc_theta0']:.3f}, target {f['acc_target']:.3f}, "
            f"after fine-tuning on the whole synset {f['acc_after_whole_synset']:.3f}"
        )


@app.command()
@user_errors
def attribute(
    run: Path = RUN,
    method: str = typer.Option("ddm", help="ddm, exact, grad-dot, if-cg, ... (see `distdm methods`)."),
    preset: str = typer.Option("default", help="DDM preset."),
    queries: int = typer.Option(20, help="Number of random test queries."),
    objective: str = typer.Option("dist1", help="margin, dist1, dist2, dist3, global."),
    top: int = typer.Option(3, help="Clusters to list per query."),
    seed: int = typer.Option(0, help="Seed of the query draw."),
) -> None:
    """Attribute test predictions to training clusters; prints the top clusters and saves a heatmap."""
    import torch

    from .figures import heatmap_png
    from .objectives import get_objective

    get_objective(objective)  # fail before any expensive fitting
    if top < 1:
        raise DistdmError(f"--top must be >= 1, got {top}")
    r = _open(run)
    x, y, idx = r.queries(queries, seed)
    settings = {"preset_name": preset} if method == "ddm" else {}
    att = r.attributor(method, **settings)
    s = att.scores(x, y, objective)
    clusters = r.clusters()
    pred = r.task().outputs(x).argmax(-1).numpy()
    t = Table(title=f"{method}: top clusters for '{objective}' (score = change when removed)")
    for col in ("query", "label", "pred", *[f"#{i + 1} cluster (class, size): score" for i in range(top)]):
        t.add_column(col)
    tops = s.top(top)
    sizes = clusters.sizes()
    for q in range(len(y)):
        cells = [f"{k} ({clusters.cluster_class[k]}, {sizes[k]}): {s.values[k, q]:+.3g}" for k in tops[:, q]]
        t.add_row(str(idx[q]), str(int(y[q])), str(int(pred[q])), *cells)
    console.print(t)
    tag = f"{method}-{objective}-q{queries}s{seed}"
    r.store.save_tensors(
        f"attribution/{tag}", {"scores": torch.as_tensor(s.values), "queries": torch.as_tensor(idx)}
    )
    fig = r.store.save_file(
        f"figures/{tag}.png", heatmap_png(s.values, clusters, y.numpy(), f"{method} / {objective}")
    )
    console.print(f"scores: {r.path}/attribution/{tag}.safetensors; heatmap: {fig}")
    console.print(f"online time {s.seconds:.2f}s for {len(y)} queries x {s.n_units} clusters")


def _method(run: Any, spec: str) -> Any:
    """'ddm' / 'ddm:paper' (a DDM preset) or any registered method name, fitted on the run."""
    name, _, preset_name = spec.partition(":")
    if name == "ddm":
        return run.attributor("ddm", preset_name=preset_name or "default")
    if preset_name:
        raise DistdmError(f"only ddm takes a preset (ddm:paper), got {spec!r}")
    return run.attributor(name)


@app.command()
@user_errors
def evaluate(
    run: Path = RUN,
    methods: str = typer.Option("ddm,ddm:paper,grad-dot,if-cg,random", help="Comma-separated methods."),
    queries: int = typer.Option(20, help="Number of random test queries."),
    seeds: str = typer.Option("0,1,2", help="Seeds of exact retraining (truth; noise ceiling needs 2+)."),
    lds_subsets: int = typer.Option(100, help="Random half-subsets of clusters retrained for LDS."),
) -> None:
    """Compare methods with exact leave-cluster-out retraining: Dist1-3, Spearman, LDS, timings."""
    from .evaluate import evaluate as run_evaluation

    r = _open(run)
    x, y, _ = r.queries(queries)
    fitted = {spec: _method(r, spec) for spec in methods.split(",") if spec}
    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError:
        raise DistdmError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    ev = run_evaluation(
        r.task(), fitted, (x, y), truth_seeds=seed_list, lds_subsets=lds_subsets, progress=True
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        written = ev.save(tmp)
        paths = [r.store.save_file(f"evaluation/{p.name}", p.read_bytes()) for p in written.values()]
    console.print(ev.to_markdown())
    console.print("written: " + ", ".join(str(p) for p in paths))


@app.command()
@user_errors
def report(
    run: Path = RUN,
    out: Path = typer.Option(None, help="Where to write the HTML file (default RUN/report.html)."),
) -> None:
    """Write a single self-contained HTML report of the run (settings, timings, diagnostics, figures)."""
    from .report import write_report
    from .run import Run

    console.print(f"report: {write_report(Run.open(run), out)}")


@app.command()
@user_errors
def reset(
    run: Path = RUN,
    stage: str = typer.Argument(..., help="Stage to forget: train, cluster, distill-default, retrain, ..."),
) -> None:
    """Forget one stage's settings, completion and artifacts so it can be rerun with new settings."""
    from .store import RunStore

    store = RunStore(run, create=False)
    known = set(store.manifest["configs"]) | {s.split("/")[0] for s in store.manifest["stages"]}
    if stage not in known:
        raise DistdmError(f"run {run} has no stage {stage!r}; it has {sorted(known)}")
    store.reset(stage)
    console.print(f"reset {stage} in {run}")


@app.command()
def methods() -> None:
    """List the registered attribution methods."""
    from .attribution import ATTRIBUTORS

    for name, cls in sorted(ATTRIBUTORS.items()):
        console.print(f"{name:18s} {(cls.__doc__ or '').strip().splitlines()[0]}")


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run directory for the demo."),
    queries: int = typer.Option(20, help="Number of test queries."),
) -> None:
    """Every stage on the embedded digits data with defaults, checked against exact retraining."""
    from scipy.stats import spearmanr

    from .config import ClusterConfig
    from .figures import bar_png, heatmap_png, synset_grid_png
    from .run import Run

    t0 = time.perf_counter()
    r = Run(out, "digits", "mlp", progress=True)
    timings: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        console.print(f"[bold]{name}[/] ...")
        res = fn()
        timings[name] = time.perf_counter() - t
        return res

    stage("train", r.train)
    console.print(f"  target test accuracy {r.store.stage_info('train')['accuracy']:.3f}")
    clusters = stage("cluster", lambda: r.cluster(ClusterConfig(per_class=10)))
    syn = stage("distill", lambda: r.distill("default"))
    _print_synset(syn)
    x, y, _ = r.queries(queries)
    ddm = r.attributor("ddm")
    s = stage("attribute (DDM)", lambda: ddm.scores(x, y, "margin"))
    exact = stage("exact leave-cluster-out retraining", lambda: r.attributor("exact").scores(x, y, "margin"))
    rho = [spearmanr(s.values[:, q], exact.values[:, q])[0] for q in range(len(y))]
    within = []
    for q in range(len(y)):
        m = clusters.cluster_class == int(y[q])
        within.append(spearmanr(s.values[m, q], exact.values[m, q])[0])
    figs = {
        "heatmap": r.store.save_file(
            "figures/demo-heatmap.png", heatmap_png(s.values, clusters, y.numpy(), "DDM margin scores")
        ),
        "truth": r.store.save_file(
            "figures/demo-exact.png",
            heatmap_png(exact.values, clusters, y.numpy(), "exact leave-cluster-out"),
        ),
        "matching": r.store.save_file(
            "figures/demo-matching.png",
            bar_png(
                list(syn.info["layer_cosine"]),
                list(syn.info["layer_cosine"].values()),
                "matching cosine",
                "cosine",
            ),
        ),
    }
    grid = synset_grid_png(syn, r.data.x_train, clusters)
    if grid:
        figs["synsets"] = r.store.save_file("figures/demo-synsets.png", grid)
    t = Table(title="DDM (default preset) vs exact leave-cluster-out retraining, margin objective")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("Spearman, all clusters (mean over queries)", f"{np.nanmean(rho):.3f}")
    t.add_row("Spearman, within the query's class", f"{np.nanmean(within):.3f}")
    t.add_row("DDM online time", f"{s.seconds:.2f}s")
    t.add_row("exact retraining time", f"{timings['exact leave-cluster-out retraining']:.1f}s")
    console.print(t)
    for k, v in timings.items():
        console.print(f"  {k:40s} {v:6.1f}s")
    console.print(f"total {time.perf_counter() - t0:.1f}s; run directory {r.path}")
    for k, p in figs.items():
        console.print(f"  figure {k}: {p}")


def run_cli() -> None:
    """Entry point for `python -m distdm`."""
    app(prog_name="distdm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_cli())
