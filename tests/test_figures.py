"""Figures that stay readable: colour scales that one extreme cell cannot wash out, side-by-side
heatmaps on one scale, and synset grids where each image keeps its own contrast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distdm.clusters import Clusters
from distdm.figures import (
    _as_image,
    heatmap_png,
    heatmaps_figure,
    heatmaps_png,
    robust_limit,
    synset_grid_figure,
    synset_grid_png,
)
from distdm.synset import Synset

PNG = b"\x89PNG\r\n\x1a\n"


def _clusters(k_per_class: int = 2, classes: int = 3, per_cluster: int = 4) -> Clusters:
    k = k_per_class * classes
    return Clusters(np.repeat(np.arange(k), per_cluster), np.repeat(np.arange(classes), k_per_class), "test")


def test_one_extreme_cell_does_not_change_the_colour_scale():
    ones = np.ones((3, 3))
    assert robust_limit(ones) == 1.0
    spike = ones.copy()
    spike[1, 2] = -1e6
    assert robust_limit(spike) == 1.0  # 9 cells: the 99th percentile (at or below) is the 2nd largest
    # closed form for distinct values: |v| = 1..200 with the smallest cell replaced by an extreme one;
    # the limit is the value at index floor(0.99 * 199) = 197 of the sorted |v|: 2..200 -> 199
    v = np.arange(1, 201, dtype=float).reshape(20, 10) * np.where(np.arange(200) % 2, 1, -1).reshape(20, 10)
    assert robust_limit(v) == 198.0
    v[0, 0] = 1e9
    assert robust_limit(v) == 199.0
    assert robust_limit(v, percentile=100) == 1e9


def test_colour_limit_of_degenerate_values():
    assert robust_limit(np.zeros((4, 4))) == 1.0
    assert robust_limit(np.full((2, 2), np.nan)) == 1.0
    nan_and_one = np.array([[np.nan, np.inf], [0.5, -2.0]])
    assert robust_limit(nan_and_one) == 0.5  # of the finite |v| {0.5, 2}: index floor(0.99) = 0
    mostly_zero = np.zeros((10, 10))
    mostly_zero[0, 0] = 3.0
    assert robust_limit(mostly_zero) == 3.0  # a percentile of 0 would leave nothing to see


def test_side_by_side_heatmaps_share_one_clipped_colour_scale():
    cl = _clusters()
    rng = np.random.default_rng(0)
    small = rng.normal(size=(cl.n_clusters, 8))
    big = 3 * rng.normal(size=(cl.n_clusters, 8))
    big[2, 3] = 1e6  # one extreme cell
    labels = np.array([2, 0, 1, 2, 0, 1, 0, 2])
    fig = heatmaps_figure([(small, "DDM"), (big, "exact")], cl, labels)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2 and [ax.get_title() for ax in fig.axes if ax.images] == ["DDM", "exact"]
    lim = robust_limit([small, big])
    assert all(im.get_clim() == (-lim, lim) for im in images)  # one scale for both
    assert lim < 100  # the extreme cell is clipped, not the scale
    bars = [ax for ax in fig.axes if not ax.images]
    assert len(bars) == 1  # one colour bar for both panels
    label = bars[0].get_ylabel()
    assert "clipped at the 99th pct of |score|" in label and f"{lim:.3g}" in label
    # rows are grouped by class and columns sorted by label, in both panels alike
    order_k, order_q = np.argsort(cl.cluster_class, kind="stable"), np.argsort(labels, kind="stable")
    np.testing.assert_array_equal(images[1].get_array(), big[np.ix_(order_k, order_q)])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0", "1", "2"]  # class groups
    # a panel whose scores are far smaller than the shared scale says so instead of looking blank
    faint = heatmaps_figure([(small / 1000, "tiny"), (big, "exact")], cl, labels)
    assert faint.axes[0].get_title().startswith("tiny\n(faint on this shared scale: its |score| 99th pct")
    assert faint.axes[1].get_title() == "exact"


def test_an_unclipped_heatmap_says_nothing_about_clipping():
    cl = _clusters()
    v = np.ones((cl.n_clusters, 4))
    fig = heatmaps_figure([(v, "flat")], cl, np.zeros(4))
    (bar,) = [ax for ax in fig.axes if not ax.images]
    assert bar.get_ylabel() == "score (objective change when the cluster is removed)"
    assert heatmap_png(v, cl, np.zeros(4), "one").startswith(PNG)
    assert heatmaps_png([(v, "a"), (-v, "b")], cl, np.zeros(4), title="t").startswith(PNG)
    with pytest.raises(ValueError, match="at least one"):
        heatmaps_figure([], cl, np.zeros(4))


def test_each_image_keeps_its_contrast_despite_one_bright_pixel():
    img = torch.linspace(0, 1, 64)
    bright = img.clone()
    bright[10] = 1000.0
    out = _as_image(bright)
    rest = np.delete(out.reshape(-1), 10)
    # min-max scaling would squash the rest into [0, 0.001]: here it spans nearly the whole range
    assert out.shape == (8, 8) and out.reshape(-1)[10] == 1.0
    assert rest.max() - rest.min() > 0.9 and np.corrcoef(rest, np.delete(img.numpy(), 10))[0, 1] > 0.99
    assert _as_image(torch.ones(3, 4, 4)).shape == (4, 4, 3) and _as_image(torch.ones(10)) is None
    assert np.isfinite(_as_image(torch.full((16,), float("nan")))).all()


def test_synset_grid_has_a_title_a_legend_and_per_image_contrast():
    cl = _clusters()
    g = torch.Generator().manual_seed(0)
    x_train = torch.rand(len(cl.assignment), 64, generator=g)
    x_train[0, 5] = 1e4  # one bright pixel in a real member of cluster 0
    syn = Synset(
        x=torch.rand(cl.n_clusters, 64, generator=g),
        y=torch.eye(3)[torch.as_tensor(cl.cluster_class)],
        cluster=torch.arange(cl.n_clusters),
        scale=torch.ones(cl.n_clusters),
        lr=0.1,
    )
    fig = synset_grid_figure(syn, x_train, cl, n_clusters=3, n_real=2)
    assert fig._suptitle.get_text().startswith("Synthetic samples (synset) beside real members")
    legend = " ".join(t.get_text() for t in fig.texts)
    assert "k = cluster id, c = its class" in legend and "own 5th-95th percentile range" in legend
    rows = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert rows[0].startswith("k=0 c=0") and len(rows) == 3
    first_real = fig.axes[1].images[0].get_array()  # row 0, column 1: the member with the bright pixel
    assert float(np.median(np.asarray(first_real))) > 0.2  # not a black image
    assert synset_grid_png(syn, x_train, cl).startswith(PNG)
    flat = torch.rand(len(cl.assignment), 10)  # not an image
    assert synset_grid_png(syn, flat, cl) is None and synset_grid_figure(syn, flat, cl) is None
