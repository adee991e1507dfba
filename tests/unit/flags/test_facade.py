"""Unit tests of the flag facade: no Unleash server, state seeded through the SDK's bootstrap."""

from __future__ import annotations

import logging
import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest
from UnleashClient.cache import FileCache

from harness.servers import free_port
from service.flags import EMAIL_QUEUE, POLICY_REQUOTE, Flag, Flags, Source
from service.flags import client as flag_client
from service.flags.client import QuietSdkErrors
from service.metrics import FLAG_ENABLED
from tests.support.flags import FlagsMade

pytestmark = pytest.mark.usefixtures("no_thread_outlives_the_test")


APP = "booking-durability-service"


def toggle(name: str, enabled: bool, *strategies: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "type": "kill-switch",
        "enabled": enabled,
        "project": "default",
        "stale": False,
        "strategies": list(strategies) or [{"name": "default", "parameters": {}}],
        "variants": [],
        "impressionData": False,
    }


def seed_cache(cache_dir: str, *toggles: dict[str, Any]) -> None:
    """Write a state into the cache dir exactly as the SDK's bootstrap does."""
    cache = FileCache(APP, directory=cache_dir)
    cache.bootstrap_from_dict({"version": 2, "features": list(toggles)})


@pytest.fixture
def unreachable_unleash(flag_env: dict[str, str]) -> dict[str, str]:
    """``flag_env`` pointed at a loopback port nobody listens on (connection refused at once)."""
    return {
        **flag_env,
        "UNLEASH_URL": f"http://127.0.0.1:{free_port()}/api",
        "UNLEASH_REFRESH_INTERVAL_SECONDS": "1",
    }


def gauge(name: str) -> float:
    return float(FLAG_ENABLED.labels(flag=name)._value.get())


def test_defaults_without_unleash(flag_env: dict[str, str], make_flags: FlagsMade) -> None:
    flags = make_flags(flag_env)
    assert flags.email_queue_enabled() is True
    assert flags.policy_requote_enabled("venue-1") is True
    assert flags.holder.get() is None
    rows, state = flags.status()
    assert state is None
    assert {row.flag.name: row.source for row in rows} == {
        "email-queue-enabled": Source.DEFAULT,
        "policy-requote-enabled": Source.DEFAULT,
    }


def test_environment_overrides_defaults(flag_env: dict[str, str], make_flags: FlagsMade) -> None:
    off = make_flags(
        flag_env, FEATURE_EMAIL_QUEUE_ENABLED="false", FEATURE_POLICY_REQUOTE_ENABLED="0"
    )
    assert off.email_queue_enabled() is False
    assert off.policy_requote_enabled() is False
    assert gauge("email-queue-enabled") == 0
    on = make_flags(flag_env, FEATURE_EMAIL_QUEUE_ENABLED="true")
    assert on.email_queue_enabled() is True
    assert gauge("email-queue-enabled") == 1


def test_cached_state_is_used_while_unleash_is_unreachable(
    unreachable_unleash: dict[str, str], make_flags: FlagsMade
) -> None:
    seed_cache(unreachable_unleash["FLAG_CACHE_DIR"], toggle("email-queue-enabled", False))
    flags = make_flags(unreachable_unleash)
    started = time.perf_counter()
    assert flags.email_queue_enabled() is False
    assert time.perf_counter() - started < 0.5
    assert flags.policy_requote_enabled() is True, "a toggle missing from the cache: default"
    rows, state = flags.status(wait=5)
    assert state is not None and state.loaded_from_cache and not state.fresh
    sources = {row.flag.name: row.source for row in rows}
    assert sources["email-queue-enabled"] == Source.CACHE
    assert sources["policy-requote-enabled"] == Source.DEFAULT
    time.sleep(1.5)
    assert flags.email_queue_enabled() is False, "failed polls must not drop the cached state"


def test_env_default_wins_only_for_unknown_toggles(
    unreachable_unleash: dict[str, str], make_flags: FlagsMade
) -> None:
    seed_cache(unreachable_unleash["FLAG_CACHE_DIR"], toggle("email-queue-enabled", True))
    flags = make_flags(unreachable_unleash, FEATURE_EMAIL_QUEUE_ENABLED="false")
    assert flags.email_queue_enabled() is True


def test_venue_goes_into_the_context(
    unreachable_unleash: dict[str, str], make_flags: FlagsMade
) -> None:
    seed_cache(
        unreachable_unleash["FLAG_CACHE_DIR"],
        toggle(
            "email-queue-enabled",
            True,
            {
                "name": "default",
                "parameters": {},
                "constraints": [
                    {"contextName": "venueId", "operator": "IN", "values": ["venue-a"]}
                ],
            },
        ),
        toggle(
            "policy-requote-enabled", True, {"name": "userWithId", "parameters": {"userIds": "7"}}
        ),
    )
    flags = make_flags(unreachable_unleash)
    assert flags.email_queue_enabled("venue-a") is True
    assert flags.email_queue_enabled("venue-b") is False
    assert flags.email_queue_enabled() is False
    assert flags.policy_requote_enabled(7) is True, "venue ids are passed as strings"
    assert flags.policy_requote_enabled(8) is False


def test_venue_stickiness_is_stable(
    unreachable_unleash: dict[str, str], make_flags: FlagsMade
) -> None:
    rollout = {
        "name": "flexibleRollout",
        "parameters": {"rollout": "50", "stickiness": "venueId", "groupId": "email-queue-enabled"},
    }
    seed_cache(unreachable_unleash["FLAG_CACHE_DIR"], toggle("email-queue-enabled", True, rollout))
    flags = make_flags(unreachable_unleash)
    venues = [f"venue-{i}" for i in range(200)]
    first = [flags.email_queue_enabled(v) for v in venues]
    assert first == [flags.email_queue_enabled(v) for v in venues]
    assert 40 < sum(first) < 160, "about half the venues are in a 50 % rollout"


def test_evaluation_never_raises(
    flag_env: dict[str, str], make_flags: FlagsMade, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("boom")

    flags = make_flags(flag_env, FEATURE_POLICY_REQUOTE_ENABLED="false")
    monkeypatch.setattr(flags.holder, "get", broken)
    assert flags.email_queue_enabled("v") is True
    assert flags.policy_requote_enabled() is False

    monkeypatch.setattr(Flag, "default", broken)
    assert flags.email_queue_enabled() is EMAIL_QUEUE.last_resort
    assert flags.policy_requote_enabled() is POLICY_REQUOTE.last_resort


def test_a_failing_client_answers_the_default(
    unreachable_unleash: dict[str, str], make_flags: FlagsMade, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = make_flags(unreachable_unleash)
    client = flags.holder.get()
    assert client is not None

    def broken(*_: object, **__: object) -> bool:
        raise ValueError("engine exploded")

    monkeypatch.setattr(client, "is_enabled", broken)
    assert flags.email_queue_enabled() is True


def test_client_construction_failure_is_retried_later(
    unreachable_unleash: dict[str, str], make_flags: FlagsMade, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = flag_client.FlagClient

    def failing(settings: Any) -> Any:
        calls.append(1)
        raise OSError("disk gone")

    flags = make_flags(unreachable_unleash)
    monkeypatch.setattr(flag_client, "FlagClient", failing)
    assert flags.email_queue_enabled() is True
    assert flags.email_queue_enabled() is True
    assert len(calls) == 1, "no rebuild storm: the next try waits a refresh interval"
    monkeypatch.setattr(flag_client, "FlagClient", real)
    monkeypatch.setattr(flags.holder._slot, "retry_at", 0.0)
    flags.email_queue_enabled()
    assert isinstance(flags.holder.get(), real)


def test_unwritable_cache_dir_falls_back_to_memory(
    unreachable_unleash: dict[str, str], make_flags: FlagsMade, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    flags = make_flags(unreachable_unleash, FLAG_CACHE_DIR=str(blocker / "cache"))
    assert flags.email_queue_enabled() is True
    client = flags.holder.get()
    assert client is not None and not client.cache_persistent


def test_corrupt_cache_reads_as_empty(
    unreachable_unleash: dict[str, str], make_flags: FlagsMade
) -> None:
    cache = FileCache(APP, directory=unreachable_unleash["FLAG_CACHE_DIR"])
    cache.set("/client/features", "{not json")
    flags = make_flags(unreachable_unleash)
    assert flags.email_queue_enabled() is True
    client = flags.holder.get()
    assert client is not None and not client.loaded_from_cache


def _child_client_identity(queue: Any, flags: Flags) -> None:
    created = flags.holder.get()
    queue.put((id(created), created.pid if created else None))
    flags.stop(5.0)  # the child's own Unleash threads end before the child exits
    flags.holder.join_stopped(5.0)


def test_a_forked_child_builds_its_own_client(
    unreachable_unleash: dict[str, str], make_flags: FlagsMade
) -> None:
    flags = make_flags(unreachable_unleash)
    parent = flags.holder.get()
    assert parent is not None
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_client_identity, args=(queue, flags))
    child.start()
    _, child_pid_seen = queue.get(timeout=20)
    child.join(20)
    assert child_pid_seen == child.pid != parent.pid
    assert flags.holder.get() is parent


def test_shutdown_then_next_evaluation_rebuilds(
    unreachable_unleash: dict[str, str], make_flags: FlagsMade
) -> None:
    flags = make_flags(unreachable_unleash)
    first = flags.holder.get()
    flags.stop()
    second = flags.holder.get()
    assert first is not None and second is not None and first is not second


def test_sdk_log_filter_strips_tracebacks_and_repeats() -> None:
    quiet = QuietSdkErrors(interval=60)

    def record(msg: str) -> logging.LogRecord:
        try:
            raise ConnectionError("refused")
        except ConnectionError:
            import sys

            return logging.LogRecord(
                "UnleashClient", logging.ERROR, __file__, 1, msg, ("x",), sys.exc_info()
            )

    first = record("fetch failed: %s")
    assert quiet.filter(first) and first.exc_info is None
    assert not quiet.filter(record("fetch failed: %s"))
    assert quiet.filter(record("register failed: %s"))
    info = logging.LogRecord("UnleashClient", logging.INFO, __file__, 1, "polling", (), None)
    assert quiet.filter(info) and quiet.filter(info)


def test_state_and_etag_stay_per_process_over_a_shared_cache_dir(tmp_path: Path) -> None:
    from UnleashClient.constants import ETAG, FEATURES_URL

    from service.flags.client import SyncTrackingCache

    synced: list[str] = []
    newer = SyncTrackingCache(FileCache(APP, directory=str(tmp_path)), lambda: synced.append("a"))
    older = SyncTrackingCache(FileCache(APP, directory=str(tmp_path)), lambda: synced.append("b"))
    newer.set(FEATURES_URL, '{"version": 2, "features": [], "rev": 2}')
    older.set(FEATURES_URL, '{"version": 2, "features": [], "rev": 1}')
    newer.set(ETAG, '"rev-2"')
    older.set(ETAG, '"rev-1"')
    assert newer.get(ETAG) == '"rev-2"' and '"rev": 2' in newer.get(FEATURES_URL)
    assert synced == ["a", "b", "a", "b"]

    restarted = SyncTrackingCache(FileCache(APP, directory=str(tmp_path)), lambda: None)
    assert restarted.get(FEATURES_URL) is None and restarted.get(ETAG) is None
    assert restarted.load_saved_state() and restarted.bootstrapped
    assert '"rev": 1' in restarted.get(FEATURES_URL), "the last write on disk"
    assert restarted.saved_at() is not None
