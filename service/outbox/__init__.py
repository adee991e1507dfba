"""Transactional outbox: events written with the state change they announce, delivered by a relay.

``write_event`` runs in the caller's transaction; ``python -m service outbox relay`` claims due
events with ``FOR UPDATE SKIP LOCKED`` and a lease, and hands each to its registered handler.
"""

from service.outbox.store import OutboxEvent, write_event

__all__ = ["OutboxEvent", "write_event"]
