"""Configuration: one typed object built from ``NUDGE_*`` environment variables and an optional
TOML file, validated once at start and passed down explicitly."""

from __future__ import annotations

import os
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared import brokers
from shared.errors import ConfigError
from shared.topology import DELIVERY_LIMIT

DelayBackendName = Literal["auto", "plugin", "tiers"]

#: The shortest secret accepted: an HMAC-SHA256 key should carry 256 bits, which 32 characters
#: of ``secrets.token_urlsafe`` (43 of them for 32 bytes) or of hex (64) come close to or reach.
MIN_SECRET_LENGTH = 32
#: Placeholders of example files and former defaults: a secret containing one is refused.
PLACEHOLDERS = ("change-me", "changeme", "change_me")
#: How to make a good secret, said with every refusal.
GENERATE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def check_secret(value: SecretStr | None) -> SecretStr | None:
    """A secret that is set must be long and not a placeholder (the message names neither the
    value nor any part of it)."""
    if value is None:
        return None
    text = value.get_secret_value()
    if any(p in text.lower() for p in PLACEHOLDERS):
        raise ValueError(f"is a placeholder, not a secret: generate one with {GENERATE}")
    if len(text) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"must be at least {MIN_SECRET_LENGTH} characters (got {len(text)}): "
            f"generate one with {GENERATE}"
        )
    return value


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
    #: HMAC key of the webhook signature; required by a dispatch worker when ``webhook_url`` is
    #: set (:meth:`require_channel_secrets`).
    webhook_secret: SecretStr | None = None
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
    smtp_password: SecretStr | None = None
    #: CA certificates (a PEM file) to trust for the SMTP server, e.g. a private CA.
    smtp_cert_bundle: str | None = None
    smtp_from: str = "Nudge <nudge@localhost>"
    smtp_timeout_seconds: float = Field(default=30.0, gt=0)
    #: SMTP connections kept open and reused across messages.
    smtp_connections: int = Field(default=4, ge=1, le=100)
    #: Base URL of the unsubscribe endpoint; the List-Unsubscribe link adds signed parameters.
    unsubscribe_url: str = "http://localhost:8080/unsubscribe"
    #: HMAC key of the unsubscribe links; required by a dispatch worker when ``smtp_host`` is
    #: set (:meth:`require_channel_secrets`).
    unsubscribe_secret: SecretStr | None = None
    #: Base URL of the ``web`` role as recipients reach it, e.g. ``https://t.example.com``;
    #: when set, HTML emails get an open pixel and signed click redirects (templates may opt
    #: out). Unset: no tracking.
    tracking_url: str | None = None
    #: HMAC key of open and click tokens; required by a dispatch worker when ``tracking_url`` is
    #: set, and by the ``web`` role.
    tracking_secret: SecretStr | None = None
    #: Where the ``web`` role listens (unsubscribe pages, open pixel, click redirects).
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=8080, ge=1, le=65535)
    #: Sends per second per channel for the whole fleet of dispatch processes, e.g.
    #: ``{"email": 14}``; a channel not named is unlimited.
    rate_limits: dict[str, float] = Field(default_factory=dict)

    claim_lease_seconds: float = Field(default=300.0, gt=0)
    #: A pending recipient whose due message has not come back from the delay this long after
    #: its time is published again, straight to the due queue, by a ``scheduler`` worker (the
    #: delay lost it: the plugin across a broker restart, a purge, a lost node).
    rescue_after_seconds: float = Field(default=300.0, ge=1)
    # Retention (docs/operations.md, "Retention"): what ``nudge db prune`` and the scheduler
    # role may drop, whole months at a time, once nothing pending needs it.
    #: Months of ``contact_events`` older than this may be dropped.
    retention_events_days: float = Field(default=180.0, gt=0)
    #: Months of ``messages`` and ``message_items`` whose last activity is older than this
    #: may be dropped.
    retention_messages_days: float = Field(default=90.0, gt=0)
    #: Idempotency keys older than this whose message is gone are deleted: a publish of the
    #: same key after that schedules the message again.
    retention_message_keys_days: float = Field(default=90.0, gt=0)
    #: Rule runs older than this are deleted (unset: kept for ever); a run-once rule may then
    #: fire again for the contact.
    retention_rule_runs_days: float | None = Field(default=None, gt=0)
    #: How often a ``scheduler`` worker creates the coming months' partitions and moves the
    #: message id sequence at a month boundary.
    partition_maintenance_seconds: float = Field(default=300.0, ge=1)
    #: How often a ``scheduler`` worker prunes (0: never; run ``nudge db prune`` instead).
    prune_interval_seconds: float = Field(default=3600.0, ge=0)
    #: How many times a recipient whose lease ran out is claimed again before it is recorded
    #: ``failed`` (reason ``lease``): it is sent at most this many times plus one.
    max_takeovers: int = Field(default=3, ge=0, le=100)
    #: How long rendering one recipient's message may take (off the event loop) before the
    #: recipient is recorded failed.
    render_timeout_seconds: float = Field(default=1.0, gt=0, le=60)
    #: Events up to this long before a message was scheduled still exclude it (clock skew
    #: between services, an event published just before the message).
    exclusion_buffer_seconds: float = Field(default=5.0, ge=0)
    #: A message that lists exclusion events waits this long past its due time for the events
    #: role to record every event published before then; past it, it is deferred (reason
    #: ``events_behind``) and tried again this much later.
    events_wait_seconds: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, le=100)
    #: A message whose handler raises on this many tries is parked in ``nudge.dead`` by the
    #: worker (reason ``crash: <error class> ...``); below the queues' delivery limit, so the
    #: broker never parks it as ``delivery_limit``.
    max_crash_tries: int = Field(default=5, ge=1, le=DELIVERY_LIMIT - 1)
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
        try:
            brokers.addresses(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return value

    @field_validator("tracking_url", "unsubscribe_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("webhook_secret", "unsubscribe_secret", "tracking_secret")
    @classmethod
    def _strong_secret(cls, value: SecretStr | None) -> SecretStr | None:
        return check_secret(value)

    def require_channel_secrets(self) -> None:
        """Raise :class:`ConfigError` naming each secret that a channel this configuration
        enables needs but that is not set: ``NUDGE_WEBHOOK_SECRET`` with ``NUDGE_WEBHOOK_URL``,
        ``NUDGE_UNSUBSCRIBE_SECRET`` with ``NUDGE_SMTP_HOST``."""
        missing = [
            f"NUDGE_{secret.upper()}: required when NUDGE_{enabler.upper()} is set "
            f"(generate one with {GENERATE})"
            for secret, enabler in (
                ("webhook_secret", "webhook_url"),
                ("unsubscribe_secret", "smtp_host"),
                ("tracking_secret", "tracking_url"),
            )
            if getattr(self, enabler) and getattr(self, secret) is None
        ]
        if missing:
            raise ConfigError(f"invalid configuration: {'; '.join(missing)}")

    def require_web_secrets(self) -> None:
        """Raise :class:`ConfigError` unless the ``web`` role's keys are set: it verifies
        unsubscribe links (``NUDGE_UNSUBSCRIBE_SECRET``) and tracking tokens
        (``NUDGE_TRACKING_SECRET``)."""
        missing = [
            f"NUDGE_{secret.upper()}: required by the web role (generate one with {GENERATE})"
            for secret in ("unsubscribe_secret", "tracking_secret")
            if getattr(self, secret) is None
        ]
        if missing:
            raise ConfigError(f"invalid configuration: {'; '.join(missing)}")

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
        return multi_host(value)

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
        _refuse_removed(values)
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
                f"NUDGE_{'.'.join(str(p) for p in err['loc']).upper()}: "
                f"{err['msg'].removeprefix('Value error, ')}"
                for err in exc.errors()
            )
            # Not chained: the validation error holds the raw input, secrets included.
            raise ConfigError(f"invalid configuration: {problems}") from None


#: Settings that no longer exist, and what replaced them.
REMOVED = {
    "dispatch_processes": "rate limits are the fleet's: every dispatch process reserves its "
    "sends from one schedule in Postgres, whatever their number (docs/delivery.md); unset it",
}


def _refuse_removed(file_values: dict[str, Any]) -> None:
    """A removed setting is an error, not silently ignored: the operator meant something."""
    for name, why in REMOVED.items():
        if name in file_values or f"NUDGE_{name.upper()}" in os.environ:
            raise ConfigError(f"invalid configuration: NUDGE_{name.upper()} was removed: {why}")


def multi_host(url: str) -> str:
    """``url`` with libpq's list of hosts (``user@host1:port1,host2:port2/db``) written as
    SQLAlchemy reads it (``user@/db?host=host1:port1&host=host2:port2``); any other URL as
    it is. libpq tries the hosts in turn, and with ``target_session_attrs=read-write`` keeps
    the first that accepts writes: after a failover, the promoted standby."""
    scheme, rest = url.split("://", 1)
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if "," not in hosts:
        return url
    names = hosts.split(",")
    if not all(names):
        raise ValueError(f"an empty host in the list {hosts!r}: write host1:port1,host2:port2")
    path, _, query = tail.partition("?")
    pairs = [("host", h) for h in names] + urllib.parse.parse_qsl(query, keep_blank_values=True)
    query = urllib.parse.urlencode(pairs, safe=":[]")
    return f"{scheme}://{userinfo}{at}/{path if slash else ''}?{query}"
