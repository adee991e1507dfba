"""Fixtures of the confirmation and outbox integration tests: settings and a webhook receiver."""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from harness.servers import free_port, wait_for
from tests.support.current_app import running_app

WEBHOOK_SECRET = "whsec-test-0123456789"


@dataclass(frozen=True)
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    signature_ok: bool

    @property
    def document(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


def signature_is_valid(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The receiver side of the documented scheme, written independently of the service."""
    timestamp = headers.get("x-booking-timestamp", "")
    header = headers.get("x-booking-signature", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > 300:
        return False
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(header, "v1=" + expected.hexdigest())


class WebhookReceiver:
    """A real HTTP server on loopback that records every POST and answers from a script.

    With ``tls`` it serves HTTPS and its URL names ``url_host`` (the certificate's name).
    """

    def __init__(
        self,
        secret: str = WEBHOOK_SECRET,
        *,
        bind: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        url_host: str | None = None,
    ) -> None:
        self.secret = secret
        self.bind = bind
        self.tls = tls
        self.url_host = url_host or bind
        self.port = free_port()
        self.requests: list[ReceivedRequest] = []
        self.statuses: list[int] = []
        self.default_status = 200
        self.delay = 0.0
        self.response_headers: dict[str, str] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                if receiver.delay:
                    time.sleep(receiver.delay)
                with receiver._lock:
                    receiver.requests.append(
                        ReceivedRequest(
                            self.path,
                            headers,
                            body,
                            time.monotonic(),
                            signature_is_valid(receiver.secret, headers, body),
                        )
                    )
                    status = (
                        receiver.statuses.pop(0) if receiver.statuses else receiver.default_status
                    )
                self.send_response(status)
                for name, value in receiver.response_headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer((bind, self.port), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.url_host}:{self.port}/hooks/booking"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, count: int, timeout: float = 20) -> list[ReceivedRequest]:
        wait_for(lambda: len(self.requests) >= count, timeout, f"{count} webhook request(s)")
        return list(self.requests)


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture
def capacity_env(
    service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> Iterator[dict[str, str]]:
    """The service environment plus webhook signing, fast outbox retries and requote on; the
    test's App is built from it."""
    extra = {
        "WEBHOOK_SIGNING_SECRET": WEBHOOK_SECRET,
        "WEBHOOK_TIMEOUT_SECONDS": "5",
        # The receivers below are plain HTTP on loopback, which the relay refuses by default.
        "WEBHOOK_ALLOW_HTTP": "true",
        "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.1/32",
        "OUTBOX_MAX_ATTEMPTS": "3",
        "OUTBOX_MIN_BACKOFF_SECONDS": "0.3",
        "OUTBOX_POLL_INTERVAL_SECONDS": "0.05",
        "FEATURE_POLICY_REQUOTE_ENABLED": "true",
        "FLAG_CACHE_DIR": str(tmp_path / "flags"),
        "HEALTH_FILE": str(tmp_path / "health" / "relay"),
        "LOG_LEVEL": "WARNING",
    }
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    env = {**service_env, **extra}
    with running_app(env):
        yield env
