"""``BROKER_URL`` in its Sentinel form: parsed once, validated with clear errors, never echoed."""

from __future__ import annotations

import pytest
from redis.sentinel import SentinelConnectionPool

from service.config import SERVICE, ConfigError, load_settings
from service.redis_urls import SentinelTarget, parse_redis_url, redis_client

SECRET = "hunter2-secret"
BASE = {
    "DATABASE_URL": "postgresql://svc@db.internal:5432/booking",
    "SMTP_URL": "smtp://smtp.internal:25",
    "EMAIL_FROM": "Bookings <bookings@example.com>",
}


def test_a_sentinel_url_names_every_sentinel_the_master_and_the_database() -> None:
    target = parse_redis_url(f"redis+sentinel://:{SECRET}@s1:26379,s2:26380,s3/bookings/2")
    assert target == SentinelTarget(
        sentinels=(("s1", 26379), ("s2", 26380), ("s3", 26379)),
        master="bookings",
        db=2,
        username=None,
        password=SECRET,
        sentinel_password=None,
        tls=False,
    )


def test_database_defaults_to_zero_and_tls_and_sentinel_password_are_read() -> None:
    target = parse_redis_url("rediss+sentinel://app:pw@[::1]:26379/m?sentinel_password=sp")
    assert target is not None
    assert (target.sentinels, target.db, target.username, target.password) == (
        (("::1", 26379),),
        0,
        "app",
        "pw",
    )
    assert target.sentinel_password == "sp" and target.tls


def test_a_plain_redis_url_has_no_sentinel_target() -> None:
    assert parse_redis_url("redis://127.0.0.1:6379/0") is None


def test_settings_accept_a_sentinel_url_and_the_broker_stays_redis() -> None:
    settings = load_settings({**BASE, "BROKER_URL": "redis+sentinel://s1:26379,s2:26379/m/0"})
    assert settings.require(*SERVICE).broker_kind == "redis"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"redis+sentinel://:{SECRET}@s1:26379,s2:26379", "must name the master"),
        (f"redis+sentinel://:{SECRET}@s1:26379/m/zero", "database index must be a number"),
        (f"redis+sentinel://:{SECRET}@s1:26379/m/0/extra", "/<master-name>/<db>, nothing more"),
        (f"redis+sentinel://:{SECRET}@s1:263x9/m/0", "invalid port"),
        (f"redis+sentinel://:{SECRET}@s1:26379,:26379/m/0", "has no host"),
        (f"redis+sentinel://:{SECRET}@s1:26379/m/0?master=x", "unknown Sentinel URL parameter"),
        (f"sentinel://:{SECRET}@s1:26379/m/0", "must start with one of"),
    ],
)
def test_a_bad_sentinel_url_is_a_clear_config_error(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({**BASE, "BROKER_URL": url})
    message = str(raised.value)
    assert message.startswith("invalid configuration: BROKER_URL: ")
    assert expected in message
    assert SECRET not in message


def test_the_client_asks_the_sentinels_for_the_named_primary() -> None:
    client = redis_client(f"redis+sentinel://:{SECRET}@s1:26379,s2:26380/bookings/3")
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "bookings" and pool.is_master
    assert [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in pool.sentinel_manager.sentinels
    ] == [("s1", 26379), ("s2", 26380)]
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"], kwargs["socket_timeout"]) == (3, SECRET, 10)
    assert kwargs["retry"] is not None
