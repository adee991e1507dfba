"""The composition root builds each part once, even when worker threads ask at the same time."""

from __future__ import annotations

import threading

from service.app import App
from service.config import load_settings
from tests.unit.test_actor_binding import ENV


def test_concurrent_first_use_builds_one_pool_and_one_mailroom() -> None:
    app = App(load_settings(ENV))
    barrier = threading.Barrier(16)
    seen: list[tuple[int, int]] = []

    def ask() -> None:
        barrier.wait()
        seen.append((id(app.mailroom), id(app.db)))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == 1
    assert app.mailroom.db is app.db
    app.close()


def test_nothing_is_built_until_asked() -> None:
    app = App(load_settings(ENV))
    assert not {"db", "mailer", "flags", "broker"} & set(vars(app))
    app.close()
