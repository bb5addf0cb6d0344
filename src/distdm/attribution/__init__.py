"""Attribution methods, one module per family, all behind the `Attributor` interface."""

from . import ddm  # noqa: F401  (registers the method)
from .base import ATTRIBUTORS, Attributor, make_attributor, register

__all__ = ["ATTRIBUTORS", "Attributor", "make_attributor", "register"]
from . import further, gradients, influence, retrain, simple  # noqa: F401  (registers methods)  # noqa: F401  (registers methods)
