"""How much a synset reveals about the real training images it was distilled from.

All distances live in the standardised input space of the training set: inputs are flattened and
every feature is centred and divided by its training-set standard deviation (features that are
constant in the training set keep scale 1, as in scikit-learn's StandardScaler).

Per synthetic sample (`nearest_real`): the cosine similarity to its most similar real training image
and the L2 distance to its nearest one (each with the real image's index). A synthetic sample that
copies a training image has cosine 1 and distance 0.

Membership inference (`membership_auc`): the attacker holds the synset and candidate images and
guesses "member of the training set" when a candidate lies close to some synthetic sample. Score of a
candidate = minus its L2 distance to the nearest synthetic sample; members = the training images,
non-members = the held-out test images; the AUC of that score (sklearn `roc_auc_score`) is 0.5 when the
synset tells nothing about membership and 1 when every member is copied into it. A synset initialised
from real members and barely changed raises the AUC above 0.5 by about half the fraction of members
it copies. Also reported: the true-positive rate at 1% and 5% false positives.

Loss-based attacks (`loss_attacks`, given the task): the attacker also holds the target model and
fine-tunes it on the whole synset, as an unlearning request would; a candidate whose loss rises more
is guessed a member. The same attack on the target model alone ('target_loss') measures what the model
itself leaks, which no synset can lower. Input range (`input_range`): whether the synthetic inputs stay
within the real inputs' [min, max], so that they are inputs of the same kind at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..data import TensorData
from ..errors import DistdmError
from ..synset import Synset
from ..task import Task


@dataclasses.dataclass
class Standardiser:
    """Per-feature centring and scaling fitted on the training inputs (flattened)."""

    mean: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> Standardiser:
        """Mean and standard deviation per feature; constant features keep scale 1."""
        f = torch.as_tensor(x, dtype=torch.float64).flatten(1)
        std = f.std(0, unbiased=False)
        return cls(f.mean(0), torch.where(std > 1e-12, std, torch.ones_like(std)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised flattened inputs (n, features), float64."""
        f = torch.as_tensor(x, dtype=torch.float64).flatten(1)
        if f.shape[1] != self.mean.shape[0]:
            raise DistdmError(f"inputs have {f.shape[1]} features, the training set {self.mean.shape[0]}")
        return (f - self.mean) / self.scale


@dataclasses.dataclass
class NearestReal:
    """Per synthetic sample: best cosine and nearest L2 distance to the real images, with their indices."""

    cosine: np.ndarray  # (S,) max over real images of the cosine similarity
    cosine_index: np.ndarray  # (S,) index of that real image
    distance: np.ndarray  # (S,) min over real images of the L2 distance
    distance_index: np.ndarray  # (S,) index of that real image


def _check(x: torch.Tensor, what: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim < 2 or x.shape[0] == 0:
        raise DistdmError(f"{what} must be a non-empty batch of inputs, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise DistdmError(f"{what} contain NaN or inf")
    return x


def _min_distances(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each row of a, the smallest L2 distance to a row of b and its index."""
    dist, idx = [], []
    for part in a.split(chunk):
        d = torch.cdist(part, b, compute_mode="donot_use_mm_for_euclid_dist")  # exact 0 for copies
        m, i = d.min(1)
        dist.append(m)
        idx.append(i)
    return torch.cat(dist).cpu().numpy(), torch.cat(idx).cpu().numpy()


def nearest_real(
    x_syn: torch.Tensor, x_real: torch.Tensor, standardiser: Standardiser | None = None
) -> NearestReal:
    """For every synthetic input, its most similar real input by cosine and its nearest by L2 distance,
    both in the standardised space (fitted on `x_real` unless given)."""
    x_syn, x_real = _check(x_syn, "synthetic inputs"), _check(x_real, "real inputs")
    if x_syn.shape[1:] != x_real.shape[1:]:
        raise DistdmError(
            f"synthetic inputs {tuple(x_syn.shape[1:])} and real inputs {tuple(x_real.shape[1:])} differ"
        )
    std = standardiser or Standardiser.fit(x_real)
    s, r = std(x_syn), std(x_real)
    sn = s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rn = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos, cos_idx = [], []
    for part in sn.split(2048):
        c, i = (part @ rn.T).max(1)
        cos.append(c)
        cos_idx.append(i)
    dist, dist_idx = _min_distances(s, r)
    return NearestReal(torch.cat(cos).cpu().numpy(), torch.cat(cos_idx).cpu().numpy(), dist, dist_idx)


def membership_auc(
    x_syn: torch.Tensor,
    members: torch.Tensor,
    non_members: torch.Tensor,
    standardiser: Standardiser | None = None,
) -> dict[str, float]:
    """Nearest-synthetic-distance membership attack: AUC and TPR at 1% and 5% FPR of the score
    -min_j ||x - s_j|| separating members (label 1) from non-members (label 0); see the module doc."""
    x_syn = _check(x_syn, "synthetic inputs")
    members, non_members = _check(members, "members"), _check(non_members, "non-members")
    std = standardiser or Standardiser.fit(members)
    s = std(x_syn)
    d_in, _ = _min_distances(std(members), s)
    d_out, _ = _min_distances(std(non_members), s)
    return attack_summary(-d_in, -d_out, "mia")


def attack_summary(score_members: np.ndarray, score_non_members: np.ndarray, prefix: str) -> dict[str, float]:
    """AUC and TPR at 1% and 5% FPR of an attack score that is higher for guessed members."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.r_[np.ones(len(score_members)), np.zeros(len(score_non_members))]
    score = np.r_[score_members, score_non_members]
    fpr, tpr, _ = roc_curve(labels, score)
    return {
        f"{prefix}_auc": float(roc_auc_score(labels, score)),
        f"{prefix}_tpr_at_1pct_fpr": float(np.interp(0.01, fpr, tpr)),
        f"{prefix}_tpr_at_5pct_fpr": float(np.interp(0.05, fpr, tpr)),
    }


def loss_attacks(task: Task, synset: Synset) -> dict[str, float]:
    """Loss-based membership attacks that use the synset: fine-tune the target model on the whole
    synset (what an unlearning request would do) and score each candidate by the rise of its
    cross-entropy ('ft_delta': members' clusters are what the synset removes) and by minus its loss
    after the fine-tune ('ft_loss'); 'target_loss' is the classic attack on the target model alone, a
    reference for what the model leaks without any synset. Members = training, non-members = test."""
    from ..distill import finetune
    from ..engine import per_sample_loss, predict

    data = task.data
    data.require_test("a membership attack (its non-members)")
    after = finetune(task, synset, torch.ones(1, synset.n_clusters))
    out: dict[str, float] = {}
    losses = {}
    for part, (x, y) in {"in": (data.x_train, data.y_train), "out": (data.x_test, data.y_test)}.items():
        base = per_sample_loss(task.outputs(x), y, task.loss).detach().double().cpu().numpy()
        ft = predict(task.model, after, x, strategy=task.strategy)[0]
        tuned = per_sample_loss(ft, y, task.loss).detach().double().cpu().numpy()
        losses[part] = (base, tuned)
    (b_in, t_in), (b_out, t_out) = losses["in"], losses["out"]
    if not (np.isfinite(t_in).all() and np.isfinite(t_out).all()):
        raise DistdmError("fine-tuning on the whole synset diverged: lower the synset's online lr")
    out.update(attack_summary(t_in - b_in, t_out - b_out, "ft_delta"))
    out.update(attack_summary(-t_in, -t_out, "ft_loss"))
    out.update(attack_summary(-b_in, -b_out, "target_loss"))
    return out


def input_range(x_syn: torch.Tensor, x_real: torch.Tensor) -> dict[str, float]:
    """Range of the synthetic inputs against the real ones: min, max, the span ratio and the share of
    synthetic values outside the real inputs' [min, max]."""
    s, r = x_syn.detach().double(), torch.as_tensor(x_real).double()
    lo, hi = float(r.min()), float(r.max())
    return {
        "input_min": float(s.min()),
        "input_max": float(s.max()),
        "data_min": lo,
        "data_max": hi,
        "range_ratio": float((s.max() - s.min()) / max(hi - lo, 1e-12)),
        "frac_outside_range": float(((s < lo) | (s > hi)).double().mean()),
    }


def _inputs(synset: Synset | torch.Tensor) -> torch.Tensor:
    if isinstance(synset, Synset):
        return synset.x.detach()
    if isinstance(synset, torch.Tensor):
        return synset.detach()
    raise DistdmError(f"expected a Synset or a tensor of synthetic inputs, got {type(synset).__name__}")


def privacy_metrics(
    synset: Synset | torch.Tensor, data: TensorData, task: Task | None = None
) -> dict[str, float]:
    """Privacy numbers of a synset against the training data (see the module doc): nearest-real cosine
    and L2 distance (mean, extremes), the test images' own nearest-train distance as a reference, the
    fraction of near copies (closer to a training image than 95% of test images are), the input range,
    and the membership-inference AUC with training members vs test non-members; with the task (and a
    Synset) also the loss-based attacks of `loss_attacks`."""
    x = _inputs(synset)
    std = Standardiser.fit(data.x_train)
    near = nearest_real(x, data.x_train, std)
    ref, _ = _min_distances(std(_check(data.x_test, "test inputs")), std(data.x_train))
    q05 = float(np.quantile(ref, 0.05))
    out: dict[str, float] = {
        "n_synthetic": len(x),
        "cos_nearest_mean": float(near.cosine.mean()),
        "cos_nearest_max": float(near.cosine.max()),
        "l2_nearest_mean": float(near.distance.mean()),
        "l2_nearest_median": float(np.median(near.distance)),
        "l2_nearest_min": float(near.distance.min()),
        "test_l2_nearest_median": float(np.median(ref)),
        "frac_near_copies": float((near.distance < q05).mean()),
    }
    out.update(membership_auc(x, data.x_train, data.x_test, std))
    out.update(input_range(x, data.x_train))
    if task is not None and isinstance(synset, Synset):
        out.update(loss_attacks(task, synset))
    return out


def privacy_figure_png(
    synsets: Mapping[str, Synset],
    data: TensorData,
    cluster_class: np.ndarray,
    *,
    n_rows: int = 10,
) -> bytes | None:
    """Side by side per synset: synthetic samples (one per shown cluster, one cluster per class where
    possible) and their nearest real training images with the L2 distance; None for non-image inputs."""
    from ..figures import _as_image, _png, plt

    if not synsets:
        raise DistdmError("no synsets to draw")
    if _as_image(data.x_train[0]) is None:
        return None
    cluster_class = np.asarray(cluster_class)
    firsts = [int(np.flatnonzero(cluster_class == c)[0]) for c in np.unique(cluster_class)]
    rest = [k for k in range(len(cluster_class)) if k not in firsts]
    shown = (firsts + rest)[: max(1, n_rows)]
    std = Standardiser.fit(data.x_train)
    names = list(synsets)
    fig, axes = plt.subplots(
        len(shown), 2 * len(names), figsize=(1.2 * 2 * len(names), 1.25 * len(shown)), squeeze=False
    )
    for j, name in enumerate(names):
        syn = synsets[name]
        picks = [int(torch.nonzero(syn.cluster == k)[0, 0]) for k in shown]
        near = nearest_real(syn.x[picks].detach(), data.x_train, std)
        for r, k in enumerate(shown):
            a, b = axes[r, 2 * j], axes[r, 2 * j + 1]
            a.imshow(_as_image(syn.x[picks[r]]), cmap="gray")
            b.imshow(_as_image(data.x_train[int(near.distance_index[r])]), cmap="gray")
            b.set_title(("nearest real\n" if r == 0 else "") + f"d={near.distance[r]:.1f}", fontsize=6, pad=1)
            for ax in (a, b):
                ax.set_xticks([])
                ax.set_yticks([])
            if r == 0:
                a.set_title(f"{name}\nsynthetic", fontsize=7)
            if j == 0:
                a.set_ylabel(f"k={k}, c={cluster_class[k]}", fontsize=6)
    fig.suptitle("synthetic samples and their nearest real training images (L2, standardised)", fontsize=8)
    return _png(fig)


def privacy_table(
    synsets: Mapping[str, Synset], data: TensorData, task: Task | None = None
) -> list[dict[str, Any]]:
    """`privacy_metrics` for several synsets, one row each (with the task: the loss attacks too)."""
    return [{"synset": name, **privacy_metrics(syn, data, task)} for name, syn in synsets.items()]
