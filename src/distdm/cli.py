"""The `distdm` command: train, cluster, distill, attribute, evaluate, report, demo."""

from __future__ import annotations

import functools
import logging
import math
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


def _open(
    run: Path, *, executor: Any = None, memory_budget_bytes: int | None = None, device: str = "cpu"
) -> Any:
    """Reopen an existing run with the data, model and settings it records."""
    from .run import Run

    if not (run / "manifest.json").exists():
        if run.exists() and not run.is_dir():
            raise DistdmError(f"{run} is a file, not a run directory: choose another path")
        raise DistdmError(f"no such run {run}: create it with `distdm train {run}`")
    return Run.open(
        run, progress=True, executor=executor, memory_budget_bytes=memory_budget_bytes, device=device
    )


def _refuse_changed(store: Any, stage: str, config: dict[str, Any]) -> None:
    """Refuse, before any work, settings that differ from those a finished stage was made with (the
    message names the `distdm reset` command that forgets the stage)."""
    if store.is_done(stage) and store.config(stage) is not None:
        store.check_config(stage, config)  # records nothing: the stage's settings exist


RUN = typer.Argument(..., help="Run directory (`distdm train` creates it).")
TRAINING_METHODS = frozenset({"exact", "further-training", "ddm"})  # methods that retrain or fine-tune
EXECUTOR = typer.Option(
    "local",
    help="Where models are retrained or fine-tuned: local (in this process) or ray "
    "(a Ray cluster at --address, or a local Ray instance started on this machine).",
)
ADDRESS = typer.Option(None, help="Address of a running Ray cluster, e.g. auto or ray://host:10001.")
MEMORY_BUDGET = typer.Option(
    None, help="Megabytes one batched training call may use; fewer models train at once if needed."
)
DEVICE = typer.Option(
    "cpu", help="Where to compute: cpu, cuda, cuda:N, mps or auto (cuda if available, else mps, else cpu)."
)
VERIFY = typer.Option(
    0,
    "--verify",
    metavar="M",
    help="Trust check: retrain M random clusters out (8 is a good start) with two seeds and say whether "
    "the scores agree with exact retraining and whether retraining agrees with itself; 0: no check.",
)


def _execution(
    ctx: typer.Context, executor: str, address: str | None, memory_budget: float | None
) -> dict[str, Any]:
    """Run settings for --executor/--address/--memory-budget; a Ray instance started here is
    stopped when the command ends (also when it fails). Results do not depend on them."""
    from . import executors

    if memory_budget is not None and not (math.isfinite(memory_budget) and memory_budget > 0):
        raise DistdmError(f"--memory-budget must be a number of megabytes > 0, got {memory_budget}")
    ex = executors.get_executor(executor, address)
    if getattr(ex, "in_process", False):
        ex = None  # the engine's own in-process path (with progress bars)
    else:
        # the command's context closes when the command returns or raises, before the process exits
        ctx.call_on_close(ex.shutdown)  # type: ignore[union-attr]
    budget = None if memory_budget is None else max(1, int(memory_budget * 2**20))
    return {"executor": ex, "memory_budget_bytes": budget}


@app.command()
@user_errors
def train(
    run: Path = RUN,
    dataset: str = typer.Option(
        None, help="Built-in dataset: digits (a new run's default), fashion-mnist, diabetes (regression)."
    ),
    data: Path = typer.Option(
        None,
        help="Your own data instead of --dataset: a .npz, .pt or .safetensors file holding x_train, "
        "y_train and optionally x_test, y_test.",
    ),
    model: str = typer.Option(
        None,
        help="Built-in model (mlp (default), logreg, convnet, alexnet-in, resnet18-ap, vit), or your own: "
        "module:callable or path/to/file.py:callable returning an nn.Module.",
    ),
    epochs: int = typer.Option(
        None, help="Epochs (default: the dataset's benchmark setting; 30 with --data)."
    ),
    lr: float = typer.Option(None, help="Learning rate of plain SGD."),
    batch_size: int = typer.Option(None, help="Batch size."),
    seed: int = typer.Option(None, help="Seed of initialisation and shuffle order."),
    device: str = DEVICE,
) -> None:
    """Train the target model and record its trajectory (one checkpoint per epoch). On an existing run
    without --dataset/--data/--model: resume with the settings it records."""
    from .config import TrainConfig
    from .run import Run, default_train_config
    from .store import RunStore
    from .userdata import DATA_SUFFIXES

    if dataset is not None and data is not None:
        raise DistdmError("--dataset and --data are exclusive: give a built-in dataset or your own file")
    if data is not None:
        if data.suffix.lower() not in DATA_SUFFIXES:
            raise DistdmError(f"--data takes a {', '.join(DATA_SUFFIXES)} file, got {str(data)!r}")
        if not data.is_file():
            raise DistdmError(f"--data {str(data)!r}: no such file")
    overrides = {k: v for k, v in dict(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed).items()
                 if v is not None}  # fmt: skip
    base = None  # the run's recorded training settings, if any: options change them one by one
    if (run / "manifest.json").exists():
        store = RunStore(run, create=False)
        base = store.config("train")
        wanted = None if base is None else TrainConfig.from_dict({**base, **overrides}).to_dict()
        if wanted is not None:  # a changed setting is refused before data is loaded or a model built
            _refuse_changed(store, "train", wanted)
        if not overrides or (wanted is not None and wanted == base):
            # the recorded data, model and settings; --dataset/--data/--model given again must match them
            _train_and_report(Run.open(run, data=data or dataset, model=model, progress=True, device=device))
            return
        if dataset is None and data is None and model is None:
            raise DistdmError(
                f"run {run} has no finished training; to train it with other settings give its "
                f"--dataset or --data and --model again"
            )
    source: Path | str = data if data is not None else (dataset or "digits")
    if base is None:
        base = (default_train_config(dataset or "digits") if data is None else TrainConfig()).to_dict()
    cfg = TrainConfig.from_dict({**base, **overrides})
    _train_and_report(Run(run, source, model or "mlp", train=cfg, progress=True, device=device))


def _train_and_report(r: Any) -> None:
    """Train (or reuse) the target model and print its test quality: accuracy, or MSE for regression."""
    r.train()
    info = r.store.stage_info("train")
    if "mse" in info or r.data.is_regression:
        quality = f"test MSE {info.get('mse', info.get('accuracy')):.4g}"
    else:
        quality = f"test accuracy {info['accuracy']:.3f}"
    console.print(f"trained {r.model_name} on {r.data.name}: {quality} in {info['seconds']:.1f}s -> {r.path}",
                  highlight=False, soft_wrap=True)  # fmt: skip


@app.command()
@user_errors
def cluster(
    run: Path = RUN,
    per_class: int = typer.Option(10, help="Clusters per class (C)."),
    features: str = typer.Option("penultimate", help="penultimate (target model) or inputs."),
    kind: str = typer.Option("kmeans", help="kmeans, classwise or index (the paper's 'w/o cluster')."),
    device: str = DEVICE,
) -> None:
    """Partition the training data into attribution units."""
    from .config import ClusterConfig
    from .store import RunStore

    cfg = ClusterConfig(per_class=per_class, features=features, kind=kind)
    if (run / "manifest.json").exists():  # a changed setting is refused before the run is loaded
        _refuse_changed(RunStore(run, create=False), "cluster", cfg.to_dict())
    r = _open(run, device=device)
    c = r.cluster(cfg)
    sizes = c.sizes()
    console.print(
        f"{c.n_clusters} clusters, sizes {sizes.min()}..{sizes.max()} (median {int(np.median(sizes))})"
    )


@app.command()
@user_errors
def distill(
    ctx: typer.Context,
    run: Path = RUN,
    preset: str = typer.Option(
        "default",
        help="default (closed-form labels: measured best for its cost), influence-adam (the previous "
        "default, 8x the offline cost), paper (the paper, literally).",
    ),
    executor: str = EXECUTOR,
    address: str = ADDRESS,
    memory_budget: float = MEMORY_BUDGET,
    device: str = DEVICE,
) -> None:
    """Distil one synthetic set per cluster; prints matching diagnostics and saves a synset grid.
    --executor and --memory-budget apply to the fine-tunes on synsets (the forgetting check)."""
    from .figures import bar_png, synset_grid_png

    _check_preset(preset)
    r = _open(run, device=device, **_execution(ctx, executor, address, memory_budget))
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


def _check_preset(name: str) -> None:
    """Refuse an unknown DDM preset before any work."""
    from .presets import PRESETS

    if name not in PRESETS:
        raise DistdmError(f"unknown preset {name!r}; one of {', '.join(map(repr, PRESETS))}")


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
    ctx: typer.Context,
    run: Path = typer.Argument(None, help="Run directory (or give --pack instead)."),
    method: str = typer.Option("ddm", help="ddm, exact, grad-dot, if-cg, ... (see `distdm methods`)."),
    preset: str = typer.Option("default", help="DDM preset."),
    queries: int = typer.Option(20, help="Number of random test queries."),
    objective: str = typer.Option("dist1", help="margin, dist1, dist2, dist3, global."),
    top: int = typer.Option(3, help="Clusters to list per query."),
    seed: int = typer.Option(0, help="Seed of the query draw."),
    verify: int = VERIFY,
    executor: str = EXECUTOR,
    address: str = ADDRESS,
    memory_budget: float = MEMORY_BUDGET,
    device: str = DEVICE,
    pack: Path = typer.Option(None, help="Answer from a synset pack (`distdm export`) instead of a run."),
    model: Path = typer.Option(None, help="With --pack: the trained target's weights (.safetensors)."),
    arch: str = typer.Option(None, help="With --pack: your model's constructor, package.module:callable."),
    queries_file: Path = typer.Option(
        None, help="With --pack: .npz/.safetensors of query inputs x and labels y (scores go beside it)."
    ),
) -> None:
    """Attribute test predictions to training clusters; prints the top clusters and saves a heatmap.
    --executor and --memory-budget apply to the methods that train models (exact, further-training, ddm).
    With --pack PACK --model WEIGHTS --queries-file Q: from the pack and the model alone (no run, no data)."""
    import torch

    from .figures import heatmap_png
    from .objectives import get_objective

    get_objective(objective)  # fail before any expensive fitting
    if pack is not None or run is None:
        if run is not None:
            raise DistdmError("give either a run directory or --pack, not both")
        if pack is None:
            raise DistdmError("give a run directory, or --pack PACK --model WEIGHTS --queries-file FILE")
        if verify:
            raise DistdmError("--verify retrains the model and needs a run directory, not --pack")
        _attribute_pack(pack, model, arch, queries_file, objective, top)
        return
    if model is not None or arch is not None or queries_file is not None:
        raise DistdmError("--model, --arch and --queries-file go with --pack")
    _check_methods("--method", [method])
    if method == "ddm":
        _check_preset(preset)
    _check_queries(queries)
    if top < 1:
        raise DistdmError(f"--top must be >= 1, got {top}")
    if method not in TRAINING_METHODS and (executor != "local" or address or memory_budget is not None):
        raise DistdmError(
            f"{method} trains no models: --executor, --address and --memory-budget apply to "
            f"{', '.join(sorted(TRAINING_METHODS))}"
        )
    r = _open(run, device=device, **_execution(ctx, executor, address, memory_budget))
    x, y, idx = _queries(r, queries, seed)
    clusters = r.clusters()
    if top > clusters.n_clusters:
        console.print(f"note: --top {top} is more than the run's {clusters.n_clusters} clusters: listing all "
                      f"{clusters.n_clusters}", highlight=False)  # fmt: skip
        top = clusters.n_clusters
    _check_verify(verify, clusters.n_clusters)
    settings = {"preset": preset} if method == "ddm" else {}
    att = r.attributor(method, **settings)
    s = att.scores(x, y, objective)
    pred = r.task().outputs(x).argmax(-1).cpu().numpy()
    t = Table(title=f"{method}: top clusters for '{objective}' (score = change when removed)")
    for col in ("query", "label", "pred", "rank", "cluster", "class", "size", "score"):
        t.add_column(col, justify="left" if col == "query" else "right")
    tops = s.top(min(top, s.n_units)).indices
    sizes = clusters.sizes()
    for q in range(len(y)):  # one row per (query, rank): as narrow for --top 50 as for --top 1
        for rank, k in enumerate(tops[:, q]):
            head = (str(idx[q]), str(int(y[q])), str(int(pred[q]))) if rank == 0 else ("", "", "")
            about = (str(rank + 1), str(int(k)), str(int(clusters.cluster_class[k])), str(int(sizes[k])))
            t.add_row(*head, *about, f"{s.values[k, q]:+.3g}", end_section=rank == len(tops) - 1)
    console.print(t)
    tag = f"{method}-{objective}-q{len(y)}s{seed}"
    r.store.save_tensors(
        f"attribution/{tag}", {"scores": torch.as_tensor(s.values), "queries": torch.as_tensor(idx)}
    )
    fig = r.store.save_file(
        f"figures/{tag}.png", heatmap_png(s.values, clusters, y.numpy(), f"{method} / {objective}")
    )
    console.print(f"scores: {r.path}/attribution/{tag}.safetensors; heatmap: {fig}")
    console.print(f"online time {s.seconds:.2f}s for {len(y)} queries x {s.n_units} clusters")
    if verify:
        _print_verification([_verify(r, s, x, y, verify)], console)


def _load_queries_file(path: Path) -> tuple[Any, Any]:
    """Query inputs x and labels y from a .npz or .safetensors file."""
    import torch

    if not path.is_file():
        raise DistdmError(f"no such queries file {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            t = {k: torch.as_tensor(f[k]) for k in f.files}
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        t = load_file(str(path))
    else:
        raise DistdmError(f"--queries-file must be .npz or .safetensors holding x and y, got {path.name!r}")
    if "x" not in t or "y" not in t:
        raise DistdmError(
            f"{path} must hold arrays 'x' (query inputs) and 'y' (their labels), has {sorted(t)}"
        )
    return t["x"].float(), t["y"].long()


def _attribute_pack(
    pack: Path, model: Path | None, arch: str | None, queries_file: Path | None, objective: str, top: int
) -> None:
    """`distdm attribute --pack`: DDM scores from a synset pack and the target model alone."""
    import torch
    from safetensors.torch import save as safetensors_bytes

    from .pack import load_pack, model_from_pack
    from .store import atomic_write_bytes

    if model is None or queries_file is None:
        raise DistdmError("--pack needs --model WEIGHTS.safetensors and --queries-file FILE (x, y)")
    if top < 1:
        raise DistdmError(f"--top must be >= 1, got {top}")
    p = load_pack(pack)
    net = model_from_pack(p, model, arch)
    x, y = _load_queries_file(queries_file)
    s = p.attribute(net, x, y, objective)
    top = min(top, s.n_units)
    t = Table(title=f"pack {pack.name}: top clusters for '{objective}' (score = change when removed)")
    for col in ("query", "label", "rank", "cluster", "class", "size", "score"):
        t.add_column(col, justify="left" if col == "query" else "right")
    tops = s.top(top).indices
    for q in range(len(y)):
        for rank, k in enumerate(tops[:, q]):
            head = (str(q), str(int(y[q]))) if rank == 0 else ("", "")
            about = (str(rank + 1), str(int(k)), str(int(p.cluster_class[k])), str(int(p.cluster_size[k])))
            t.add_row(*head, *about, f"{s.values[k, q]:+.3g}", end_section=rank == len(tops) - 1)
    console.print(t)
    out = queries_file.with_suffix(".scores.safetensors")
    atomic_write_bytes(out, safetensors_bytes({"scores": torch.as_tensor(s.values)}))
    console.print(f"scores: {out}", soft_wrap=True, highlight=False)


@app.command()
@user_errors
def export(
    run: Path = RUN,
    out: Path = typer.Option(..., help="Directory to write the synset pack into (new or empty)."),
    preset: str = typer.Option("default", help="DDM preset whose synset is exported (distilled if needed)."),
    labels: Path = typer.Option(None, help="JSON file {cluster id: human label} stored in the pack."),
    device: str = DEVICE,
) -> None:
    """Write a synset pack: the synsets, cluster class/size/label, the target model's fingerprint and the
    preset and online settings, no training data; `distdm attribute --pack` answers from it."""
    import json

    from .pack import export_pack

    _check_preset(preset)
    names = None
    if labels is not None:
        try:
            raw = json.loads(labels.read_text())
            names = {int(k): str(v) for k, v in raw.items()}
        except (OSError, ValueError, AttributeError) as e:
            raise DistdmError(f"--labels must be a JSON file {{cluster id: label}}: {e}") from None
    r = _open(run, device=device)
    path = export_pack(r, out, preset, labels=names)
    console.print(f"pack: {path} ({r.clusters().n_clusters} clusters, preset {preset})", highlight=False)


def _check_verify(m: int, n_clusters: int | None = None) -> None:
    """Refuse a --verify M that cannot be checked (before any fitting)."""
    if m == 0:
        return
    from .verify import choose_clusters

    if m < 0:
        raise DistdmError(f"--verify must be 0 (no check) or a number of clusters >= 3, got {m}")
    choose_clusters(n_clusters if n_clusters is not None else m, m)


def _verify(r: Any, scores: Any, x: Any, y: Any, m: int, seeds: list[int] | None = None) -> Any:
    """`distdm.verify.verify` on the run's task (stored in the run under verify/)."""
    from .verify import verify

    return verify(r.task(), scores, x, y, m=m, seeds=seeds, progress=True)


def _print_verification(checks: list[Any], out: Console) -> None:
    """Each check's verdict, agreement, reproducibility and cost, then the verdict rules."""
    from .verify import VERDICT_RULES

    for v in checks:
        out.print(v.summary(), markup=False, highlight=False, soft_wrap=True)
    out.print(f"verdict rules: {VERDICT_RULES}", markup=False, highlight=False, soft_wrap=True)


def _check_queries(n: int) -> None:
    """Refuse a number of queries below 1 before any work."""
    if n < 1:
        raise DistdmError(f"--queries (the number of queries) must be an integer >= 1, got {n}")


def _queries(r: Any, n: int, seed: int = 0) -> tuple[Any, Any, np.ndarray]:
    """The run's n random test queries; says so when the test set holds fewer than n."""
    x, y, idx = r.queries(n, seed)
    if len(y) < n:
        console.print(f"note: --queries {n} is more than the {len(y)} test samples: using all {len(y)}",
                      highlight=False)  # fmt: skip
    return x, y, idx


def _check_methods(flag: str, specs: list[str]) -> None:
    """Refuse unknown method names (and presets of ddm:PRESET) before any work."""
    from .attribution import ATTRIBUTORS

    if not specs:
        raise DistdmError(f"{flag} must name at least one method, e.g. ddm,grad-dot")
    for spec in specs:
        name, _, preset = spec.partition(":")
        if name not in ATTRIBUTORS:
            known = ", ".join(sorted(ATTRIBUTORS))
            raise DistdmError(f"unknown method {name!r} in {flag}; available: {known}")
        if preset and name != "ddm":
            raise DistdmError(f"only ddm takes a preset (ddm:paper), got {spec!r} in {flag}")
        if name == "ddm":
            _check_preset(preset or "default")


def _method(run: Any, spec: str, **settings: Any) -> Any:
    """'ddm' / 'ddm:paper' (a DDM preset) or any registered method name, fitted on the run."""
    name, _, preset_name = spec.partition(":")
    if name == "ddm":
        return run.attributor("ddm", preset=preset_name or "default")
    if preset_name:
        raise DistdmError(f"only ddm takes a preset (ddm:paper), got {spec!r}")
    return run.attributor(name, **settings)


def _int_list(flag: str, text: str) -> list[int]:
    """Comma-separated integers of a flag, or a DistdmError naming the flag."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise DistdmError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise DistdmError(f"{flag} must list at least one integer, got {text!r}")
    return values


EXACT_METHODS = "ddm,ddm:paper,grad-dot,if-cg,random"
FURTHER_METHODS = "grad-dot,grad-cos,tracin,if-cg,if-lissa,if-arnoldi"


def _evaluate_further(
    r: Any,
    specs: list[str],
    queries: int,
    seeds: list[int],
    *,
    epochs: list[int],
    unit: str,
    optimizer: str,
    lr: float | None,
    left_out: int | None,
    objective: str,
) -> None:
    """`evaluate --gold further-training`: agreement of each method with the final-model-only gold
    standard against further-training epochs and seeds averaged; table, CSV and figures."""
    import tempfile

    from .attribution.further import agreement_to_markdown, further_agreement, left_out_units, write_agreement

    x, y, _ = _queries(r, queries)
    task = r.task()
    n = task.clusters.n_clusters if unit == "cluster" else task.data.n_train
    left = left_out_units(n, left_out if left_out is not None else (None if unit == "cluster" else 50))
    settings = {"unit": unit} if unit == "sample" else {}
    scores = {spec: _method(r, spec, **settings).scores(x, y, objective) for spec in specs}
    rows = further_agreement(
        task, scores, x, y, objective, epochs=epochs, seeds=seeds, optimizer=optimizer, lr=lr,
        unit=unit, left_out=None if len(left) == n else left, progress=True,
    )  # fmt: skip
    stem = f"further-agreement-{optimizer}-{unit}-{objective}"
    with tempfile.TemporaryDirectory() as tmp:
        written = write_agreement(rows, tmp, stem=stem)
        paths = [r.store.save_file(f"evaluation/{p.name}", p.read_bytes()) for p in written.values()]
    console.print(
        f"agreement with further training ({optimizer}) from the final model: {len(left)} left-out "
        f"{unit}s, {len(y)} queries, objective {objective}; mean over queries [95% interval]",
        highlight=False,
    )
    console.print(agreement_to_markdown(rows), markup=False, highlight=False, soft_wrap=True)
    console.print("written: " + ", ".join(str(p) for p in paths), soft_wrap=True)


def _check_further(
    specs: list[str], epochs: list[int], unit: str, optimizer: str, lr: float | None, left_out: int | None,
    objective: str,
) -> None:  # fmt: skip
    """Options of `evaluate --gold further-training`, checked before any work."""
    from .objectives import get_objective

    get_objective(objective)
    if unit not in ("cluster", "sample"):
        raise DistdmError(f"--unit must be cluster or sample, got {unit!r}")
    if optimizer not in ("sgd", "adam"):
        raise DistdmError(f"--optimizer must be sgd or adam, got {optimizer!r}")
    if min(epochs) < 0:
        raise DistdmError(f"--epochs must be integers >= 0, got {epochs}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise DistdmError(f"--lr must be a finite number > 0, got {lr}")
    if left_out is not None and left_out < 1:
        raise DistdmError(f"--left-out must be >= 1, got {left_out}")
    if unit == "sample" and any(s.partition(":")[0] == "ddm" for s in specs):
        raise DistdmError("ddm attributes clusters only: leave it out of --methods or use --unit cluster")


def _check_seeds(flag: str, seeds: list[int]) -> None:
    """Distinct seeds >= 0, or a DistdmError naming the flag."""
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise DistdmError(f"{flag} must be distinct seeds >= 0, got {seeds}")


def _check_lds_cache(r: Any, lds_subsets: int) -> None:
    """Refuse, before any fitting, an LDS subset count other than the one this run's LDS retrains used."""
    job = f"retrain/lds/seed{r.train_config.seed}"
    stored = r.store.config(job)
    if lds_subsets and stored is not None and stored.get("variants") != lds_subsets:
        n = stored.get("variants")
        raise DistdmError(
            f"run {r.path} retrained its LDS subsets with --lds-subsets {n}: pass --lds-subsets {n}, or "
            f"redo them with {lds_subsets}: distdm reset {r.path} {job}"
        )


OUTPUT_FORMATS = ("auto", "table", "markdown", "csv")


def _print_evaluation(rows: list[dict[str, Any]], output: str) -> None:
    """The evaluation table: a rich table on a terminal, plain markdown or CSV (never wrapped) else;
    then one line per column saying what it measures."""
    from .evaluate import legend, to_csv, to_markdown

    if output == "csv":
        sys.stdout.write(to_csv(rows))  # machine-readable: no legend mixed in
        return
    if output == "table" or (output == "auto" and console.is_terminal):
        for table in _evaluation_tables(rows, console.width):
            console.print(table)
    else:
        console.print(to_markdown(rows), markup=False, highlight=False, soft_wrap=True)
    console.print("\n".join(legend(rows)), markup=False, highlight=False, soft_wrap=not console.is_terminal)


def _evaluation_tables(rows: list[dict[str, Any]], width: int) -> list[Table]:
    """Evaluation rows as rich tables no wider than `width`: as many columns per table as fit, each
    table repeating the method column, every value on one line and its interval on the next."""
    from .evaluate import cell, columns

    cols = [c for c in columns(rows) if c != "method"]
    cells = {c: [cell(r, c, sep="\n") for r in rows] for c in cols}

    def need(name: str, values: list[str]) -> int:  # characters incl. padding and one border
        return max([len(name), *(len(line) for v in values for line in v.split("\n"))]) + 3

    first = need("method", [str(r["method"]) for r in rows]) + 1
    groups: list[list[str]] = [[]]
    used = first
    for c in cols:
        if groups[-1] and used + need(c, cells[c]) > width:
            groups.append([])
            used = first
        groups[-1].append(c)
        used += need(c, cells[c])
    tables = []
    for i, group in enumerate(groups):
        t = Table(
            title="(continued)" if i else "attribution quality against exact leave-cluster-out retraining"
        )
        t.add_column("method", no_wrap=True)
        for c in group:
            t.add_column(c, justify="right", no_wrap=True)
        for j, r in enumerate(rows):
            t.add_row(str(r["method"]), *[cells[c][j] for c in group])
        tables.append(t)
    return tables


@app.command()
@user_errors
def evaluate(
    ctx: typer.Context,
    run: Path = RUN,
    methods: str = typer.Option(
        None,
        help=f"Comma-separated methods (default {EXACT_METHODS}; with --gold further-training "
        f"{FURTHER_METHODS}).",
    ),
    queries: int = typer.Option(20, help="Number of random test queries."),
    seeds: str = typer.Option(
        "0,1,2",
        help="Seeds of the gold standard: exact retraining's (noise ceiling needs 2+) or further training's "
        "shuffle seeds.",
    ),
    lds_subsets: int = typer.Option(100, help="Random half-subsets of clusters retrained for LDS."),
    verify: int = VERIFY,
    gold: str = typer.Option(
        "exact", help="exact (leave-cluster-out retraining) or further-training (final-model-only)."
    ),
    epochs: str = typer.Option(
        "1,2,20", help="Further-training epochs to compare (--gold further-training)."
    ),
    unit: str = typer.Option("cluster", help="cluster or sample units (--gold further-training)."),
    optimizer: str = typer.Option("sgd", help="Further-training optimizer: sgd or adam."),
    lr: float = typer.Option(
        None, help="Further-training lr (default: the target's for sgd, 1e-3 for adam)."
    ),
    left_out: int = typer.Option(
        None, help="Left-out units of further training (default: all clusters, 50 random samples)."
    ),
    objective: str = typer.Option("margin", help="Objective of --gold further-training."),
    compare: str = typer.Option(
        None,
        help="Robustness instead: compare one method's class-wise and cluster-wise attribution matrices "
        "across model variants ARCH, INIT or ARCH:INIT (optionally @SEED), e.g. mlp,convnet,vit or "
        "kaiming,normal,xavier.",
    ),
    compare_method: str = typer.Option("grad-dot", help="Attribution method of --compare."),
    output: str = typer.Option(
        "auto", "--format", help="auto (a table on a terminal, markdown otherwise), table, markdown or csv."
    ),
    executor: str = EXECUTOR,
    address: str = ADDRESS,
    memory_budget: float = MEMORY_BUDGET,
    device: str = DEVICE,
) -> None:
    """Compare methods with exact leave-cluster-out retraining (Dist1-3, Spearman, LDS, timings), or
    with the final-model-only further-training gold standard (--gold further-training), or one
    method's attributions across architectures and initialisations (--compare)."""
    import tempfile

    from .evaluate import evaluate as run_evaluation

    # every option is checked before the run is opened and anything is fitted
    _check_queries(queries)
    if output not in OUTPUT_FORMATS:
        raise DistdmError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {output!r}")
    if compare is not None:
        _check_methods("--compare-method", [compare_method])
        return _evaluate_compare(_open(run, device=device), compare, compare_method, queries)
    if gold not in ("exact", "further-training"):
        raise DistdmError(f"--gold must be exact or further-training, got {gold!r}")
    seed_list = _int_list("--seeds", seeds)
    _check_seeds("--seeds", seed_list)
    if gold == "further-training":
        specs = [s.strip() for s in (methods or FURTHER_METHODS).split(",") if s.strip()]
        _check_methods("--methods", specs)
        epoch_list = _int_list("--epochs", epochs)
        _check_further(specs, epoch_list, unit, optimizer, lr, left_out, objective)
        return _evaluate_further(
            _open(run, device=device, **_execution(ctx, executor, address, memory_budget)), specs, queries,
            seed_list,
            epochs=epoch_list, unit=unit, optimizer=optimizer, lr=lr, left_out=left_out, objective=objective,
        )  # fmt: skip
    specs = [s.strip() for s in (methods or EXACT_METHODS).split(",") if s.strip()]
    _check_methods("--methods", specs)
    if lds_subsets < 0 or lds_subsets == 1:
        raise DistdmError(f"--lds-subsets must be 0 (no LDS) or >= 2, got {lds_subsets}")
    _check_verify(verify)
    r = _open(run, device=device, **_execution(ctx, executor, address, memory_budget))
    _check_lds_cache(r, lds_subsets)
    _check_verify(verify, r.clusters().n_clusters)
    x, y, _ = _queries(r, queries)
    fitted = {spec: _method(r, spec) for spec in specs}
    ev = run_evaluation(
        r.task(), fitted, (x, y), truth_seeds=seed_list, lds_subsets=lds_subsets, progress=True
    )
    with tempfile.TemporaryDirectory() as tmp:
        written = ev.save(tmp)
        paths = [r.store.save_file(f"evaluation/{p.name}", p.read_bytes()) for p in written.values()]
    _print_evaluation(ev.rows, output)
    if verify:
        from .scores import Scores

        # the truth's leave-one-out retrains of the first two seeds are in the run: the check reuses them
        vseeds = seed_list[:2] if len(seed_list) >= 2 else None
        checks = [
            _verify(r, Scores(by_obj["margin"], "cluster", "margin", name), x, y, verify, vseeds)
            for name, by_obj in ev.scores.items()
        ]
        _print_verification(checks, err_console if output == "csv" else console)
    written_to = "written: " + ", ".join(str(p) for p in paths)
    if output == "csv":
        err_console.print(written_to, soft_wrap=True, highlight=False)
    else:
        console.print(written_to, soft_wrap=True, highlight=False)


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
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/demo"), help="Run directory for the demo."),
    queries: int = typer.Option(20, help="Number of test queries."),
    executor: str = EXECUTOR,
    address: str = ADDRESS,
    memory_budget: float = MEMORY_BUDGET,
    device: str = DEVICE,
) -> None:
    """Every stage on the embedded digits data with defaults, checked against exact retraining."""
    from . import metrics
    from .config import ClusterConfig
    from .figures import bar_png, heatmaps_png, synset_grid_png
    from .run import Run

    _check_queries(queries)
    t0 = time.perf_counter()
    execution = _execution(ctx, executor, address, memory_budget)
    r = Run(out, "digits", "mlp", progress=True, device=device, **execution)
    timings: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        console.print(f"[bold]{name}[/] ...")
        res = fn()
        timings[name] = time.perf_counter() - t
        return res

    stage("train", r.train)
    console.print(f"  target test accuracy {r.store.stage_info('train')['accuracy']:.3f}", highlight=False)
    clusters = stage("cluster", lambda: r.cluster(ClusterConfig(per_class=10)))
    syn = stage("distill", lambda: r.distill("default"))
    _print_synset(syn)
    x, y, _ = _queries(r, queries)
    ddm = r.attributor("ddm")
    s = stage("attribute (DDM)", lambda: ddm.scores(x, y, "margin"))
    exact = stage("exact leave-cluster-out retraining", lambda: r.attributor("exact").scores(x, y, "margin"))
    # the same per-query rules as `distdm evaluate`: a constant side counts 0, < 3 clusters is left out
    rho = metrics.spearman(s, exact)
    within = metrics.spearman_within_class(s, exact, clusters.cluster_class, y)
    figs = {
        "heatmaps": r.store.save_file(
            "figures/demo-heatmaps.png",
            heatmaps_png(
                [(s.values, "DDM (default preset)"), (exact.values, "exact leave-cluster-out retraining")],
                clusters,
                y.numpy(),
                title="margin scores on one colour scale",
            ),
        ),  # fmt: skip
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
    t.caption = f"Spearman: mean over the {len(y)} queries [95% interval], as `distdm evaluate` reports it"
    t.add_row("Spearman, all clusters", str(rho) if rho.n else "-")
    t.add_row("Spearman, within the query's class", str(within) if within.n else "- (< 3 clusters per class)")
    t.add_row("DDM online time", f"{s.seconds:.2f}s")
    t.add_row("exact retraining time", f"{timings['exact leave-cluster-out retraining']:.1f}s")
    console.print(t)
    for k, v in timings.items():
        console.print(f"  {k:40s} {v:6.1f}s")
    console.print(f"total {time.perf_counter() - t0:.1f}s; run directory {r.path}")
    for k, p in figs.items():
        console.print(f"  figure {k}: {p}")


def _float_list(flag: str, text: str) -> list[float]:
    """Comma-separated numbers of a flag, or a DistdmError naming the flag."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise DistdmError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise DistdmError(f"{flag} must list at least one number, got {text!r}")
    return values


def _ranking_methods(text: str) -> list[str]:
    """Method specs of --methods, checked against the registry before any expensive work."""
    from .attribution import ATTRIBUTORS

    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise DistdmError("--methods must name at least one method, e.g. ddm,if-cg")
    for spec in specs:
        name = spec.partition(":")[0]
        if name == "random":
            raise DistdmError("random removal is always the baseline: leave 'random' out of --methods")
        if name not in ATTRIBUTORS:
            raise DistdmError(f"unknown method {name!r} in --methods; available: {sorted(ATTRIBUTORS)}")
    return specs


def _check_share(flag: str, share: float) -> None:
    """A share strictly between 0 and 1, or a DistdmError naming the flag."""
    if not 0 < share < 1:
        raise DistdmError(f"{flag} must lie in (0, 1) (e.g. 0.5 for half), got {share}")


def _seed_list(flag: str, text: str) -> list[int | None]:
    """'' -> [None] (the target's own seed); else comma-separated integers."""
    return [None] if not text.strip() else list(_int_list(flag, text))


def _save_outputs(r: Any, prefix: str, files: dict[str, Any]) -> None:
    from .applications.diagnose import save_outputs

    paths = save_outputs(r.store, prefix, files)
    console.print("written: " + ", ".join(paths.values()), soft_wrap=True, highlight=False)


@app.command()
@user_errors
def diagnose(
    run: Path = RUN,
    methods: str = typer.Option(
        "ddm,if-cg", help="Comma-separated ranking methods (random is the baseline)."
    ),
    fractions: str = typer.Option(
        None, help="Shares of training data to remove (default 0.01,0.1,0.2,0.5; with corruption 0.1-0.4)."
    ),
    random_seeds: int = typer.Option(5, help="Random-removal draws."),
    retrain_seeds: str = typer.Option("", help="Retrain seeds (default: the target's init and order)."),
    inject_noise: float = typer.Option(
        None, help="Add Gaussian noise (norm --noise-norm) to this share of training images first."
    ),
    flip_labels: float = typer.Option(None, help="Flip the labels of this share of training samples first."),
    noise_norm: float = typer.Option(0.1, help="L2 norm of the noise added per image."),
    noise_seed: int = typer.Option(0, help="Seed choosing the corrupted samples."),
    validation_fraction: float = typer.Option(0.5, help="Share of the test set held out as validation."),
    balanced: bool = typer.Option(False, help="Remove the same share from every class."),
    device: str = DEVICE,
) -> None:
    """Rank clusters by validation loss, remove the most harmful data, retrain, compare with random
    removal (DDM Table 3); with --inject-noise / --flip-labels also detect the corrupted data (Table 6)."""
    import json

    from .applications.diagnose import DEFAULT_FRACTIONS, check_fractions, diagnose, diagnosis_files
    from .applications.noise import NOISE_FRACTIONS, corrupt, noisy_diagnosis

    specs = _ranking_methods(methods)
    if inject_noise is not None and flip_labels is not None:
        raise DistdmError("use either --inject-noise or --flip-labels, not both")
    corrupting = inject_noise is not None or flip_labels is not None
    for flag, share in (("--inject-noise", inject_noise), ("--flip-labels", flip_labels)):
        if share is not None and not 0 < share < 1:
            raise DistdmError(f"{flag} must lie in (0, 1) (e.g. 0.2 for 20%), got {share}")
    default = NOISE_FRACTIONS if corrupting else DEFAULT_FRACTIONS
    fr = check_fractions(_float_list("--fractions", fractions) if fractions else default)
    if random_seeds < 1:
        raise DistdmError(f"--random-seeds must be >= 1, got {random_seeds}")
    _check_share("--validation-fraction", validation_fraction)
    if not (math.isfinite(noise_norm) and noise_norm > 0):
        raise DistdmError(f"--noise-norm must be a finite number > 0, got {noise_norm}")
    if noise_seed < 0:
        raise DistdmError(f"--noise-seed must be >= 0, got {noise_seed}")
    seeds = _seed_list("--retrain-seeds", retrain_seeds)
    r = _open(run, device=device)
    settings = dict(fractions=fr, random_seeds=list(range(random_seeds)), retrain_seeds=seeds,
                    validation_fraction=validation_fraction, balanced=balanced, progress=True)  # fmt: skip
    if not corrupting:
        fitted = {spec: _method(r, spec) for spec in specs}
        console.print(f"ranking {r.task().clusters.n_clusters} clusters by validation loss ...")
        d = diagnose(r.task(), fitted, **settings)
        console.print(d.to_markdown(), markup=False, highlight=False, soft_wrap=True)
        for spec in d.scores:
            top = [f"{c['cluster']} (class {c['class']}, n={c['size']}, {c['score']:+.3g})"
                   for c in d.ranking(spec, 10)]  # fmt: skip
            console.print(
                f"most harmful clusters by {spec}: " + ", ".join(top), highlight=False, soft_wrap=True
            )
        _save_outputs(r, "applications/diagnose", diagnosis_files(d, r.data.x_train))
        return
    kind, share = ("noise", inject_noise) if inject_noise is not None else ("labels", flip_labels)
    c = corrupt(r.data, kind, share, seed=noise_seed, norm=noise_norm)  # type: ignore[arg-type]
    console.print(f"corrupted {len(c.indices)} of {c.data.n_train} training samples ({c.tag}); training "
                  f"and clustering the corrupted copy ...")  # fmt: skip
    sub = r.corrupted(c)
    from .applications.diagnose import validation_split
    from .objectives import accuracy

    split = validation_split(r.data, validation_fraction)
    xt, yt = split.xy(r.data, "test")
    clean = float(accuracy(r.task().outputs(xt), yt))
    settings.pop("validation_fraction")
    fitted = {spec: _method(sub, spec) for spec in specs}
    rep = noisy_diagnosis(sub.task(), c, fitted, clean_accuracy=clean, split=split, **settings)
    console.print(rep.to_markdown(), markup=False, highlight=False, soft_wrap=True)
    files = diagnosis_files(rep.diagnosis, c.data.x_train, stem="diagnose")
    files["detection.csv"] = rep.to_csv()
    files["corruption.json"] = json.dumps(rep.to_json(), indent=2)
    files["report.md"] = rep.to_markdown()
    _save_outputs(r, f"applications/diagnose-{c.tag}", files)


@app.command()
@user_errors
def transfer(
    run: Path = RUN,
    methods: str = typer.Option("ddm", help="Comma-separated ranking methods (random is the baseline)."),
    fractions: str = typer.Option("0.1,0.2,0.5", help="Shares of training data to delete."),
    alpha: float = typer.Option(0.5, help="Weight a of the KL term: (1 - a) CE + a KL(teacher || student)."),
    temperature: float = typer.Option(1.0, help="Distillation temperature."),
    random_seeds: int = typer.Option(3, help="Random-deletion draws."),
    student_seeds: str = typer.Option("", help="Student seeds (default: the target's init and order)."),
    validation_fraction: float = typer.Option(0.5, help="Share of the test set the KL is ranked on."),
    balanced: bool = typer.Option(False, help="Delete the same share from every class."),
    device: str = DEVICE,
) -> None:
    """Delete the data the teacher (the target model) rests on least by the KL objective, train a
    student with (1 - a) CE + a KL on the rest, compare with random deletion (DDM Table 7)."""
    from .applications.diagnose import check_fractions
    from .applications.transfer import kd_loss
    from .applications.transfer import transfer as run_transfer

    specs = _ranking_methods(methods)
    fr = check_fractions(_float_list("--fractions", fractions))
    kd_loss(alpha, temperature)
    if random_seeds < 1:
        raise DistdmError(f"--random-seeds must be >= 1, got {random_seeds}")
    _check_share("--validation-fraction", validation_fraction)
    seeds = _seed_list("--student-seeds", student_seeds)
    r = _open(run, device=device)
    fitted = {spec: _method(r, spec) for spec in specs}
    res = run_transfer(
        r.task(), fitted, fractions=fr, alpha=alpha, temperature=temperature,
        random_seeds=list(range(random_seeds)), student_seeds=seeds,
        validation_fraction=validation_fraction, balanced=balanced, progress=True,
    )  # fmt: skip
    console.print(res.to_markdown(), markup=False, highlight=False, soft_wrap=True)
    _save_outputs(r, "applications/transfer", res.files())


def _synset_names(flag: str, text: str) -> list[str]:
    """Synset variant names of a flag (paper, paper-match, default), checked before any work."""
    from .applications.unlearn import SYNSET_VARIANTS

    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in SYNSET_VARIANTS]
    if not names or bad:
        raise DistdmError(f"{flag} takes synsets from {list(SYNSET_VARIANTS)}, got {text!r}")
    if len(set(names)) != len(names):
        raise DistdmError(f"{flag} names a synset twice: {text!r}")
    return names


@app.command()
@user_errors
def unlearn(
    run: Path = RUN,
    clusters: str = typer.Option(None, help="Comma-separated cluster ids to remove, e.g. 3,17."),
    all_synset: bool = typer.Option(
        False, "--all", help="Table 4: fine-tune on the whole synset of each of --presets instead."
    ),
    out: Path = typer.Option(None, help="Write the unlearned model here (.safetensors; with --clusters)."),
    preset: str = typer.Option("default", help="Synset to unlearn with: default, paper or paper-match."),
    presets: str = typer.Option("paper,paper-match,default", help="Synsets compared by --all."),
    lr_scales: str = typer.Option("0.01,0.1,1", help="With --all: multiples of each synset's online lr."),
    retrain: bool = typer.Option(
        True, "--retrain/--no-retrain", help="Also retrain exactly without the clusters."
    ),
    device: str = DEVICE,
) -> None:
    """Remove clusters' effect by fine-tuning on their synsets; compare with the original model and
    exact retraining without them (accuracy and margin on removed / kept / test samples). --all:
    accuracy after fine-tuning on the whole synset, reverse vs standard matching (DDM Table 4)."""
    from .applications.unlearn import (
        forgetting_table,
        parse_clusters,
        rows_to_markdown,
        save_state,
        synset_variant,
        unlearn_report,
    )

    if all_synset == (clusters is not None):
        raise DistdmError("give either --clusters (e.g. --clusters 3,17) or --all")
    if out is not None and (all_synset or out.suffix != ".safetensors"):
        raise DistdmError(f"--out must be a .safetensors file and goes with --clusters, got {str(out)!r}")
    if all_synset:
        names = _synset_names("--presets", presets)
        scales = _float_list("--lr-scales", lr_scales)
        if not all(math.isfinite(s) and s > 0 for s in scales):
            raise DistdmError(f"--lr-scales must be numbers > 0, got {lr_scales!r}")
        r = _open(run, device=device)
        task = r.task()
        syns = {n: synset_variant(task, n, progress=True) for n in names}
        rows = forgetting_table(task, syns, lr_scales=scales)
        table = rows_to_markdown(rows)
        console.print("test accuracy after fine-tuning theta_tau on the whole synset (DDM Table 4; "
                      "'forgotten' 1 = back to theta_0's accuracy):", highlight=False)  # fmt: skip
        console.print(table, markup=False, highlight=False, soft_wrap=True)
        path = r.store.save_file("applications/unlearn/forgetting.md", (table + "\n").encode())
        console.print(f"written: {path}", soft_wrap=True, highlight=False)
        return
    name = _synset_names("--preset", preset)[0]
    r = _open(run, device=device)
    ids = parse_clusters(clusters, r.clusters().n_clusters)
    task = r.task()
    rep = unlearn_report(task, synset_variant(task, name, progress=True), ids, retrain=retrain)
    sizes = task.clusters.sizes()
    console.print(
        "removed clusters: " + ", ".join(f"{k} (class {task.clusters.cluster_class[k]}, n={sizes[k]})"
                                         for k in ids) + f"; synset '{name}'",
        highlight=False, soft_wrap=True,
    )  # fmt: skip
    table = rep.to_markdown()
    console.print(table, markup=False, highlight=False, soft_wrap=True)
    tag = "-".join(str(k) for k in ids)
    written = [r.store.save_file(f"applications/unlearn/clusters-{tag}-{name}.md", (table + "\n").encode())]
    if out is not None:
        meta = {"removed_clusters": ids, "synset": name, "run": str(r.path), "model": r.model_name}
        written.append(save_state(out, rep.state, meta))
    console.print("written: " + ", ".join(str(p) for p in written), soft_wrap=True, highlight=False)


@app.command()
@user_errors
def privacy(
    run: Path = RUN,
    presets: str = typer.Option("paper,paper-match,default", help="Synsets to measure and draw."),
    rows: int = typer.Option(10, help="Clusters drawn in the figure (one per class first)."),
    device: str = DEVICE,
) -> None:
    """How close synthetic samples are to real training images (cosine, L2 in standardised input space)
    and a nearest-synthetic-distance membership-inference AUC; figure of synsets beside their nearest
    real images."""
    import json

    from .applications.privacy import privacy_figure_png, privacy_table
    from .applications.unlearn import rows_to_markdown, synset_variant

    names = _synset_names("--presets", presets)
    if rows < 1:
        raise DistdmError(f"--rows must be >= 1, got {rows}")
    r = _open(run, device=device)
    task = r.task()
    syns = {n: synset_variant(task, n, progress=True) for n in names}
    table = privacy_table(syns, r.data)
    console.print(
        "per synset: nearest real training image of each synthetic sample (standardised inputs); "
        "membership-inference AUC of the nearest-synthetic-distance attack (members: training images, "
        "non-members: test images; 0.5 = nothing revealed)",
        highlight=False, soft_wrap=True,
    )  # fmt: skip
    console.print(rows_to_markdown(table), markup=False, highlight=False, soft_wrap=True)
    written = [r.store.save_file("applications/privacy/metrics.json", json.dumps(table, indent=2).encode())]
    png = privacy_figure_png(syns, r.data, task.clusters.cluster_class, n_rows=rows)
    if png is not None:
        written.append(r.store.save_file("applications/privacy/nearest-real.png", png))
    console.print("written: " + ", ".join(str(p) for p in written), soft_wrap=True, highlight=False)


def _evaluate_compare(r: Any, spec: str, method: str, queries: int) -> None:
    """`evaluate --compare`: class-wise and cluster-wise attribution matrices of one method under
    several architectures / initialisations, their pairwise agreement and a side-by-side heatmap."""
    import json

    import torch

    from .applications.compare import compare_heatmaps_png, compare_study, parse_variants
    from .attribution import ATTRIBUTORS

    variants = parse_variants(spec, r.model_name)
    if method not in ATTRIBUTORS:
        raise DistdmError(f"unknown --compare-method {method!r}; available: {sorted(ATTRIBUTORS)}")
    x, y, _ = _queries(r, queries)
    clusters = r.clusters()
    kwargs = {r.model_name: r.store.config("model").get("kwargs", {})}
    comp = compare_study(
        r.data, variants, r.schedule, clusters, (x, y), method=method, seed=r.train_config.seed,
        model_kwargs=kwargs, store=r.store, progress=True,
    )  # fmt: skip
    console.print(
        f"{method} attribution matrices (margin) under {len(variants)} variants, {len(y)} queries, "
        f"{clusters.n_clusters} clusters / {len(comp.matrices[variants[0].name]['class'])} classes:",
        highlight=False,
    )
    console.print(comp.to_markdown(), markup=False, highlight=False, soft_wrap=True)
    tag = f"compare-{method}-" + "-".join(v.name.replace(":", "_").replace("@", "s") for v in variants)
    mats = {f"{v}/{lvl}": torch.as_tensor(m) for v, d in comp.matrices.items() for lvl, m in d.items()}
    r.store.save_tensors(f"evaluation/{tag}", mats)
    written = [
        r.store.save_file(f"evaluation/{tag}.json", json.dumps({"accuracy": comp.accuracy,
                                                                "rows": comp.rows}, indent=2).encode()),
        r.store.save_file(f"figures/{tag}.png", compare_heatmaps_png(comp, clusters, y.numpy())),
    ]  # fmt: skip
    console.print("written: " + ", ".join(str(p) for p in written), soft_wrap=True, highlight=False)


def run_cli() -> None:
    """Entry point for `python -m distdm`."""
    app(prog_name="distdm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_cli())
