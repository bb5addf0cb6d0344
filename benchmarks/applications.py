"""Applications of attribution in the DDM paper's shape: data diagnosis (Table 3), noisy-data
detection (Table 6) and transferability (Table 7), each beside its random baseline.

    python benchmarks/applications.py --setting digits --threads 1
    python benchmarks/applications.py --setting fmnist --threads 1 --random-seeds 3

Settings (benchmarks/quality.py `build_task`): 'digits' = digits-mlp-k100 (sklearn digits, MLP
64-128-10, 30 epochs SGD, 10 k-means clusters per class on the inputs); 'fmnist' =
fmnist-convnet-k100 (the first 200 Fashion-MNIST training images per class = 2,000 images, or
--per-class; ConvNet width 16 depth 3, 15 epochs, 10 k-means clusters per class on the target's
penultimate features).
Validation data: a stratified half of the test set (at most 1,000 samples, seed 0) ranks the
clusters; accuracy is measured on the rest of the test set. Retrains use the target's theta_0 and
data order (--retrain-seeds adds others). Table 6 corrupts 20% of the training set (seed 0) with
Gaussian noise of L2 norm --noise-norms per image (in standardised units) or with label flips; the
corrupted copy gets its own target model (same theta_0 and schedule) and clusters. Synsets and
retrains are cached under <out>/run-<setting>[-<corruption>], so a second run reuses them.
Writes applications-<setting>.md (all tables) and per-table CSV/PNG files to --out.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import FMNIST_PER_CLASS, build_task, run_name  # noqa: E402

from distdm.applications.diagnose import diagnose, diagnosis_files, validation_split  # noqa: E402
from distdm.applications.noise import corrupt, corrupted_task, noisy_diagnosis  # noqa: E402
from distdm.applications.transfer import transfer  # noqa: E402
from distdm.attribution import Attributor, make_attributor  # noqa: E402
from distdm.attribution.base import accepts  # noqa: E402
from distdm.store import RunStore, atomic_write_bytes  # noqa: E402
from distdm.task import Task  # noqa: E402

SETTINGS = {"digits": ("digits-mlp-k100", "inputs"), "fmnist": ("fmnist-convnet-k100", "penultimate")}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _seeds(text: str) -> list[int | None]:
    return [None] + [int(v) for v in text.split(",") if v.strip()]


def _spec(text: str, progress: bool) -> tuple[str, dict[str, object]]:
    """'NAME' or 'NAME:key=value;key=value' (e.g. 'if-cg:curvature=ggn') -> name and settings."""
    name, _, rest = text.partition(":")
    settings: dict[str, object] = {"progress": progress} if name == "ddm" else {}
    for item in [r for r in rest.split(";") if r]:
        key, _, value = item.partition("=")
        settings[key] = float(value) if value.replace(".", "", 1).isdigit() else value
    return name, settings


def _write(out: Path, files: dict[str, bytes | str | None]) -> list[str]:
    written = []
    for name, data in files.items():
        if data is None:
            continue
        atomic_write_bytes(out / name, data.encode() if isinstance(data, str) else data)
        written.append(str(out / name))
    return written


def main(argv: list[str] | None = None) -> int:
    """Run the selected tables and print them as markdown."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="digits")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--tables", default="3,6,7", help="which of the paper's tables: 3, 6, 7")
    ap.add_argument(
        "--methods",
        default="ddm,if-cg",
        help="ranking methods for Tables 3 and 6 (NAME or NAME:key=value;...)",
    )
    ap.add_argument("--transfer-methods", default="ddm", help="ranking methods for Table 7")
    ap.add_argument("--random-seeds", type=int, default=5, help="random-removal draws")
    ap.add_argument("--retrain-seeds", default="", help="extra retrain seeds besides the target's")
    ap.add_argument("--noise-norms", default="0.1", help="L2 norms of the Table 6 noise per image")
    ap.add_argument("--corrupt-fraction", type=float, default=0.2)
    ap.add_argument("--alpha", type=float, default=0.5, help="KL weight of the Table 7 students")
    ap.add_argument("--balanced", action="store_true", help="also run Table 3 with class-balanced removal")
    ap.add_argument("--per-class", type=int, default=FMNIST_PER_CLASS, help="Fashion-MNIST images per class")
    ap.add_argument("--out", default="benchmarks/out/applications")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    setting, features = SETTINGS[args.setting]
    tables = {t.strip() for t in args.tables.split(",")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = build_task(setting, args.progress, args.per_class)
    setting = run_name(setting, args.per_class)
    store = RunStore(out / f"run-{setting}", fingerprint=task.data.fingerprint())
    split = validation_split(task.data, 0.5, seed=0, max_validation=1000)
    common = dict(
        random_seeds=list(range(args.random_seeds)),
        retrain_seeds=_seeds(args.retrain_seeds),
        split=split,
        progress=args.progress,
    )
    sections: list[str] = []
    written: list[str] = []
    timings: dict[str, float] = {}

    def fitted(t: Task, names: str, cache: RunStore) -> dict[str, Attributor]:
        out_: dict[str, Attributor] = {}
        for n in [m for m in names.split(",") if m]:
            t0 = time.perf_counter()
            name, settings = _spec(n, args.progress)
            if accepts(name, "store"):  # synsets and retrains are cached in the task's run directory
                settings["store"] = cache
            out_[n] = make_attributor(name, **settings).fit(t)
            timings[f"fit {n} ({t.data.name})"] = time.perf_counter() - t0
            print(f"fitted {n} on {t.data.name} in {timings[f'fit {n} ({t.data.name})']:.0f} s", flush=True)
        return out_

    needed = (args.methods.split(",") if tables & {"3"} else []) + (
        args.transfer_methods.split(",") if "7" in tables else []
    )
    clean = fitted(task, ",".join(dict.fromkeys(needed)), store)
    if "3" in tables:
        t0 = time.perf_counter()
        ranking = {m: clean[m] for m in args.methods.split(",") if m}
        for balanced in [False, True] if args.balanced else [False]:
            d = diagnose(
                task, ranking, fractions=(0.01, 0.1, 0.2, 0.5), balanced=balanced, store=store, **common
            )
            stem = f"table3-{args.setting}" + ("-balanced" if balanced else "")
            sections.append(
                f"## Table 3 (data diagnosis){' , class-balanced removal' if balanced else ''}"
                f"\n\n{d.to_markdown()}"
            )
            written += _write(out, diagnosis_files(d, task.data.x_train, stem=stem))
            print(sections[-1], flush=True)
        timings["table 3"] = time.perf_counter() - t0
    if "6" in tables:
        specs = [("noise", n) for n in _floats(args.noise_norms)] + [("labels", None)]
        for kind, norm in specs:
            t0 = time.perf_counter()
            c = corrupt(task.data, kind, args.corrupt_fraction, seed=0, norm=norm or 0.1)
            ctask = corrupted_task(task, c, features=features, progress=args.progress)
            cstore = RunStore(out / f"run-{setting}-{c.tag}", fingerprint=c.data.fingerprint())
            clean_acc = float(
                (task.outputs(split.xy(task.data, "test")[0]).argmax(-1) == split.xy(task.data, "test")[1])
                .double()
                .mean()
            )
            rep = noisy_diagnosis(
                ctask,
                c,
                fitted(ctask, args.methods, cstore),
                clean_accuracy=clean_acc,
                fractions=(0.1, 0.2, 0.3, 0.4),
                store=cstore,
                **common,
            )
            stem = f"table6-{args.setting}-{c.tag}"
            files = diagnosis_files(rep.diagnosis, c.data.x_train, stem=stem)
            files[f"{stem}-detection.csv"] = rep.to_csv()
            written += _write(out, files)
            sections.append(f"## Table 6 (noisy data, {c.tag})\n\n{rep.to_markdown()}")
            print(sections[-1], flush=True)
            timings[f"table 6 {c.tag}"] = time.perf_counter() - t0
    if "7" in tables:
        t0 = time.perf_counter()
        ranking = {m: clean[m] for m in args.transfer_methods.split(",") if m}
        res = transfer(
            task,
            ranking,
            fractions=(0.1, 0.2, 0.5),
            alpha=args.alpha,
            random_seeds=list(range(args.random_seeds)),
            student_seeds=_seeds(args.retrain_seeds),
            split=split,
            progress=args.progress,
        )
        written += _write(out, res.files(stem=f"table7-{args.setting}"))
        sections.append(f"## Table 7 (transferability)\n\n{res.to_markdown()}")
        print(sections[-1], flush=True)
        timings["table 7"] = time.perf_counter() - t0

    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    header = (
        f"# Applications, setting {setting}\n\n{datetime.date.today()}; {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}; {task.data.n_train} training samples, "
        f"K = {task.clusters.n_clusters}; "
        f"wall {wall:.0f} s; peak RSS {peak_mb:.0f} MB\ncommand: python {' '.join(sys.argv)}\n\ntimings (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
        + "\n"
    )
    report = header + "\n" + "\n".join(sections)
    written += _write(out, {f"applications-{args.setting}.md": report})
    print(header)
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
