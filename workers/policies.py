"""Anti-spam policies: one per priority class, stored in Postgres, changed with
``nudge policy set`` and read by dispatch workers on every batch (no restart needed)."""

from __future__ import annotations

import re
import zoneinfo
from datetime import UTC, datetime, time, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.contract import Name, Priority, TimeZone, describe
from shared.errors import InvalidMessage

_HOURS = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


class Policy(BaseModel):
    """What a dispatch worker checks before sending a message of one priority class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: At most this many messages per contact per rolling window, all channels (None: no cap).
    frequency_cap: int | None = Field(default=3, ge=1, le=10_000)
    #: At most this many per contact per window on the message's own channel (None: no cap).
    channel_cap: int | None = Field(default=None, ge=1, le=10_000)
    frequency_window_seconds: float = Field(default=86_400, gt=0, le=366 * 86_400)
    #: No second message of the same category within this window (None: no dedup).
    category_window_seconds: float | None = Field(default=72 * 3600, gt=0, le=366 * 86_400)
    #: Skip when the contact did one of these within ``interaction_window_seconds``.
    interaction_events: tuple[Name, ...] = ()
    interaction_window_seconds: float = Field(default=3600, gt=0, le=366 * 86_400)
    #: ``HH:MM-HH:MM`` in the contact's timezone; may cross midnight. None: no quiet hours.
    quiet_hours: str | None = None
    #: Timezone for contacts without one.
    default_timezone: TimeZone = "UTC"
    #: What a capped message becomes: ``suppress`` (dropped, recorded) or ``defer`` (re-checked
    #: when the window frees).
    cap_action: Literal["suppress", "defer"] = "suppress"
    #: Skip the frequency cap and category dedup (transactional messages).
    bypass_caps: bool = False
    #: Send even to unsubscribed contacts (transactional messages).
    bypass_subscription: bool = False

    @field_validator("quiet_hours")
    @classmethod
    def _quiet_hours(cls, value: str | None) -> str | None:
        if value is not None and not _HOURS.match(value):
            raise ValueError("must be HH:MM-HH:MM, e.g. 22:00-08:00")
        return value

    def quiet_until(self, now: datetime, timezone: str | None) -> datetime | None:
        """When quiet hours end, if ``now`` falls inside them for a contact in ``timezone``."""
        if self.quiet_hours is None:
            return None
        match = _HOURS.match(self.quiet_hours)
        assert match is not None
        start = time(int(match[1]), int(match[2]))
        end = time(int(match[3]), int(match[4]))
        zone = zoneinfo.ZoneInfo(timezone or self.default_timezone)
        local = now.astimezone(zone)
        t = local.timetz().replace(tzinfo=None)
        inside = (start <= t < end) if start <= end else (t >= start or t < end)
        if not inside:
            return None
        opening = datetime.combine(local.date(), end, tzinfo=zone)
        if opening <= local:
            opening = datetime.combine(local.date() + timedelta(days=1), end, tzinfo=zone)
        return opening.astimezone(UTC)


#: The interaction events the automation and campaign policies ship with: a contact who
#: started a conversation with the team (chat, sales, support) or opened a support ticket
#: within the interaction window is not sent an automated message (docs/operations.md).
DEFAULT_INTERACTION_EVENTS: tuple[str, ...] = ("conversation_started", "support_ticket_opened")

DEFAULTS: dict[Priority, Policy] = {
    Priority.TRANSACTIONAL: Policy(
        bypass_caps=True, bypass_subscription=True, frequency_cap=None, category_window_seconds=None
    ),
    Priority.AUTOMATION: Policy(interaction_events=DEFAULT_INTERACTION_EVENTS),
    Priority.CAMPAIGN: Policy(interaction_events=DEFAULT_INTERACTION_EVENTS),
}


def parse(settings: dict[str, object]) -> Policy:
    """Validate policy settings, raising :class:`InvalidMessage` naming the field."""
    try:
        return Policy.model_validate(settings)
    except ValidationError as exc:
        raise InvalidMessage(describe(exc)) from exc
