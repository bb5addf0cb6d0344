"""The `distdm` command: train, cluster, distill, attribute, evaluate, report, demo.

It parses options (typed; lists through one comma-separated option type), calls the pipeline
(`distdm.run.Run` methods, `distdm.pack.Pack`) and prints; a DistdmError, raised while parsing or
while running, is printed as one line with exit status 2."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from .errors import DistdmError
from .run import EXACT_METHODS, FURTHER_METHODS

console = Console()
err_console = Console(stderr=True)


class _BadOption(Exception):
    """A DistdmError raised by an option's parser (typer would turn a ValueError into its own panel)."""


class _Commands(TyperGroup):
    """The command group: a DistdmError from an option's parser or a command is one line, status 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (DistdmError, _BadOption) as e:
            err_console.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, help=__doc__)


class Listed(list):  # type: ignore[type-arg]
    """The values of a comma-separated option, parsed and checked by `list_option`."""


def list_option(
    default: str | None,
    flag: str,
    item: Callable[[str], Any] = int,
    *,
    help: str,
    check: Callable[[str, list[Any]], Any] | None = None,
    empty: bool = False,
    aliases: Sequence[str] = (),
) -> Any:
    """A typer option taking comma-separated values of one type (int, float or str), parsed before any
    work: a value that does not parse, an empty list (unless `empty`) or one `check(flag, values)`
    refuses is a DistdmError naming the flag. Annotate the parameter as `Listed`."""
    noun = {int: "integers", float: "numbers"}.get(item, "names")  # type: ignore[call-overload]

    def values(text: str) -> Listed:
        try:
            out = Listed(item(t.strip()) for t in text.split(",") if t.strip())
        except ValueError:
            raise DistdmError(f"{flag} must be comma-separated {noun}, got {text!r}") from None
        if not out and not empty:
            raise DistdmError(f"{flag} must list at least one {noun[:-1]}, got {text!r}")
        if check is not None and out:
            check(flag, out)
        return out

    def parse(text: Any) -> Listed:
        if isinstance(text, list):
            return Listed(text)
        try:
            return values(str(text))
        except DistdmError as e:
            raise _BadOption(str(e)) from None

    return typer.Option(default, flag, *aliases, parser=parse, metavar="A,B,...", help=help)


def _distinct_seeds(flag: str, seeds: list[int]) -> None:
    """Distinct seeds >= 0."""
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise DistdmError(f"{flag} must be distinct seeds >= 0, got {seeds}")


def _non_negative(flag: str, values: list[int]) -> None:
    if min(values) < 0:
        raise DistdmError(f"{flag} must be integers >= 0, got {values}")


def _positive(flag: str, values: list[float]) -> None:
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise DistdmError(f"{flag} must be numbers > 0, got {','.join(map(str, values))!r}")


def _fractions(flag: str, values: list[float]) -> None:
    from .applications.diagnose import check_fractions

    check_fractions(values)


def _method_specs(ranking: bool = False) -> Callable[[str, list[str]], None]:
    """Checks method specs (a registered name, or ddm:PRESET) against the registry; ranking: refuse
    'random', which diagnose and transfer always run as the baseline."""

    def check(flag: str, specs: list[str]) -> None:
        from .attribution import ATTRIBUTORS

        for spec in specs:
            name, _, preset = spec.partition(":")
            if ranking and name == "random":
                raise DistdmError(f"random removal is always the baseline: leave 'random' out of {flag}")
            if name not in ATTRIBUTORS:
                known = ", ".join(sorted(ATTRIBUTORS))
                raise DistdmError(f"unknown method {name!r} in {flag}; available: {known}")
            if preset and name != "ddm":
                raise DistdmError(f"only ddm takes a preset (ddm:paper), got {spec!r} in {flag}")
            if name == "ddm":
                _check_preset(preset or "default")

    return check


def _synsets(flag: str, names: list[str]) -> None:
    """Synset variant names (paper, paper-match, default), each once."""
    from .applications.unlearn import SYNSET_VARIANTS

    bad = [n for n in names if n not in SYNSET_VARIANTS]
    if bad:
        raise DistdmError(f"{flag} takes synsets from {list(SYNSET_VARIANTS)}, got {','.join(names)!r}")
    if len(set(names)) != len(names):
        raise DistdmError(f"{flag} names a synset twice: {','.join(names)!r}")


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


def _print_lines(text: str, out: Console | None = None) -> None:
    """Text printed as it is: no markup, no highlighting, never wrapped."""
    (out or console).print(text, markup=False, highlight=False, soft_wrap=True)


def _written(paths: Sequence[Any], out: Console | None = None) -> None:
    (out or console).print("written: " + ", ".join(str(p) for p in paths), soft_wrap=True, highlight=False)


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
PACK = typer.Option(None, help="Answer from a synset pack (`distdm export`) instead of a run.")
PACK_MODEL = typer.Option(None, help="With --pack: the trained target's weights (.safetensors).")
PACK_ARCH = typer.Option(None, help="With --pack: your model's constructor, package.module:callable.")


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
def distill(
    ctx: typer.Context,
    run: Path = RUN,
    preset: str = typer.Option(
        "default",
        help="default (closed-form labels: measured best for its cost), thorough (default with 50 "
        "input steps: a closer fit at 1.2-1.7x the offline time), private (started from no member: "
        "for shared packs), fast, influence-adam (the previous default, 8x the offline cost), paper "
        "(the paper, literally).",
    ),
    executor: str = EXECUTOR,
    address: str = ADDRESS,
    memory_budget: float = MEMORY_BUDGET,
    device: str = DEVICE,
) -> None:
    """Distil one synthetic set per cluster; prints matching diagnostics and saves a synset grid.
    --executor and --memory-budget apply to the fine-tunes on synsets (the forgetting check)."""
    _check_preset(preset)
    r = _open(run, device=device, **_execution(ctx, executor, address, memory_budget))
    syn = r.distill(preset)
    _print_synset(syn)
    for what, path in r.save_synset_figures(syn, preset).items():
        console.print(f"{what}: {path}")


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
    pack: Path = PACK,
    model: Path = PACK_MODEL,
    arch: str = PACK_ARCH,
    queries_file: Path = typer.Option(
        None, help="With --pack: .npz/.safetensors of query inputs x and labels y (scores go beside it)."
    ),
) -> None:
    """Attribute test predictions to training clusters; prints the top clusters and saves a heatmap.
    --executor and --memory-budget apply to the methods that train models (exact, further-training, ddm).
    With --pack PACK --model WEIGHTS --queries-file Q: from the pack and the model alone (no run, no data)."""
    from .objectives import get_objective

    get_objective(objective)  # fail before any expensive fitting
    if top < 1:
        raise DistdmError(f"--top must be >= 1, got {top}")
    if _pack_mode(run, pack, model, arch, queries_file, verify=verify):
        _attribute_pack(pack, model, arch, queries_file, objective, top)
        return
    _method_specs()("--method", [method])
    if method == "ddm":
        _check_preset(preset)
    _check_queries(queries)
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
    s = r.attributor(method, **({"preset": preset} if method == "ddm" else {})).scores(x, y, objective)
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
    saved = r.save_scores(s, idx, method=method, seed=seed)
    console.print(f"scores: {saved['scores']}; heatmap: {saved['heatmap']}")
    console.print(f"online time {s.seconds:.2f}s for {len(y)} queries x {s.n_units} clusters")
    if verify:
        _print_verification([r.verify(s, x, y, m=verify)], console)


def _pack_mode(
    run: Path | None, pack: Path | None, model: Path | None, arch: str | None, data_file: Path | None,
    *, verify: int = 0, data_flag: str = "--queries-file",
) -> bool:  # fmt: skip
    """Whether a command answers from a synset pack (--pack) rather than a run; refuses a mix of both,
    and --pack without its --model WEIGHTS and data file."""
    if pack is None and run is not None:
        if model is not None or arch is not None or data_file is not None:
            raise DistdmError(f"--model, --arch{' and ' + data_flag if data_flag else ''} go with --pack")
        return False
    if run is not None:
        raise DistdmError("give either a run directory or --pack, not both")
    if pack is None:
        raise DistdmError(f"give a run directory, or --pack PACK --model WEIGHTS {data_flag} FILE")
    if verify:
        raise DistdmError("--verify retrains the model and needs a run directory, not --pack")
    if model is None or (data_flag and data_file is None):
        need = f" and {data_flag} FILE (x, y)" if data_flag else ""
        raise DistdmError(f"--pack needs --model WEIGHTS.safetensors{need}")
    return True


def _load_queries_file(path: Path, flag: str = "--queries-file") -> tuple[Any, Any]:
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
        raise DistdmError(f"{flag} must be .npz or .safetensors holding x and y, got {path.name!r}")
    if "x" not in t or "y" not in t:
        raise DistdmError(
            f"{path} must hold arrays 'x' (query inputs) and 'y' (their labels), has {sorted(t)}"
        )
    return t["x"].float(), t["y"].long()


def _open_pack(pack: Path, model: Path, arch: str | None) -> tuple[Any, Any]:
    """The verified pack and the target model built from its architecture and the weights file,
    refused here (before any work) when its fingerprint is not the pack's."""
    from .pack import load_pack, model_from_pack

    p = load_pack(pack)
    net = model_from_pack(p, model, arch)
    p.check_model(net)
    return p, net


def _save_beside(path: Path, suffix: str, tensors: dict[str, Any]) -> Path:
    """Tensors written atomically as a .safetensors file beside `path` (its name with `suffix`)."""
    import torch
    from safetensors.torch import save as safetensors_bytes

    from .store import atomic_write_bytes

    out = path.with_suffix(suffix)
    atomic_write_bytes(
        out, safetensors_bytes({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()})
    )
    return out


def _attribute_pack(
    pack: Path, model: Path, arch: str | None, queries_file: Path, objective: str, top: int
) -> None:
    """`distdm attribute --pack`: DDM scores from a synset pack and the target model alone."""
    p, net = _open_pack(pack, model, arch)
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
    out = _save_beside(queries_file, ".scores.safetensors", {"scores": s.values})
    console.print(f"scores: {out}", soft_wrap=True, highlight=False)


def _cluster_about(p: Any, k: int) -> str:
    label = p.cluster_labels[k]
    return f"{k} (class {p.cluster_class[k]}, n={p.cluster_size[k]}" + (f", {label!r})" if label else ")")


def _diagnose_pack(pack: Path, model: Path, arch: str | None, validation_file: Path, top: int) -> None:
    """`distdm diagnose --pack`: each cluster's estimated effect on the validation loss (the global
    objective) from a synset pack and the target model alone; the most harmful first."""
    p, net = _open_pack(pack, model, arch)
    x, y = _load_queries_file(validation_file, "--validation-file")
    g = p.diagnose(net, x, y)
    order = np.argsort(g, kind="stable")[: min(top, len(g))]
    t = Table(title=f"pack {pack.name}: clusters by their effect on the validation loss ({len(y)} samples)")
    for col in ("rank", "cluster", "class", "size", "label", "loss change when removed"):
        t.add_column(col, justify="left" if col == "label" else "right")
    for rank, k in enumerate(order):
        label = p.cluster_labels[k] or ""
        about = (str(int(k)), str(int(p.cluster_class[k])), str(int(p.cluster_size[k])), label)
        t.add_row(str(rank + 1), *about, f"{g[k]:+.3g}")
    console.print(t)
    harmful = [_cluster_about(p, int(k)) for k in order if g[k] < 0]
    console.print("most harmful clusters (removing them lowers the validation loss): "
                  + (", ".join(harmful) if harmful else "none"), highlight=False, soft_wrap=True)  # fmt: skip
    out = _save_beside(validation_file, ".diagnose.safetensors", {"scores": g})
    console.print(f"scores: {out}", soft_wrap=True, highlight=False)


def _unlearn_pack(pack: Path, model: Path, arch: str | None, clusters: list[int], out: Path | None) -> None:
    """`distdm unlearn --pack`: the target model with clusters' effect removed by fine-tuning on their
    synsets from the pack, written as .safetensors (default beside --model)."""
    from .applications.unlearn import save_state

    p, net = _open_pack(pack, model, arch)
    state = p.unlearn(net, clusters)
    tag = "-".join(str(k) for k in clusters)
    dest = out if out is not None else model.with_name(f"{model.stem}-unlearned-{tag}.safetensors")
    meta = {"removed_clusters": list(clusters), "pack": str(pack), "preset": p.manifest["preset"],
            "target_fingerprint": p.manifest["model"]["fingerprint"]}  # fmt: skip
    written = save_state(dest, state, meta)
    console.print("removed clusters: " + ", ".join(_cluster_about(p, k) for k in clusters)
                  + f"; pack {pack.name}", highlight=False, soft_wrap=True)  # fmt: skip
    _written([written])


@app.command()
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

    _check_preset(preset)
    names = None
    if labels is not None:
        try:
            raw = json.loads(labels.read_text())
            names = {int(k): str(v) for k, v in raw.items()}
        except (OSError, ValueError, AttributeError) as e:
            raise DistdmError(f"--labels must be a JSON file {{cluster id: label}}: {e}") from None
    r = _open(run, device=device)
    path = r.export_pack(out, preset, labels=names)
    console.print(f"pack: {path} ({r.clusters().n_clusters} clusters, preset {preset})", highlight=False)


def _check_verify(m: int, n_clusters: int | None = None) -> None:
    """Refuse a --verify M that cannot be checked (before any fitting)."""
    if m == 0:
        return
    from .verify import choose_clusters

    if m < 0:
        raise DistdmError(f"--verify must be 0 (no check) or a number of clusters >= 3, got {m}")
    choose_clusters(n_clusters if n_clusters is not None else m, m)


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


def _check_further(
    specs: list[str], unit: str, optimizer: str, lr: float | None, left_out: int | None, objective: str
) -> None:
    """Options of `evaluate --gold further-training`, checked before any work."""
    from .objectives import get_objective

    get_objective(objective)
    if unit not in ("cluster", "sample"):
        raise DistdmError(f"--unit must be cluster or sample, got {unit!r}")
    if optimizer not in ("sgd", "adam"):
        raise DistdmError(f"--optimizer must be sgd or adam, got {optimizer!r}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise DistdmError(f"--lr must be a finite number > 0, got {lr}")
    if left_out is not None and left_out < 1:
        raise DistdmError(f"--left-out must be >= 1, got {left_out}")
    if unit == "sample" and any(s.partition(":")[0] == "ddm" for s in specs):
        raise DistdmError("ddm attributes clusters only: leave it out of --methods or use --unit cluster")


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
def evaluate(
    ctx: typer.Context,
    run: Path = RUN,
    methods: Listed | None = list_option(
        None, "--methods", str, check=_method_specs(),
        help=f"Comma-separated methods (default {','.join(EXACT_METHODS)}; with --gold further-training "
        f"{','.join(FURTHER_METHODS)}).",
    ),
    queries: int = typer.Option(20, help="Number of random test queries."),
    seeds: Listed = list_option(
        "0,1,2", "--seeds", int, check=_distinct_seeds,
        help="Seeds of the gold standard: exact retraining's (noise ceiling needs 2+) or further training's "
        "shuffle seeds.",
    ),
    lds_subsets: int = typer.Option(100, help="Random half-subsets of clusters retrained for LDS."),
    verify: int = VERIFY,
    gold: str = typer.Option(
        "exact", help="exact (leave-cluster-out retraining) or further-training (final-model-only)."
    ),
    epochs: Listed = list_option(
        "1,2,20", "--epochs", int, check=_non_negative,
        help="Further-training epochs to compare (--gold further-training).",
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
) -> None:  # fmt: skip
    """Compare methods with exact leave-cluster-out retraining (Dist1-3, Spearman, LDS, timings), or
    with the final-model-only further-training gold standard (--gold further-training), or one
    method's attributions across architectures and initialisations (--compare)."""
    # every option is checked before the run is opened and anything is fitted
    _check_queries(queries)
    if output not in OUTPUT_FORMATS:
        raise DistdmError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {output!r}")
    if compare is not None:
        _method_specs()("--compare-method", [compare_method])
        r = _open(run, device=device)
        x, y, _ = _queries(r, queries)
        comp = r.compare(compare, compare_method, (x, y))
        c = comp.value
        first = next(iter(c.matrices.values()))
        console.print(
            f"{compare_method} attribution matrices (margin) under {len(c.matrices)} variants, {len(y)} "
            f"queries, {r.clusters().n_clusters} clusters / {len(first['class'])} classes:",
            highlight=False,
        )
        _print_lines(c.to_markdown())
        _written(comp.paths)
        return
    if gold not in ("exact", "further-training"):
        raise DistdmError(f"--gold must be exact or further-training, got {gold!r}")
    if gold == "further-training":
        specs = list(methods or FURTHER_METHODS)
        _check_further(specs, unit, optimizer, lr, left_out, objective)
        r = _open(run, device=device, **_execution(ctx, executor, address, memory_budget))
        x, y, _ = _queries(r, queries)
        res = r.evaluate_further(
            specs, (x, y), seeds=seeds, epochs=epochs, unit=unit, optimizer=optimizer, lr=lr,
            left_out=left_out, objective=objective,
        )  # fmt: skip
        console.print(
            f"agreement with further training ({optimizer}) from the final model: {res.info['left_out']} "
            f"left-out {unit}s, {len(y)} queries, objective {objective}; mean over queries [95% interval]",
            highlight=False,
        )
        from .attribution.further import agreement_to_markdown

        _print_lines(agreement_to_markdown(res.value))
        console.print("written: " + ", ".join(res.paths), soft_wrap=True)
        return
    specs = list(methods or EXACT_METHODS)
    if lds_subsets < 0 or lds_subsets == 1:
        raise DistdmError(f"--lds-subsets must be 0 (no LDS) or >= 2, got {lds_subsets}")
    _check_verify(verify)
    r = _open(run, device=device, **_execution(ctx, executor, address, memory_budget))
    x, y, _ = _queries(r, queries)
    res = r.evaluate(specs, (x, y), seeds=seeds, lds_subsets=lds_subsets, verify=verify)
    _print_evaluation(res.value.rows, output)
    out = err_console if output == "csv" else console  # csv: stdout holds the table alone
    if res.checks:
        _print_verification(res.checks, out)
    _written(res.paths, out)


@app.command()
def report(
    run: Path = RUN,
    out: Path = typer.Option(None, help="Where to write the HTML file (default RUN/report.html)."),
) -> None:
    """Write a single self-contained HTML report of the run (settings, timings, diagnostics, figures)."""
    from .report import write_report
    from .run import Run

    console.print(f"report: {write_report(Run.open(run), out)}")


@app.command()
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
    from .run import Run

    _check_queries(queries)
    t0 = time.perf_counter()
    r = Run(
        out,
        "digits",
        "mlp",
        progress=True,
        device=device,
        **_execution(ctx, executor, address, memory_budget),
    )

    def done(stage: str, result: Any) -> None:
        if stage == "train":
            acc = r.store.stage_info("train")["accuracy"]
            console.print(f"  target test accuracy {acc:.3f}", highlight=False)
        elif stage == "distill":
            _print_synset(result)
            if len(r.data.y_test) < queries:
                _queries(r, queries)  # says how many test queries there are

    d = r.demo(queries, on_start=lambda stage: console.print(f"[bold]{stage}[/] ..."), on_done=done)
    rho, within = d.spearman, d.within_class
    t = Table(title="DDM (default preset) vs exact leave-cluster-out retraining, margin objective")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.caption = (
        f"Spearman: mean over the {d.n_queries} queries [95% interval], as `distdm evaluate` reports it"
    )
    t.add_row("Spearman, all clusters", str(rho) if rho.n else "-")
    t.add_row("Spearman, within the query's class", str(within) if within.n else "- (< 3 clusters per class)")
    t.add_row("DDM online time", f"{d.ddm.seconds:.2f}s")
    t.add_row("exact retraining time", f"{d.timings['exact leave-cluster-out retraining']:.1f}s")
    console.print(t)
    for k, v in d.timings.items():
        console.print(f"  {k:40s} {v:6.1f}s")
    console.print(f"total {time.perf_counter() - t0:.1f}s; run directory {r.path}")
    for k, p in d.figures.items():
        console.print(f"  figure {k}: {p}")


def _check_share(flag: str, share: float) -> None:
    """A share strictly between 0 and 1, or a DistdmError naming the flag."""
    if not 0 < share < 1:
        raise DistdmError(f"{flag} must lie in (0, 1) (e.g. 0.5 for half), got {share}")


def _check_count(flag: str, n: int) -> None:
    if n < 1:
        raise DistdmError(f"{flag} must be >= 1, got {n}")


@app.command()
def diagnose(
    run: Path = typer.Argument(None, help="Run directory (or give --pack instead)."),
    methods: Listed = list_option(
        "ddm,if-cg", "--methods", str, check=_method_specs(ranking=True),
        help="Comma-separated ranking methods (random is the baseline).",
    ),
    fractions: Listed | None = list_option(
        None, "--fractions", float, check=_fractions,
        help="Shares of training data to remove (default 0.01,0.1,0.2,0.5; with corruption 0.1-0.4).",
    ),
    random_seeds: int = typer.Option(5, help="Random-removal draws."),
    retrain_seeds: Listed = list_option(
        "", "--retrain-seeds", int, empty=True, help="Retrain seeds (default: the target's init and order)."
    ),
    inject_noise: float = typer.Option(
        None, help="Add Gaussian noise (norm --noise-norm) to this share of training images first."
    ),
    flip_labels: float = typer.Option(None, help="Flip the labels of this share of training samples first."),
    noise_norm: float = typer.Option(0.1, help="L2 norm of the noise added per image."),
    noise_seed: int = typer.Option(0, help="Seed choosing the corrupted samples."),
    validation_fraction: float = typer.Option(0.5, help="Share of the test set held out as validation."),
    balanced: bool = typer.Option(False, help="Remove the same share from every class."),
    device: str = DEVICE,
    pack: Path = PACK,
    model: Path = PACK_MODEL,
    arch: str = PACK_ARCH,
    validation_file: Path = typer.Option(
        None, "--validation-file", "--queries-file",
        help="With --pack: .npz/.safetensors of validation inputs x and labels y (scores go beside it).",
    ),
    top: int = typer.Option(10, help="With --pack: clusters to list, the most harmful first."),
) -> None:  # fmt: skip
    """Rank clusters by validation loss, remove the most harmful data, retrain, compare with random
    removal (DDM Table 3); with --inject-noise / --flip-labels also detect the corrupted data (Table 6).
    With --pack PACK --model WEIGHTS --validation-file V: rank the pack's clusters by their effect on
    the validation loss from the pack and the model alone (no run, no training data, no retraining)."""
    if _pack_mode(run, pack, model, arch, validation_file, data_flag="--validation-file"):
        _check_count("--top", top)
        _diagnose_pack(pack, model, arch, validation_file, top)
        return
    if inject_noise is not None and flip_labels is not None:
        raise DistdmError("use either --inject-noise or --flip-labels, not both")
    for flag, share in (("--inject-noise", inject_noise), ("--flip-labels", flip_labels)):
        if share is not None and not 0 < share < 1:
            raise DistdmError(f"{flag} must lie in (0, 1) (e.g. 0.2 for 20%), got {share}")
    _check_count("--random-seeds", random_seeds)
    _check_share("--validation-fraction", validation_fraction)
    if not (math.isfinite(noise_norm) and noise_norm > 0):
        raise DistdmError(f"--noise-norm must be a finite number > 0, got {noise_norm}")
    if noise_seed < 0:
        raise DistdmError(f"--noise-seed must be >= 0, got {noise_seed}")
    r = _open(run, device=device)
    settings = dict(fractions=fractions, random_seeds=random_seeds, retrain_seeds=retrain_seeds or [None],
                    validation_fraction=validation_fraction, balanced=balanced)  # fmt: skip
    if inject_noise is None and flip_labels is None:
        console.print(f"ranking {r.clusters().n_clusters} clusters by validation loss ...")
        res = r.diagnose(methods, **settings)
        d = res.value
        _print_lines(d.to_markdown())
        for spec in d.scores:
            top_k = [f"{c['cluster']} (class {c['class']}, n={c['size']}, {c['score']:+.3g})"
                     for c in d.ranking(spec, 10)]  # fmt: skip
            console.print(
                f"most harmful clusters by {spec}: " + ", ".join(top_k), highlight=False, soft_wrap=True
            )
        _written(res.paths)
        return
    kind, share = ("noise", inject_noise) if inject_noise is not None else ("labels", flip_labels)
    c = r.corruption(kind, share, seed=noise_seed, norm=noise_norm)
    console.print(f"corrupted {len(c.indices)} of {c.data.n_train} training samples ({c.tag}); training "
                  f"and clustering the corrupted copy ...")  # fmt: skip
    res = r.diagnose(methods, corruption=c, **settings)
    _print_lines(res.value.to_markdown())
    _written(res.paths)


@app.command()
def transfer(
    run: Path = RUN,
    methods: Listed = list_option(
        "ddm", "--methods", str, check=_method_specs(ranking=True),
        help="Comma-separated ranking methods (random is the baseline).",
    ),
    fractions: Listed = list_option(
        "0.1,0.2,0.5", "--fractions", float, check=_fractions, help="Shares of training data to delete."
    ),
    alpha: float = typer.Option(0.5, help="Weight a of the KL term: (1 - a) CE + a KL(teacher || student)."),
    temperature: float = typer.Option(1.0, help="Distillation temperature."),
    random_seeds: int = typer.Option(3, help="Random-deletion draws."),
    student_seeds: Listed = list_option(
        "", "--student-seeds", int, empty=True, help="Student seeds (default: the target's init and order)."
    ),
    validation_fraction: float = typer.Option(0.5, help="Share of the test set the KL is ranked on."),
    balanced: bool = typer.Option(False, help="Delete the same share from every class."),
    device: str = DEVICE,
) -> None:  # fmt: skip
    """Delete the data the teacher (the target model) rests on least by the KL objective, train a
    student with (1 - a) CE + a KL on the rest, compare with random deletion (DDM Table 7)."""
    from .applications.transfer import kd_loss

    kd_loss(alpha, temperature)
    _check_count("--random-seeds", random_seeds)
    _check_share("--validation-fraction", validation_fraction)
    r = _open(run, device=device)
    res = r.transfer(
        methods, fractions=fractions, alpha=alpha, temperature=temperature, random_seeds=random_seeds,
        student_seeds=student_seeds or [None], validation_fraction=validation_fraction, balanced=balanced,
    )  # fmt: skip
    _print_lines(res.value.to_markdown())
    _written(res.paths)


@app.command()
def unlearn(
    run: Path = typer.Argument(None, help="Run directory (or give --pack instead)."),
    clusters: Listed | None = list_option(
        None, "--clusters", int, aliases=("--cluster",),
        help="Comma-separated cluster ids to remove, e.g. 3,17.",
    ),
    all_synset: bool = typer.Option(
        False, "--all", help="Table 4: fine-tune on the whole synset of each of --presets instead."
    ),
    out: Path = typer.Option(None, help="Write the unlearned model here (.safetensors; with --clusters)."),
    preset: str = typer.Option("default", help="Synset to unlearn with: default, paper or paper-match."),
    presets: Listed = list_option(
        "paper,paper-match,default", "--presets", str, check=_synsets, help="Synsets compared by --all."
    ),
    lr_scales: Listed = list_option(
        "0.01,0.1,1", "--lr-scales", float, check=_positive,
        help="With --all: multiples of each synset's online lr.",
    ),
    retrain: bool = typer.Option(
        True, "--retrain/--no-retrain", help="Also retrain exactly without the clusters."
    ),
    device: str = DEVICE,
    pack: Path = PACK,
    model: Path = PACK_MODEL,
    arch: str = PACK_ARCH,
) -> None:  # fmt: skip
    """Remove clusters' effect by fine-tuning on their synsets; compare with the original model and
    exact retraining without them (accuracy and margin on removed / kept / test samples). --all:
    accuracy after fine-tuning on the whole synset, reverse vs standard matching (DDM Table 4).
    With --pack PACK --model WEIGHTS --cluster K: fine-tune the target on the pack's synsets of K and
    write the unlearned weights (default beside WEIGHTS), from the pack and the model alone."""
    if all_synset == (clusters is not None):
        raise DistdmError("give either --clusters (e.g. --clusters 3,17) or --all")
    if out is not None and (all_synset or out.suffix != ".safetensors"):
        raise DistdmError(f"--out must be a .safetensors file and goes with --clusters, got {str(out)!r}")
    if _pack_mode(run, pack, model, arch, None, data_flag=""):
        if all_synset:
            raise DistdmError("--all compares synset variants of a run: give a run directory, not --pack")
        assert clusters is not None
        _unlearn_pack(pack, model, arch, clusters, out)
        return
    if all_synset:
        r = _open(run, device=device)
        res = r.forgetting(presets, lr_scales)
        console.print("test accuracy after fine-tuning theta_tau on the whole synset (DDM Table 4; "
                      "'forgotten' 1 = back to theta_0's accuracy):", highlight=False)  # fmt: skip
        _print_lines(res.value)
        _written(res.paths)
        return
    _synsets("--preset", [preset])
    r = _open(run, device=device)
    assert clusters is not None
    res = r.unlearn(clusters, preset, retrain=retrain, out=out)
    sizes, cls = r.clusters().sizes(), r.clusters().cluster_class
    console.print(
        "removed clusters: " + ", ".join(f"{k} (class {cls[k]}, n={sizes[k]})" for k in res.info["clusters"])
        + f"; synset '{preset}'",
        highlight=False, soft_wrap=True,
    )  # fmt: skip
    _print_lines(res.value.to_markdown())
    _written(res.paths)


@app.command()
def privacy(
    run: Path = RUN,
    presets: Listed = list_option(
        "paper,paper-match,default", "--presets", str, check=_synsets, help="Synsets to measure and draw."
    ),
    rows: int = typer.Option(10, help="Clusters drawn in the figure (one per class first)."),
    device: str = DEVICE,
) -> None:
    """How close synthetic samples are to real training images (cosine, L2 in standardised input space)
    and a nearest-synthetic-distance membership-inference AUC; figure of synsets beside their nearest
    real images."""
    from .applications.unlearn import rows_to_markdown

    _check_count("--rows", rows)
    r = _open(run, device=device)
    res = r.privacy(presets, rows)
    console.print(
        "per synset: nearest real training image of each synthetic sample (standardised inputs); "
        "membership-inference AUC of the nearest-synthetic-distance attack (members: training images, "
        "non-members: test images; 0.5 = nothing revealed)",
        highlight=False, soft_wrap=True,
    )  # fmt: skip
    _print_lines(rows_to_markdown(res.value))
    _written(res.paths)


def run_cli() -> None:
    """Entry point for `python -m distdm`."""
    app(prog_name="distdm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_cli())
