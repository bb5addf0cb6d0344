"""Frozen, validated settings for each stage, serialisable to and from plain dicts (JSON)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, TypeVar

from .errors import DistdmError

T = TypeVar("T", bound="_Config")


class _Config:
    """Mixin: validation hook plus dict round-trip for frozen dataclasses."""

    def __post_init__(self) -> None:
        _check_types(self)
        self.validate()

    def validate(self) -> None:
        """Raise DistdmError on a nonsense setting."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the settings (JSON-serialisable)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        """Build from a dict, rejecting unknown keys with a clear message."""
        if not isinstance(d, dict):
            raise DistdmError(f"{cls.__name__} settings must be a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - names
        if unknown:
            raise DistdmError(f"{cls.__name__}: unknown settings {sorted(unknown)}; known: {sorted(names)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**fixed)

    def replace(self: T, **changes: Any) -> T:
        """A copy with some settings changed (validated again)."""
        names = {f.name for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        unknown = set(changes) - names
        if unknown:
            raise DistdmError(
                f"{type(self).__name__}: unknown settings {sorted(unknown)}; known: {sorted(names)}"
            )
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _check_types(cfg: Any) -> None:
    """Reject settings of the wrong type (by the field's annotation) and normalise numbers to int/float."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kinds = str(f.type).replace(" ", "").split("|")
        if value is None and "None" in kinds:
            continue
        if "bool" in kinds:
            ok = isinstance(value, bool)
        elif "int" in kinds:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            value = int(value) if ok else value
        elif "float" in kinds:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif "str" in kinds:
            ok = isinstance(value, str)
        else:  # another annotation: left to validate()
            continue
        if not ok:
            words = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}
            want = " or ".join(words.get(k, "None") for k in kinds)
            raise DistdmError(f"{type(cfg).__name__}.{f.name} must be {want}, got {value!r}")
        if f.name == "seed" and value < 0:
            raise DistdmError(f"{type(cfg).__name__}.seed must be an integer >= 0, got {value!r}")
        object.__setattr__(cfg, f.name, value)


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not real or not math.isfinite(value) or not (value >= 0 if allow_zero else value > 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise DistdmError(f"{name} must be a finite number {bound}, got {value!r}")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise DistdmError(f"{name} must be one of {list(options)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Config):
    """How the target model (and every retrain) is trained: plain SGD by default."""

    epochs: int = 30
    lr: float = 0.1
    batch_size: int = 64
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        _positive("epochs", self.epochs)
        _positive("lr", self.lr)
        _positive("batch_size", self.batch_size)
        _positive("momentum", self.momentum, allow_zero=True)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _choice("optimizer", self.optimizer, ("sgd", "adam"))


@dataclasses.dataclass(frozen=True)
class ClusterConfig(_Config):
    """How training data is partitioned into attribution units."""

    per_class: int = 10
    features: str = "penultimate"  # penultimate | inputs
    kind: str = "kmeans"  # kmeans | classwise | index
    seed: int = 0
    n_init: int = 10

    def validate(self) -> None:
        _positive("per_class", self.per_class)
        _choice("features", self.features, ("penultimate", "inputs"))
        _choice("kind", self.kind, ("kmeans", "classwise", "index"))
        _positive("n_init", self.n_init)


@dataclasses.dataclass(frozen=True)
class DistillConfig(_Config):
    """How one synthetic set per cluster is distilled (SPEC.md section 1.3 and 6)."""

    target: str = "trajectory"  # trajectory (reverse gradient matching) | influence | oracle (exact removal)
    ipc: int = 1
    iterations: int = 50  # image-update steps per sampled start (trajectory) or in total
    starts: int = 10  # sampled trajectory starts t
    step: int = 4  # s
    pairing: str = "alg1"  # alg1 | eq6 | same
    distance: str = "cosine"  # cosine | mse
    reduction: str = "sum"  # sum | mean
    direction: str = "reverse"  # reverse | match
    lr_img: float = 0.1
    momentum_img: float = 0.5
    soft_labels: bool = False
    lr_label: float = 0.1
    real_batch: int = 256
    calibration: str = "none"  # none | mass | norm
    damping: float = 0.01  # influence target: lambda in (H + lambda I)
    metric: str = "hessian"  # influence target: hessian | euclidean
    cg_iterations: int = 50  # influence target: CG steps for d_k = (H + lambda I)^-1 g_k / N
    hessian_batch: int | None = 256  # influence target: samples per stochastic HVP of the metric (None: all)
    hessian_rank: int | None = None  # influence target: metric from the top-r eigenpairs (Arnoldi) + damping
    curvature: str = "hessian"  # influence target: hessian | ggn (Gauss-Newton, positive semi-definite)
    hessian_target: str = "metric"  # influence target: metric (A^-1 g / N in the metric A) | solve (CG)
    # influence target: Arnoldi (hessian_rank) or EK-FAC (curvature 'ekfac') fitted on a fixed random
    # subsample of this many samples (None: all)
    hessian_subsample: int | None = None
    # influence target: adam (inputs and labels by gradient steps, all clusters at once) | closed-form
    # (labels by least squares for fixed inputs, optionally alternated with input_steps; clusters in
    # chunks that fit the task's memory budget; the target is always A^-1 g / N, hessian_target unused)
    solver: str = "adam"
    input_steps: int = 0  # closed-form: Adam steps on the inputs (lr_img), split between label solves
    label_solves: int = 1  # closed-form: label solves; input steps run between consecutive solves
    init: str = "members"  # closed-form: inputs from random cluster members | means of member groups
    # closed-form: auto (nn.Linear models with a low-rank or Euclidean metric: normal equations from the
    # per-sample gradient factors, M never formed; else as 'materialise') | materialise (the label
    # columns M, ipc x C x P per cluster: the `fast` preset's path)
    label_solver: str = "auto"
    input_box: bool = False  # closed-form: keep the synthetic inputs within the training inputs' range
    seed: int = 0

    def validate(self) -> None:
        _choice("target", self.target, ("trajectory", "influence", "oracle"))
        _positive("ipc", self.ipc)
        _positive("iterations", self.iterations)
        _positive("starts", self.starts)
        _positive("step", self.step)
        _choice("pairing", self.pairing, ("alg1", "eq6", "same"))
        _choice("distance", self.distance, ("cosine", "mse"))
        _choice("reduction", self.reduction, ("sum", "mean"))
        _choice("direction", self.direction, ("reverse", "match"))
        _positive("lr_img", self.lr_img)
        _positive("momentum_img", self.momentum_img, allow_zero=True)
        _positive("lr_label", self.lr_label)
        _positive("real_batch", self.real_batch)
        _choice("calibration", self.calibration, ("none", "mass", "norm"))
        _positive("damping", self.damping, allow_zero=True)
        _choice("metric", self.metric, ("hessian", "euclidean"))
        _positive("cg_iterations", self.cg_iterations)
        if self.hessian_batch is not None:
            _positive("hessian_batch", self.hessian_batch)
        _choice("curvature", self.curvature, ("hessian", "ggn", "ekfac"))
        _choice("hessian_target", self.hessian_target, ("metric", "solve"))
        if self.hessian_rank is not None:
            _positive("hessian_rank", self.hessian_rank)
        if self.hessian_subsample is not None:
            _positive("hessian_subsample", self.hessian_subsample)
        _choice("solver", self.solver, ("adam", "closed-form"))
        _positive("input_steps", self.input_steps, allow_zero=True)
        _positive("label_solves", self.label_solves)
        _choice("init", self.init, ("members", "means", "cluster-mean", "gaussian", "noise"))
        _choice("label_solver", self.label_solver, ("auto", "materialise"))
        if self.curvature == "ekfac" and self.solver != "closed-form":
            raise DistdmError("curvature 'ekfac' needs solver='closed-form' (the adam solver uses HVPs)")


@dataclasses.dataclass(frozen=True)
class OnlineConfig(_Config):
    """How perturbations are drawn, emulated by fine-tuning, and regressed (SPEC.md section 2)."""

    perturbations_per_cluster: float = 4.0  # |P| = this * K (SPEC 6: |P| = K is not enough)
    steps: int = 1  # T fine-tune steps per mask
    lr: float | None = None  # None: the training lr
    weighting: str = "exp"  # exp | kernelshap | uniform
    ridge: float = 1e-3
    holdout: float = 0.2  # fraction of perturbations held out to report the fit error
    seed: int = 0

    def validate(self) -> None:
        _positive("perturbations_per_cluster", self.perturbations_per_cluster)
        _positive("steps", self.steps)
        if self.lr is not None:
            _positive("lr", self.lr)
        _choice("weighting", self.weighting, ("exp", "kernelshap", "uniform"))
        _positive("ridge", self.ridge, allow_zero=True)
        if not 0 <= self.holdout < 1:
            raise DistdmError(f"holdout must be in [0, 1), got {self.holdout!r}")
