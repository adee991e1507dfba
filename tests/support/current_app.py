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

_running: list[tuple[App, dict[str, str]]] = []


def _start(env: Mapping[str, str]) -> App:
    app = App.for_worker(env)
    bind(app)
    _running.append((app, dict(env)))
    return app


@contextmanager
def running_app(env: Mapping[str, str]) -> Iterator[App]:
    """A worker-style App for ``env`` with every actor bound, current until the block ends
    (with any App that ``reconfigure`` started inside it)."""
    depth = len(_running)
    app = _start(env)
    try:
        yield app
    finally:
        while len(_running) > depth:
            finished = _running.pop()[0]
            finished.close()
            if "flags" in vars(finished):
                finished.flags.holder.join_stopped(10)
        for actor in ACTORS:
            actor.unbind()
        if _running:
            bind(_running[-1][0])


def reconfigure(**values: str) -> App:
    """Make current an App whose environment is the current one changed by ``values``
    (``WEBHOOK_ALLOW_HTTP="true"``, say); it lasts until the enclosing ``running_app`` ends."""
    _, env = _running[-1]
    return _start({**env, **{k.upper(): v for k, v in values.items()}})


def current_app() -> App:
    assert _running, "this helper needs the `app` fixture (or capacity_env)"
    return _running[-1][0]


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
