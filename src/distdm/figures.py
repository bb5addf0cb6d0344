"""Figures a person would rather look at than read: attribution heatmaps and synset grids (PNG)."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .clusters import Clusters  # noqa: E402
from .synset import Synset  # noqa: E402


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# colour scales end at this percentile of |value|, so one extreme cell cannot wash out the rest
CLIP_PERCENTILE = 99.0
# each image is shown over its own robust range: a few outlier pixels saturate instead
PIXEL_PERCENTILES = (5.0, 95.0)


def robust_limit(values: np.ndarray | list[np.ndarray], percentile: float = CLIP_PERCENTILE) -> float:
    """The symmetric colour limit of a heatmap: the `percentile`-th percentile of |value| over all
    finite values (the nearest value at or below it, so a single extreme cell never sets the scale);
    1.0 when every value is zero or none is finite."""
    arrays = values if isinstance(values, list) else [values]
    a = np.abs(np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in arrays]))
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 1.0
    lim = float(np.percentile(a, percentile, method="lower"))
    return lim if lim > 0 else (float(a.max()) or 1.0)


def _as_image(x: torch.Tensor) -> np.ndarray | None:
    """An input as an image in [0, 1], scaled to its own 5th-95th percentile range (so a few bright
    pixels do not turn the rest black); None when the input is not an image."""
    a = x.detach().cpu().float().numpy()
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else np.moveaxis(a[:3], 0, -1)
    elif a.ndim == 1:
        side = math.isqrt(a.shape[0])
        if side * side != a.shape[0]:
            return None
        a = a.reshape(side, side)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros_like(a)
    lo = float(np.percentile(finite, PIXEL_PERCENTILES[0], method="higher"))
    hi = float(np.percentile(finite, PIXEL_PERCENTILES[1], method="lower"))
    if hi <= lo:  # (nearly) constant apart from a few pixels: fall back to the full range
        lo, hi = float(finite.min()), float(finite.max())
    return np.clip((np.nan_to_num(a, nan=lo) - lo) / (hi - lo + 1e-12), 0.0, 1.0)


def _clip_label(values: list[np.ndarray], lim: float, what: str, percentile: float) -> tuple[str, str]:
    finite = [np.abs(v[np.isfinite(v)]) for v in values]
    clipped = any(f.size and float(f.max()) > lim for f in finite)
    if not clipped:
        return what, "neither"
    return f"{what}\n(colours clipped at the {percentile:g}th pct of |score| = {lim:.3g})", "both"


def heatmaps_figure(
    panels: list[tuple[np.ndarray, str]],
    clusters: Clusters,
    query_labels: np.ndarray,
    *,
    percentile: float = CLIP_PERCENTILE,
    title: str | None = None,
) -> plt.Figure:
    """Side-by-side heatmaps (clusters x queries) on ONE symmetric colour scale, clipped at the
    `percentile`-th percentile of |score| over all panels; clusters grouped by class, queries by label."""
    if not panels:
        raise ValueError("heatmaps_figure needs at least one (values, title) panel")
    order_q = np.argsort(query_labels, kind="stable")
    order_k = np.argsort(clusters.cluster_class, kind="stable")
    vs = [np.asarray(v, dtype=np.float64)[np.ix_(order_k, order_q)] for v, _ in panels]
    lim = robust_limit(vs, percentile)
    nq, nk = vs[0].shape[1], vs[0].shape[0]
    width = min(9.0, 1.5 + 0.22 * nq)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(width * len(panels) + 1.2, min(12, 2.2 + 0.08 * nk)), squeeze=False,
        sharey=True, layout="constrained",
    )  # fmt: skip
    row_class = clusters.cluster_class[order_k]
    bounds = np.flatnonzero(np.diff(row_class)) + 0.5
    # rows are reordered, so their positions are no cluster ids: label each class group instead
    edges = np.concatenate([[-0.5], bounds, [nk - 0.5]])
    centres, groups = (
        (edges[:-1] + edges[1:]) / 2,
        row_class[np.concatenate([[0], (bounds + 0.5).astype(int)])],
    )
    labels = [str(int(c)) for c in np.asarray(query_labels)[order_q]]
    im = None
    for ax, v, (_, name) in zip(axes[0], vs, panels, strict=True):
        im = ax.imshow(v, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_xlabel("query (sorted by true class)")
        ax.set_xticks(range(nq))
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_yticks(centres)
        ax.set_yticklabels([str(int(c)) for c in groups], fontsize=7 if len(groups) <= 30 else 4)
        for b in bounds:
            ax.axhline(b, color="k", lw=0.4)
        own = robust_limit(v, percentile)
        if len(panels) > 1 and own < lim / 10:  # say why a panel looks blank on the shared scale
            name = f"{name}\n(faint on this shared scale: its |score| 99th pct is {own:.3g})"
        ax.set_title(name)
    axes[0, 0].set_ylabel("clusters, grouped by class")
    label, extend = _clip_label(vs, lim, "score (objective change when the cluster is removed)", percentile)
    fig.colorbar(im, ax=list(axes[0]), label=label, extend=extend, shrink=0.9)
    if title:
        fig.suptitle(title)
    return fig


def heatmaps_png(
    panels: list[tuple[np.ndarray, str]],
    clusters: Clusters,
    query_labels: np.ndarray,
    *,
    percentile: float = CLIP_PERCENTILE,
    title: str | None = None,
) -> bytes:
    """PNG of side-by-side heatmaps on one shared, clipped colour scale (see `heatmaps_figure`)."""
    return _png(heatmaps_figure(panels, clusters, query_labels, percentile=percentile, title=title))


def heatmap_png(values: np.ndarray, clusters: Clusters, query_labels: np.ndarray, title: str) -> bytes:
    """Heatmap of scores (clusters x queries), clusters grouped by class, queries sorted by label;
    the colour scale is clipped at the 99th percentile of |score| (said on the colour bar)."""
    return heatmaps_png([(values, title)], clusters, query_labels)


SYNSET_GRID_TITLE = "Synthetic samples (synset) beside real members of the same cluster"


def synset_grid_png(
    synset: Synset,
    x_train: torch.Tensor,
    clusters: Clusters,
    *,
    n_clusters: int = 10,
    n_real: int = 4,
    title: str = SYNSET_GRID_TITLE,
) -> bytes | None:
    """Grid: for some clusters, the synthetic samples beside real members (None for non-images).
    Each image is scaled to its own robust range; a legend explains the row labels."""
    fig = synset_grid_figure(synset, x_train, clusters, n_clusters=n_clusters, n_real=n_real, title=title)
    return None if fig is None else _png(fig)


def synset_grid_figure(
    synset: Synset,
    x_train: torch.Tensor,
    clusters: Clusters,
    *,
    n_clusters: int = 10,
    n_real: int = 4,
    title: str = SYNSET_GRID_TITLE,
) -> plt.Figure | None:
    """The figure of `synset_grid_png` (None for non-image inputs)."""
    if _as_image(x_train[0]) is None:
        return None
    ks = np.linspace(0, clusters.n_clusters - 1, min(n_clusters, clusters.n_clusters)).astype(int)
    ipc = synset.ipc
    cols = ipc + n_real
    sizes = clusters.sizes()
    fig, axes = plt.subplots(
        len(ks), cols, figsize=(max(4.2, 1.1 * cols + 0.8), 1.1 * len(ks) + 1.3), squeeze=False
    )
    for r, k in enumerate(ks):
        syn = synset.x[synset.cluster == k]
        real = x_train[clusters.members(k)[:n_real]]
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            src = (
                syn[c] if c < ipc and c < len(syn) else (real[c - ipc] if 0 <= c - ipc < len(real) else None)
            )
            if src is not None:
                ax.imshow(_as_image(src), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                if c == ipc - 1:  # a line between the synthetic and the real images
                    ax.spines["right"].set_visible(True)
                    ax.spines["right"].set_color("tab:blue")
                    ax.spines["right"].set_linewidth(2)
            if r == 0:
                ax.set_title(
                    "synthetic" if c < ipc else "real", fontsize=8, color="tab:blue" if c < ipc else "k"
                )
        axes[r, 0].set_ylabel(
            f"k={k} c={clusters.cluster_class[k]}\n(n={sizes[k]})",
            fontsize=7,
            rotation=0,
            ha="right",
            va="center",
        )
    fig.suptitle(title, fontsize=10)
    fig.text(
        0.5, 0.005,
        f"Each row is one cluster: k = cluster id, c = its class, n = its size. Left: the {ipc} synthetic "
        f"sample(s)\ndistilled for it; right: real training members. Each image is scaled to its own "
        f"{PIXEL_PERCENTILES[0]:g}th-{PIXEL_PERCENTILES[1]:g}th percentile range.",
        ha="center", va="bottom", fontsize=7, color="#444",
    )  # fmt: skip
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return fig


def bar_png(labels: list[str], values: list[float], title: str, xlabel: str) -> bytes:
    """A horizontal bar chart (e.g. per-layer matching cosine)."""
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(labels) + 1))
    ax.barh(labels, values, color=["tab:red" if v <= 0 else "tab:blue" for v in values])
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _png(fig)
