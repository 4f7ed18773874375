"""Configuration: one typed object built from ``NUDGE_*`` environment variables and an optional
TOML file, validated once at start and passed down explicitly."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError

DelayBackendName = Literal["auto", "plugin", "tiers"]


class Settings(BaseSettings):
    """Everything a worker, the CLI or a producer needs to know about its surroundings."""

    model_config = SettingsConfigDict(env_prefix="NUDGE_", extra="forbid", frozen=True)

    amqp_url: str = "amqp://guest:guest@127.0.0.1:35672/"
    database_url: str = "postgresql+psycopg://nudge@127.0.0.1:35432/nudge"
    rabbitmq_mgmt_url: str = "http://guest:guest@127.0.0.1:35673"
    #: ``tiers`` works on every broker and keeps waiting messages replicated in a cluster;
    #: ``plugin`` is the faster choice on a single node with the plugin (docs/delays.md,
    #: "Choosing a backend"); ``auto`` takes the plugin whenever the broker has it.
    delay_backend: DelayBackendName = "tiers"

    webhook_url: str | None = None
    webhook_secret: str = Field(default="change-me", min_length=8)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    #: Messages per webhook request: 1 sends one POST per message, more turns on batch mode.
    webhook_batch_size: int = Field(default=1, ge=1, le=500)

    # Delivery: SMTP, unsubscribe links, rate limits (docs/delivery.md).
    #: The SMTP server; the ``email`` channel is enabled when set.
    smtp_host: str | None = None
    smtp_port: int = Field(default=587, ge=1, le=65535)
    #: ``starttls`` upgrades a plain connection, ``tls`` connects over TLS (port 465),
    #: ``none`` is for a local relay only.
    smtp_security: Literal["starttls", "tls", "none"] = "starttls"
    smtp_username: str | None = None
    smtp_password: str | None = None
    #: CA certificates (a PEM file) to trust for the SMTP server, e.g. a private CA.
    smtp_cert_bundle: str | None = None
    smtp_from: str = "Nudge <nudge@localhost>"
    smtp_timeout_seconds: float = Field(default=30.0, gt=0)
    #: SMTP connections kept open and reused across messages.
    smtp_connections: int = Field(default=4, ge=1, le=100)
    #: Base URL of the unsubscribe endpoint; the List-Unsubscribe link adds signed parameters.
    unsubscribe_url: str = "http://localhost:8080/unsubscribe"
    unsubscribe_secret: str = Field(default="change-me-too", min_length=8)
    #: Sends per second per channel, e.g. ``{"email": 14}``; a channel not named is unlimited.
    rate_limits: dict[str, float] = Field(default_factory=dict)
    #: Dispatch processes sharing the rate limits: each process takes limit / this.
    dispatch_processes: int = Field(default=1, ge=1, le=10000)

    claim_lease_seconds: float = Field(default=300.0, gt=0)
    #: Events up to this long before a message was scheduled still exclude it (clock skew
    #: between services, an event published just before the message).
    exclusion_buffer_seconds: float = Field(default=5.0, ge=0)
    max_attempts: int = Field(default=5, ge=1, le=100)
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=3600.0, gt=0)

    #: Held messages count against it: at R messages due per second arriving up to
    #: 4.25 s early, keep it above 4.25 R plus a batch, or the hold throttles delivery.
    prefetch: int = Field(default=10000, ge=1, le=65535)
    batch_size: int = Field(default=500, ge=1, le=5000)
    batch_wait_seconds: float = Field(default=0.01, ge=0)
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: str) -> str:
        if not value.startswith(("amqp://", "amqps://")):
            raise ValueError("must start with amqp:// or amqps://")
        return value

    @field_validator("rate_limits")
    @classmethod
    def _positive_rates(cls, value: dict[str, float]) -> dict[str, float]:
        bad = sorted(k for k, v in value.items() if not v > 0)
        if bad:
            raise ValueError(f"rates must be positive numbers per second (check {', '.join(bad)})")
        return value

    @field_validator("database_url")
    @classmethod
    def _db_scheme(cls, value: str) -> str:
        if not value.startswith("postgresql+psycopg://"):
            raise ValueError("must start with postgresql+psycopg://")
        return value

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Build settings from a TOML file (if given), then the environment, then overrides.

        Raises :class:`ConfigError` naming every invalid setting.
        """
        values: dict[str, Any] = {}
        if config_file is not None:
            try:
                values.update(tomllib.loads(config_file.read_text()))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"config file {config_file}: {exc}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            # Environment variables win over the file: explicit init values would win over the
            # environment in pydantic-settings, so feed the file through the defaults instead.
            env_only = cls()
            merged = {**values, **env_only.model_dump(exclude_unset=True)}
            merged.update({k: v for k, v in overrides.items() if v is not None})
            return cls(**merged)
        except ValidationError as exc:
            problems = "; ".join(
                f"NUDGE_{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigError(f"invalid configuration: {problems}") from exc
