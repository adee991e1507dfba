"""Postgres access: a connection pool per process, transactions, and migrations.

Database errors are mapped once, here, onto the service's vocabulary: a lock conflict,
deadlock or serialisation failure is ``DatabaseConflict`` (retry soon: the other transaction
will finish), a lost or refused connection is ``DatabaseUnavailable`` (retry later).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout
from yoyo import get_backend, read_migrations

from service.resilience import TransientError

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "db" / "migrations"

Conn = psycopg.Connection[Any]

_CONFLICTS: tuple[type[BaseException], ...] = (
    psycopg.errors.LockNotAvailable,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
)


class DatabaseError(TransientError):
    """Postgres could not do it now; retrying can succeed (catch this for either kind)."""


class DatabaseUnavailable(DatabaseError):
    """Postgres could not be reached, or the pool had no connection in time."""


class DatabaseConflict(DatabaseError):
    """A lock conflict, deadlock or serialisation failure: retrying soon will succeed."""


def map_error(error: BaseException) -> DatabaseError | None:
    """The service error for a psycopg or pool error, or None when it is not transient."""
    if isinstance(error, _CONFLICTS):
        return DatabaseConflict(f"database conflict: {type(error).__name__}")
    if isinstance(error, PoolTimeout):
        return DatabaseUnavailable(
            "database unavailable: no pooled connection within DB_POOL_TIMEOUT_SECONDS"
            " (all DB_POOL_MAX_SIZE connections busy, or Postgres unreachable)"
        )
    if isinstance(error, psycopg.OperationalError | psycopg.errors.AdminShutdown):
        return DatabaseUnavailable(f"database unavailable: {type(error).__name__}")
    return None


@contextmanager
def _mapped_errors() -> Iterator[None]:
    try:
        yield
    except psycopg.Error as error:
        mapped = map_error(error)
        if mapped is None:
            raise
        raise mapped from error


class Database:
    """One pool per process: a forked child opens its own instead of sharing the parent's
    sockets. Nothing connects until the first transaction."""

    def __init__(
        self, url: str, max_size: int, *, connect_timeout: float = 5, wait_timeout: float = 5
    ) -> None:
        self.url = url
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.wait_timeout = wait_timeout
        self._lock = threading.Lock()
        self._pool: ConnectionPool | None = None
        self._pid: int | None = None

    def pool(self) -> ConnectionPool:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = ConnectionPool(
                    self.url,
                    min_size=self.max_size,  # opened up front: no thread waits for growth
                    max_size=self.max_size,
                    kwargs={"row_factory": dict_row, "connect_timeout": self.connect_timeout},
                    open=False,
                    name="booking",
                    timeout=self.wait_timeout,
                )
                self._pool.open(wait=False)
                self._pid = os.getpid()
            return self._pool

    @contextmanager
    def transaction(self) -> Iterator[Conn]:
        """A connection inside one transaction: committed on success, rolled back on error."""
        with _mapped_errors(), self.pool().connection() as conn, conn.transaction():
            yield conn

    @contextmanager
    def autocommit(self) -> Iterator[Conn]:
        """A pooled connection in autocommit mode: each statement is its own transaction, in one
        round trip (no BEGIN and COMMIT), for work that is a single statement."""
        with _mapped_errors(), self.pool().connection() as conn:
            conn.autocommit = True
            try:
                yield conn
            finally:
                with suppress(psycopg.Error):
                    conn.autocommit = False

    @contextmanager
    def connection(self) -> Iterator[Conn]:
        """A pooled connection without an enclosing transaction (the caller commits)."""
        with _mapped_errors(), self.pool().connection() as conn:
            yield conn

    def close(self) -> None:
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.close()
            self._pool, self._pid = None, None


def _yoyo_url(database_url: str) -> str:
    scheme, rest = database_url.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme in ("postgresql", "postgres") else database_url


def migrate(database_url: str, migrations_dir: Path | None = None) -> list[str]:
    """Apply pending migrations under a lock, so that concurrent callers are safe; returns ids."""
    backend = get_backend(_yoyo_url(database_url))
    try:
        migrations = read_migrations(str(migrations_dir or MIGRATIONS_DIR))
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
    finally:
        backend.connection.close()
    return [m.id for m in pending]
