"""Actors declared at import and bound to a broker when a process starts.

``dramatiq.actor`` binds an actor to the global broker as the module is imported, creating one
if there is none: importing such a module replaces a host application's own broker. Our actors
are ``DeferredActor`` objects instead. A worker process binds them to its ``App`` (the worker's
composition root does it once, at start); anywhere else, the first ``send`` binds them to a
producer ``App`` built from the environment, with a private broker that needs only BROKER_URL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any

import dramatiq

from service.app import App

Handler = Callable[..., Any]
"""An actor's function: ``handler(app, *args, **kwargs)``; the App is bound in."""


class AppActor(dramatiq.Actor[Any, Any]):
    """A Dramatiq actor that knows the App it was bound with."""

    app: App


class DeferredActor:
    """An actor's declaration; ``bind`` makes the Dramatiq actor on an App's broker."""

    def __init__(
        self,
        handler: Handler,
        *,
        actor_name: str,
        queue_name: str,
        actor_class: type[AppActor] = AppActor,
        options: Callable[[App], dict[str, Any]] = lambda _app: {},
    ) -> None:
        self.handler = handler
        self.actor_name = actor_name
        self.queue_name = queue_name
        self.actor_class = actor_class
        self.options = options
        self._bound: AppActor | None = None
        self._lock = threading.Lock()

    def bind(self, app: App) -> AppActor:
        """Declare this actor on ``app.broker``, its function receiving ``app`` (binding to an
        App again reuses the actor already declared on its broker)."""
        declared = app.broker.actors.get(self.actor_name)
        if isinstance(declared, AppActor) and declared.app is app:
            self._bound = declared
            return declared
        fn = partial(self.handler, app)
        fn.__module__ = self.handler.__module__  # names the actor's logger
        actor = self.actor_class(
            fn,
            broker=app.broker,
            actor_name=self.actor_name,
            queue_name=self.queue_name,
            priority=0,
            options=self.options(app),
        )
        actor.app = app
        self._bound = actor
        return actor

    def unbind(self) -> None:
        self._bound = None

    @property
    def actor(self) -> AppActor:
        """The bound actor; bound to the process's producer App on first use."""
        bound = self._bound
        if bound is None:
            with self._lock:
                bound = self._bound
                if bound is None:
                    bound = self.bind(producer_app())
        return bound

    def send(self, *args: Any, **kwargs: Any) -> dramatiq.Message[Any]:
        return self.actor.send(*args, **kwargs)

    def send_with_options(
        self,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: timedelta | int | None = None,
        **options: Any,
    ) -> dramatiq.Message[Any]:
        return self.actor.send_with_options(args=args, kwargs=kwargs, delay=delay, **options)

    def message_with_options(
        self, *, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> dramatiq.Message[Any]:
        return self.actor.message_with_options(args=args, kwargs=kwargs, **options)

    def message(self, *args: Any, **kwargs: Any) -> dramatiq.Message[Any]:
        return self.actor.message(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.actor(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Anything else (``broker``, ``options``, ``fn``) is the bound actor's."""
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.actor, name)


_producer_lock = threading.Lock()
_producer: list[App] = []


def producer_app() -> App:
    """The App behind ``send`` outside a worker: built from the environment on first use."""
    with _producer_lock:
        if not _producer:
            _producer.append(App.for_producer())
        return _producer[0]
