"""The service's App for a test, the demo or a benchmark: built from an explicit environment
mapping (never ``os.environ`` edits), with every actor bound, closed at the end."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from service.actors import ACTORS
from service.app import App
from service.logs import configure
from service.worker import bind


@contextmanager
def bound_app(env: Mapping[str, str], *, configure_logging: bool = False) -> Iterator[App]:
    """A worker-style App for ``env`` with the actors bound to it; unbound and closed at the end.

    One App at a time: an actor is declared once per broker, so switching settings means a new
    App (and broker) rather than binding an earlier one again.
    """
    app = App.for_worker(env)
    if configure_logging:
        configure(app.settings.log_level, app.settings.log_format)
    bind(app)
    try:
        yield app
    finally:
        for actor in ACTORS:
            actor.unbind()
        app.close()
