"""Who is asking: password hashes, the three authentication modes, CSRF tokens, lookup budgets.

Pure where it can be: the authenticators take header values and the peer address and return an
``Identity`` or None; the web layer turns that into sessions, 401 and 403.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import ip_address

from service.config import CONSOLE_ROLES, SCRYPT_PREFIX, ConfigError, Settings, parse_console_users

OPERATOR = "operator"
VIEWER = "viewer"
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash`` (base64), for ``CONSOLE_USERS``."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    b64 = base64.b64encode
    return f"{SCRYPT_PREFIX}{_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Constant-time comparison of the scrypt digest of ``password`` with ``hashed``."""
    try:
        _, n, r, p, salt, digest = hashed.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=64 * 1024 * 1024,
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


@dataclass(frozen=True)
class Identity:
    name: str
    role: str

    @property
    def operator(self) -> bool:
        return self.role == OPERATOR


class Authenticator:
    """One of the modes of ``CONSOLE_AUTH``. ``from_headers`` answers per request (bearer
    token, HTTP Basic, proxy headers); ``from_form`` backs the login form (token and basic)."""

    mode = ""
    login_fields: tuple[str, ...] = ()

    def from_headers(self, headers: Mapping[str, str], peer: str | None) -> Identity | None:
        return None

    def from_form(self, form: Mapping[str, str]) -> Identity | None:
        return None

    def credential(self, who: Identity) -> str | None:
        """What ``who`` signed in with as configured now (a token, a password hash); a session
        bound to it ends when it is rotated or removed."""
        return None


def fingerprint(key: str, credential: str) -> str:
    """A keyed digest of a credential, safe to keep in a (signed, readable) session cookie."""
    return hmac.new(key.encode(), credential.encode(), hashlib.sha256).hexdigest()


class TokenAuth(Authenticator):
    mode = "token"
    login_fields = ("token",)

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self.tokens = dict(tokens)  # role -> token

    def check(self, token: str) -> Identity | None:
        found = None
        for role, expected in self.tokens.items():
            if same_secret(token, expected):  # every comparison runs: no early exit
                found = Identity(f"{role}-token", role)
        return found

    def from_headers(self, headers: Mapping[str, str], peer: str | None) -> Identity | None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.check(token.strip())

    def from_form(self, form: Mapping[str, str]) -> Identity | None:
        token = form.get("token", "").strip()
        return self.check(token) if token else None

    def credential(self, who: Identity) -> str | None:
        return self.tokens.get(who.role) if who.name == f"{who.role}-token" else None


class BasicAuth(Authenticator):
    mode = "basic"
    login_fields = ("username", "password")
    _DUMMY = hash_password("not a password", salt=b"0" * 16)

    def __init__(self, users: list[tuple[str, str, str]]) -> None:
        self.users = {name: (role, hashed) for name, role, hashed in users}

    def check(self, name: str, password: str) -> Identity | None:
        role, hashed = self.users.get(name, ("", self._DUMMY))
        ok = verify_password(password, hashed)  # an unknown name costs the same time
        return Identity(name, role) if ok and role else None

    def from_headers(self, headers: Mapping[str, str], peer: str | None) -> Identity | None:
        scheme, _, encoded = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            name, _, password = base64.b64decode(encoded.strip()).decode().partition(":")
        except ValueError:
            return None
        return self.check(name, password)

    def from_form(self, form: Mapping[str, str]) -> Identity | None:
        return self.check(form.get("username", ""), form.get("password", ""))

    def credential(self, who: Identity) -> str | None:
        role, hashed = self.users.get(who.name, ("", ""))
        return f"{role}:{hashed}" if role == who.role else None


class ProxyAuth(Authenticator):
    """Identity headers set by an authenticating proxy, honoured only from its addresses."""

    mode = "proxy"

    def __init__(self, settings: Settings) -> None:
        self.user_header = settings.console_proxy_user_header.lower()
        self.role_header = settings.console_proxy_role_header.lower()
        self.networks = settings.console_trusted_proxies

    def trusted(self, peer: str | None) -> bool:
        if peer is None:
            return False
        try:
            address = ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def from_headers(self, headers: Mapping[str, str], peer: str | None) -> Identity | None:
        name = headers.get(self.user_header, "").strip()
        if not name or not self.trusted(peer):
            return None
        role = headers.get(self.role_header, "").strip().lower()
        return Identity(name, role if role in CONSOLE_ROLES else VIEWER)


def build_authenticator(settings: Settings) -> Authenticator:
    """The mode ``CONSOLE_AUTH`` names, with its credentials; ConfigError when they are missing."""
    if settings.console_auth == "basic":
        if settings.console_users is None:
            raise ConfigError(
                "invalid configuration: CONSOLE_USERS: is required when CONSOLE_AUTH=basic"
            )
        return BasicAuth(parse_console_users(settings.console_users.get_secret_value()))
    if settings.console_auth == "proxy":
        if not settings.console_trusted_proxies:
            raise ConfigError(
                "invalid configuration: CONSOLE_TRUSTED_PROXIES: is required when CONSOLE_AUTH=proxy"
            )
        return ProxyAuth(settings)
    tokens = {
        role: secret.get_secret_value()
        for role, secret in (
            (OPERATOR, settings.console_operator_token),
            (VIEWER, settings.console_viewer_token),
        )
        if secret is not None
    }
    if not tokens:
        raise ConfigError(
            "invalid configuration: CONSOLE_OPERATOR_TOKEN or CONSOLE_VIEWER_TOKEN: is required"
            " when CONSOLE_AUTH=token"
        )
    if len(set(tokens.values())) < len(tokens):
        raise ConfigError("invalid configuration: the viewer and operator tokens must differ")
    return TokenAuth(tokens)


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def mask_email(address: str) -> str:
    """``j***@example.com``: what a viewer sees of a guest's address."""
    local, at, domain = address.partition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"


class LookupBudget:
    """A token bucket per user: ``burst`` lookups at once, refilled at ``per_minute``."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, user: str, now: float | None = None) -> float:
        """0 when a lookup may run now; otherwise the seconds until one may."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, since = self._buckets.get(user, (self.burst, now))
            tokens = min(self.burst, tokens + (now - since) * self.rate)
            if tokens >= 1:
                self._buckets[user] = (tokens - 1, now)
                return 0.0
            self._buckets[user] = (tokens, now)
            return max(1.0, math.ceil((1 - tokens) / self.rate))
