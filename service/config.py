"""Settings from the environment, read when a process starts (never at import).

Every variable is documented in the README's configuration table. ``load_settings`` validates
everything it is given; each process then calls ``Settings.require`` for the variables its role
needs, so a producer inside a host application needs ``BROKER_URL`` and ``DATABASE_URL`` while
a worker stops at start, with one line naming the variable, when any of its settings is missing or malformed.
Error messages never echo a value (URLs carry passwords).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from email.utils import parseaddr
from ipaddress import ip_network
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    AnyUrl,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
)

from service.redis_urls import DIRECT_SCHEMES, SENTINEL_SCHEMES, parse_redis_url

EMAIL_RENDER_MARGIN_SECONDS = 5.0

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE_FALSE = ("1", "0", "true", "false", "yes", "no")


QUEUE_TYPES = ("classic", "quorum")


class ConfigError(RuntimeError):
    """Raised when the environment does not describe a runnable process."""


def amqp_node_urls(url: str) -> list[str]:
    """``amqp://user:pass@host1:5672,host2:5673/vhost?query`` as one URL per node, in order
    (credentials, vhost and query shared). Messages never include the URL."""
    if ";" in url or url.count("://") > 1:
        raise ValueError(
            "BROKER_URL: list RabbitMQ nodes as amqp://user:pass@host1:port1,host2:port2/vhost"
            " (one scheme, one set of credentials)"
        )
    parts = urlsplit(url)
    credentials, at, hosts = parts.netloc.rpartition("@")
    nodes = [h.strip() for h in hosts.split(",")]
    if any(not h for h in nodes):
        raise ValueError("BROKER_URL: an empty host in the list of RabbitMQ nodes")
    if len(set(nodes)) != len(nodes):
        raise ValueError("BROKER_URL: a RabbitMQ node is listed twice")
    return [parts._replace(netloc=f"{credentials}{at}{node}").geturl() for node in nodes]


def _check_url(value: str, schemes: tuple[str, ...], name: str) -> None:
    """Scheme, host and port of a service URL; the messages never include the URL itself."""
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValueError(f"{name} is not a valid URL") from None
    if parts.scheme not in schemes:
        raise ValueError(f"{name} must start with one of {', '.join(s + '://' for s in schemes)}")
    for hostport in parts.netloc.rpartition("@")[2].split(","):
        if hostport.startswith("["):
            host, _, rest = hostport[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = hostport.partition(":")
        if not host.strip():
            raise ValueError(f"{name} has no host")
        if port and (not port.isdigit() or not 0 < int(port) < 65536):
            raise ValueError(f"{name} has an invalid port (must be a number from 1 to 65535)")


class Settings(BaseModel):
    """Built by ``load_settings`` from one mapping of environment variables."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    database_url: SecretStr | None = Field(None, description="postgresql:// URL")
    broker_url: SecretStr | None = Field(
        None, description="redis(s)://, redis(s)+sentinel:// or amqp(s):// URL"
    )
    smtp_url: SecretStr | None = Field(None, description="smtp:// or smtps:// URL")
    email_from: str | None = Field(None, description="From address of guest emails")

    smtp_timeout_seconds: float = Field(default=5.0, gt=0)
    smtp_ca_file: Path | None = None
    db_pool_max_size: int = Field(default=4, ge=1)
    db_pool_timeout_seconds: float = Field(default=5.0, gt=0)
    migrations_dir: Path | None = None

    email_max_retries: int = Field(default=4, ge=0)
    email_min_backoff_ms: int = Field(default=60_000, ge=1)
    email_max_backoff_ms: int = Field(default=3_600_000, ge=1)
    email_time_limit_ms: int = Field(default=120_000, ge=1_000)
    reenqueue_deadline_seconds: float = Field(default=30.0, ge=0)
    sent_record_deadline_seconds: float = Field(default=120.0, ge=0)
    reconcile_grace_seconds: int = Field(default=300, ge=0)
    reconcile_lookback_hours: int = Field(default=72, ge=1)

    redis_heartbeat_timeout_ms: int = Field(default=15_000, ge=1_000)
    redis_maintenance_interval_seconds: float = Field(default=5.0, gt=0)
    redis_dead_message_ttl_ms: int = Field(default=7 * 86_400_000, ge=60_000)
    rabbitmq_queue_type: str = "classic"
    rabbitmq_delivery_limit: int = Field(default=10, ge=1, le=1000)
    rabbitmq_failover_seconds: float = Field(default=5.0, ge=0)

    unleash_url: AnyUrl | None = None
    unleash_api_token: SecretStr | None = None
    unleash_app_name: str = "booking-durability-service"
    unleash_environment: str = "default"
    unleash_refresh_interval_seconds: int = Field(default=15, ge=1)
    unleash_request_timeout_seconds: float = Field(default=2.0, gt=0)
    flag_cache_dir: Path = Path("/tmp/booking-flags")  # noqa: S108
    feature_email_queue_enabled: bool = True
    feature_policy_requote_enabled: bool = True

    hold_ttl_seconds: int = Field(default=600, ge=10)
    quote_max_tables: int = Field(default=3, ge=1, le=6)
    webhook_signing_secret: SecretStr | None = None
    webhook_timeout_seconds: float = Field(default=5.0, gt=0)
    webhook_allow_http: bool = False
    webhook_allowed_networks: tuple[IPvAnyNetwork, ...] = ()
    webhook_ca_file: Path | None = None
    outbox_max_attempts: int = Field(default=8, ge=1)
    outbox_min_backoff_seconds: float = Field(default=5.0, gt=0)
    outbox_poll_interval_seconds: float = Field(default=1.0, gt=0)

    metrics_port: int = Field(default=9191, ge=0, le=65535)
    metrics_bind_address: str = "0.0.0.0"  # noqa: S104  (pods are scraped on their pod IP)
    prometheus_multiproc_dir: Path | None = None
    health_file: Path = Path("/tmp/booking-worker-health")  # noqa: S108
    health_max_age_seconds: int = Field(default=60, ge=5)
    log_level: str = "INFO"
    log_format: str = Field(default="json", pattern="^(json|console)$")

    console_host: str = "127.0.0.1"
    console_port: int = Field(default=8080, ge=1, le=65535)
    console_auth: str = Field(default="token", pattern="^(token|basic|proxy)$")
    console_operator_token: SecretStr | None = None
    console_viewer_token: SecretStr | None = None
    console_users: SecretStr | None = None
    console_session_secret: SecretStr | None = None
    console_secure_cookies: bool = False
    console_session_max_age_seconds: int = Field(default=8 * 3600, ge=60)
    console_proxy_user_header: str = Field(default="X-Forwarded-User", pattern=r"^[A-Za-z0-9-]+$")
    console_proxy_role_header: str = Field(default="X-Forwarded-Role", pattern=r"^[A-Za-z0-9-]+$")
    console_trusted_proxies: tuple[IPvAnyNetwork, ...] = ()
    console_lookups_per_minute: float = Field(default=60.0, gt=0)
    console_lookup_burst: int = Field(default=20, ge=1)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            _check_url(v.get_secret_value(), ("postgresql", "postgres"), "DATABASE_URL")
        return v

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return v
        url = v.get_secret_value()
        _check_url(url, (*DIRECT_SCHEMES, *SENTINEL_SCHEMES, "amqp", "amqps"), "BROKER_URL")
        if urlsplit(url).scheme.startswith("redis"):
            try:
                parse_redis_url(url)
            except ValueError as error:
                raise ValueError(f"BROKER_URL: {error}") from None
        else:
            amqp_node_urls(url)
        return v

    @field_validator("rabbitmq_queue_type")
    @classmethod
    def _queue_type(cls, v: str) -> str:
        if v.lower() not in QUEUE_TYPES:
            raise ValueError(f"RABBITMQ_QUEUE_TYPE must be one of {', '.join(QUEUE_TYPES)}")
        return v.lower()

    @field_validator("smtp_url")
    @classmethod
    def _smtp_url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return v
        url = v.get_secret_value()
        _check_url(url, ("smtp", "smtps"), "SMTP_URL")
        for value in parse_qs(urlsplit(url).query).get("starttls", []):
            if value.lower() not in _TRUE_FALSE:
                raise ValueError("SMTP_URL: starttls must be true or false")
        return v

    @field_validator("email_from")
    @classmethod
    def _email_from(cls, v: str | None) -> str | None:
        if v is None:
            return v
        address = parseaddr(v)[1]
        local, _, domain = address.rpartition("@")
        if not local or "." not in domain or any(c in v for c in "\r\n"):
            raise ValueError("EMAIL_FROM must be an email address, e.g. Bookings <b@example.com>")
        return v

    @field_validator("smtp_ca_file")
    @classmethod
    def _ca_file(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError("SMTP_CA_FILE: no such file")
        return v

    @field_validator("prometheus_multiproc_dir")
    @classmethod
    def _multiproc_dir(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError("PROMETHEUS_MULTIPROC_DIR: no such directory")
        return v

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        if v.upper() not in LOG_LEVELS:
            raise ValueError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
        return v.upper()

    @field_validator("console_users")
    @classmethod
    def _console_users(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            parse_console_users(v.get_secret_value())
        return v

    @field_validator("console_operator_token", "console_viewer_token", "console_session_secret")
    @classmethod
    def _long_secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters long")
        return v

    @field_validator("webhook_allowed_networks", "console_trusted_proxies", mode="before")
    @classmethod
    def _comma_separated(cls, v: Any) -> Any:
        """Comma-separated CIDRs, each checked here so that the message names the bad one."""
        if not isinstance(v, str):
            return v
        networks = []
        for part in (p.strip() for p in v.split(",")):
            if part:
                try:
                    networks.append(ip_network(part))
                except ValueError as error:
                    raise ValueError(f"{part!r} is not a network in CIDR form: {error}") from None
        return tuple(networks)

    @property
    def broker_urls(self) -> list[str]:
        """RabbitMQ: one URL per node listed in BROKER_URL, in order; Redis: BROKER_URL."""
        url = self.secret("broker_url")
        return amqp_node_urls(url) if self.broker_kind == "rabbitmq" else [url]

    @property
    def smtp_conversation_seconds(self) -> float:
        """The mailer's deadline for one whole send (a reconnect included): two socket timeouts."""
        return 2 * self.smtp_timeout_seconds

    @property
    def email_lease_seconds(self) -> float:
        """How long a worker's claim on an email lasts: the SMTP deadline plus a render margin."""
        return self.smtp_conversation_seconds + EMAIL_RENDER_MARGIN_SECONDS

    @property
    def broker_kind(self) -> str:
        scheme = urlsplit(self.secret("broker_url")).scheme
        return "rabbitmq" if scheme.startswith("amqp") else "redis"

    def secret(self, name: str) -> str:
        """The value of a required secret setting (``database_url``, ``broker_url``, ...)."""
        value = getattr(self, name)
        if value is None:
            raise ConfigError(f"invalid configuration: {name.upper()}: is required")
        return value.get_secret_value() if isinstance(value, SecretStr) else str(value)

    @property
    def sender(self) -> str:
        if self.email_from is None:
            raise ConfigError("invalid configuration: EMAIL_FROM: is required")
        return self.email_from

    def require(self, *names: str) -> Settings:
        """Raise ConfigError naming every setting in ``names`` that is not set."""
        missing = [name.upper() for name in names if getattr(self, name) is None]
        if missing:
            raise ConfigError(
                "invalid configuration: " + "; ".join(f"{m}: is required" for m in missing)
            )
        return self


CONSOLE_ROLES = ("viewer", "operator")
SCRYPT_PREFIX = "scrypt$"


def parse_console_users(text: str) -> list[tuple[str, str, str]]:
    """``CONSOLE_USERS``: comma-separated ``name:role:password-hash`` entries (the hash from
    ``python -m service console hash-password``). Messages name the entry, never the hash."""
    users = []
    for number, entry in enumerate((e.strip() for e in text.split(",")), start=1):
        if not entry:
            continue
        name, _, rest = entry.partition(":")
        role, _, hashed = rest.partition(":")
        if not name or not hashed:
            raise ValueError(f"entry {number} is not name:role:password-hash")
        if role not in CONSOLE_ROLES:
            raise ValueError(f"entry {number} ({name}): role must be viewer or operator")
        if not hashed.startswith(SCRYPT_PREFIX) or hashed.count("$") != 5:
            raise ValueError(f"entry {number} ({name}): the hash is not a scrypt hash")
        users.append((name, role, hashed))
    if not users:
        raise ValueError("names no user")
    return users


SERVICE = ("database_url", "broker_url", "smtp_url", "email_from")
"""What a worker, the relay and the operator CLI need."""
PRODUCER = ("broker_url", "database_url")
"""What ``send_booking_email.send`` needs: it records the request in Postgres, then enqueues."""


def _explain(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        name = "_".join(str(p) for p in item["loc"]).upper() or "environment"
        if item["type"] == "missing":
            message = "is required"
        else:
            message = str(item["msg"]).removeprefix("Value error, ")
            message = message.removeprefix(f"{name}: ").removeprefix(f"{name} ")
        lines.append(f"{name}: {message}")
    return "invalid configuration: " + "; ".join(lines)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``environ`` (default ``os.environ``), raising ConfigError naming each bad
    variable. Only variables that are settings are read; empty values count as unset."""
    source = os.environ if environ is None else environ
    fields = Settings.model_fields
    values = {k.lower(): v for k, v in source.items() if k.lower() in fields and v != ""}
    try:
        return Settings.model_validate(values)
    except ValidationError as error:
        raise ConfigError(_explain(error)) from None
