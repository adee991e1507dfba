"""SMTP transport, shared by guest emails and admin notifications: one reused connection per
thread, failures classified as transient, permanent or a configuration error.

``smtplib`` raises only when the server refuses every recipient of a message; otherwise it
returns the refused ones. ``send_to`` reports them per recipient (a 4xx is deferred, a 5xx
refused) so that a caller with several recipients can retry or give up on each; ``send``, for
one-recipient guest emails, raises when any recipient is refused.

A server that refuses our credentials is a configuration error, :class:`SmtpAuthenticationError`:
permanent (retrying with the same SMTP_URL cannot help), counted in
``booking_smtp_auth_failures_total``, and reported in this process's heartbeat record so that the
readiness probe fails until a message goes through again.
"""

from __future__ import annotations

import os
import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.message import Message
from email.utils import getaddresses
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from service.config import Settings
from service.logs import get_logger, redact_text
from service.metrics import SMTP_AUTH_FAILURES
from service.observability.heartbeat import clear_unready, report_unready
from service.resilience import PermanentError, ServiceError, TransientError

log = get_logger(__name__)

AUTH_FAILED = "SMTP authentication failed: check SMTP_URL credentials"
UNREADY_KEY = "smtp"
_AUTH_REQUIRED_CODE = 530
_REPLY_CHARS = 200


class SmtpError(ServiceError):
    """A send failed; ``permanent`` says whether retrying could ever help."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class TransientSmtpError(SmtpError, TransientError):
    pass


class PermanentSmtpError(SmtpError, PermanentError):
    pass


class SmtpAuthenticationError(PermanentSmtpError):
    """The server refused our credentials, or requires some we do not send: fix SMTP_URL."""


class WireEmail(Protocol):
    """An email already serialised for SMTP (``service.emails.render.RenderedEmail``): sent as
    it is, never parsed or flattened again."""

    @property
    def envelope_from(self) -> str: ...

    @property
    def envelope_to(self) -> Sequence[str]: ...

    @property
    def data(self) -> bytes: ...


@dataclass(frozen=True)
class Refusal:
    """The server's answer to one refused recipient."""

    code: int
    reply: str

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        return f"{self.code} {self.reply}".strip()


def _reply_text(reply: bytes | str) -> str:
    """The server's reply, shortened, with addresses masked: it is stored in delivery rows,
    dead letters and retry tracebacks, where no guest address belongs."""
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return redact_text(" ".join(text.split()))[:_REPLY_CHARS]


def _refusals(recipients: Mapping[str, tuple[int, bytes]]) -> dict[str, Refusal]:
    return {addr: Refusal(code, _reply_text(reply)) for addr, (code, reply) in recipients.items()}


@dataclass(frozen=True)
class SmtpTarget:
    host: str
    port: int
    implicit_tls: bool
    starttls: bool
    username: str | None
    password: str | None

    @classmethod
    def from_url(cls, url: str) -> SmtpTarget:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        implicit = parts.scheme == "smtps"
        starttls = query.get("starttls", ["false"])[0].lower() in ("1", "true", "yes")
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or (465 if implicit else 25),
            implicit_tls=implicit,
            starttls=starttls and not implicit,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    @property
    def credentials_in_clear(self) -> bool:
        return bool(self.username) and not (self.implicit_tls or self.starttls)


def _auth_failed(detail: str, code: int | None = None) -> SmtpAuthenticationError:
    """Count and report an authentication failure (never with the credentials themselves)."""
    message = f"{AUTH_FAILED} ({detail})"
    SMTP_AUTH_FAILURES.inc()
    report_unready(UNREADY_KEY, message)
    log.error("SMTP authentication failed", code=code, detail=detail)
    return SmtpAuthenticationError(message, code)


def _classify(error: Exception) -> SmtpError:
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        return _refused_error(_refusals(error.recipients))
    if isinstance(error, smtplib.SMTPResponseException):
        code = error.smtp_code
        if code == _AUTH_REQUIRED_CODE:
            return _auth_failed(f"{code} {_reply_text(error.smtp_error)}", code)
        kind = PermanentSmtpError if 500 <= code < 600 else TransientSmtpError
        return kind(f"SMTP {code}: {error.smtp_error!r:.200}", code)
    return TransientSmtpError(f"SMTP connection failed: {type(error).__name__}: {error}")


def _refused_error(refused: Mapping[str, Refusal]) -> SmtpError:
    """One error for a message whose recipients were (some or all) refused: permanent when every
    refusal is, an authentication failure when every one is a 530."""
    answers = list(refused.values())
    if all(a.code == _AUTH_REQUIRED_CODE for a in answers):
        return _auth_failed(str(answers[0]), _AUTH_REQUIRED_CODE)
    deferred = [a for a in answers if not a.permanent]
    if deferred:
        return TransientSmtpError(f"recipient deferred ({deferred[0]})", deferred[0].code)
    return PermanentSmtpError(f"recipient refused ({answers[0]})", answers[0].code)


_plaintext_warned = False
_plaintext_lock = threading.Lock()


def _warn_credentials_in_clear(target: SmtpTarget) -> None:
    """Once per process: the username and password are about to cross the network unencrypted."""
    global _plaintext_warned
    with _plaintext_lock:
        if _plaintext_warned:
            return
        _plaintext_warned = True
    log.warning(
        "SMTP credentials are sent without TLS: use smtps:// or ?starttls=true in SMTP_URL",
        host=target.host,
        port=target.port,
    )


class _Deadline:
    """Bounds a whole SMTP conversation, not just each socket operation: before every command
    and every reply the socket timeout is cut to what is left of the deadline, so that a slow
    server cannot stretch a send past the lease the email pipeline holds for it."""

    deadline: float | None = None
    timeout: float
    sock: Any

    def arm(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def _cut(self) -> None:
        if self.deadline is None or self.sock is None:
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("SMTP conversation deadline passed")
        self.sock.settimeout(min(self.timeout, left))

    def send(self, s: Any) -> None:
        self._cut()
        super().send(s)  # type: ignore[misc]

    def getreply(self) -> tuple[int, bytes]:
        self._cut()
        reply: tuple[int, bytes] = super().getreply()  # type: ignore[misc]
        return reply


class _SMTP(_Deadline, smtplib.SMTP):
    pass


class _SMTP_SSL(_Deadline, smtplib.SMTP_SSL):
    pass


class SmtpTransport:
    """Sends through one persistent connection, reconnecting once when the server dropped it;
    one send, reconnect included, lasts at most ``deadline`` seconds when given."""

    def __init__(
        self,
        target: SmtpTarget,
        timeout: float,
        ca_file: str | None = None,
        deadline: float | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.ca_file = ca_file
        self.deadline = deadline
        self._conn: _SMTP | _SMTP_SSL | None = None

    def _tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def _connect(self, ends: float | None) -> _SMTP | _SMTP_SSL:
        t = self.target
        timeout = self.timeout
        if ends is not None:
            timeout = min(timeout, ends - time.monotonic())
            if timeout <= 0:
                raise TimeoutError("SMTP conversation deadline passed")
        conn: _SMTP | _SMTP_SSL
        if t.implicit_tls:
            conn = _SMTP_SSL(t.host, t.port, timeout=timeout, context=self._tls())
        else:
            conn = _SMTP(t.host, t.port, timeout=timeout)
        conn.timeout = self.timeout
        conn.deadline = ends
        try:
            if t.starttls:
                conn.starttls(context=self._tls())
            if t.username:
                if t.credentials_in_clear:
                    _warn_credentials_in_clear(t)
                self._login(conn, t.username, t.password or "")
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _login(conn: smtplib.SMTP, username: str, password: str) -> None:
        try:
            conn.login(username, password)
        except smtplib.SMTPAuthenticationError as error:
            code = error.smtp_code
            if 400 <= code < 500:
                raise TransientSmtpError(
                    f"SMTP authentication temporarily failed ({code})", code
                ) from error
            raise _auth_failed(f"{code} {_reply_text(error.smtp_error)}", code) from error
        except smtplib.SMTPNotSupportedError as error:
            raise _auth_failed("the server offers no AUTH on this connection") from error
        except (smtplib.SMTPServerDisconnected, smtplib.SMTPResponseException):
            raise
        except smtplib.SMTPException as error:
            raise _auth_failed(str(error)) from error

    def send_to(self, message: Message, recipients: Sequence[str]) -> dict[str, Refusal]:
        """Hand ``message`` to the server for ``recipients`` (the envelope, whatever the headers
        say); returns the recipients it refused, empty when it took them all.

        Raises TransientSmtpError or PermanentSmtpError (SmtpAuthenticationError among them)
        when the message as a whole could not be handed over.
        """
        if not recipients:
            raise ValueError("send_to needs at least one recipient")
        return self._hand_over(lambda conn: conn.send_message(message, to_addrs=list(recipients)))

    def send_wire(self, email: WireEmail) -> None:
        """Hand a serialised email to its envelope recipients with ``sendmail`` (its bytes as
        they are); raises like ``send``."""
        if not email.envelope_to:
            raise PermanentSmtpError("message has no recipient")
        refused = self._hand_over(
            lambda conn: conn.sendmail(email.envelope_from, list(email.envelope_to), email.data)
        )
        if refused:
            raise _refused_error(refused)

    def _hand_over(
        self, transfer: Callable[[smtplib.SMTP], Mapping[str, tuple[int, bytes]]]
    ) -> dict[str, Refusal]:
        """Run one message transfer on the connection (reconnecting once when the server had
        dropped it) and classify what went wrong. The whole transfer, connecting included, ends
        within ``deadline`` seconds when one is set."""
        ends = None if self.deadline is None else time.monotonic() + self.deadline
        for attempt in (1, 2):
            try:
                if self._conn is None:
                    self._conn = self._connect(ends)
                self._conn.deadline = ends
                refused = transfer(self._conn)
            except smtplib.SMTPRecipientsRefused as error:
                result = _refusals(error.recipients)
                if result and all(r.code == _AUTH_REQUIRED_CODE for r in result.values()):
                    raise _refused_error(result) from error
                return result
            except smtplib.SMTPServerDisconnected as error:
                self.close()
                if attempt == 2:
                    raise _classify(error) from error
            except SmtpError:
                self.close()
                raise
            except (smtplib.SMTPException, OSError) as error:
                if isinstance(error, smtplib.SMTPResponseException):
                    self._reset()
                else:
                    self.close()
                raise _classify(error) from error
            else:
                self._conn.deadline = None
                clear_unready(UNREADY_KEY)
                return _refusals(refused)
        raise AssertionError("unreachable")  # pragma: no cover

    def send(self, message: Message) -> None:
        """Hand ``message`` to its header recipients; raises TransientSmtpError or
        PermanentSmtpError, also when only some recipients were refused (use ``send_to`` to
        track several recipients one by one)."""
        recipients = _header_recipients(message)
        refused = self.send_to(message, recipients)
        if refused:
            raise _refused_error(refused)

    def _reset(self) -> None:
        try:
            if self._conn is not None:
                self._conn.rset()
        except (smtplib.SMTPException, OSError):
            self.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.quit()
            except (smtplib.SMTPException, OSError):
                conn.close()


def _header_recipients(message: Message) -> list[str]:
    """The envelope recipients ``smtplib.send_message`` would take from the headers."""
    fields = [f for name in ("To", "Cc", "Bcc") for f in (message.get_all(name) or [])]
    addresses = [addr for _, addr in getaddresses([str(f) for f in fields]) if addr]
    if not addresses:
        raise PermanentSmtpError("message has no recipient")
    return addresses


class Mailer:
    """One SMTP transport per thread (smtplib connections are not thread-safe), built from a
    target parsed once when the process starts."""

    def __init__(
        self,
        target: SmtpTarget,
        timeout: float,
        ca_file: str | None = None,
        deadline: float | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.ca_file = ca_file
        self.deadline = deadline
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[SmtpTransport] = []
        self._pid = os.getpid()

    @classmethod
    def from_settings(cls, settings: Settings) -> Mailer:
        target = SmtpTarget.from_url(settings.secret("smtp_url"))
        ca_file = str(settings.smtp_ca_file) if settings.smtp_ca_file else None
        return cls(
            target, settings.smtp_timeout_seconds, ca_file, settings.smtp_conversation_seconds
        )

    def transport(self) -> SmtpTransport:
        if self._pid != os.getpid():  # forked: never share the parent's SMTP sockets
            self._local, self._all, self._pid = threading.local(), [], os.getpid()
        transport: SmtpTransport | None = getattr(self._local, "transport", None)
        if transport is None:
            transport = SmtpTransport(self.target, self.timeout, self.ca_file, self.deadline)
            self._local.transport = transport
            with self._lock:
                self._all.append(transport)
        return transport

    def send(self, email: WireEmail) -> None:
        """Hand a rendered email to the server; raises TransientSmtpError or PermanentSmtpError."""
        self.transport().send_wire(email)

    def send_to(self, message: Message, recipients: Sequence[str]) -> dict[str, Refusal]:
        """``SmtpTransport.send_to`` on the calling thread's transport."""
        return self.transport().send_to(message, recipients)

    def close_all(self) -> None:
        with self._lock:
            transports, self._all = self._all, []
        for transport in transports:
            transport.close()
