"""What an attribution explains: functions of a model's outputs on the queries.

Every objective maps outputs (V, Q, O) of V models, the reference model's outputs (Q, O) and the
queries' true targets (Q,) to values (V, Q). Gradient methods use the same functions through
automatic differentiation, so one definition serves all methods.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import DistdmError

Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of queries whose top class is the true one: outputs (..., Q, C), targets (Q,) ->
    (...,) in float64, on the outputs' device (the one accuracy of the library)."""
    return (out.argmax(-1) == y.to(out.device)).double().mean(-1)


def margin(out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p_y / (1 - p_y) of the true class (BENCHMARKS.md's ground-truth target)."""
    logp = F.log_softmax(out, -1)
    lp = logp.gather(-1, y.expand(*out.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    # log(1 - p_y) computed stably as logsumexp over the other classes
    others = logp.scatter(-1, y.expand(*out.shape[:-1]).unsqueeze(-1), float("-inf"))
    return lp - torch.logsumexp(others, -1)


def dist1(out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||softmax(out) - softmax(ref)||^2: how far the prediction moves (DDM's Dist1)."""
    return ((F.softmax(out, -1) - F.softmax(ref, -1)) ** 2).sum(-1)


def dist2(out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the prediction with the true label (DDM's Dist2; also 'loss')."""
    return -F.log_softmax(out, -1).gather(-1, y.expand(*out.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def dist3(out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 / (1 + ||softmax(out) - softmax(ref)||^2): DDM's 'least influence' objective."""
    return 1.0 / (1.0 + dist1(out, ref, y))


def squared_error(out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared error of a regression output (loss for regression queries)."""
    return ((out.squeeze(-1) - y) ** 2).reshape(*out.shape[:-1])


def global_loss(out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all queries as one column (V, 1): a validation-set objective."""
    return dist2(out, ref, y).mean(-1, keepdim=True)


def kl_to(teacher_logits: torch.Tensor) -> Objective:
    """KL(teacher || model) per query: transferability to a teacher's predictions."""

    def kl(out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pt = F.log_softmax(teacher_logits, -1)
        return (pt.exp() * (pt - F.log_softmax(out, -1))).sum(-1)

    return kl


OBJECTIVES: dict[str, Objective] = {
    "margin": margin,
    "dist1": dist1,
    "dist2": dist2,
    "loss": dist2,
    "dist3": dist3,
    "squared_error": squared_error,
    "global": global_loss,
}


def get_objective(objective: str | Objective) -> Objective:
    """An objective by name ('margin', 'dist1', 'dist2', 'loss', 'dist3', 'squared_error') or a
    user function (outputs (V,Q,O), reference (Q,O), targets (Q,)) -> (V, Q)."""
    if callable(objective):
        return objective
    if objective not in OBJECTIVES:
        raise DistdmError(f"unknown objective {objective!r}; one of {sorted(OBJECTIVES)} or a callable")
    return OBJECTIVES[objective]


def objective_name(objective: str | Objective) -> str:
    """A printable name for an objective."""
    return objective if isinstance(objective, str) else getattr(objective, "__name__", "custom")
