"""The SMTP transport against real aiosmtpd servers: STARTTLS, implicit TLS, AUTH, reuse, errors,
recipients refused one by one."""

from __future__ import annotations

import logging
import ssl
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from prometheus_client import REGISTRY

from harness.servers import free_port
from harness.smtp_sink import Credentials, StoringHandler
from service import smtp as transport_module
from service.emails.models import BookingView
from service.emails.render import RenderedEmail, render
from service.emails.rules import EmailType
from service.observability.heartbeat import clear_unready, unready_reasons
from service.smtp import (
    AUTH_FAILED,
    PermanentSmtpError,
    Refusal,
    SmtpAuthenticationError,
    SmtpTarget,
    SmtpTransport,
    TransientSmtpError,
)


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


authenticate = Credentials("mailer", "p@ss word")


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

    def recipients(self) -> list[str]:
        """The envelope recipients of every stored message."""
        return sorted(
            line for p in self.store.glob("*.rcpt") for line in p.read_text().splitlines()
        )


def message(to: str = "ada@guests.example") -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "bookings@example.test", to, "hello"
    msg.set_content("body")
    return msg


plain_text_auth = pytest.mark.filterwarnings(
    "ignore:Requiring AUTH while not requiring TLS:UserWarning"
)


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


def auth_failures() -> float:
    return REGISTRY.get_sample_value("booking_smtp_auth_failures_total") or 0.0


@pytest.fixture
def fresh_auth_state() -> Iterator[None]:
    clear_unready(transport_module.UNREADY_KEY)
    yield
    clear_unready(transport_module.UNREADY_KEY)


def test_wrong_password_is_a_permanent_configuration_error(
    ca: trustme.CA, ca_file: str, store: Path, fresh_auth_state: None
) -> None:
    with Server(
        store,
        tls_context=server_context(ca),
        require_starttls=True,
        authenticator=authenticate,
        auth_required=True,
    ) as server:
        url = f"smtp://mailer:wrong@127.0.0.1:{server.port}?starttls=true"
        before = auth_failures()
        transport = SmtpTransport(SmtpTarget.from_url(url), timeout=2, ca_file=ca_file)
        with pytest.raises(SmtpAuthenticationError) as raised:
            transport.send(message())
        assert raised.value.permanent and raised.value.code == 535
        assert str(raised.value).startswith(AUTH_FAILED)
        assert "wrong" not in str(raised.value)
        assert auth_failures() == before + 1
        assert unready_reasons() == {"smtp": str(raised.value)}

        good = f"smtp://mailer:p%40ss%20word@127.0.0.1:{server.port}?starttls=true"
        SmtpTransport(SmtpTarget.from_url(good), timeout=2, ca_file=ca_file).send(message())
        assert unready_reasons() == {}, "a message that went through clears the failure"
        assert server.count() == 1


@plain_text_auth
def test_auth_required_but_no_credentials_is_an_authentication_error(
    store: Path, fresh_auth_state: None
) -> None:
    with Server(
        store, authenticator=authenticate, auth_required=True, auth_require_tls=False
    ) as server:
        transport = SmtpTransport(SmtpTarget.from_url(f"smtp://127.0.0.1:{server.port}"), timeout=2)
        with pytest.raises(SmtpAuthenticationError, match="530"):
            transport.send(message())
        assert "smtp" in unready_reasons()
        assert server.count() == 0


@plain_text_auth
def test_credentials_without_tls_warn_once_and_never_log_the_password(
    store: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transport_module, "_plaintext_warned", False)
    with (
        Server(
            store, authenticator=authenticate, auth_required=True, auth_require_tls=False
        ) as server,
        caplog.at_level(logging.INFO, logger="service.smtp"),
    ):
        url = f"smtp://mailer:p%40ss%20word@127.0.0.1:{server.port}"
        for _ in range(2):  # two transports: two connections, one warning per process
            transport = SmtpTransport(SmtpTarget.from_url(url), timeout=2)
            transport.send(message())
            transport.close()
        assert server.count() == 2
    warnings = [r for r in caplog.records if "without TLS" in r.getMessage()]
    assert len(warnings) == 1
    logged = " ".join(f"{r.getMessage()} {getattr(r, 'structured', '')}" for r in caplog.records)
    assert "p@ss word" not in logged and "p%40ss" not in logged


def test_credentials_over_starttls_do_not_warn(
    ca: trustme.CA,
    ca_file: str,
    store: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transport_module, "_plaintext_warned", False)
    with (
        Server(
            store,
            tls_context=server_context(ca),
            require_starttls=True,
            authenticator=authenticate,
            auth_required=True,
        ) as server,
        caplog.at_level(logging.INFO, logger="service.smtp"),
    ):
        url = f"smtp://mailer:p%40ss%20word@127.0.0.1:{server.port}?starttls=true"
        SmtpTransport(SmtpTarget.from_url(url), timeout=2, ca_file=ca_file).send(message())
    assert not [r for r in caplog.records if "without TLS" in r.getMessage()]


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


def test_send_to_reports_each_refused_recipient_and_delivers_the_others(store: Path) -> None:
    with Server(store) as server:
        transport = SmtpTransport(SmtpTarget.from_url(f"smtp://127.0.0.1:{server.port}"), timeout=5)
        recipients = ["a@venue.example", "b+reject@venue.example", "c+tempfail@venue.example"]
        refused = transport.send_to(message(", ".join(recipients)), recipients)
        assert set(refused) == {"b+reject@venue.example", "c+tempfail@venue.example"}
        assert refused["b+reject@venue.example"] == Refusal(550, "5.1.1 mailbox unavailable")
        assert refused["b+reject@venue.example"].permanent
        assert not refused["c+tempfail@venue.example"].permanent
        assert server.recipients() == ["a@venue.example"]

        everyone = ["d+reject@venue.example", "e+tempfail@venue.example"]
        all_refused = transport.send_to(message(", ".join(everyone)), everyone)
        assert {a: r.code for a, r in all_refused.items()} == {everyone[0]: 550, everyone[1]: 451}
        transport.send(message())  # the connection is still usable
        assert server.count() == 2


def test_send_raises_when_any_recipient_is_refused(store: Path) -> None:
    with Server(store) as server:
        transport = SmtpTransport(SmtpTarget.from_url(f"smtp://127.0.0.1:{server.port}"), timeout=5)
        with pytest.raises(PermanentSmtpError, match="550"):
            transport.send(message("ok@venue.example, gone+reject@venue.example"))
        with pytest.raises(TransientSmtpError, match="451"):
            transport.send(message("ok@venue.example, busy+tempfail@venue.example"))


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


def _rendered(guest_email: str = "ada@guests.example") -> RenderedEmail:
    booking = BookingView(
        booking_id=uuid.uuid4(),
        status="confirmed",
        guest_name="Zoë Ångström",
        guest_email=guest_email,
        party_size=2,
        starts_at=datetime(2026, 12, 1, 19, 0, tzinfo=UTC),
        locale="en",
        notes=None,
        venue_name="Café Œuvre",
        venue_timezone="Europe/Paris",
    )
    return render(
        booking, EmailType.CONFIRMED, "Bookings <bookings@example.test>", datetime.now(UTC)
    )


def test_a_rendered_email_goes_out_byte_for_byte_to_its_envelope(store: Path) -> None:
    with Server(store) as server:
        transport = SmtpTransport(SmtpTarget.from_url(f"smtp://127.0.0.1:{server.port}"), timeout=5)
        rendered = _rendered()
        transport.send_wire(rendered)
        stored = sorted(store.glob("*.eml"))
        assert len(stored) == 1
        assert stored[0].read_bytes() == rendered.data  # sent as rendered, never re-serialised
        assert server.recipients() == ["ada@guests.example"]


def test_a_rendered_email_to_a_refused_guest_is_permanent(store: Path) -> None:
    with Server(store) as server:
        transport = SmtpTransport(SmtpTarget.from_url(f"smtp://127.0.0.1:{server.port}"), timeout=5)
        with pytest.raises(PermanentSmtpError, match="550"):
            transport.send_wire(_rendered("gone+reject@guests.example"))
        transport.send_wire(_rendered())  # the connection is still usable
        assert server.count() == 1
