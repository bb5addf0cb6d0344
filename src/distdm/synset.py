"""A synthetic set: a few learned samples per cluster whose loss gradient emulates removing it."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .errors import DistdmError


@dataclasses.dataclass
class Synset:
    """Synthetic samples for K clusters (ipc each) with real-valued label vectors.

    Fine-tuning the target model for `steps` full-batch SGD steps of size `lr` on the loss
    sum_j scale[cluster[j]] * (-sum_c y[j, c] log softmax(f(x[j]))_c), over the samples of a set of
    clusters, emulates retraining without those clusters.
    """

    x: torch.Tensor  # (K * ipc, *input_shape)
    y: torch.Tensor  # (K * ipc, L) label vectors (free real values; one-hot for hard labels)
    cluster: torch.Tensor  # (K * ipc,) long
    scale: torch.Tensor  # (K,) per-cluster loss weight (step calibration)
    lr: float
    steps: int = 1
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # settings and diagnostics

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.y.shape[0] != n or self.cluster.shape[0] != n:
            raise DistdmError("synset inputs, labels and cluster ids must have the same length")

    @property
    def n_clusters(self) -> int:
        """K, the number of clusters the synset covers."""
        return int(self.scale.shape[0])

    @property
    def ipc(self) -> int:
        """Synthetic samples per cluster."""
        return self.x.shape[0] // max(self.n_clusters, 1)

    def weights(self, delete: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights (V, K*ipc) for deletion indicators (V, K): scale of deleted clusters."""
        delete = torch.as_tensor(delete, dtype=torch.float32, device=self.scale.device)
        if delete.ndim != 2 or delete.shape[1] != self.n_clusters:
            raise DistdmError(
                f"deletion masks must be (variants, {self.n_clusters}), got {tuple(delete.shape)}"
            )
        return (delete * self.scale)[:, self.cluster]

    def nbytes(self) -> int:
        """Storage of the synset's tensors in bytes."""
        return sum(t.numel() * t.element_size() for t in (self.x, self.y, self.cluster, self.scale))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors for a safetensors file (settings go to the manifest via `info`)."""
        return {
            "x": self.x,
            "y": self.y,
            "cluster": self.cluster,
            "scale": self.scale,
            "lr_steps": torch.tensor([self.lr, float(self.steps)], dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], info: dict[str, Any] | None = None) -> Synset:
        """Rebuild a synset saved with `to_tensors`."""
        missing = {"x", "y", "cluster", "scale", "lr_steps"} - set(t)
        if missing:
            raise DistdmError(f"not a synset file: missing {sorted(missing)}")
        lr, steps = t["lr_steps"].tolist()
        return cls(t["x"], t["y"], t["cluster"].long(), t["scale"], float(lr), int(steps), info or {})
