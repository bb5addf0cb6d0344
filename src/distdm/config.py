"""Frozen, validated settings for each stage, serialisable to and from plain dicts (JSON).

A setting's type and range are its annotation (e.g. `Annotated[float, Field(gt=0)]`, a `Literal` of
choices, `int | None`), checked by pydantic in strict mode; rules that tie settings together live in
`validate()`. Every refusal is a DistdmError naming the setting and what it must be."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

import pydantic

from .errors import DistdmError

T = TypeVar("T", bound="_Config")

# strict: no silent coercion ('yes' is not true, 2.5 is not an integer); floats must be finite
_STRICT = pydantic.ConfigDict(strict=True, allow_inf_nan=False)
# field metadata of a setting added after runs were first recorded: `to_dict` writes it only when it is
# not at its default, so the settings (and cache keys) of runs recorded before it keep their identity
ADDED_LATER = {"omit_default": True}

Seed = Annotated[int, pydantic.Field(ge=0)]
Positive = Annotated[float, pydantic.Field(gt=0)]
NonNegative = Annotated[float, pydantic.Field(ge=0)]


class _Config:
    """Mixin: type check, validation hook and dict round-trip for frozen dataclasses."""

    # a message per setting that replaces the generic "<setting> must be <type>" (see Schedule)
    _messages: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        _check_types(self)
        self.validate()

    def validate(self) -> None:
        """Raise DistdmError on settings that do not fit together (types and ranges are checked first)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the settings (JSON-serialisable)."""
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.metadata.get("omit_default") and out[f.name] == f.default:
                del out[f.name]
        return out

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        """Build from a dict, rejecting unknown keys with a clear message (missing keys: defaults)."""
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


@functools.cache
def _adapters(cls: type) -> tuple[tuple[str, Any, pydantic.TypeAdapter[Any]], ...]:
    """(name, annotation, validator) per field of a settings class, built once per class."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return tuple(
        (f.name, hints[f.name], pydantic.TypeAdapter(hints[f.name], config=_STRICT))
        for f in dataclasses.fields(cls)
    )


def _check_types(cfg: Any) -> None:
    """Reject settings of the wrong type or range (by the field's annotation) and normalise numbers
    (numpy ones included) to Python int/float, as JSON holds them."""
    for name, hint, adapter in _adapters(type(cfg)):
        value = getattr(cfg, name)
        plain = value
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            plain = int(value)  # numpy integers: strict mode takes Python ints only
        try:
            checked = adapter.validate_python(plain)
        except pydantic.ValidationError:
            say = type(cfg)._messages.get(name) or f"{name} must be {describe_type(hint)}"
            raise DistdmError(f"{type(cfg).__name__}.{say}, got {value!r}") from None
        object.__setattr__(cfg, name, checked)


def describe_type(hint: Any) -> str:
    """A type annotation in words, e.g. `int | None` -> 'an integer or None'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        bounds = [
            f"{op} {getattr(m, attr)}"
            for item in args[1:]
            for m in getattr(item, "metadata", [item])
            for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
            if getattr(m, attr, None) is not None
        ]
        return " ".join([describe_type(args[0]), *bounds])
    if origin is Literal:
        return f"one of {list(args)}"
    if origin is Union or origin is types.UnionType:
        return " or ".join(describe_type(a) for a in args)
    words = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}
    return words.get(hint, "None" if hint is type(None) else getattr(hint, "__name__", str(hint)))


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not real or not math.isfinite(value) or not (value >= 0 if allow_zero else value > 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise DistdmError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Schedule(_Config):
    """How a model is trained (one schedule shared by every variant the engine trains): SGD by default.

    `TrainConfig`, the target model's schedule, is this with at least one epoch; the engine also takes
    zero epochs (further training by 0 epochs is the identity) and full-batch, unshuffled schedules."""

    epochs: Annotated[int, pydantic.Field(ge=0)] = 30
    lr: Positive = 0.1
    batch_size: Annotated[int, pydantic.Field(gt=0)] | None = 64  # None: full batch
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: NonNegative = 0.0
    weight_decay: NonNegative = 0.0
    seed: Seed = 0  # shuffle order (and, for a target model, the initialisation)
    shuffle: bool = dataclasses.field(default=True, metadata=ADDED_LATER)  # False: samples in order

    # the engine's wording of two refusals, which its callers match
    _messages: ClassVar[dict[str, str]] = {
        "lr": "lr: the learning rate must be a finite number > 0",
        "optimizer": "optimizer must be 'sgd' or 'adam'",
    }


@dataclasses.dataclass(frozen=True)
class TrainConfig(Schedule):
    """How the target model (and every retrain) is trained: a Schedule of at least one epoch."""

    _messages: ClassVar[dict[str, str]] = {}

    def validate(self) -> None:
        super().validate()
        if self.epochs < 1:
            raise DistdmError(
                f"TrainConfig.epochs must be a finite number > 0 (a target model is trained for at least "
                f"one epoch), got {self.epochs!r}"
            )


@dataclasses.dataclass(frozen=True)
class ClusterConfig(_Config):
    """How training data is partitioned into attribution units."""

    per_class: int = 10
    features: Literal["penultimate", "inputs"] = "penultimate"
    kind: Literal["kmeans", "classwise", "index"] = "kmeans"
    seed: Seed = 0
    n_init: int = 10

    def validate(self) -> None:
        _positive("per_class", self.per_class)
        _positive("n_init", self.n_init)


@dataclasses.dataclass(frozen=True)
class DistillConfig(_Config):
    """How one synthetic set per cluster is distilled (SPEC.md section 1.3 and 6)."""

    # trajectory: reverse gradient matching; oracle: exact removal
    target: Literal["trajectory", "influence", "oracle"] = "trajectory"
    ipc: int = 1
    iterations: int = 50  # image-update steps per sampled start (trajectory) or in total
    starts: int = 10  # sampled trajectory starts t
    step: int = 4  # s
    pairing: Literal["alg1", "eq6", "same"] = "alg1"
    distance: Literal["cosine", "mse"] = "cosine"
    reduction: Literal["sum", "mean"] = "sum"
    direction: Literal["reverse", "match"] = "reverse"
    lr_img: float = 0.1
    momentum_img: float = 0.5
    soft_labels: bool = False
    lr_label: float = 0.1
    real_batch: int = 256
    calibration: Literal["none", "mass", "norm"] = "none"
    # influence target: lambda in (H + lambda I); 'auto' (closed-form solver, low-rank curvature): the
    # smallest lambda >= 0.01 at which the median cluster's target takes a tenth of its squared norm
    # from the curvature's eigenpairs (distill_influence.share_damping)
    damping: float | Literal["auto"] = 0.01
    metric: Literal["hessian", "euclidean"] = "hessian"  # influence target
    cg_iterations: int = 50  # influence target: CG steps for d_k = (H + lambda I)^-1 g_k / N
    hessian_batch: int | None = 256  # influence target: samples per stochastic HVP of the metric (None: all)
    hessian_rank: int | None = None  # influence target: metric from the top-r eigenpairs (Arnoldi) + damping
    # influence target: ggn is the Gauss-Newton matrix (positive semi-definite)
    curvature: Literal["hessian", "ggn", "ekfac"] = "hessian"
    # influence target: metric (A^-1 g / N in the metric A) | solve (CG)
    hessian_target: Literal["metric", "solve"] = "metric"
    # influence target: Arnoldi (hessian_rank) or EK-FAC (curvature 'ekfac') fitted on a fixed random
    # subsample of this many samples (None: all)
    hessian_subsample: int | None = None
    # influence target, curvature 'hessian': the GGN part on all samples through stored Jacobians and
    # the rest of the Hessian on this many weighted draws (hessian.SplitHessian), where the stored
    # Jacobians pay (models that reuse parameters, e.g. convolutions); None: the Hessian on all
    residual_subsample: int | None = None
    # influence target: adam (inputs and labels by gradient steps, all clusters at once) | closed-form
    # (labels by least squares for fixed inputs, optionally alternated with input_steps; clusters in
    # chunks that fit the task's memory budget; the target is always A^-1 g / N, hessian_target unused)
    solver: Literal["adam", "closed-form"] = "adam"
    input_steps: int = 0  # closed-form: Adam steps on the inputs (lr_img), split between label solves
    label_solves: int = 1  # closed-form: label solves; input steps run between consecutive solves
    # closed-form: inputs from random cluster members | means of member groups | draws that copy no
    # member (distill_influence.init_inputs)
    init: Literal["members", "means", "cluster-mean", "gaussian", "between", "noise"] = "members"
    # closed-form: auto (nn.Linear models with a low-rank or Euclidean metric: normal equations from the
    # per-sample gradient factors, M never formed; else as 'materialise') | materialise (the label
    # columns M, ipc x C x P per cluster: the `fast` preset's path)
    label_solver: Literal["auto", "materialise"] = "auto"
    input_box: bool = False  # closed-form: keep the synthetic inputs within the training inputs' range
    seed: Seed = 0

    def validate(self) -> None:
        _positive("ipc", self.ipc)
        _positive("iterations", self.iterations)
        _positive("starts", self.starts)
        _positive("step", self.step)
        _positive("lr_img", self.lr_img)
        _positive("momentum_img", self.momentum_img, allow_zero=True)
        _positive("lr_label", self.lr_label)
        _positive("real_batch", self.real_batch)
        if self.damping == "auto":
            if self.solver != "closed-form" or self.curvature == "ekfac" or self.hessian_rank is None:
                raise DistdmError(
                    "damping='auto' needs solver='closed-form' with a low-rank curvature (hessian_rank set, "
                    f"curvature 'hessian' or 'ggn'); got solver={self.solver!r}, curvature="
                    f"{self.curvature!r}, hessian_rank={self.hessian_rank!r}: give a number instead"
                )
        else:
            _positive("damping", self.damping, allow_zero=True)
        _positive("cg_iterations", self.cg_iterations)
        if self.hessian_batch is not None:
            _positive("hessian_batch", self.hessian_batch)
        if self.hessian_rank is not None:
            _positive("hessian_rank", self.hessian_rank)
        if self.hessian_subsample is not None:
            _positive("hessian_subsample", self.hessian_subsample)
        if self.residual_subsample is not None:
            _positive("residual_subsample", self.residual_subsample)
        _positive("input_steps", self.input_steps, allow_zero=True)
        _positive("label_solves", self.label_solves)
        if self.curvature == "ekfac" and self.solver != "closed-form":
            raise DistdmError("curvature 'ekfac' needs solver='closed-form' (the adam solver uses HVPs)")


@dataclasses.dataclass(frozen=True)
class OnlineConfig(_Config):
    """How perturbations are drawn, emulated by fine-tuning, and regressed (SPEC.md section 2)."""

    perturbations_per_cluster: float = 4.0  # |P| = this * K (SPEC 6: |P| = K is not enough)
    steps: int = 1  # T fine-tune steps per mask
    lr: float | None = None  # None: the training lr
    weighting: Literal["exp", "kernelshap", "uniform"] = "exp"
    ridge: float = 1e-3
    holdout: float = 0.2  # fraction of perturbations held out to report the fit error
    seed: Seed = 0

    def validate(self) -> None:
        _positive("perturbations_per_cluster", self.perturbations_per_cluster)
        _positive("steps", self.steps)
        if self.lr is not None:
            _positive("lr", self.lr)
        _positive("ridge", self.ridge, allow_zero=True)
        if not 0 <= self.holdout < 1:
            raise DistdmError(f"holdout must be in [0, 1), got {self.holdout!r}")
