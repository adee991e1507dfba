"""Postgres access: one connection pool per process (created after fork), and migrations."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from service.config import get_settings

MIGRATIONS_DIR = Path(
    os.environ.get("MIGRATIONS_DIR", Path(__file__).resolve().parents[1] / "db" / "migrations")
)

_lock = threading.Lock()
_pool: ConnectionPool | None = None
_pool_pid: int | None = None


class DatabaseUnavailable(RuntimeError):
    """Postgres could not be reached (a transient condition: retry later)."""


def pool() -> ConnectionPool:
    """The process's pool; a forked child builds its own instead of sharing the parent's sockets."""
    global _pool, _pool_pid
    with _lock:
        if _pool is None or _pool_pid != os.getpid():
            settings = get_settings()
            _pool = ConnectionPool(
                settings.database_url.get_secret_value(),
                min_size=1,
                max_size=settings.db_pool_max_size,
                kwargs={"row_factory": dict_row, "connect_timeout": 5},
                open=False,
                name="booking",
                timeout=10,
            )
            _pool.open(wait=False)
            _pool_pid = os.getpid()
        return _pool


def close_pool() -> None:
    global _pool, _pool_pid
    with _lock:
        if _pool is not None and _pool_pid == os.getpid():
            _pool.close()
        _pool, _pool_pid = None, None


@contextmanager
def transaction() -> Iterator[psycopg.Connection[dict[str, object]]]:
    """A connection inside one transaction: committed on success, rolled back on error."""
    try:
        with pool().connection() as conn, conn.transaction():
            yield conn  # type: ignore[misc]
    except (psycopg.OperationalError, psycopg.errors.AdminShutdown) as error:
        raise DatabaseUnavailable(f"database unavailable: {type(error).__name__}") from error
    except TimeoutError as error:
        raise DatabaseUnavailable(
            "database unavailable: no connection within the pool timeout"
        ) from error


def _yoyo_url(database_url: str) -> str:
    scheme, rest = database_url.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme in ("postgresql", "postgres") else database_url


def migrate(database_url: str | None = None) -> list[str]:
    """Apply pending migrations under a lock, so that concurrent callers are safe; returns ids applied."""
    from yoyo import get_backend, read_migrations

    url = database_url or get_settings().database_url.get_secret_value()
    backend = get_backend(_yoyo_url(url))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return [m.id for m in pending]
