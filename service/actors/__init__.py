"""Thin Dramatiq actors, declared here and bound to a broker by ``service.worker`` at start."""

from service.actors.binding import DeferredActor
from service.actors.capacity import confirm_booking
from service.actors.emails import send_booking_email

ACTORS: tuple[DeferredActor, ...] = (send_booking_email, confirm_booking)

__all__ = ["ACTORS", "confirm_booking", "send_booking_email"]
