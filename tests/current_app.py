"""The App of the running test, for test helpers that are plain functions, not fixtures."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import Any

from service.actors import ACTORS
from service.actors.capacity import capacity_service
from service.app import App
from service.capacity.confirm import Capacity, Notifier
from service.db import Conn
from service.outbox.relay import Relay
from service.worker import bind

_running: list[App] = []


@contextmanager
def running_app(env: Mapping[str, str]) -> Iterator[App]:
    """A worker-style App for ``env`` with every actor bound, current until the block ends."""
    app = App.for_worker(env)
    bind(app)
    _running.append(app)
    try:
        yield app
    finally:
        _running.remove(app)
        for actor in ACTORS:
            actor.unbind()
        app.close()


def current_app() -> App:
    assert _running, "this helper needs the `app` fixture (or capacity_env)"
    return _running[-1]


def transaction() -> AbstractContextManager[Conn]:
    return current_app().db.transaction()


def capacity(notify: Notifier | None = None) -> Capacity:
    """The capacity service of the current App, optionally with another confirmed-email hook."""
    cap = capacity_service(current_app())
    return cap if notify is None else replace(cap, notify_confirmed=notify)


def relay(**options: Any) -> Relay:
    """An outbox relay over the current App's database and registered handlers."""
    app = current_app()
    return Relay(app.db, app.settings, app.outbox_handlers, **options)
