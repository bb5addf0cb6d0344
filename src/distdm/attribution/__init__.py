"""Attribution methods, one module per family, all behind the `Attributor` interface."""

from .base import ATTRIBUTORS, Attributor, make_attributor, register

__all__ = ["ATTRIBUTORS", "Attributor", "make_attributor", "register"]
