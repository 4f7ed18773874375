"""Delay policies of automation rules: when a rule's message falls due, from the moment the rule
starts counting and what we know about the contact.

- ``fixed``: a duration (``15m``, ``2h``, ``7d``); a bare duration in a rule file means this.
- ``contact``: a base per value of a contact attribute (``tier``: vip 1h, normal 2h, otherwise
  24h), multiplied by ``active.factor`` when the contact did one of ``active.events`` within
  ``active.within`` before the trigger, then bounded by ``min`` and ``max``.
- ``absolute``: at ``HH:MM`` in the contact's time zone, ``days_after`` days after the trigger's
  local date (1: the next day; 0: the same day if still ahead, else the next).

Pure functions: the facts come from :mod:`workers.store.rules`, so the numbers can be tested
exactly.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

from shared.contract import MAX_DELAY, Name, TimeZone
from workers.durations import format_duration, parse_duration


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration: write a number and a unit, e.g. 15m")
    if value.strip().startswith("-"):
        raise ValueError(f"{value!r} is negative: a delay counts forward, e.g. 15m")
    parsed = parse_duration(value)
    if parsed > MAX_DELAY:
        raise ValueError(f"{value!r} is too long: at most {MAX_DELAY.days}d")
    return parsed


#: A non-negative duration written as ``500ms``, ``15m``, ``2h``, ``7d``; stored the same way.
Duration = Annotated[
    timedelta, BeforeValidator(_duration), PlainSerializer(format_duration, return_type=str)
]
_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class ContactFacts:
    """What a delay policy may look at."""

    attributes: Mapping[str, Any]
    timezone: str | None
    #: The latest of the policy's activity events within its window before the trigger.
    active_at: datetime | None = None


@dataclass(frozen=True)
class Plan:
    """When the message is due, and how the policy got there (for ``nudge rules explain``)."""

    deliver_at: datetime
    why: str


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Fixed(_Policy):
    """The same delay for everyone."""

    policy: Literal["fixed"] = "fixed"
    after: Duration

    def plan(self, start: datetime, contact: ContactFacts) -> Plan:
        return Plan(start + self.after, f"fixed {format_duration(self.after)}")


class Active(_Policy):
    """Contacts who did one of ``events`` within ``within`` before the trigger get their
    delay multiplied by ``factor``."""

    events: tuple[Name, ...] = Field(min_length=1)
    within: Duration
    factor: float = Field(gt=0, le=100)

    @field_validator("within")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than 0s")
        return value


class ByContact(_Policy):
    """A base delay per value of a contact attribute, a factor for active contacts, bounds."""

    policy: Literal["contact"]
    attribute: Name = "tier"
    base: dict[str, Duration] = Field(min_length=1)
    #: For contacts whose attribute is missing or has no entry in ``base``.
    otherwise: Duration
    active: Active | None = None
    min: Duration = timedelta(0)
    max: Duration | None = None

    @model_validator(mode="after")
    def _bounds(self) -> ByContact:
        if self.max is not None and self.min > self.max:
            raise ValueError("min: must not be longer than max")
        return self

    def plan(self, start: datetime, contact: ContactFacts) -> Plan:
        raw = contact.attributes.get(self.attribute)
        value = None if raw is None or isinstance(raw, dict | list) else str(raw)
        if value is not None and value in self.base:
            delay = self.base[value]
            why = [f"{self.attribute}={value}: {format_duration(delay)}"]
        else:
            delay = self.otherwise
            shown = f"{self.attribute} missing" if value is None else f"{self.attribute}={value}"
            why = [f"{shown}, not in base: otherwise {format_duration(delay)}"]
        if self.active is not None and contact.active_at is not None:
            delay = delay * self.active.factor
            why.append(
                f"active at {contact.active_at.isoformat(timespec='seconds')} (within "
                f"{format_duration(self.active.within)}): x{self.active.factor:g} = "
                f"{format_duration(delay)}"
            )
        elif self.active is not None:
            why.append(f"not active within {format_duration(self.active.within)}")
        bounded = max(delay, self.min)
        if self.max is not None:
            bounded = min(bounded, self.max)
        if bounded != delay:
            upper = format_duration(self.max) if self.max is not None else ""
            why.append(
                f"bounded to {format_duration(self.min)}..{upper}: {format_duration(bounded)}"
            )
        return Plan(start + bounded, "; ".join(why))


class Absolute(_Policy):
    """At a wall-clock time in the contact's time zone."""

    policy: Literal["absolute"]
    at: str
    days_after: int = Field(default=1, ge=0, le=366)
    #: For contacts without a time zone.
    default_timezone: TimeZone = "UTC"

    @field_validator("at")
    @classmethod
    def _clock(cls, value: str) -> str:
        if not _CLOCK.match(value):
            raise ValueError("must be HH:MM, e.g. '09:00'")
        return value

    def plan(self, start: datetime, contact: ContactFacts) -> Plan:
        zone_name = contact.timezone or self.default_timezone
        zone = zoneinfo.ZoneInfo(zone_name)
        hour, minute = (int(p) for p in self.at.split(":"))
        local = start.astimezone(zone)
        day = local.date() + timedelta(days=self.days_after)
        target = datetime.combine(day, time(hour, minute), tzinfo=zone)
        if target <= start:  # days_after 0 and the time has passed today
            target = datetime.combine(day + timedelta(days=1), time(hour, minute), tzinfo=zone)
        when = "the same day" if self.days_after == 0 else f"{self.days_after} day(s) later"
        return Plan(target.astimezone(UTC), f"at {self.at} {zone_name}, {when}")


def _shorthand(value: Any) -> Any:
    if isinstance(value, str | timedelta):
        return {"policy": "fixed", "after": value}
    return value


#: What a rule's ``delay`` may be; a bare duration means ``fixed``.
DelayPolicy = Annotated[
    Annotated[Fixed | ByContact | Absolute, Field(discriminator="policy")],
    BeforeValidator(_shorthand),
]
POLICIES = ("fixed", "contact", "absolute")
