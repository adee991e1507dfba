"""Dramatiq actors. ``dramatiq service.actors`` loads the broker and every actor module."""

from service import broker as _broker  # sets the global broker before any actor is declared
from service.actors import capacity, emails

__all__ = ["_broker", "capacity", "emails"]
