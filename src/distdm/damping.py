"""Automatic damping for the influence functions: lambda in (H + lambda I)^-1 chosen from the curvature.

An influence function inverts H + lambda I. At a model that is not at a minimum H is indefinite, and a
damping below |lambda_min(H)| inverts an indefinite matrix: directions of negative curvature blow up
and the scores turn to noise (a 40-128-10 MLP, lambda_min -0.16: Spearman ~0 at lambda 0.01 against
0.5 within class at 0.16-0.3). The rule ('auto', the default of every if-* method):

    lambda = max(SAFETY x (|lambda_min| + r), TIME_FACTOR / t, FLOOR)  when lambda_min < 0 (indefinite:
                                                                        logged at WARNING)
    lambda = max(TIME_FACTOR / t, FLOOR)                               otherwise (positive semi-definite,
                                                                        e.g. the GGN, the default)

(the TIME_FACTOR / t term only where the schedule is SGD; t below)

with lambda_min the smallest eigenvalue: exact from the spectrum where the method holds the dense
matrix (r = 0), else the smallest Ritz value of `iters` Lanczos steps on H (which is >= lambda_min,
so it underestimates |lambda_min|) and r its residual norm, which bounds how far it is from an
eigenvalue: an estimate that has not converged damps more. FLOOR keeps the default of earlier
versions (0.01) for curvatures with no negative direction, where it held on the benchmark settings.
SAFETY was 2 until 2026-12-03; a finer sweep on the robustness suite (benchmarks/damping_factor.py;
benchmarks/RESULTS.md, "... the damping rule at 1.25 x |lambda_min|") found 1.1-1.25 x best on the
convolutional settings (the max-pool CNN within class 0.48 vs 0.45, the instance-norm ConvNet 0.81
vs 0.76) and within 0.05 elsewhere. benchmarks/damping_rule.py measures the rule against a sweep
(and the alternatives in RULES).

Where the schedule is SGD, the rule also keeps the damping at least TIME_FACTOR / t, t = steps x lr /
(1 - momentum) the training time: gradient descent run for time t from its start regularises like a
ridge penalty of order 1 / t (Ali, Kolter & Tibshirani 2019, on least squares: its shrinkage
1 - exp(-t sigma) of a direction of curvature sigma and ridge's sigma / (sigma + lambda) cross one
half at lambda = ln 2 / t), and directions of curvature well below it were never fitted. With the
positive semi-definite Gauss-Newton curvature, the influence functions' default since 2026-12-03,
that is the whole rule. TIME_FACTOR 0.5 is measured (benchmarks/damping_factor.py --of
training-time; benchmarks/RESULTS.md, "The Gauss-Newton curvature at half the inverse training
time"): at 0.25-2 x 1 / t on the robustness suite's SGD settings, 1 x fell below 0.9 of the best
damping within class on the max-pool CNN and wine (0.88), 0.5 x held on all. Adam has no single
step size: there the spectrum alone decides.

EK-FAC's curvature is a Fisher (never indefinite): its 'auto' is the mean corrected eigenvalue of
each layer (ekfac.py; 'kronfluence' is kronfluence's 0.1 x it, which damped too little on 3 of the 9
robustness-suite settings).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import torch

from .config import Schedule
from .errors import DistdmError

log = logging.getLogger(__name__)

AUTO = "auto"
SAFETY = 1.25  # times |lambda_min| (+ the Lanczos residual): measured best at 1.1-1.25x on the suite
FLOOR = 0.01  # the fixed default before 'auto'; used where the curvature has no negative direction
TIME_FACTOR = 0.5  # times 1 / the SGD training time: measured on the suite (0.25-2 x tried)
LANCZOS_ITERS = 40  # HVPs spent on the spectrum estimate of the iterative methods

HVP = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """What the rule knows about the curvature: its extreme eigenvalues, its mean eigenvalue
    (trace / P) and where they come from ('exact' spectrum or 'lanczos' estimate)."""

    lambda_min: float
    lambda_max: float
    mean: float
    source: str
    # Lanczos: the residual norm ||H y - lambda_min y|| of the smallest Ritz pair (an eigenvalue of
    # H lies within it); 0 for an exact spectrum
    lambda_min_error: float = 0.0


@dataclasses.dataclass(frozen=True)
class Choice:
    """A chosen damping: the value, the rule that chose it, and why (for logs and reports)."""

    value: float
    rule: str
    reason: str
    spectrum: Spectrum | None = None

    def as_dict(self) -> dict[str, object]:
        """Plain JSON-able fields (value, rule, reason, lambda_min, lambda_max, mean, source)."""
        out: dict[str, object] = {"value": self.value, "rule": self.rule, "reason": self.reason}
        if self.spectrum is not None:
            out.update(dataclasses.asdict(self.spectrum))
        return out


def check_damping(damping: object, *, allow_none: bool = False) -> float | str | None:
    """The damping setting as given, 'auto' or a finite number >= 0; raises a DistdmError otherwise."""
    if damping is None and allow_none:
        return None
    if isinstance(damping, str) and damping == AUTO:
        return AUTO
    if isinstance(damping, bool) or not (
        isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0
    ):
        raise DistdmError(f"damping must be 'auto' or a finite number >= 0, got {damping!r}")
    return float(damping)


def lanczos(
    hv: HVP,
    n_params: int,
    *,
    iters: int = LANCZOS_ITERS,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Spectrum:
    """Extreme eigenvalues of the symmetric operator hv from `iters` Lanczos steps (full
    re-orthogonalisation, iters HVPs, iters x P floats); the mean eigenvalue from the start vector's
    Rayleigh quotient (a one-probe Hutchinson estimate of trace / P)."""
    if iters < 1:
        raise DistdmError(f"Lanczos needs iters >= 1, got {iters}")
    m = min(iters, n_params)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_params, generator=g, dtype=torch.float64)
    basis = torch.empty(m, n_params, dtype=dtype, device=device)
    basis[0] = (q / q.norm()).to(device=device, dtype=dtype)
    t = torch.zeros(m, m, dtype=torch.float64, device=device)
    k, beta = m, 0.0
    for j in range(m):
        w = hv(basis[j]).reshape(-1).to(dtype)
        for _ in range(2):  # twice: keeps the basis orthogonal in float32
            c = basis[: j + 1] @ w
            t[: j + 1, j] += c.double()
            w = w - c @ basis[: j + 1]
        nrm = float(w.double().norm())
        scale = float(t[: j + 1, j].abs().max().clamp_min(1e-300))
        if nrm <= 1e-7 * scale:  # invariant subspace: its Ritz values are exact
            k = j + 1
            break
        if j + 1 == m:
            k, beta = m, nrm
            break
        t[j + 1, j] = nrm
        basis[j + 1] = w / nrm
    tk = t[:k, :k]
    ritz, vecs = torch.linalg.eigh(0.5 * (tk + tk.T))
    # ||H y - theta y|| = beta x |last component of the Ritz vector| (the standard Lanczos bound)
    err = beta * float(vecs[-1, 0].abs())
    return Spectrum(float(ritz[0]), float(ritz[-1]), float(t[0, 0]), "lanczos", err)


def exact_spectrum(eigvals: torch.Tensor) -> Spectrum:
    """The rule's inputs from a full list of eigenvalues."""
    w = eigvals.double()
    return Spectrum(float(w.min()), float(w.max()), float(w.mean()), "exact")


def training_time(schedule: Schedule, n_train: int) -> float | None:
    """How long SGD trained the model, in parameter-space time: steps x lr / (1 - momentum); None for
    Adam (no single step size) or an empty schedule."""
    if schedule.optimizer != "sgd" or schedule.epochs < 1 or n_train < 1:
        return None
    steps = schedule.epochs * math.ceil(n_train / (schedule.batch_size or n_train))
    return steps * schedule.lr / (1.0 - schedule.momentum) if schedule.momentum < 1 else None


def _rule_lambda_min(s: Spectrum) -> tuple[float, str]:
    # |lambda_min| plus the Lanczos residual: where the estimate has not converged the damping grows
    size = -s.lambda_min + s.lambda_min_error
    if s.lambda_min < 0 and SAFETY * size > FLOOR:
        err = f" +- {s.lambda_min_error:.2g}" if s.lambda_min_error else ""
        return SAFETY * size, (
            f"the curvature is indefinite (smallest eigenvalue {s.lambda_min:.3g}{err}, {s.source}): "
            f"damping raised to {SAFETY:g} x |smallest eigenvalue|"
        )
    return FLOOR, f"smallest eigenvalue {s.lambda_min:.3g} ({s.source}): the floor {FLOOR:g}"


def _rule_mean(s: Spectrum) -> tuple[float, str]:
    v = max(0.1 * s.mean, 1e-8)
    return v, f"0.1 x the mean eigenvalue {s.mean:.3g} ({s.source})"


def _rule_combined(s: Spectrum) -> tuple[float, str]:
    a, why = _rule_lambda_min(s)
    b, _ = _rule_mean(s)
    return (a, why) if a >= b else (b, f"0.1 x the mean eigenvalue {s.mean:.3g} (above the lambda_min rule)")


# the candidates benchmarks/damping_rule.py compares; 'lambda-min' is what 'auto' uses
RULES: dict[str, Callable[[Spectrum], tuple[float, str]]] = {
    "lambda-min": _rule_lambda_min,
    "mean": _rule_mean,
    "combined": _rule_combined,
}
DEFAULT_RULE = "lambda-min"


def choose(
    spectrum: Spectrum, rule: str = DEFAULT_RULE, *, method: str = "", time: float | None = None
) -> Choice:
    """The damping the rule picks for this spectrum (and, for the default rule, at least TIME_FACTOR /
    the training `time` where it is known); logs at WARNING when the curvature is indefinite (the damping
    was raised above |lambda_min| because of it)."""
    if rule not in RULES:
        raise DistdmError(f"damping rule must be one of {list(RULES)}, got {rule!r}")
    value, reason = RULES[rule](spectrum)
    if rule == DEFAULT_RULE and time is not None and time > 0 and TIME_FACTOR / time > value:
        why = f"{TIME_FACTOR:g} / the training time {time:.3g} (SGD steps x lr / (1 - momentum))"
        why += f", above {reason}"
        value, reason = TIME_FACTOR / time, why
    choice = Choice(float(value), rule, reason, spectrum)
    if spectrum.lambda_min < 0 and -spectrum.lambda_min > 1e-6 * max(abs(spectrum.lambda_max), 1e-30):
        log.warning("%sdamping %.4g chosen: %s", f"{method}: " if method else "", value, reason)
    else:
        log.info("%sdamping %.4g chosen: %s", f"{method}: " if method else "", value, reason)
    return choice


def given(value: float, spectrum: Spectrum | None = None, *, method: str = "") -> Choice:
    """A damping the user set; warns when a known spectrum shows it leaves H + damping I indefinite."""
    if spectrum is not None and spectrum.lambda_min + value < 0:
        log.warning(
            "%sdamping %.4g is below |smallest eigenvalue| %.3g: H + damping I is indefinite and the scores "
            "may be noise; use damping='auto' or curvature='ggn'",
            f"{method}: " if method else "",
            value,
            -spectrum.lambda_min,
        )
    return Choice(float(value), "given", "set by the user", spectrum)
