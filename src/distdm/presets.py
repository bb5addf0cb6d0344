"""Named DDM settings: 'paper' (the paper, literally) and 'default' (what measured best here)."""

from __future__ import annotations

from .config import DistillConfig, OnlineConfig
from .errors import DistdmError


def preset(name: str, *, epochs: int) -> tuple[DistillConfig, OnlineConfig]:
    """Distillation and online settings of a preset; `epochs` is the target's tau (the paper's T)."""
    if name == "paper":
        # SPEC.md 1-2 literally: hard labels, cosine, sum, alg1 pairing, reverse matching, no step
        # calibration; online |P| = K masks, T = tau steps at the training lr on the summed loss.
        return (
            DistillConfig(target="trajectory", ipc=1, soft_labels=False, calibration="none"),
            OnlineConfig(perturbations_per_cluster=1.0, steps=epochs),
        )
    if name == "default":
        # SPEC.md 6: learnable labels, a per-cluster step calibration, one online step, |P| = 4K.
        return (
            DistillConfig(target="trajectory", ipc=1, soft_labels=True, calibration="norm"),
            OnlineConfig(perturbations_per_cluster=4.0, steps=1),
        )
    raise DistdmError(f"unknown preset {name!r}; one of 'paper', 'default'")


PRESETS = ("paper", "default")
