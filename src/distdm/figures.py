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


def _as_image(x: torch.Tensor) -> np.ndarray | None:
    a = x.detach().cpu().numpy()
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else np.moveaxis(a[:3], 0, -1)
    elif a.ndim == 1:
        side = math.isqrt(a.shape[0])
        if side * side != a.shape[0]:
            return None
        a = a.reshape(side, side)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo + 1e-12)


def heatmap_png(values: np.ndarray, clusters: Clusters, query_labels: np.ndarray, title: str) -> bytes:
    """Heatmap of scores (clusters x queries), clusters grouped by class, queries sorted by label."""
    order_q = np.argsort(query_labels, kind="stable")
    order_k = np.argsort(clusters.cluster_class, kind="stable")
    v = values[np.ix_(order_k, order_q)]
    lim = float(np.nanmax(np.abs(v))) or 1.0
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.25 * v.shape[1]), min(12, 2 + 0.08 * v.shape[0])))
    im = ax.imshow(v, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_xlabel("query (sorted by true class)")
    ax.set_ylabel("cluster (grouped by class)")
    ax.set_xticks(range(len(order_q)))
    ax.set_xticklabels([str(int(c)) for c in np.asarray(query_labels)[order_q]], fontsize=6)
    bounds = np.flatnonzero(np.diff(clusters.cluster_class[order_k])) + 0.5
    for b in bounds:
        ax.axhline(b, color="k", lw=0.4)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="score (objective change when the cluster is removed)")
    return _png(fig)


def synset_grid_png(
    synset: Synset, x_train: torch.Tensor, clusters: Clusters, *, n_clusters: int = 10, n_real: int = 4
) -> bytes | None:
    """Grid: for some clusters, the synthetic samples beside real members (None for non-images)."""
    if _as_image(x_train[0]) is None:
        return None
    ks = np.linspace(0, clusters.n_clusters - 1, min(n_clusters, clusters.n_clusters)).astype(int)
    ipc = synset.ipc
    cols = ipc + n_real
    fig, axes = plt.subplots(len(ks), cols, figsize=(1.1 * cols, 1.1 * len(ks)), squeeze=False)
    for r, k in enumerate(ks):
        syn = synset.x[synset.cluster == k]
        real = x_train[clusters.members(k)[:n_real]]
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            src = syn[c] if c < ipc else (real[c - ipc] if c - ipc < len(real) else None)
            if src is not None:
                ax.imshow(_as_image(src), cmap="gray")
            if r == 0:
                ax.set_title("synthetic" if c < ipc else "real", fontsize=7)
        axes[r, 0].text(-0.5, 0.5, f"k={k}\nc={clusters.cluster_class[k]}", transform=axes[r, 0].transAxes,
                        ha="right", va="center", fontsize=7)  # fmt: skip
    return _png(fig)


def bar_png(labels: list[str], values: list[float], title: str, xlabel: str) -> bytes:
    """A horizontal bar chart (e.g. per-layer matching cosine)."""
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(labels) + 1))
    ax.barh(labels, values, color=["tab:red" if v <= 0 else "tab:blue" for v in values])
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _png(fig)
