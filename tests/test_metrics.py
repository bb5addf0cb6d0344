import numpy as np
import pytest
import torch

from distdm import metrics
from distdm.clusters import Clusters
from distdm.errors import DistdmError
from distdm.scores import Scores


def test_t_interval_matches_hand_computation():
    iv = metrics.t_interval([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, sd sqrt(5/3), t_{0.975, 3} = 3.182446
    half = 3.182446305284263 * np.sqrt(5 / 3) / 2
    assert iv.mean == pytest.approx(2.5)
    assert iv.low == pytest.approx(2.5 - half)
    assert iv.high == pytest.approx(2.5 + half)
    assert iv.n == 4 and iv.method == "t"
    assert metrics.t_interval([np.nan, 1.0, 3.0]).n == 2
    one = metrics.t_interval([0.5])
    assert one.mean == 0.5 and np.isnan(one.low)


def test_intervals_of_bounded_metrics_stay_in_their_range():
    # three hits out of four: mean 0.75, sd 0.5, half-width t_{0.975, 3} * 0.5 / 2 = 0.7956
    hits = [1.0, 1.0, 1.0, 0.0]
    half = 3.182446305284263 * 0.5 / 2
    raw = metrics.t_interval(hits)
    assert raw.low == pytest.approx(0.75 - half) and raw.high == pytest.approx(0.75 + half)  # -0.05, 1.55
    iv = metrics.t_interval(hits, bounds=metrics.SHARE)
    assert (iv.mean, iv.low, iv.high, iv.n) == (pytest.approx(0.75), 0.0, 1.0, 4)
    # an interval inside the range is left as it is
    inside = metrics.t_interval([0.4, 0.5, 0.6], bounds=metrics.SHARE)
    assert inside.low == pytest.approx(0.5 - 4.302652729911275 * 0.1 / np.sqrt(3))
    # top-1 hits as the evaluation table reports them: 3 of 4 queries hit, the bound is 1, not 1.55
    truth = np.array([[3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 1.0], [1.0, 1.0, 1.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    scores = truth.copy()
    scores[:, 3] = truth[:, 0]  # query 3 picks unit 0, the truth's bottom
    top = metrics.top1_in_topk(scores, truth, 1)
    assert (top.mean, top.low, top.high) == (pytest.approx(0.75), 0.0, 1.0)
    # correlations: per-query Spearman (1, 1, 1, -1): mean 0.5, sd 1, half-width 1.59 -> [-1, 1]
    sp = metrics.spearman(scores, truth)
    assert (sp.mean, sp.low, sp.high) == (pytest.approx(0.5), -1.0, 1.0)
    rho = metrics.t_interval([1.0, 1.0, 1.0, 0.6], bounds=metrics.CORRELATION)
    assert rho.low == pytest.approx(0.9 - 3.182446305284263 * 0.2 / 2) and rho.high == 1.0


def test_paper_dist_intervals_stay_in_the_objectives_range():
    # dist3 = 1 / (1 + Dist1) lies in [1/3, 1]: values near 1 must not give an upper bound above 1
    values = {"dist3": np.array([[1.0, 1.0, 0.5]]), "dist1": np.array([[0.0, 0.0, 2.0]])}
    picks = {"dist3": np.zeros(3, dtype=int), "dist1": np.zeros(3, dtype=int)}
    out = metrics.paper_dist(picks, values)
    assert out["dist3"].high == 1.0 and out["dist3"].low == pytest.approx(1 / 3)
    assert out["dist1_x100"].low == 0.0 and out["dist1_x100"].mean == pytest.approx(200 / 3)


def test_spearman_and_pearson_per_query_by_hand():
    scores = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    truth = np.array([[1.0, 4.0], [3.0, 3.0], [2.0, 2.0], [4.0, 1.0]])
    # query 0: rank differences (0, 1, -1, 0) -> 1 - 6 * 2 / (4 * 15) = 0.8; query 1: reversed -> -1
    np.testing.assert_allclose(metrics.spearman_per_query(scores, truth), [0.8, -1.0])
    assert metrics.spearman(scores, truth).mean == pytest.approx(-0.1)
    # Pearson of (1, 2, 3, 4) with (1, 3, 2, 4): sum of products of deviations 4, of squares 5 -> 0.8
    np.testing.assert_allclose(metrics.pearson_per_query(scores, truth), [0.8, -1.0])
    # Pearson differs from Spearman when the relation is monotone but not linear
    assert metrics.pearson_per_query(scores[:, :1], scores[:, :1] ** 3)[0] < 0.99
    assert metrics.spearman_per_query(scores[:, :1], scores[:, :1] ** 3)[0] == pytest.approx(1.0)


def test_within_class_uses_only_the_query_class_clusters():
    cluster_class = np.array([0, 0, 0, 1, 1, 1])
    y = np.array([0, 1])
    scores = np.array([[1, 3], [2, 2], [3, 1], [9, 1], [8, 2], [7, 3]], dtype=float)
    truth = np.array([[1, 0], [2, 0], [3, 0], [1, 1], [2, 2], [3, 3]], dtype=float)
    # query 0 sees clusters 0-2: (1,2,3) vs (1,2,3); query 1 sees clusters 3-5: (1,2,3) vs (1,2,3)
    np.testing.assert_allclose(metrics.spearman_per_query(scores, truth, cluster_class, y), [1.0, 1.0])
    # over all clusters query 0 is anti-correlated in the other class's part
    assert metrics.spearman_per_query(scores, truth)[0] < 0.5
    iv = metrics.spearman_within_class(scores, truth, cluster_class, y)
    assert iv.mean == pytest.approx(1.0) and iv.n == 2


def test_constant_scores_count_as_zero_and_too_few_units_are_dropped():
    truth = np.arange(8.0).reshape(4, 2)
    np.testing.assert_allclose(metrics.spearman_per_query(np.ones((4, 2)), truth), [0.0, 0.0])
    cc = np.array([0, 0, 1, 1])  # two clusters per class: too few to rank
    iv = metrics.spearman_within_class(truth, truth, cc, np.array([0, 1]))
    assert iv.n == 0 and np.isnan(iv.mean)


def test_lds_predicted_is_minus_the_sum_of_kept_scores():
    s = np.array([[1.0], [2.0], [4.0]])
    keep = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=float)
    np.testing.assert_allclose(metrics.lds_predicted(s, keep)[:, 0], [-1.0, -2.0, -4.0, -3.0])
    # prediction ranks (4, 3, 1, 2), actual ranks (4, 2, 3, 1): d = (0, 1, -2, 1) -> 1 - 36 / 60 = 0.4
    actual = np.array([[3.0], [1.0], [2.0], [0.0]])
    assert metrics.lds(s, keep, actual).mean == pytest.approx(0.4)


def test_lds_is_one_for_an_exactly_additive_model_and_minus_one_with_the_wrong_sign():
    rng = np.random.default_rng(0)
    k, q = 12, 5
    s = rng.standard_normal((k, q))
    keep = metrics.lds_masks(k, m=30, alpha=0.5, seed=1)
    # effects add: output without a set of units = f(all) + sum of the removed units' scores
    actual = 7.0 + (1.0 - keep) @ s
    assert metrics.lds(s, keep, actual).mean == pytest.approx(1.0)
    assert metrics.lds(-s, keep, actual).mean == pytest.approx(-1.0)
    assert metrics.lds(Scores(s, "cluster", "margin", "x"), keep, actual).n == q
    # per query: +1 where a query's scores are right, -1 where its sign is flipped
    flipped = s * np.array([1.0, -1.0, 1.0, 1.0, -1.0])
    np.testing.assert_allclose(metrics.lds_per_query(flipped, keep, actual), [1, -1, 1, 1, -1])


def test_lds_masks_keep_a_fixed_fraction_reproducibly():
    a = metrics.lds_masks(10, m=50, alpha=0.3, seed=4)
    assert a.shape == (50, 10)
    assert set(np.unique(a)) == {0.0, 1.0}
    assert (a.sum(1) == 3).all()
    np.testing.assert_array_equal(a, metrics.lds_masks(10, m=50, alpha=0.3, seed=4))
    assert len(np.unique(a, axis=0)) > 30  # C(10, 3) = 120 possible subsets
    assert not np.array_equal(a, metrics.lds_masks(10, m=50, alpha=0.3, seed=5))
    with pytest.raises(DistdmError, match="alpha"):
        metrics.lds_masks(10, alpha=1.0)
    with pytest.raises(DistdmError, match="alpha"):
        metrics.lds_masks(3, alpha=0.1)


def test_top1_in_topk_by_hand():
    truth = np.array([[5.0, 0.0], [4.0, 1.0], [3.0, 2.0], [2.0, 3.0], [1.0, 4.0]])
    scores = np.array([[0.0, 9.0], [0.0, 0.0], [9.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    # query 0 picks unit 2 (true top 3: 0, 1, 2) -> hit; query 1 picks unit 0 (true top 3: 4, 3, 2) -> miss
    iv = metrics.top1_in_topk(scores, truth, 3)
    assert iv.mean == pytest.approx(0.5) and iv.n == 2
    assert metrics.top1_in_topk(scores, truth, 1).mean == 0.0
    assert metrics.top1_in_topk(truth + 0.1, truth, 1, largest=False).mean == 1.0
    assert metrics.top1_in_topk(-truth, truth, 1, largest=False).mean == 0.0


def test_paper_dist_reads_the_values_of_the_picked_clusters():
    values = {
        "dist1": np.array([[0.1, 0.2], [0.3, 0.4]]),
        "dist2": np.array([[1.0, 2.0], [3.0, 4.0]]),
        "dist3": np.array([[0.5, 0.6], [0.7, 0.8]]),
    }
    picks = {"dist1": np.array([1, 0]), "dist2": np.array([0, 0]), "dist3": np.array([1, 1])}
    out = metrics.paper_dist(picks, values)
    assert out["dist1_x100"].mean == pytest.approx(100 * (0.3 + 0.2) / 2)
    assert out["dist2"].mean == pytest.approx(1.5)
    assert out["dist3"].mean == pytest.approx(0.75)


def test_removal_masks_drop_the_most_negative_scores():
    s = np.array([[0.5, -1.0], [-2.0, 0.0], [-1.0, 3.0], [1.0, -0.5]])
    m = metrics.removal_masks(s, [1, 2])
    np.testing.assert_array_equal(m[0, 0], [1, 0, 1, 1])
    np.testing.assert_array_equal(m[1, 0], [1, 0, 0, 1])
    np.testing.assert_array_equal(m[1, 1], [0, 1, 1, 0])
    np.testing.assert_array_equal(metrics.removal_masks(s, [1], largest=True)[0, 1], [1, 1, 0, 1])
    with pytest.raises(DistdmError, match="removal sizes"):
        metrics.removal_masks(s, [5])


def test_compare_sums_sample_scores_into_clusters_and_checks_shapes():
    clusters = Clusters(np.array([0, 0, 1, 1, 2, 2, 3, 3]), np.array([0, 0, 1, 1]))
    y = np.array([0, 1, 0])
    rng = np.random.default_rng(0)
    truth = rng.standard_normal((4, 3))
    per_sample = np.repeat(truth / 2, 2, axis=0)  # each cluster's two members share its effect
    out = metrics.compare(Scores(per_sample, "sample", "margin", "x"), truth, clusters, y)
    assert set(out) == {"spearman", "spearman_class", "pearson", "pearson_class", "top1_in_top3"}
    assert out["spearman"].mean == pytest.approx(1.0)
    assert out["top1_in_top3"].mean == 1.0
    with pytest.raises(DistdmError, match="same shape"):
        metrics.compare(truth[:3], truth, clusters, y)


def test_noise_ceiling_compares_seed_zero_with_the_other_seeds():
    clusters = Clusters(np.arange(6), np.zeros(6, dtype=np.int64))
    rng = np.random.default_rng(1)
    base = rng.standard_normal((6, 4))
    same = metrics.noise_ceiling(np.stack([base, base, base]), clusters, np.zeros(4))
    assert same["spearman"].mean == pytest.approx(1.0)
    flipped = metrics.noise_ceiling(np.stack([base, -base, -base]), clusters, np.zeros(4))
    assert flipped["spearman"].mean == pytest.approx(-1.0)
    with pytest.raises(DistdmError, match="two seeds"):
        metrics.noise_ceiling(base[None], clusters, np.zeros(4))


def test_accuracy_counts_top_class_hits_per_model():
    from distdm.objectives import accuracy

    out = torch.tensor([[[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]])
    y = torch.tensor([0, 1, 1])
    acc = accuracy(out, y)
    assert acc.dtype == torch.float64 and acc.shape == (2,)
    np.testing.assert_allclose(acc.numpy(), [2 / 3, 2 / 3])
    assert float(accuracy(out[0], y)) == pytest.approx(2 / 3)
