"""Redis clients from ``BROKER_URL``: one Redis server, or the primary that Sentinel names.

``redis://[:password@]host:port/db`` (``rediss://`` for TLS) is one server.
``redis+sentinel://[:password@]host1:26379,host2:26379,host3:26379/<master-name>/<db>``
(``rediss+sentinel://`` for TLS to Sentinels and Redis alike) asks the Sentinels which server is
the primary of ``<master-name>`` whenever a connection is (re)opened, so a client follows a
failover without a restart: a connection to a dead primary fails, and the next one goes to the
new primary; one to a primary demoted to replica answers ``READONLY``, which redis-py turns into
a reconnect. The password is the Redis servers' password; Sentinels that require one of their
own take it from the query parameter ``sentinel_password``.

Every Redis user of the service (the broker and its maintenance, the producer, the reconciler's
enqueues, the queue-depth collector, the readiness probe, the DLQ tool) gets its client from
``redis_client``. ``parse_redis_url`` is also what ``config`` validates ``BROKER_URL`` with.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.backoff
import redis.retry
from redis.sentinel import Sentinel

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DIRECT_SCHEMES = ("redis", "rediss")
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """A ``redis+sentinel://`` URL, parsed."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None
    tls: bool


def parse_redis_url(url: str) -> SentinelTarget | None:
    """The Sentinel target of a ``redis+sentinel://`` URL, None for a plain ``redis://`` one.

    Raises ValueError with a message that never quotes the URL (it carries a password).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("is not a valid URL") from None
    if parts.scheme in DIRECT_SCHEMES:
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError("the Redis database index must be a number")
        return None
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError("is not a redis://, rediss:// or redis+sentinel:// URL")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = []
    for hostport in hosts.split(","):
        hostport = hostport.strip()
        if hostport.startswith("["):
            host, _, rest = hostport[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = hostport.partition(":")
        if not host:
            raise ValueError(
                "a Sentinel URL needs host:port of each Sentinel, comma-separated"
                " (redis+sentinel://host1:26379,host2:26379,host3:26379/<master-name>/<db>)"
            )
        if port and (not port.isdigit() or not 0 < int(port) < 65536):
            raise ValueError("has an invalid Sentinel port (must be a number from 1 to 65535)")
        sentinels.append((host, int(port) if port else DEFAULT_SENTINEL_PORT))
    segments = [s for s in parts.path.split("/") if s]
    if not segments:
        raise ValueError(
            "a Sentinel URL must name the master after the hosts"
            " (redis+sentinel://host1:26379,host2:26379/<master-name>/<db>)"
        )
    if len(segments) > 2:
        raise ValueError("a Sentinel URL's path is /<master-name>/<db>, nothing more")
    db = segments[1] if len(segments) == 2 else "0"
    if not db.isdigit():
        raise ValueError("the Redis database index must be a number")
    query = parse_qs(parts.query)
    unknown = sorted(set(query) - {"sentinel_password"})
    if unknown:
        raise ValueError(f"unknown Sentinel URL parameter(s): {', '.join(unknown)}")
    username, has_password, password = userinfo.partition(":")
    sentinel_password = query.get("sentinel_password", [None])[-1]
    return SentinelTarget(
        sentinels=tuple(sentinels),
        master=unquote(segments[0]),
        db=int(db),
        username=unquote(username) or None,
        password=unquote(password) if has_password and password else None,
        sentinel_password=sentinel_password or None,
        tls=parts.scheme.startswith("rediss"),
    )


def _retry() -> redis.retry.Retry:
    return redis.retry.Retry(redis.backoff.ExponentialBackoff(cap=0.5, base=0.05), 2)


def redis_client(
    url: str,
    *,
    connect_timeout: float = 2,
    socket_timeout: float = 10,
    health_check_interval: int = 30,
) -> redis.Redis:
    """A client for ``url`` (plain or Sentinel) with bounded timeouts and two quick retries of a
    failed command on a fresh connection (for Sentinel, a fresh look-up of the primary)."""
    target = parse_redis_url(url)
    if target is None:
        return redis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
            health_check_interval=health_check_interval,
            retry=_retry(),
        )
    sentinel = Sentinel(
        list(target.sentinels),
        sentinel_kwargs={
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": min(socket_timeout, connect_timeout),
            "password": target.sentinel_password,
            "ssl": target.tls,
            # discover_master already tries each Sentinel in turn: one try each, no backoff
            "retry": redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        },
    )
    client: redis.Redis = sentinel.master_for(
        target.master,
        db=target.db,
        username=target.username,
        password=target.password,
        ssl=target.tls,
        socket_connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
        health_check_interval=health_check_interval,
        retry=_retry(),
    )
    return client
