"""Webhook targets: https only, no private or loopback address unless allowed, no redirects, a
bounded answer and a deadline; against real HTTP(S) servers on loopback."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from harness.servers import SmtpSink, free_port
from service.outbox.egress import EgressRefused, check_url, forbidden_reason
from tests.integration.capacity.test_outbox import _row
from tests.integration.capacity.test_outbox_recipients import _event
from tests.support.capacity import WebhookReceiver
from tests.support.current_app import reconfigure, relay

# --------------------------------------------------------------------------- the pure decision

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("100.64.0.1", "not a public"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fc00::1", "private"),
    ("ff02::1", "multicast"),
    ("::ffff:127.0.0.1", "127.0.0.1 is a loopback"),
    ("::ffff:169.254.169.254", "169.254.169.254 is a link-local"),
    ("64:ff9b::a9fe:a9fe", "169.254.169.254 is a link-local"),
    ("2002:7f00:1::", "127.0.0.1 is a loopback"),
]


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_non_public_addresses_are_refused(address: str, reason: str) -> None:
    found = forbidden_reason(ipaddress.ip_address(address))
    assert found is not None and reason in found


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:93.184.216.34"]
)
def test_public_addresses_pass(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


def test_the_allow_list_permits_only_its_networks() -> None:
    allowed = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("fd00::/8")]
    for address in ("127.0.0.1", "::ffff:127.0.0.9", "fd12::1"):
        assert forbidden_reason(ipaddress.ip_address(address), allowed) is None
    for address in ("10.0.0.1", "::1", "169.254.169.254"):
        assert forbidden_reason(ipaddress.ip_address(address), allowed) is not None


def test_only_https_unless_http_is_allowed() -> None:
    with pytest.raises(EgressRefused, match="must use https"):
        check_url("http://hooks.example/x", allow_http=False)
    with pytest.raises(EgressRefused, match="scheme 'ftp'"):
        check_url("ftp://hooks.example/x", allow_http=True)
    assert check_url("http://hooks.example/x", allow_http=True).host == "hooks.example"


# --------------------------------------------------------------------------- through the relay


def _settings(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    reconfigure(**values)


def _admin() -> str:
    return f"ops-{uuid.uuid4().hex[:8]}@venue.example"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def https_receiver(ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[WebhookReceiver, Path]]:
    """An HTTPS receiver on 127.0.0.1 whose certificate names only ``localhost``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    receiver = WebhookReceiver(tls=ctx, url_host="localhost")
    receiver.start()
    yield receiver, ca_file
    receiver.stop()


def test_an_http_url_is_refused_by_default(
    capacity_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    webhook_receiver: WebhookReceiver,
    smtp_sink: SmtpSink,
) -> None:
    _settings(monkeypatch, WEBHOOK_ALLOW_HTTP="false")
    admin = _admin()
    event_id = _event([admin], webhook_receiver.url)

    assert relay().run_once().dead == 1

    row = _row(event_id)
    assert row["dead_targets"] == {
        "webhook": "webhook refused: webhook URL must use https (WEBHOOK_ALLOW_HTTP is false)"
    }
    assert row["delivered_targets"] == [f"email:{admin}"], "the email still goes"
    assert webhook_receiver.requests == []
    assert smtp_sink.deliveries() == [admin]


def test_a_loopback_https_target_is_refused_without_the_allow_list_and_delivered_with_it(
    capacity_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    https_receiver: tuple[WebhookReceiver, Path],
) -> None:
    receiver, ca_file = https_receiver
    _settings(
        monkeypatch,
        WEBHOOK_ALLOW_HTTP="false",
        WEBHOOK_ALLOWED_NETWORKS="",
        WEBHOOK_CA_FILE=str(ca_file),
    )
    refused = _event([_admin()], receiver.url)
    assert relay().run_once().dead == 1
    reason = _row(refused)["dead_targets"]["webhook"]
    assert reason == (
        "webhook refused: webhook host localhost is not allowed: 127.0.0.1 is a loopback "
        "address (WEBHOOK_ALLOWED_NETWORKS can permit it)"
    )
    assert receiver.requests == []

    _settings(monkeypatch, WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8,::1/128")
    delivered = _event([_admin()], receiver.url)
    assert relay().run_once().delivered == 1

    assert _row(delivered)["status"] == "delivered"
    (request,) = receiver.requests
    assert request.signature_ok
    assert request.headers["host"] == f"localhost:{receiver.port}", "Host keeps the name"


def test_a_redirect_is_not_followed(
    capacity_env: dict[str, str], webhook_receiver: WebhookReceiver
) -> None:
    elsewhere = WebhookReceiver(bind="127.0.0.2")
    elsewhere.start()
    try:
        webhook_receiver.default_status = 307
        webhook_receiver.response_headers = {"Location": f"{elsewhere.url}/steal"}
        event_id = _event([_admin()], webhook_receiver.url)

        assert relay().run_once().dead == 1
    finally:
        elsewhere.stop()

    reason = _row(event_id)["dead_targets"]["webhook"]
    assert "answered HTTP 307 (a redirect to 127.0.0.2); redirects are not followed" in reason
    assert len(webhook_receiver.requests) == 1
    assert elsewhere.requests == [], "the forbidden address was never contacted"


class RawServer:
    """A loopback TCP server answering each connection with ``answer(conn, stop)`` in a thread;
    records whether the client hung up while it was still writing."""

    def __init__(self, answer: Callable[[socket.socket, threading.Event], None]) -> None:
        self.answer = answer
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.stop = threading.Event()
        self.client_hung_up = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                try:
                    self.answer(conn, self.stop)
                except OSError:
                    self.client_hung_up.set()

    def __enter__(self) -> RawServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(15)
        self.listener.close()


def _endless_body(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    deadline = time.monotonic() + 10
    while not stop.is_set() and time.monotonic() < deadline:
        conn.sendall(chunk)


def _dripping_headers(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    deadline = time.monotonic() + 10
    while not stop.is_set() and time.monotonic() < deadline:
        conn.sendall(b"a")
        time.sleep(0.2)


def test_an_endless_answer_is_not_read_whole(capacity_env: dict[str, str]) -> None:
    with RawServer(_endless_body) as server:
        event_id = _event([_admin()], server.url)
        started = time.monotonic()
        result = relay().run_once()
        elapsed = time.monotonic() - started
        assert server.client_hung_up.wait(5), "the relay stopped reading and closed"
    assert result.delivered == 1
    assert _row(event_id)["status"] == "delivered"
    assert elapsed < 3, f"took {elapsed:.1f}s"


def test_the_whole_exchange_has_one_deadline(
    capacity_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _settings(monkeypatch, WEBHOOK_TIMEOUT_SECONDS="1")
    with RawServer(_dripping_headers) as server:
        event_id = _event([_admin()], server.url)
        started = time.monotonic()
        result = relay().run_once()
        elapsed = time.monotonic() - started
    assert result.retried == 1
    row = _row(event_id)
    assert "webhook to 127.0.0.1: no answer within 1s" in row["last_error"]
    assert row["dead_targets"] == {}, "a timeout is retried"
    assert elapsed < 3, f"took {elapsed:.1f}s: each byte must not restart the clock"


def _bad_request(conn: socket.socket, stop: threading.Event) -> None:
    body = b"invalid   signature\n" + b"x" * 10_000
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def test_a_client_error_is_permanent_and_quotes_the_start_of_the_answer(
    capacity_env: dict[str, str],
) -> None:
    with RawServer(_bad_request) as server:
        event_id = _event([_admin()], server.url)
        assert relay().run_once().dead == 1
    reason = _row(event_id)["dead_targets"]["webhook"]
    assert reason.startswith("webhook to 127.0.0.1 answered HTTP 400: invalid signature xxx")
    assert len(reason) < 300
