"""A single self-contained HTML report of a run directory: settings, timings, diagnostics, figures.

    from distdm.report import write_report
    write_report(Run.open("runs/digits"))          # -> runs/digits/report.html

Everything is embedded (PNG figures as base64, inline CSS, no scripts, no external assets), so the
file can be mailed or attached as it is. Parts of the run that were not computed yet are listed as
such; an artifact that fails its checksum is named in the report instead of being shown.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .clusters import Clusters, classwise
from .errors import DistdmError
from .scores import SIGN_CONVENTION
from .store import APPLICATION, CHUNKED_JOB, DISTILLATION, SCORES, SYNSET, Result, atomic_write_bytes

if TYPE_CHECKING:  # run.py imports every attribution method; the report needs none of them
    from .run import Run

REPORT_NAME = "report.html"
MAX_HEATMAP_QUERIES = 60  # heatmap columns
TOP_QUERIES = 6  # queries shown with images of their top clusters' members
TOP_K = 3  # top clusters per query
MEMBERS = 3  # member images per cluster

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0; color: #1d1d1f;
       background: #fafafa; line-height: 1.45; }
header { background: #1f3a5f; color: white; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 1.6em; }
header p { margin: 0; opacity: 0.85; }
nav { background: #e8edf3; padding: 8px 32px; position: sticky; top: 0; z-index: 1;
      border-bottom: 1px solid #cfd8e3; }
nav a { margin-right: 14px; color: #1f3a5f; text-decoration: none; font-weight: 600;
        white-space: nowrap; display: inline-block; }
main { padding: 8px 32px 40px 32px; max-width: 1200px; }
section { background: white; border: 1px solid #e0e0e0; border-radius: 6px; padding: 6px 20px 16px;
          margin: 18px 0; }
h2 { border-bottom: 2px solid #1f3a5f; padding-bottom: 4px; }
h3 { margin-bottom: 6px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #d0d0d0; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f3f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 6px 0; }
.missing { color: #8a6d00; background: #fff8e1; border-left: 4px solid #f0b400; padding: 6px 10px; }
.bad { color: #a00000; font-weight: 600; }
.error { color: #a00000; background: #fdecec; border-left: 4px solid #d00000; padding: 6px 10px; }
.note { color: #555; font-size: 0.9em; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; }
.scroll { overflow-x: auto; max-width: 100%; }
table.wide { font-size: 0.78em; }
table.wide th, table.wide td { padding: 2px 5px; }
th { white-space: normal; }
.ci { color: #666; font-size: 0.85em; white-space: nowrap; }
.source { color: #777; font-size: 0.8em; margin-top: 0; }
.lead { color: #333; }
.cards { display: flex; flex-wrap: wrap; gap: 6px 22px; align-items: flex-start; }
.card h3 { margin: 8px 0 0 0; }
summary { cursor: pointer; color: #1f3a5f; font-weight: 600; margin: 8px 0; }
"""

# the applications' outputs (RUN/applications/<dir>/...): section id, title, short name for the
# navigation bar, what the application asks, and the command that computes it
APPLICATIONS = (
    ("diagnose", "Which data hurt accuracy (diagnose)", "Diagnose",
     "Clusters ranked by how much they raise the validation loss; the highest-ranked share of the "
     "training data is removed, the model retrained, and its test accuracy compared with removing the "
     "same share at random (DDM Table 3).", "distdm diagnose RUN"),
    ("noise", "Noisy data detection", "Noise",
     "A copy of the training set with Gaussian noise or flipped labels on some samples: does the ranking "
     "find the corrupted samples, and does removing them restore accuracy? (DDM Table 6)",
     "distdm diagnose RUN --inject-noise 0.2</code> or <code>--flip-labels 0.2"),
    ("transfer", "Knowledge transfer", "Transfer",
     "The data the teacher (the target model) rests on least is deleted, and a student is trained on "
     "the rest with cross-entropy plus a KL term to the teacher, against random deletion (DDM Table 7).",
     "distdm transfer RUN"),
    ("unlearn", "Unlearning", "Unlearning",
     "Removing the effect of clusters by fine-tuning on their synthetic samples, compared with the "
     "original model and with exact retraining without them (DDM Table 4).",
     "distdm unlearn RUN --all</code> or <code>distdm unlearn RUN --clusters 3,17"),
    ("privacy", "Privacy of the synsets", "Privacy",
     "How close the synthetic samples are to real training images, and whether they reveal which "
     "images were trained on (membership-inference AUC; 0.5 means nothing is revealed).",
     "distdm privacy RUN"),
)  # fmt: skip

SECTIONS = (
    ("overview", "Overview"),
    ("settings", "Settings"),
    ("timings", "Stages and timings"),
    ("clusters", "Clusters"),
    ("distillation", "Distillation"),
    ("attribution", "Attribution"),
    ("evaluation", "Evaluation"),
    ("verification", "Trust checks"),
    *((sid, title) for sid, title, *_ in APPLICATIONS),
)
NAV = {sid: short for sid, _, short, *_ in APPLICATIONS}  # the long titles would not fit the bar


# small HTML helpers ---------------------------------------------------------------------------


def _e(v: object) -> str:
    return html.escape(str(v))


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _missing(what: str, how: str) -> str:
    return f'<p class="missing">{_e(what)}: not computed yet. {how}</p>'


def _fmt(v: object) -> str:
    if isinstance(v, bool) or v is None:
        return _e(json.dumps(v))
    if isinstance(v, float):
        if not np.isfinite(v):
            return "-"
        return f"{v:.4g}"
    if isinstance(v, (dict, list, tuple)):
        return f"<code>{_e(json.dumps(v))}</code>"
    return _e(v)


WIDE_COLUMNS = 7  # tables with more columns get a smaller font, so that they fit the page
_NUMBER = re.compile(r"^([-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?%?|-)$", re.I)  # '-': a missing value
# a value with its interval or spread ("0.42 [0.30, 0.50]", "97.1 ± 0.3 (10.0%)"): the second part
# goes on its own line, which halves the width of an evaluation table
_SPREAD = re.compile(r"^(\S+) ((?:\[[^\]]*\]|± \S+)(?: \([^)]*\))?)$")


def _head(h: object) -> str:
    # let long snake_case column names break after an underscore instead of widening the table
    return _e(h).replace("_", "_<wbr>").replace("/", "/<wbr>")


def _cell(v: object, raw: bool, numeric: bool) -> str:
    if raw and isinstance(v, str):
        return f"<td>{v}</td>"
    if isinstance(v, str):
        m = _SPREAD.match(v.strip())
        if m and _NUMBER.match(m.group(1)):
            return f'<td class="num">{_e(m.group(1))}<br><span class="ci">{_e(m.group(2))}</span></td>'
        if numeric and _NUMBER.match(v.strip()):
            return f'<td class="num">{_e(v)}</td>'
        return f"<td>{_e(v)}</td>"
    num = numeric and isinstance(v, (int, float)) and not isinstance(v, bool)
    return f'<td class="num">{_fmt(v)}</td>' if num else f"<td>{_fmt(v)}</td>"


def _table(
    header: list[str] | None, rows: list[list[object]], raw: bool = False, numeric: bool = True
) -> str:
    head = "<tr>" + "".join(f"<th>{_head(h)}</th>" for h in header) + "</tr>" if header else ""
    body = ["<tr>" + "".join(_cell(v, raw, numeric) for v in r) + "</tr>" for r in rows]
    width = max([len(header or [])] + [len(r) for r in rows])
    cls = ' class="wide"' if width > WIDE_COLUMNS else ""
    return f'<div class="scroll"><table{cls}>{head}{"".join(body)}</table></div>'


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _kv_table(d: dict[str, Any]) -> str:
    flat = _flatten(d)
    return _table(None, [[k, flat[k]] for k in sorted(flat)], numeric=False)


def _guard(title: str, fn: Callable[[], str]) -> str:
    """The section body, or an error box naming what could not be read (e.g. a tampered artifact)."""
    try:
        return fn()
    except DistdmError as e:
        return f'<p class="error">{_e(title)} could not be read: {_e(e)}</p>'


# figures made here (the rest come from distdm.figures) ---------------------------------------


def _line_png(values: list[float], title: str, xlabel: str, ylabel: str) -> bytes:
    from .figures import _png, plt

    fig, ax = plt.subplots(figsize=(5, 2.6))
    ax.plot(np.arange(len(values)), values, color="tab:blue")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(values) and min(values) > 0 and max(values) / max(min(values), 1e-12) > 50:
        ax.set_yscale("log")
    return _png(fig)


def top_clusters_png(
    values: np.ndarray,
    x_queries: torch.Tensor,
    y_queries: np.ndarray,
    x_train: torch.Tensor,
    clusters: Clusters,
    *,
    top: int = TOP_K,
    members: int = MEMBERS,
) -> bytes | None:
    """Per query (row): its image, then for each of its top clusters a few member images (None for
    non-image inputs). Drawn as one mosaic image with captions, which is fast for many tiles."""
    from .figures import _as_image, _png, plt

    if len(x_queries) == 0 or _as_image(x_queries[0]) is None:
        return None
    tile = _as_image(x_queries[0])
    h, w = tile.shape[:2]
    rgb = tile.ndim == 3
    pad, gap, cap = max(1, h // 8), max(2, h // 2), max(4, h // 2)  # between tiles, between groups, captions
    nq = len(x_queries)
    order = np.argsort(-values, axis=0, kind="stable")[:top]
    sizes = clusters.sizes()
    col_x = [0] + [
        w + gap + r * (members * (w + pad) + gap) + m * (w + pad) for r in range(top) for m in range(members)
    ]
    width = col_x[-1] + w
    row_h = cap + h + pad
    canvas = np.ones((nq * row_h, width, 3) if rgb else (nq * row_h, width))
    fig, ax = plt.subplots(figsize=(max(4.0, width / h * 0.75), max(1.5, nq * row_h / h * 0.75)))
    for q in range(nq):
        top_y = q * row_h + cap
        canvas[top_y : top_y + h, :w] = _as_image(x_queries[q])
        ax.text(0, top_y - 1, f"query, class {int(y_queries[q])}", fontsize=6, color="tab:blue", va="bottom")
        for r, k in enumerate(order[:, q]):
            idx = clusters.members(int(k))[:members]
            x0 = col_x[1 + r * members]
            ax.text(
                x0, top_y - 1, f"#{r + 1} k={int(k)} (class {clusters.cluster_class[k]}, n={sizes[k]}) "
                f"{values[k, q]:+.3g}", fontsize=6, va="bottom",
            )  # fmt: skip
            for m, i in enumerate(idx):
                x = col_x[1 + r * members + m]
                canvas[top_y : top_y + h, x : x + w] = _as_image(x_train[i])
    ax.imshow(canvas, cmap=None if rgb else "gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    return _png(fig)


# sections ------------------------------------------------------------------------------------


def _overview(run: Run) -> str:
    d, m = run.data, run.store.manifest
    model_cfg = m["configs"].get("model", {})
    rows = [
        ["run directory", str(run.store.root.resolve())],
        ["dataset", f"{d.name}: {d.n_train} training and {len(d.y_test)} test samples, input shape "
                    f"{d.input_shape}, " + (f"{d.num_classes} classes" if d.num_classes else "regression")],
        ["data fingerprint", m.get("fingerprint")],
        ["model", f"{run.model_name} ({model_cfg.get('n_params', '?')} parameters)"],
        ["library versions", m.get("versions", {})],
        ["report written", datetime.datetime.now().isoformat(timespec="seconds")],
    ]  # fmt: skip
    out = _table(None, rows, numeric=False)
    info = run.store.stage_info("train")
    if info.get("done"):
        key, what = ("mse", "test mean squared error") if d.is_regression else ("accuracy", "test accuracy")
        if key in info:
            epochs = run.train_config.epochs
            out += f"<p>Target model {what}: <b>{_fmt(info[key])}</b> after {epochs} epochs.</p>"
        else:
            out += f"<p>Target model trained for {run.train_config.epochs} epochs (no test set).</p>"
    else:
        out += _missing("The target model", "Run <code>distdm train RUN</code>.")
    return out


def _settings(run: Run) -> str:
    configs = run.store.manifest["configs"]
    if not configs:
        return _missing("Settings", "Nothing has been run in this directory.")
    out = [
        '<p class="note">As recorded in <code>manifest.json</code>; reopening the run with other '
        "settings is refused.</p>"
    ]
    order = ["data", "model", "train", "cluster"]
    names = sorted(configs, key=lambda n: (order.index(n) if n in order else len(order), n))
    cards, jobs = [], []
    for name in names:
        cfg = configs[name]
        if "/" in name:  # cached retraining or further-training jobs: one row each below
            jobs.append([name, cfg])
            continue
        body = _kv_table(cfg) if isinstance(cfg, dict) else f"<p>{_fmt(cfg)}</p>"
        cards.append(f'<div class="card"><h3>{_e(name)}</h3>{body}</div>')
    out.append(f'<div class="cards">{"".join(cards)}</div>')
    if jobs:
        out.append(f"<details><summary>{len(jobs)} cached jobs (retraining, further training)</summary>")
        out.append(_table(["job", "settings"], jobs))
        out.append("</details>")
    return "".join(out)


def _timings(run: Run) -> str:
    from .figures import bar_png

    stages = run.store.manifest["stages"]
    if not stages:
        return _missing("Stages", "Run <code>distdm train RUN</code> to start.")
    # a chunked job's chunk flags are named like its chunk files (the index lists them); a job that
    # is not complete yet, or was made before the index, is recognised by the '<job>/chunk<i>' names
    job_of = {f.removesuffix(".safetensors"): r.name for r in run.store.index(CHUNKED_JOB) for f in r.files}
    groups: dict[str, dict[str, Any]] = {}
    for name, info in stages.items():
        parts = name.split("/")
        key = job_of.get(name) or (
            "/".join(parts[:-1]) if len(parts) > 2 and parts[-1].startswith("chunk") else name
        )
        g = groups.setdefault(key, {"seconds": 0.0, "units": 0, "done": 0, "info": {}})
        g["seconds"] += float(info.get("seconds") or 0.0)
        g["units"] += 1
        g["done"] += bool(info.get("done"))
        if key == name:
            g["info"] = {k: v for k, v in info.items() if k not in ("done", "seconds", "layer_cosine")}

    def rank(key: str) -> tuple[int, str]:
        first = ("train", "cluster", "distill", "retrain", "further")
        return next((i for i, f in enumerate(first) if key.startswith(f)), len(first)), key

    rows = []
    for key, g in sorted(groups.items(), key=lambda kv: rank(kv[0])):
        status = "done" if g["done"] == g["units"] else f"{g['done']} of {g['units']} parts done"
        if g["units"] > 1:
            status += f" ({g['units']} cached chunks)"
        extra = ", ".join(f"{_e(k)} {_fmt(v)}" for k, v in g["info"].items() if not isinstance(v, dict))
        rows.append([_e(key), _e(status), g["seconds"], extra])
    out = _table(["stage", "status", "seconds", "recorded"], rows, raw=True)
    labels = [html.unescape(str(r[0])) for r in rows if r[2] > 0]
    secs = [float(r[2]) for r in rows if r[2] > 0]
    if secs:  # first stage at the top
        out += _img(bar_png(labels[::-1], secs[::-1], "time per stage", "seconds"), "time per stage")
    return out


def _clusters(run: Run) -> str:
    if not run.store.is_done("cluster"):
        return _missing("Clusters", "Run <code>distdm cluster RUN --per-class 10</code>.")
    c = run.clusters()
    sizes = c.sizes()
    cfg = run.store.config("cluster") or {}
    out = (
        f"<p>{c.n_clusters} clusters ({_e(c.kind)}, {_e(cfg.get('per_class', '?'))} per class on "
        f"{_e(cfg.get('features', '?'))} features); sizes {sizes.min()} to {sizes.max()}, median "
        f"{int(np.median(sizes))}.</p>"
    )
    rows = []
    for cls in np.unique(c.cluster_class):
        ks = np.flatnonzero(c.cluster_class == cls)
        rows.append([int(cls), len(ks), int(sizes[ks].sum()), ", ".join(str(int(s)) for s in sizes[ks])])
    return out + _table(["class", "clusters", "samples", "cluster sizes"], rows)


def _listed(run: Run, kind: str, legacy: Callable[[str], bool]) -> list[str]:
    """The names of a kind of result as the run's results index lists them, plus those made before
    their writer indexed them (older runs): recorded .safetensors artifacts that `legacy` accepts."""
    names = {r.name for r in run.store.index(kind)}
    names |= {
        a[: -len(".safetensors")]
        for a in run.store.manifest["artifacts"]
        if a.endswith(".safetensors") and legacy(a) and run.store.has(a)
    }
    return sorted(names)


def _synsets(run: Run) -> list[str]:
    """The run's synsets (artifact names without suffix): indexed, or a synset/ tensors artifact
    with its JSON beside it."""
    return _listed(
        run, SYNSET, lambda a: a.startswith("synset/") and run.store.has(a[: -len("safetensors")] + "json")
    )


def _synset_labels(run: Run, keys: list[str]) -> dict[str, list[str]]:
    """The presets (or custom settings) whose distillation stage made each synset, from the results
    index; a stage recorded before the index names its synset among its artifacts, and one older
    still is matched by its matching cosines."""
    labels: dict[str, list[str]] = {k: [] for k in keys}
    indexed = run.store.index(DISTILLATION)
    for r in indexed:
        labels.setdefault(r.identity.get("synset", ""), []).append(str(r.info.get("label", r.name)))
    done = {r.name for r in indexed}
    old = {
        s: v for s, v in run.store.manifest["stages"].items() if s.startswith("distill-") and s not in done
    }
    for stage, v in old.items():
        label = stage[len("distill-") :]
        if "artifacts" in v:
            for key in keys:
                if f"{key}.safetensors" in v["artifacts"]:
                    labels[key].append(label)
        elif v.get("layer_cosine") is not None:
            for key in keys:
                info = run.store.load_json(key) if run.store.has(f"{key}.json") else {}
                if info.get("layer_cosine") == v["layer_cosine"]:
                    labels[key].append(label)
    return {k: sorted(v) for k, v in labels.items()}


def _distillation(run: Run) -> str:
    from .figures import bar_png, synset_grid_png
    from .synset import Synset

    keys = _synsets(run)
    if not keys:
        return _missing("Synsets", "Run <code>distdm distill RUN --preset default</code>.")
    labels = _synset_labels(run, keys)
    out = []
    for key in keys:

        def one(key: str = key) -> str:
            syn = Synset.from_tensors(run.store.load_tensors(key), run.store.load_json(key))
            info = syn.info
            label = labels.get(key, [])
            cfg = info.get("config", {})
            parts = [
                f"<h3>synset {_e(key.split('/', 1)[1])}"
                + (f" (preset {_e(', '.join(label))})" if label else "")
                + "</h3>"
            ]
            parts.append(
                f"<p>{syn.n_clusters} clusters x {syn.ipc} synthetic samples ({syn.nbytes() / 1e3:.1f} kB); "
                f"target <b>{_e(cfg.get('target', '?'))}</b>, online fine-tune: {syn.steps} step(s) of "
                f"lr {syn.lr:g}; distilled in {_fmt(float(info.get('seconds', float('nan'))))} s.</p>"
            )
            cos = info.get("layer_cosine") or {}
            if cos:
                bad = [k for k, v in cos.items() if v <= 0]
                rows = [
                    [k, f'<span class="bad">{v:.3f}</span>' if v <= 0 else f"{v:.3f}"] for k, v in cos.items()
                ]
                parts.append(
                    "<p>Matching cosine per layer (1 is a perfect match; &le; 0 means fine-tuning on the "
                    "synset does not emulate removal in that layer):</p>"
                )
                parts.append(_table(["layer", "matching cosine"], rows, raw=True))
                if bad:
                    parts.append(f'<p class="bad">Not matched (cosine &le; 0): {_e(", ".join(bad))}.</p>')
                parts.append(
                    _img(
                        bar_png(list(cos), list(cos.values()), "matching cosine per layer", "cosine"),
                        "matching cosine per layer",
                    )
                )
            f = info.get("forgetting") or {}
            if f:
                parts.append(
                    _table(
                        ["test accuracy of", "value"],
                        [
                            ["theta_0 (initialisation)", f.get("acc_theta0")],
                            ["target model", f.get("acc_target")],
                            ["target fine-tuned on the whole synset", f.get("acc_after_whole_synset")],
                        ],
                    )
                )
                parts.append(
                    '<p class="note">Fine-tuning on every cluster\'s synset emulates removing all data, '
                    "so its accuracy should fall towards that of theta_0.</p>"
                )
            hist = info.get("loss_history") or []
            if len(hist) > 1:
                parts.append(
                    _img(
                        _line_png([float(h) for h in hist], "distillation loss", "step (subsampled)", "loss"),
                        "distillation loss",
                    )
                )
            clusters = _clusters_for(run, syn.n_clusters)
            if clusters is not None:
                grid = synset_grid_png(syn, run.data.x_train, clusters)
                if grid:
                    parts.append("<p>Synthetic samples beside real members of the same cluster:</p>")
                    parts.append(_img(grid, "synset grid"))
            return "".join(parts)

        out.append(_guard(f"synset {key}", one))
    return "".join(out)


def _clusters_for(run: Run, n: int) -> Clusters | None:
    if run.store.is_done("cluster") and run.clusters().n_clusters == n:
        return run.clusters()
    if not run.data.is_regression and classwise(run.data.y_train).n_clusters == n:
        return classwise(run.data.y_train)
    return None


def _attributions(run: Run) -> tuple[str, set[str]]:
    from .figures import heatmap_png

    names = _listed(run, SCORES, lambda a: a.startswith("attribution/"))
    if not names:
        return _missing("Attribution scores", "Run <code>distdm attribute RUN --method ddm</code>."), set()
    if not run.store.is_done("cluster"):
        return _missing("Clusters", "Run <code>distdm cluster RUN</code>."), set()
    clusters = run.clusters()
    shown: set[str] = set()
    out = [f'<p class="note">{_e(SIGN_CONVENTION)}.</p>']
    for name in names:
        tag = name.split("/", 1)[1]

        def one(name: str = name, tag: str = tag) -> str:
            t = run.store.load_tensors(name)
            if "scores" not in t or "queries" not in t:
                raise DistdmError(f"artifact {name} has no 'scores' and 'queries' tensors")
            values = t["scores"].double().numpy()
            idx = t["queries"].long().numpy()
            if (
                values.shape != (clusters.n_clusters, len(idx))
                or (idx < 0).any()
                or (idx >= len(run.data.y_test)).any()
            ):
                raise DistdmError(f"artifact {name} does not fit this run's clusters and test set")
            y = run.data.y_test[idx].numpy()
            parts = [f"<h3>{_e(tag)}</h3>"]
            m = min(len(idx), MAX_HEATMAP_QUERIES)
            parts.append(_img(heatmap_png(values[:, :m], clusters, y[:m], tag), f"heatmap {tag}"))
            if m < len(idx):
                parts.append(f'<p class="note">Heatmap of the first {m} of {len(idx)} queries.</p>')
            order = np.argsort(-values, axis=0, kind="stable")[:TOP_K]
            sizes = clusters.sizes()
            rows = []
            for q in range(len(idx)):
                cells = [
                    f"{int(k)} (class {clusters.cluster_class[k]}, {sizes[k]}): {values[k, q]:+.3g}"
                    for k in order[:, q]
                ]
                rows.append([int(idx[q]), int(y[q]), *cells])
            parts.append(
                f"<p>Top {TOP_K} clusters per query, by largest score: the clusters whose removal would "
                "increase the objective most (cluster (class, size): score):</p>"
            )
            parts.append(_table(["test index", "label", *[f"#{i + 1}" for i in range(TOP_K)]], rows))
            nq = min(TOP_QUERIES, len(idx))
            png = top_clusters_png(
                values[:, :nq], run.data.x_test[idx[:nq]], y[:nq], run.data.x_train, clusters
            )
            if png:
                parts.append(
                    f"<p>The first {nq} queries and example members of their top {TOP_K} clusters:</p>"
                )
                parts.append(_img(png, f"top clusters {tag}"))
            shown.add(f"figures/{tag}.png")
            return "".join(parts)

        out.append(_guard(f"attribution {tag}", one))
    return "".join(out), shown


# evaluation tables and figures: whatever evaluate/benchmarks/the CLI left in the run directory


def markdown_to_html(text: str) -> str:
    """Markdown (as the evaluation and application writers produce it: headings, paragraphs, GitHub
    tables, lists, code) as HTML, parsed by markdown-it; tables go through the report's own table
    markup (numbers right-aligned, intervals on their own line), inline text is shown as written."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark", {"html": False}).enable("table").parse(text)
    out: list[str] = []
    table: list[list[str]] | None = None  # rows of the table being read; the first is its header
    for t in tokens:
        if t.type == "table_open":
            table = []
        elif t.type == "table_close" and table is not None:
            out.append(_table(table[0], table[1:]))
            table = None
        elif table is not None:
            if t.type == "tr_open":
                table.append([])
            elif t.type == "inline":
                table[-1].append(t.content)
        elif t.type == "inline":
            out.append(_e(t.content).replace("\n", "<br>"))  # a line break in the source stays one
        elif t.type in ("heading_open", "heading_close"):
            out.append("<h4>" if t.type == "heading_open" else "</h4>")
        elif t.type in ("paragraph_open", "paragraph_close") and not t.hidden:
            out.append("<p>" if t.type == "paragraph_open" else "</p>")
        elif t.type.endswith(("list_open", "list_close", "item_open", "item_close")):
            out.append(f"<{'/' if t.nesting < 0 else ''}{t.tag}>")
        elif t.type in ("fence", "code_block"):
            out.append(f"<pre>{_e(t.content)}</pre>")
        elif t.type == "hr":
            out.append("<hr>")
    return "".join(out)


def csv_to_html(text: str) -> str:
    """A CSV table as HTML."""
    rows = list(csv.reader(io.StringIO(text)))
    return _table(rows[0], rows[1:]) if rows else ""


def _evaluation(run: Run, skip: set[str], report: Path) -> str:
    root = run.store.root
    artifacts = run.store.manifest["artifacts"]
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix in (".md", ".csv", ".png") and not p.name.startswith(".")
        and p.resolve() != report.resolve()
    )  # fmt: skip
    # the applications' sections show their own outputs; corrupted/<tag> holds the noise
    # application's corrupted copies of the run, whose results it reports itself
    regenerated = re.compile(r"^figures/(synset|matching)-|^corrupted/|^applications/(" + _APP_DIRS + r")/")
    stems_with_md = {p.with_suffix("") for p in files if p.suffix == ".md"}
    out = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        if (
            rel in skip
            or regenerated.match(rel)
            or (p.suffix == ".csv" and p.with_suffix("") in stems_with_md)
        ):
            continue

        def one(p: Path = p, rel: str = rel) -> str:
            data, note = _read(run, p, rel, artifacts)
            head = f"<h3>{_e(rel)}{note}</h3>"
            if p.suffix == ".png":
                return head + _img(data, rel)
            text = data.decode("utf-8", errors="replace")
            return head + (markdown_to_html(text) if p.suffix == ".md" else csv_to_html(text))

        out.append(_guard(rel, one))
    if not out:
        return _missing(
            "Evaluation against exact retraining",
            "Run <code>distdm evaluate RUN</code>, or save an evaluation into the run directory with "
            "<code>distdm.evaluate.evaluate(...).save(RUN / 'evaluation')</code>.",
        )
    return "".join(out)


def _verification(run: Run) -> str:
    """The stored trust checks (distdm.verify): one row per check, verdict and cost beside it."""
    from .verify import VERDICT_RULES, VERIFY_DIR

    names = sorted(n for n in run.store.manifest["artifacts"] if n.startswith(f"{VERIFY_DIR}/"))
    if not names:
        # a check is optional for every answer, not a stage the run lacks: no "not computed yet" here
        return (
            '<p class="missing">No trust check stored in this run. To check an answer against exact '
            "retraining, run <code>distdm attribute RUN --verify 8</code> or <code>distdm evaluate RUN "
            "--verify 8</code>, or <code>run.verify(...)</code> in Python.</p>"
        )

    def iv(d: dict[str, Any]) -> str:
        if d.get("mean") is None:
            return "-"
        if d.get("low") is None or d.get("high") is None:
            return f"{d['mean']:.3f}"
        return f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"

    header = ["method", "objective", "clusters", "queries", "agreement (Spearman)", "signs agree",
              "retraining vs itself (Spearman)", "signs agree (seeds)", "verdict", "cost"]  # fmt: skip
    rows, why = [], []
    for n in names:
        c = run.store.load_json(n)
        rows.append([
            c["method"], c["objective"], len(c["clusters"]), c["n_queries"], iv(c["agreement"]),
            iv(c["sign_agreement"]), iv(c["reproducibility"]), iv(c["sign_reproducibility"]),
            c["verdict"], c["cost"],
        ])  # fmt: skip
        why.append(f"<li><b>{_e(c['method'])}</b> ({_e(c['objective'])}): {_e(c['explanation'])}</li>")
    lead = (
        '<p class="lead">Each check retrains a few randomly chosen clusters out with two seeds: the '
        "agreement says whether the method's scores rank them as exact retraining does (for the "
        "explained model's seed); retraining vs itself says whether the question has a stable answer "
        "at all. Means over queries with 95% Student-t intervals.</p>"
    )
    return (
        lead + _table(header, rows, numeric=False) + f"<ul>{''.join(why)}</ul>"
        f'<p class="source">verdict rules: {_e(VERDICT_RULES)}</p>'
    )


def _read(run: Run, p: Path, rel: str, artifacts: dict[str, Any]) -> tuple[bytes, str]:
    """A file's bytes (checked against the manifest when recorded there) and a note when it is not."""
    if rel in artifacts:
        return run.store.load_bytes(rel), ""
    return p.read_bytes(), ' <span class="note">(not recorded in the manifest: no checksum)</span>'


# applications: one section each, with a caption per known output file -------------------------

_APP_DIRS = r"diagnose|diagnose-[^/]+|transfer|unlearn|privacy"
_CORRUPTION = re.compile(r"^(noise|labels)([0-9.e-]+)(?:-norm([0-9.e-]+))?-seed(\d+)$")


def _corruption_title(tag: str) -> str:
    """'noise0.2-norm0.1-seed0' -> 'Gaussian noise of norm 0.1 on 20% of the training samples (seed 0)'."""
    m = _CORRUPTION.match(tag)
    if not m:
        return tag
    kind, frac, norm, seed = m.groups()
    what = f"Gaussian noise of norm {norm}" if kind == "noise" else "Flipped labels"
    try:
        share = f"{100 * float(frac):g}%"
    except ValueError:
        share = frac
    return f"{what} on {share} of the training samples (seed {seed})"


def _caption(name: str) -> str:
    """A heading for one application output file, from its name."""
    stem = name.rsplit(".", 1)[0]
    fixed = {
        "diagnose.md": "Test accuracy and validation loss after removing the highest-ranked data",
        "diagnose-curve.png": "Test accuracy against the share of training data removed",
        "diagnose.json": "Most harmful clusters",
        "report.md": "Accuracy after removing ranked data, and detection of the corrupted samples",
        "transfer.md": "Student test accuracy after deleting data",
        "transfer-curve.png": "Student test accuracy against the share of training data deleted",
        "forgetting.md": "Test accuracy after fine-tuning on the whole synset (forgetting everything)",
        "metrics.json": "Nearest real training image of each synthetic sample; membership inference",
        "nearest-real.png": "Synthetic samples beside their nearest real training images",
    }
    if name in fixed:
        return fixed[name]
    m = re.match(r"^diagnose-flagged-(.+)\.png$", name)
    if m:
        return f"Members of the most harmful clusters by {m.group(1)}"
    m = re.match(r"^clusters-([0-9-]+)-(.+)\.md$", name)
    if m:
        ids = ", ".join(m.group(1).split("-"))
        return (
            f"Removing cluster{'s' if ',' in ids else ''} {ids} by fine-tuning on the '{m.group(2)}' synset"
        )
    return stem.replace("-", " ").replace("_", " ")


def _records_table(records: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in records:
        cols += [k for k in r if k not in cols]
    return _table(cols, [[r.get(c, "") for c in cols] for r in records])


def _json_body(name: str, data: bytes) -> str | None:
    """The readable part of an application's JSON output (None: nothing worth showing)."""
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as e:
        raise DistdmError(f"not valid JSON ({e})") from None
    if name == "diagnose.json" and isinstance(obj, dict) and isinstance(obj.get("rankings"), dict):
        parts = []
        for method, ranking in obj["rankings"].items():
            if isinstance(ranking, list) and ranking and isinstance(ranking[0], dict):
                parts.append(
                    f"<p>By {_e(method)}, the 10 clusters whose removal lowers the validation loss most:</p>"
                )
                parts.append(_records_table(ranking[:10]))
        return "".join(parts) or None
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        return _records_table(obj)
    return None


def _app_files(run: Run, files: list[Path], report: Path, level: str = "h3") -> str:
    """Every readable output of one application folder, under a caption instead of its path."""
    root = run.store.root
    artifacts = run.store.manifest["artifacts"]
    names = {p.name for p in files}
    order = {".md": 0, ".json": 1, ".png": 2, ".csv": 3}
    out = []
    for p in sorted(files, key=lambda p: (order.get(p.suffix, 9), p.name)):
        rel = p.relative_to(root).as_posix()
        if p.suffix not in order or p.resolve() == report.resolve():
            continue
        if p.suffix == ".csv" and (p.with_suffix(".md").name in names or "report.md" in names):
            continue  # the markdown twin (or the noise report) shows the same table
        if p.name == "diagnose.md" and "report.md" in names:
            continue  # the noise report includes the diagnosis tables

        def one(p: Path = p, rel: str = rel) -> str:
            data, note = _read(run, p, rel, artifacts)
            if p.suffix == ".json":
                body = _json_body(p.name, data)
                if body is None:
                    return ""
            elif p.suffix == ".png":
                body = _img(data, _caption(p.name))
            else:
                text = data.decode("utf-8", errors="replace")
                body = markdown_to_html(text) if p.suffix == ".md" else csv_to_html(text)
            return (
                f"<{level}>{_e(_caption(p.name))}</{level}>{body}"
                f'<p class="source">from <code>{_e(rel)}</code>{note}</p>'
            )

        out.append(_guard(_caption(p.name), one))
    return "".join(out)


def _app_folders(run: Run, sid: str) -> dict[str, list[Path]]:
    """One application's output files by folder (keyed by the corruption tag for 'noise', else the
    folder name), as the results index lists them. A folder no indexed result names (made before
    the applications were indexed) is read whole, the noise copies found by their folder names."""
    root = run.store.root
    apps = root / "applications"
    out: dict[str, set[Path]] = {}
    indexed: set[Path] = set()
    entries: list[Result] = [r for r in run.store.index(APPLICATION) if r.info.get("application") == sid]
    for r in entries:
        paths = [root / f for f in r.files]
        indexed.update(p.parent for p in paths)
        key = str(r.info.get("corruption")) if sid == "noise" else sid
        out.setdefault(key, set()).update(paths)
    legacy = sorted(apps.glob("diagnose-*")) if sid == "noise" else [apps / sid]
    for folder in legacy:
        if folder.is_dir() and folder not in indexed:
            key = folder.name[len("diagnose-") :] if sid == "noise" else sid
            found = (p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
            out.setdefault(key, set()).update(found)
    return {k: sorted(v) for k, v in sorted(out.items())}


def _application(run: Run, sid: str, report: Path) -> str:
    """The section of one application: what it asks, then its outputs, or how to compute them."""
    _, title, _, lead, command = next(a for a in APPLICATIONS if a[0] == sid)
    bodies = []
    for tag, files in _app_folders(run, sid).items():
        body = _app_files(run, files, report, "h4" if sid == "noise" else "h3")
        if body and sid == "noise":
            body = f'<h3 class="corruption">{_e(_corruption_title(tag))}</h3>{body}'
        bodies.append(body)
    if not any(bodies):
        return f'<p class="lead">{_e(lead)}</p>' + _missing(title, f"Run <code>{command}</code>.")
    return f'<p class="lead">{_e(lead)}</p>' + "".join(bodies)


# the report ----------------------------------------------------------------------------------


def render_report(run: Run, report_path: Path | None = None) -> str:
    """The report's HTML text for a Run (see `write_report`)."""
    report_path = report_path or run.store.root / REPORT_NAME
    attribution, shown = _attributions(run)
    bodies = {
        "overview": _guard("overview", lambda: _overview(run)),
        "settings": _guard("settings", lambda: _settings(run)),
        "timings": _guard("timings", lambda: _timings(run)),
        "clusters": _guard("clusters", lambda: _clusters(run)),
        "distillation": _guard("distillation", lambda: _distillation(run)),
        "attribution": attribution,
        "evaluation": _guard("evaluation", lambda: _evaluation(run, shown, report_path)),
        "verification": _guard("trust checks", lambda: _verification(run)),
    }
    for sid, *_ in APPLICATIONS:
        bodies[sid] = _guard(sid, lambda sid=sid: _application(run, sid, report_path))
    nav = "".join(f'<a href="#{sid}">{_e(NAV.get(sid, title))}</a>' for sid, title in SECTIONS)
    sections = "".join(
        f'<section id="{sid}"><h2>{_e(title)}</h2>{bodies[sid]}</section>' for sid, title in SECTIONS
    )
    title = f"distdm report: {run.store.root.name}"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p>{_e(run.data.name)} / {_e(run.model_name)} &mdash; "
        "training data attribution with distdm</p></header>"
        f"<nav>{nav}</nav><main>{sections}</main></body></html>\n"
    )


def write_report(run: Run, path: str | os.PathLike | None = None) -> Path:
    """Write a single self-contained HTML report of the run (default RUN/report.html); returns its path."""
    target = Path(path) if path is not None else run.store.root / REPORT_NAME
    text = render_report(run, target).encode("utf-8")
    if path is None:
        return run.store.save_file(REPORT_NAME, text)
    atomic_write_bytes(target, text)
    return target


__all__ = ["csv_to_html", "markdown_to_html", "render_report", "top_clusters_png", "write_report"]
