"""SMTP transport: one reused connection per thread, failures classified as transient or permanent."""

from __future__ import annotations

import smtplib
import ssl
import threading
from dataclasses import dataclass
from email.message import Message
from urllib.parse import parse_qs, unquote, urlsplit

from service.config import Settings
from service.resilience import PermanentError, ServiceError, TransientError


class SmtpError(ServiceError):
    """A send failed; ``permanent`` says whether retrying could ever help."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class TransientSmtpError(SmtpError, TransientError):
    pass


class PermanentSmtpError(SmtpError, PermanentError):
    pass


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


def _classify(error: Exception) -> SmtpError:
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in error.recipients.values()]
        if codes and all(code >= 500 for code in codes):
            return PermanentSmtpError(f"recipient refused ({codes[0]})", codes[0])
        return TransientSmtpError(
            f"recipient deferred ({codes[0] if codes else '?'})", codes[0] if codes else None
        )
    if isinstance(error, smtplib.SMTPAuthenticationError):
        return TransientSmtpError(
            f"SMTP authentication failed ({error.smtp_code})", error.smtp_code
        )
    if isinstance(error, smtplib.SMTPResponseException):
        code = error.smtp_code
        kind = PermanentSmtpError if 500 <= code < 600 else TransientSmtpError
        return kind(f"SMTP {code}: {error.smtp_error!r:.200}", code)
    return TransientSmtpError(f"SMTP connection failed: {type(error).__name__}: {error}")


class SmtpTransport:
    """Sends through one persistent connection, reconnecting once when the server dropped it."""

    def __init__(self, target: SmtpTarget, timeout: float, ca_file: str | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self.ca_file = ca_file
        self._conn: smtplib.SMTP | None = None

    def _tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def _connect(self) -> smtplib.SMTP:
        t = self.target
        conn: smtplib.SMTP
        if t.implicit_tls:
            conn = smtplib.SMTP_SSL(t.host, t.port, timeout=self.timeout, context=self._tls())
        else:
            conn = smtplib.SMTP(t.host, t.port, timeout=self.timeout)
            if t.starttls:
                conn.starttls(context=self._tls())
        if t.username:
            conn.login(t.username, t.password or "")
        return conn

    def send(self, message: Message) -> None:
        """Hand ``message`` to the server; raises TransientSmtpError or PermanentSmtpError."""
        for attempt in (1, 2):
            try:
                if self._conn is None:
                    self._conn = self._connect()
                self._conn.send_message(message)
                return
            except smtplib.SMTPServerDisconnected as error:
                self.close()
                if attempt == 2:
                    raise _classify(error) from error
            except (smtplib.SMTPException, OSError) as error:
                if isinstance(error, smtplib.SMTPRecipientsRefused | smtplib.SMTPResponseException):
                    self._reset()
                else:
                    self.close()
                raise _classify(error) from error

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


class Mailer:
    """One SMTP transport per thread (smtplib connections are not thread-safe), built from a
    target parsed once when the process starts."""

    def __init__(self, target: SmtpTarget, timeout: float, ca_file: str | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self.ca_file = ca_file
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[SmtpTransport] = []

    @classmethod
    def from_settings(cls, settings: Settings) -> Mailer:
        target = SmtpTarget.from_url(settings.secret("smtp_url"))
        ca_file = str(settings.smtp_ca_file) if settings.smtp_ca_file else None
        return cls(target, settings.smtp_timeout_seconds, ca_file)

    def transport(self) -> SmtpTransport:
        transport: SmtpTransport | None = getattr(self._local, "transport", None)
        if transport is None:
            transport = SmtpTransport(self.target, self.timeout, self.ca_file)
            self._local.transport = transport
            with self._lock:
                self._all.append(transport)
        return transport

    def send(self, message: Message) -> None:
        """Hand ``message`` to the server; raises TransientSmtpError or PermanentSmtpError."""
        self.transport().send(message)

    def close_all(self) -> None:
        with self._lock:
            transports, self._all = self._all, []
        for transport in transports:
            transport.close()
