"""Settings from the environment, read once per process.

Every variable is documented in the README's configuration table; a missing or malformed
value stops the process at start with a message naming the variable.
"""

from __future__ import annotations

from functools import lru_cache
from ipaddress import ip_network
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AnyUrl, Field, IPvAnyNetwork, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ConfigError(RuntimeError):
    """Raised when the environment does not describe a runnable service."""


def _require_scheme(value: str, schemes: tuple[str, ...], name: str) -> str:
    scheme = urlsplit(value).scheme
    if scheme not in schemes:
        raise ValueError(f"{name} must start with one of {', '.join(s + '://' for s in schemes)}")
    if not urlsplit(value).hostname:
        raise ValueError(f"{name} has no host")
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    database_url: SecretStr = Field(description="postgresql:// URL of the service database")
    broker_url: SecretStr = Field(description="redis://, rediss:// or amqp(s):// broker URL")
    smtp_url: SecretStr = Field(description="smtp:// or smtps:// URL; ?starttls=true upgrades")
    email_from: str = Field(description="From address of guest emails")

    smtp_timeout_seconds: float = 10.0
    smtp_ca_file: Path | None = None
    db_pool_max_size: int = Field(default=8, ge=1)

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
    webhook_allowed_networks: Annotated[tuple[IPvAnyNetwork, ...], NoDecode] = ()
    webhook_ca_file: Path | None = None
    outbox_max_attempts: int = Field(default=8, ge=1)
    outbox_min_backoff_seconds: float = Field(default=5.0, gt=0)
    outbox_poll_interval_seconds: float = Field(default=1.0, gt=0)

    metrics_port: int = Field(default=9191, ge=0, le=65535)
    health_file: Path = Path("/tmp/booking-worker-health")  # noqa: S108
    health_max_age_seconds: int = Field(default=60, ge=5)
    log_level: str = "INFO"
    log_format: str = Field(default="json", pattern="^(json|console)$")

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, v: SecretStr) -> SecretStr:
        _require_scheme(v.get_secret_value(), ("postgresql", "postgres"), "DATABASE_URL")
        return v

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, v: SecretStr) -> SecretStr:
        _require_scheme(v.get_secret_value(), ("redis", "rediss", "amqp", "amqps"), "BROKER_URL")
        return v

    @field_validator("smtp_url")
    @classmethod
    def _smtp_scheme(cls, v: SecretStr) -> SecretStr:
        _require_scheme(v.get_secret_value(), ("smtp", "smtps"), "SMTP_URL")
        return v

    @field_validator("webhook_allowed_networks", mode="before")
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
    def broker_kind(self) -> str:
        scheme = urlsplit(self.broker_url.get_secret_value()).scheme
        return "rabbitmq" if scheme.startswith("amqp") else "redis"


def _explain(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        name = "_".join(str(p) for p in item["loc"]).upper() or "environment"
        message = "is required" if item["type"] == "missing" else item["msg"]
        lines.append(f"{name}: {message}")
    return "invalid configuration: " + "; ".join(lines)


def load_settings() -> Settings:
    """Build settings from the environment, raising ConfigError naming each bad variable."""
    try:
        return Settings()  # type: ignore[call-arg]
    except ValidationError as error:
        raise ConfigError(_explain(error)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()


def reset_settings() -> None:
    """Forget the cached settings (tests and the demo change the environment)."""
    get_settings.cache_clear()
