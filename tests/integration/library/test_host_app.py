"""The producer as a library inside a host application (the booking service).

Importing our actor builds nothing and replaces no broker; ``.send()`` needs BROKER_URL and
DATABASE_URL (it records the request, with the booking's revision, before enqueueing), and keeps
the email when Postgres is unreachable; without SMTP settings, a send that would have to go out
at once raises the documented ``EmailNotAccepted`` instead of failing at import; ``venue_id``
rolls the queue flag out per venue.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import redis
from UnleashClient.cache import FileCache

from harness.factories import insert_booking, insert_venue
from harness.servers import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[3]
QUEUE = "dramatiq:pending-booking-emails"


def _run(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.library.host_app", *args],
        env={"PATH": os.environ["PATH"], **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def test_import_with_no_environment_starts_nothing() -> None:
    code = (
        "import threading, dramatiq.broker as b, service.actors.emails, service.actors, "
        "service.worker, service.cli; "
        "assert b.global_broker is None, 'a global broker was set'; "
        "assert threading.active_count() == 1, threading.enumerate()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": os.environ["PATH"]},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def _booking(database_url: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return str(insert_booking(conn, insert_venue(conn), status="confirmed"))


def _message(url: str) -> dict[str, Any]:
    (raw,) = redis.Redis.from_url(url).lrange(QUEUE, 0, -1)
    enqueued = redis.Redis.from_url(url).hget(f"{QUEUE}.msgs", raw)
    assert enqueued is not None
    message: dict[str, Any] = json.loads(enqueued)
    return message


def test_host_keeps_its_broker_and_we_record_then_enqueue(
    redis_server: RedisServer, database_url: str
) -> None:
    ours, theirs = (
        f"{redis_server.url.rsplit('/', 1)[0]}/5",
        f"{redis_server.url.rsplit('/', 1)[0]}/6",
    )
    for url in (ours, theirs):
        redis.Redis.from_url(url).flushdb()
    booking = _booking(database_url)
    report = _run({"BROKER_URL": ours, "DATABASE_URL": database_url}, theirs, booking)
    assert report == {
        "imported_without_threads": True,
        "global_broker_after_import_is_host": True,
        "outcomes": {"": "accepted"},
        "global_broker_after_send_is_host": True,
        "our_broker_is_private": True,
        "host_actor_on_host_broker": True,
        "our_actor_not_on_host_broker": True,
    }
    kwargs = _message(ours)["kwargs"]
    assert kwargs == {"booking_id": booking, "type": "confirmed", "revision": 1}
    assert redis.Redis.from_url(theirs).llen(QUEUE) == 0
    assert redis.Redis.from_url(theirs).llen("dramatiq:host-jobs") == 1
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT email_type, revision, state FROM email_deliveries WHERE booking_id = %s",
            (booking,),
        ).fetchall()
    assert rows == [("confirmed", 1, "pending")]  # recorded before .send() returned


def test_without_smtp_settings_an_immediate_send_raises_email_not_accepted(
    redis_server: RedisServer, database_url: str
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = {"BROKER_URL": dead, "DATABASE_URL": database_url}
    report = _run(env, redis_server.url, _booking(database_url))
    outcome = report["outcomes"][""]
    assert outcome.startswith("EmailNotAccepted: ")
    assert "SMTP_URL" in outcome or "EMAIL_FROM" in outcome
    assert report["global_broker_after_send_is_host"] is True


def test_without_database_url_send_names_the_missing_setting(redis_server: RedisServer) -> None:
    ours = f"{redis_server.url.rsplit('/', 1)[0]}/8"
    report = _run({"BROKER_URL": ours}, redis_server.url, str(uuid.uuid4()))
    assert report["outcomes"][""] == "ConfigError: invalid configuration: DATABASE_URL: is required"
    assert report["global_broker_after_send_is_host"] is True


def test_postgres_unreachable_at_send_still_enqueues_the_email(redis_server: RedisServer) -> None:
    """The booking must not fail because our database is away: the message goes without a
    revision (the worker records the request at the booking's current revision)."""
    ours = f"{redis_server.url.rsplit('/', 1)[0]}/9"
    redis.Redis.from_url(ours).flushdb()
    env = {
        "BROKER_URL": ours,
        "DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/none",
        "DB_POOL_TIMEOUT_SECONDS": "1",
    }
    booking = str(uuid.uuid4())
    report = _run(env, redis_server.url, booking)
    assert report["outcomes"][""] == "accepted"
    assert _message(ours)["kwargs"] == {"booking_id": booking, "type": "confirmed"}


def test_venue_id_rolls_the_queue_flag_out_per_venue(
    redis_server: RedisServer, database_url: str, tmp_path: Path
) -> None:
    """The flag is on for venue-a only (from the last state Unleash sent, kept in the cache):
    venue-a's email is queued, venue-b's would be sent at once (not configured here)."""
    cache = tmp_path / "flags"
    cache.mkdir()
    toggle = {
        "name": "email-queue-enabled",
        "type": "kill-switch",
        "enabled": True,
        "project": "default",
        "stale": False,
        "strategies": [{"name": "userWithId", "parameters": {"userIds": "venue-a"}}],
        "variants": [],
        "impressionData": False,
    }
    FileCache("booking-durability-service", directory=str(cache)).bootstrap_from_dict(
        {"version": 2, "features": [toggle]}
    )
    ours = f"{redis_server.url.rsplit('/', 1)[0]}/7"
    redis.Redis.from_url(ours).flushdb()
    env = {
        "BROKER_URL": ours,
        "DATABASE_URL": database_url,
        "UNLEASH_URL": f"http://127.0.0.1:{free_port()}/api",
        "UNLEASH_REQUEST_TIMEOUT_SECONDS": "0.5",
        "FLAG_CACHE_DIR": str(cache),
    }
    report = _run(env, redis_server.url, _booking(database_url), "venue-a", "venue-b")
    assert report["outcomes"]["venue-a"] == "accepted"
    assert report["outcomes"]["venue-b"].startswith("EmailNotAccepted: ")
    assert redis.Redis.from_url(ours).llen(QUEUE) == 1
