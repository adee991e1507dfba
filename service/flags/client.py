"""The Unleash adapter: one SDK client per process, started without ever blocking the caller.

``UnleashClient`` is not fork-safe (its polling threads do not survive a fork) and its
``initialize_client`` blocks for ``request_timeout x retries`` against a server that accepts
connections and never answers. So this module

* keeps one client per process id, and forgets it in a forked child;
* builds the client synchronously (no network: it only reads the cache directory, so the
  last known toggles are usable at once), then runs ``initialize_client`` in a daemon thread;
* persists every fetched state in ``FLAG_CACHE_DIR`` through the SDK's ``FileCache``, and
  records when Unleash last answered, so callers can tell fresh values from cached ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from UnleashClient.cache import BaseCache, FileCache
from UnleashClient.clients.unleash_client import UnleashClient
from UnleashClient.constants import ETAG, FEATURES_URL
from UnleashClient.utils import InstanceAllowType

from service.config import Settings
from service.logs import get_logger

log = get_logger(__name__)

SYNCED_AT = "booking:synced-at"
REQUEST_RETRIES = 1
STALE_AFTER_INTERVALS = 3


class QuietSdkErrors(logging.Filter):
    """Drop the SDK's tracebacks for network failures and repeat each message once a minute.

    During an Unleash outage the SDK logs two full tracebacks per poll and process; one line
    per minute says the same thing.
    """

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        record.exc_info = None
        record.exc_text = None
        key = str(record.msg)
        now = time.monotonic()
        if now - self._last.get(key, -self.interval) < self.interval:
            return False
        self._last[key] = now
        return True


def _quiet_sdk_logs() -> None:
    sdk = logging.getLogger("UnleashClient")
    if not any(isinstance(f, QuietSdkErrors) for f in sdk.filters):
        sdk.addFilter(QuietSdkErrors())


class _MemoryCache(BaseCache):
    """Used only when the cache directory is not writable: values then die with the process."""

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}

    def set(self, key: str, value: Any) -> None:
        self._data[key] = value

    def mset(self, data: dict[str, Any]) -> None:
        self._data.update(data)

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def exists(self, key: str) -> bool:
        return key in self._data

    def destroy(self) -> None:
        self._data.clear()


ANSWER_TTL_SECONDS = 0.25


class SyncTrackingCache(BaseCache):
    """The SDK's cache as this process sees it, persisted through a shared ``FileCache``.

    The SDK feeds its engine from the cache and sends the cached ETag as ``If-None-Match``.
    With one directory shared by every worker process, a process whose slower poll wrote an
    older state after its sibling's newer ETag would pair them, get 304s and keep the older
    state. So the state and its ETag live in memory per process; the state is also written
    through to disk, which is read only at start (the restart-during-outage case).

    Each successful fetch (a new state, or an ETag on a 304) is reported to ``on_sync``.
    Reads never raise (a torn or unreadable file reads as missing) and ``destroy`` keeps the
    files: the directory is shared by the pod's processes and outlives them.
    """

    _LOCAL = frozenset({FEATURES_URL, ETAG})

    def __init__(self, inner: BaseCache, on_sync: Callable[[], None]) -> None:
        self._inner = inner
        self._on_sync = on_sync
        self._local: dict[str, Any] = {}

    def set(self, key: str, value: Any) -> None:
        if key not in self._LOCAL:
            self._inner.set(key, value)
            return
        self._local[key] = value
        with contextlib.suppress(Exception):
            if key == FEATURES_URL:
                self._inner.set(FEATURES_URL, value)
            self._inner.set(SYNCED_AT, time.time())
        self._on_sync()

    def mset(self, data: dict[str, Any]) -> None:
        shared = {k: v for k, v in data.items() if k not in self._LOCAL}
        self._local.update((k, v) for k, v in data.items() if k in self._LOCAL)
        if shared:
            self._inner.mset(shared)

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._LOCAL:
            return self._local.get(key, default)
        try:
            return self._inner.get(key, default)
        except Exception:
            return default

    def exists(self, key: str) -> bool:
        if key in self._LOCAL:
            return key in self._local
        try:
            return bool(self._inner.exists(key))
        except Exception:
            return False

    def destroy(self) -> None:
        """Keep the saved state: it is what a restart during an Unleash outage reads."""

    def load_saved_state(self) -> bool:
        """Adopt the state saved on disk by an earlier run (or a sibling), if it parses."""
        try:
            raw = self._inner.get(FEATURES_URL)
            json.loads(raw)
        except Exception:
            return False
        self._local[FEATURES_URL] = raw
        self.bootstrapped = True
        return True

    def saved_at(self) -> datetime | None:
        stamp = self.get(SYNCED_AT)
        if not isinstance(stamp, int | float):
            return None
        return datetime.fromtimestamp(stamp, UTC)


def _open_cache(settings: Settings, on_sync: Callable[[], None]) -> tuple[SyncTrackingCache, bool]:
    try:
        settings.flag_cache_dir.mkdir(parents=True, exist_ok=True)
        inner: BaseCache = FileCache(
            settings.unleash_app_name, directory=str(settings.flag_cache_dir)
        )
        probe = settings.flag_cache_dir / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        persistent = True
    except OSError as error:
        log.warning(
            "flag_cache_unwritable",
            cache_dir=str(settings.flag_cache_dir),
            error=str(error),
            effect="last known flag values will not survive a restart",
        )
        inner, persistent = _MemoryCache(), False
    return SyncTrackingCache(inner, on_sync), persistent


@dataclass(frozen=True)
class ClientState:
    """A snapshot of one process's client, for the operator CLI."""

    url: str
    app_name: str
    environment: str
    cache_dir: str
    cache_persistent: bool
    loaded_from_cache: bool
    initialized: bool
    last_sync: datetime | None
    cache_saved_at: datetime | None
    fresh: bool
    known_toggles: frozenset[str]


class FlagClient:
    """One ``UnleashClient`` for this process, evaluating locally from its last known state."""

    def __init__(self, settings: Settings) -> None:
        if settings.unleash_url is None:
            raise ValueError("UNLEASH_URL is not set")
        self._settings = settings
        self._answers: dict[tuple[str, bool], tuple[float, bool]] = {}
        self._refresh = settings.unleash_refresh_interval_seconds
        self._stale_after = (
            STALE_AFTER_INTERVALS * self._refresh
            + (REQUEST_RETRIES + 1) * settings.unleash_request_timeout_seconds
        )
        self._initialized = threading.Event()
        self._stopping = threading.Event()
        self._last_sync: float | None = None
        self._last_sync_wall: datetime | None = None
        self.pid = os.getpid()
        _quiet_sdk_logs()
        self.cache, self.cache_persistent = _open_cache(settings, self._mark_synced)
        self.loaded_from_cache = self.cache.load_saved_state()
        headers = {}
        if settings.unleash_api_token is not None:
            headers["Authorization"] = settings.unleash_api_token.get_secret_value()
        self._client = UnleashClient(
            url=str(settings.unleash_url).rstrip("/"),
            app_name=settings.unleash_app_name,
            environment=settings.unleash_environment,
            instance_id=f"{socket.gethostname()}-{self.pid}",
            refresh_interval=self._refresh,
            request_timeout=settings.unleash_request_timeout_seconds,  # type: ignore[arg-type]
            request_retries=REQUEST_RETRIES,
            custom_headers=headers,
            cache=self.cache,
            multiple_instance_mode=InstanceAllowType.SILENTLY_ALLOW,
        )
        self._stopper: threading.Thread | None = None
        self._stopper_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._initialize, name="unleash-initialize", daemon=True
        )
        self._thread.start()

    def _mark_synced(self) -> None:
        self._last_sync = time.monotonic()
        self._last_sync_wall = datetime.now(UTC)

    def _initialize(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            try:
                self._client.initialize_client()
            except Exception as error:
                log.warning("unleash_initialize_failed", error=str(error), retry_in=delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, float(self._refresh))
                continue
            self._initialized.set()
            break

    def _shutdown(self) -> None:
        self._thread.join()
        try:
            self._client.destroy()
        except Exception as error:
            log.warning("unleash_destroy_failed", error=str(error))

    def is_enabled(self, name: str, context: dict[str, Any], default: bool) -> bool:
        """Evaluate locally; ``default`` answers for a toggle this client does not know.

        Answers without a context are remembered for ``ANSWER_TTL_SECONDS``: the producer asks
        on every ``send()`` and the SDK's evaluation costs tens of microseconds. (Unleash's
        usage metrics then count at most a few evaluations a second for them.)
        """
        key = (name, default)
        now = time.monotonic()
        if not context:
            remembered = self._answers.get(key)
            if remembered is not None and now - remembered[0] < ANSWER_TTL_SECONDS:
                return remembered[1]
        value = bool(
            self._client.is_enabled(name, context, fallback_function=lambda _n, _c: default)
        )
        if not context:
            self._answers[key] = (now, value)
        return value

    def wait_ready(self, timeout: float) -> bool:
        """Wait (bounded) until the first fetch has been applied or has failed.

        Only the operator CLI and tests wait; evaluation never does.
        """
        return self._initialized.wait(timeout)

    @property
    def fresh(self) -> bool:
        """Whether Unleash answered within the last few refresh intervals."""
        last = self._last_sync
        return last is not None and time.monotonic() - last <= self._stale_after

    def known_toggles(self) -> frozenset[str]:
        try:
            return frozenset(self._client.feature_definitions())
        except Exception:
            return frozenset()

    def state(self) -> ClientState:
        settings = self._settings
        return ClientState(
            url=str(settings.unleash_url),
            app_name=settings.unleash_app_name,
            environment=settings.unleash_environment,
            cache_dir=str(settings.flag_cache_dir),
            cache_persistent=self.cache_persistent,
            loaded_from_cache=self.loaded_from_cache,
            initialized=bool(self._client.is_initialized),
            last_sync=self._last_sync_wall,
            cache_saved_at=self.cache.saved_at(),
            fresh=self.fresh,
            known_toggles=self.known_toggles(),
        )

    def stop(self, wait: float = 0.0) -> bool:
        """Stop polling, waiting at most ``wait`` seconds; ``True`` once every thread has ended.

        A stop thread joins the start-up thread (a first ``initialize_client`` against a
        silent server returns only after its request timeouts), then destroys the SDK client,
        which joins its scheduler. Whatever is left after ``wait`` ends in the background;
        ``join`` waits for it.
        """
        self._stopping.set()
        with self._stopper_lock:
            if self._stopper is None:
                self._stopper = threading.Thread(
                    target=self._shutdown, name="unleash-stop", daemon=True
                )
                self._stopper.start()
        return self.join(wait)

    def join(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for a stopped client's threads to end."""
        deadline = time.monotonic() + timeout
        stopper = self._stopper
        if stopper is None:
            raise RuntimeError("join() before stop(): the client is still running")
        stopper.join(max(0.0, deadline - time.monotonic()))
        return not self.alive_threads()

    def alive_threads(self) -> list[str]:
        """Names of this client's own threads still running (the SDK's end with the stop)."""
        return [t.name for t in (self._thread, self._stopper) if t is not None and t.is_alive()]


@dataclass(frozen=True)
class Diagnosis:
    """What one direct request to Unleash's client API says about this configuration."""

    answered: bool
    """Unleash served the flags (HTTP 200) to this URL and token."""
    status: int | None
    problem: str | None
    """One line for an operator: what went wrong and what to check."""


def describe_token(token: str | None) -> str:
    """The scope an Unleash token claims (``<project>:<environment>.<secret>``), not its secret."""
    if not token:
        return "not set"
    scope, dot, secret = token.partition(".")
    project, colon, environment = scope.partition(":")
    if not (dot and colon and project and environment and secret):
        return "not shaped like an Unleash token, <project>:<environment>.<secret>"
    projects = "all projects" if project == "*" else f"project '{project}'"
    environments = "all environments" if environment == "*" else f"environment '{environment}'"
    return f"for {projects}, {environments}"


def _server_message(response: httpx.Response) -> str:
    try:
        message = str(response.json().get("message", ""))
    except Exception:
        message = response.text
    return " ".join(message.split())[:200]


_USE_A_CLIENT_KEY = (
    "it must be a client (backend) token, not an admin, personal or frontend token, "
    "created for the environment and the project that hold this service's flags"
)


def diagnose(settings: Settings) -> Diagnosis:
    """Ask the client API once, directly, and say why the SDK gets no flags.

    The SDK only logs a failed fetch; the operator CLI calls this when its client has not
    synced, so that a rejected token reads as a 401 or 403 with what to check, not as an outage.
    """
    if settings.unleash_url is None:
        return Diagnosis(False, None, "UNLEASH_URL is not set")
    base = str(settings.unleash_url).rstrip("/")
    token = (
        settings.unleash_api_token.get_secret_value()
        if settings.unleash_api_token is not None
        else None
    )
    headers = {"UNLEASH-APPNAME": settings.unleash_app_name}
    if token:
        headers["Authorization"] = token
    timeout = settings.unleash_request_timeout_seconds
    try:
        response = httpx.get(f"{base}{FEATURES_URL}", headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        return Diagnosis(
            False,
            None,
            f"no answer from {base} within {timeout:g} s (UNLEASH_REQUEST_TIMEOUT_SECONDS)",
        )
    except httpx.HTTPError as error:
        return Diagnosis(False, None, f"cannot reach {base}: {error}")
    status = response.status_code
    token_scope = describe_token(token)
    if status == 200:
        return Diagnosis(True, status, None)
    if status == 401 and not token:
        problem = (
            "HTTP 401 Unauthorized: this Unleash requires a token and UNLEASH_API_TOKEN is not "
            f"set; {_USE_A_CLIENT_KEY}"
        )
    elif status == 401:
        problem = (
            f"HTTP 401 Unauthorized: Unleash does not accept UNLEASH_API_TOKEN (token {token_scope}). "
            "Check that the token exists on this Unleash instance and was not deleted or "
            f"expired; {_USE_A_CLIENT_KEY}"
        )
    elif status == 403:
        problem = (
            f"HTTP 403 Forbidden: UNLEASH_API_TOKEN may not read the client API (token {token_scope}; "
            f"Unleash says: {_server_message(response)}); {_USE_A_CLIENT_KEY}. Check also that "
            "UNLEASH_URL is the API base URL, ending in /api"
        )
    elif status == 404:
        problem = (
            f"HTTP 404 Not Found at {base}{FEATURES_URL}: UNLEASH_URL must be the API base URL, "
            "ending in /api"
        )
    else:
        problem = f"HTTP {status} from {base}{FEATURES_URL}: {_server_message(response)}"
    return Diagnosis(False, status, problem)


@dataclass
class _Slot:
    pid: int
    client: FlagClient | None
    retry_at: float


def _create(settings: Settings) -> _Slot:
    pid = os.getpid()
    if settings.unleash_url is None:
        return _Slot(pid, None, float("inf"))
    try:
        client = FlagClient(settings)
    except Exception as error:
        log.error("unleash_client_failed", error=str(error))
        return _Slot(pid, None, time.monotonic() + settings.unleash_refresh_interval_seconds)
    log.info(
        "unleash_client_started",
        url=str(settings.unleash_url),
        loaded_from_cache=client.loaded_from_cache,
    )
    return _Slot(pid, client, float("inf"))


class ClientHolder:
    """This process's client: created on first use, rebuilt in a forked child (the SDK is not
    fork-safe), retried one refresh interval after a failed creation; ``None`` when Unleash is
    not configured."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._slot: _Slot | None = None
        self._stopping: list[FlagClient] = []
        """Clients stopped whose threads had not ended by the end of ``close``."""
        forget = weakref.WeakMethod(self._forget)
        os.register_at_fork(after_in_child=lambda: (method := forget()) and method())

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._slot = None
        self._stopping.clear()

    def _usable(self, slot: _Slot | None) -> bool:
        return (
            slot is not None
            and slot.pid == os.getpid()
            and (slot.client is not None or time.monotonic() < slot.retry_at)
        )

    def get(self) -> FlagClient | None:
        slot = self._slot
        if slot is not None and self._usable(slot):
            return slot.client
        with self._lock:
            slot = self._slot
            if slot is None or not self._usable(slot):
                slot = self._slot = _create(self.settings)
            return slot.client

    def close(self, wait: float = 0.0) -> None:
        """Stop this process's client; the next evaluation builds a new one."""
        with self._lock:
            slot, self._slot = self._slot, None
        client = slot.client if slot is not None and slot.pid == os.getpid() else None
        if client is not None and not client.stop(wait):
            with self._lock:
                self._stopping.append(client)

    def join_stopped(self, timeout: float) -> list[str]:
        """Wait at most ``timeout`` s for every stopped client; the threads still alive after it.

        Shutting down never blocks on a hanging Unleash, so a stopped client's threads can
        outlive ``close``; a process that must not leave threads behind (a test) waits here.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            pending = list(self._stopping)
        alive: list[str] = []
        for client in pending:
            if client.join(max(0.0, deadline - time.monotonic())):
                with self._lock, contextlib.suppress(ValueError):
                    self._stopping.remove(client)
            else:
                alive.extend(client.alive_threads())
        return alive
