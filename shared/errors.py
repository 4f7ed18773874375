"""Every error Nudge raises on purpose descends from :class:`NudgeError`.

Driver errors (pika, aio-pika, psycopg) are translated at the adapter that calls the driver and
chained with ``from exc``, so callers only ever catch these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class NudgeError(Exception):
    """Nudge failed to do what was asked."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__ or self.__class__.__name__)


class ConfigError(NudgeError):
    """The configuration is invalid."""


class InvalidMessage(NudgeError):
    """A message does not follow the wire contract.

    ``reason`` names the field and what would be valid, e.g.
    ``"deliver_at: Input should be a valid datetime"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BrokerError(NudgeError):
    """RabbitMQ could not be reached or refused an operation."""


class BrokerUnavailable(BrokerError):
    """RabbitMQ could not be reached."""


class PublishNotConfirmed(BrokerError):
    """The broker did not confirm a publish: it was nacked, returned unroutable, or the
    connection was lost before the confirm arrived. The message may or may not have been
    enqueued; publish it again with the same idempotency key.

    ``failed`` maps the idempotency key of each message that was not confirmed to why;
    ``confirmed`` holds the keys of the same publish the broker did confirm (empty when the
    publish failed before it could tell)."""

    def __init__(
        self,
        message: str | None = None,
        *,
        failed: Mapping[str, str] | None = None,
        confirmed: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.failed: dict[str, str] = dict(failed or {})
        self.confirmed: tuple[str, ...] = tuple(confirmed)

    @classmethod
    def of(
        cls, failed: Mapping[str, str], confirmed: Sequence[str], total: int
    ) -> PublishNotConfirmed:
        """The error for a publish of ``total`` messages of which ``failed`` were not
        confirmed, naming the first ten keys and why."""
        named = "; ".join(f"{key}: {why}" for key, why in list(failed.items())[:10])
        more = f"; and {len(failed) - 10} more" if len(failed) > 10 else ""
        return cls(
            f"{len(failed)} of {total} not confirmed ({named}{more})",
            failed=failed,
            confirmed=confirmed,
        )


class SettleFailed(BrokerError):
    """An ack or a nack did not reach RabbitMQ (its channel closed since the delivery):
    RabbitMQ redelivers the message."""


class TopologyMismatch(BrokerError):
    """An exchange or queue exists on the broker with arguments other than ours."""


class StoreError(NudgeError):
    """PostgreSQL failed."""


class StoreUnavailable(StoreError):
    """PostgreSQL could not be reached; the operation can be retried."""


class NotFound(NudgeError):
    """The requested record does not exist."""


class InvalidTemplate(InvalidMessage):
    """A template does not compile, or cannot be rendered for a recipient.

    ``reason`` names the part (``subject``, ``text_body``, ``html_body``) and what failed.
    """


class InvalidTransition(NudgeError):
    """A campaign cannot do that in its current state (e.g. resume a completed campaign)."""
