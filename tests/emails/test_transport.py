"""The SMTP transport against real aiosmtpd servers: STARTTLS, implicit TLS, AUTH, reuse, errors."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from service.emails.transport import (
    PermanentSmtpError,
    SmtpTarget,
    SmtpTransport,
    TransientSmtpError,
)
from tests.harness.servers import free_port
from tests.harness.smtp_sink import StoringHandler


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
        b"mailer",
        b"p@ss word",
    )
    return AuthResult(success=ok)


class Server:
    def __init__(self, store: Path, **kwargs: Any) -> None:
        self.store = store
        self.port = free_port()
        self.handler = StoringHandler(store)
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port, **kwargs)

    def __enter__(self) -> Server:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()

    def count(self) -> int:
        return len(list(self.store.glob("*.eml")))


def message(to: str = "ada@guests.example") -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "bookings@example.test", to, "hello"
    msg.set_content("body")
    return msg


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def test_starttls_with_auth(ca: trustme.CA, ca_file: str, store: Path) -> None:
    tls = server_context(ca)
    with Server(
        store,
        tls_context=tls,
        require_starttls=True,
        authenticator=authenticate,
        auth_required=True,
        auth_require_tls=True,
    ) as server:
        url = f"smtp://mailer:p%40ss%20word@127.0.0.1:{server.port}?starttls=true"
        transport = SmtpTransport(SmtpTarget.from_url(url), timeout=5, ca_file=ca_file)
        transport.send(message())
        transport.send(message())  # the same connection is reused
        transport.close()
        assert server.count() == 2


def test_wrong_password_is_transient_not_permanent(
    ca: trustme.CA, ca_file: str, store: Path
) -> None:
    with Server(
        store,
        tls_context=server_context(ca),
        require_starttls=True,
        authenticator=authenticate,
        auth_required=True,
    ) as server:
        url = f"smtp://mailer:wrong@127.0.0.1:{server.port}?starttls=true"
        transport = SmtpTransport(SmtpTarget.from_url(url), timeout=2, ca_file=ca_file)
        with pytest.raises(TransientSmtpError):
            transport.send(message())
        assert server.count() == 0


def test_implicit_tls(ca: trustme.CA, ca_file: str, store: Path) -> None:
    with Server(store, ssl_context=server_context(ca)) as server:
        transport = SmtpTransport(
            SmtpTarget.from_url(f"smtps://127.0.0.1:{server.port}"), timeout=5, ca_file=ca_file
        )
        transport.send(message())
        assert server.count() == 1


def test_untrusted_certificate_is_refused(ca: trustme.CA, store: Path) -> None:
    with Server(store, ssl_context=server_context(ca)) as server:
        transport = SmtpTransport(
            SmtpTarget.from_url(f"smtps://127.0.0.1:{server.port}"), timeout=5
        )
        with pytest.raises(TransientSmtpError):
            transport.send(message())
        assert server.count() == 0


def test_rejected_recipient_is_permanent_and_connection_stays_usable(store: Path) -> None:
    with Server(store) as server:
        transport = SmtpTransport(SmtpTarget.from_url(f"smtp://127.0.0.1:{server.port}"), timeout=5)
        with pytest.raises(PermanentSmtpError) as raised:
            transport.send(message("gone+reject@guests.example"))
        assert raised.value.code == 550
        transport.send(message())
        assert server.count() == 1


def test_server_gone_is_transient(store: Path) -> None:
    transport = SmtpTransport(SmtpTarget.from_url(f"smtp://127.0.0.1:{free_port()}"), timeout=2)
    with pytest.raises(TransientSmtpError, match="connection"):
        transport.send(message())


def test_reconnects_after_the_server_restarts(store: Path) -> None:
    server = Server(store)
    with server:
        transport = SmtpTransport(SmtpTarget.from_url(f"smtp://127.0.0.1:{server.port}"), timeout=5)
        transport.send(message())
    restarted = Server(store)
    restarted.port = server.port
    restarted.controller = Controller(restarted.handler, hostname="127.0.0.1", port=server.port)
    with restarted:
        transport.send(message())  # the stale connection is detected and replaced
    assert restarted.count() == 2


def test_url_parsing() -> None:
    t = SmtpTarget.from_url("smtp://user%40x:p%2Fw@mail.example:2525?starttls=true")
    assert (t.host, t.port, t.starttls, t.implicit_tls, t.username, t.password) == (
        "mail.example",
        2525,
        True,
        False,
        "user@x",
        "p/w",
    )
    s = SmtpTarget.from_url("smtps://mail.example")
    assert (s.port, s.implicit_tls, s.starttls) == (465, True, False)
