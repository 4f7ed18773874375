"""The wire contract: what services publish and what workers pass each other.

JSON bodies, ``content_type: application/json``, a version field ``v``, UTC ISO-8601 times, and
the AMQP ``message_id`` property as the idempotency key. The same pydantic models validate on
both ends, so a service gets the error before it publishes and a worker rejects the same input
from a raw-AMQP producer with the same words. ``nudge contract export`` writes them as JSON
Schema and AsyncAPI for services in other languages.
"""

from __future__ import annotations

import enum
import json
import math
import re
import zoneinfo
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypedDict, TypeVar, Unpack

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.errors import InvalidMessage

CONTENT_TYPE = "application/json"
MAX_BODY_BYTES = 256 * 1024
#: The AMQP ``delivery_mode`` services publish with: persistent.
PERSISTENT = 2
#: Integers anywhere in a body fit PostgreSQL's bigint (and every 64-bit JSON library).
MAX_INT = 2**63 - 1
MIN_INT = -(2**63)
#: Row ids (messages, contacts) and counters (attempts, rounds) as PostgreSQL stores them.
MAX_ID = MAX_INT
MAX_COUNT = 2**31 - 1
#: The longest delay any backend accepts (the tiers ladder holds 2^28-1 s, about 8.5 years).
MAX_DELAY = timedelta(seconds=2**28 - 1)

Name = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:\-]+$")
]
ExternalId = Annotated[str, StringConstraints(min_length=1, max_length=200)]
IdempotencyKey = Annotated[str, StringConstraints(min_length=1, max_length=200)]
ExcludeScope = Literal["since_scheduled", "ever", "within"]


def _time_zone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError("must be an IANA time zone such as Europe/Paris") from exc
    return value


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):  # JSON true is not the number 1
        raise ValueError("must be the number 1")
    return value


#: The contract version field.
Version = Annotated[Literal[1], BeforeValidator(_not_a_boolean)]

#: An IANA time zone name, e.g. ``Europe/Paris``.
TimeZone = Annotated[str, AfterValidator(_time_zone)]

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class Channel(enum.StrEnum):
    """Where a message goes out."""

    WEBHOOK = "webhook"
    LOG = "log"
    EMAIL = "email"


class Priority(enum.StrEnum):
    """Priority class: which anti-spam policies apply and which queue carries the message."""

    TRANSACTIONAL = "transactional"
    AUTOMATION = "automation"
    CAMPAIGN = "campaign"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class ContactRef(_Model):
    """The recipient, by the service's own user id; other fields update the stored contact."""

    id: ExternalId
    email: str | None = Field(default=None, max_length=320)
    phone: str | None = Field(default=None, max_length=40)
    timezone: TimeZone | None = Field(default=None, max_length=64)
    attributes: dict[str, JsonValue] = Field(default_factory=dict)
    #: Whether the contact accepts non-transactional messages; None leaves it as stored.
    subscribed: bool | None = None

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is not None and not _EMAIL.match(value):
            raise ValueError("must look like name@example.com")
        return value


class ScheduleMessage(_Model):
    """``nudge.intake``, routing key ``schedule``: send ``template`` to ``contact`` at
    ``deliver_at`` unless, by then, it no longer makes sense."""

    v: Version = 1
    contact: ContactRef
    template: Name
    channel: Channel
    deliver_at: AwareDatetime
    expires_at: AwareDatetime | None = None
    exclude_events: tuple[Name, ...] = Field(default=(), max_length=50)
    #: Which past events exclude: those since the message was scheduled (less the workers'
    #: configured buffer), any ever (Plunk's semantics), or those within the last
    #: ``exclude_within_seconds`` before delivery.
    exclude_scope: ExcludeScope = "since_scheduled"
    exclude_within_seconds: float | None = Field(default=None, gt=0, le=MAX_DELAY.total_seconds())
    #: With ``since_scheduled``: count exclusion events from this instant on (inclusive), not
    #: from when the scheduler stored the message less the buffer. Automation rules give the
    #: instant just after their trigger event, so only later events exclude.
    exclude_since: AwareDatetime | None = None
    category: Name | None = None
    priority: Priority = Priority.AUTOMATION
    data: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("deliver_at", "expires_at", "exclude_since")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None

    @model_validator(mode="after")
    def _times(self) -> ScheduleMessage:
        if (self.exclude_scope == "within") != (self.exclude_within_seconds is not None):
            raise ValueError(
                "exclude_within_seconds: required with exclude_scope 'within', and only then"
            )
        if self.exclude_since is not None and self.exclude_scope != "since_scheduled":
            raise ValueError("exclude_since: only with exclude_scope 'since_scheduled'")
        if self.expires_at is not None and self.expires_at <= self.deliver_at:
            raise ValueError("expires_at: must be later than deliver_at")
        if self.deliver_at - datetime.now(UTC) > MAX_DELAY:
            raise ValueError(f"deliver_at: must be at most {MAX_DELAY.days} days from now")
        return self


class TrackEvent(_Model):
    """``nudge.events``, routing key ``event``: ``contact`` did ``name`` at ``occurred_at``.
    The AMQP ``message_id`` is the event id: an event recorded twice counts once."""

    v: Version = 1
    contact: ContactRef
    name: Name
    occurred_at: AwareDatetime
    data: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        value = value.astimezone(UTC)
        if value - datetime.now(UTC) > timedelta(minutes=5):
            raise ValueError("must not be in the future (more than 5 minutes of clock skew)")
        return value


class DueMessage(_Model):
    """``nudge.due`` (through the delay exchange): message ``message_id`` is due for contact
    ``contact_id``. Internal to the workers; ``attempt`` counts delivery attempts."""

    v: Version = 1
    message_id: int = Field(gt=0, le=MAX_ID)
    contact_id: int = Field(gt=0, le=MAX_ID)
    deliver_at: AwareDatetime
    attempt: int = Field(default=1, ge=1, le=MAX_COUNT)


def due_message_id(message_id: int, contact_id: int, attempt: int) -> str:
    """The AMQP ``message_id`` of a :class:`DueMessage`: unique per recipient and attempt."""
    return f"due-{message_id}-{contact_id}-{attempt}"


#: The most recipients one :class:`DueBatch` carries.
MAX_DUE_BATCH = 500


class DueBatch(_Model):
    """``nudge.due`` (through the delay exchange): several recipients that leave the delay
    together, in one AMQP message. The scheduler bundles the messages of a batch that the
    delay carries alike; a dispatch worker holds and handles each one as if it had come alone
    and acks the bundle once every one is settled. Internal to the workers."""

    v: Version = 1
    due: list[DueMessage] = Field(min_length=2, max_length=MAX_DUE_BATCH)


class ReadReceipt(_Model):
    """``nudge.receipts``, routing key ``read``: ``contact`` read message ``message_id`` (the
    ``message_id`` of the webhook payload) at ``read_at``. Recorded once: a second receipt for
    the same recipient keeps the first time."""

    v: Version = 1
    message_id: int = Field(gt=0, le=MAX_ID)
    contact: ExternalId
    read_at: AwareDatetime

    @field_validator("read_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        value = value.astimezone(UTC)
        if value - datetime.now(UTC) > timedelta(minutes=5):
            raise ValueError("must not be in the future (more than 5 minutes of clock skew)")
        return value


class PlanCampaign(_Model):
    """``nudge.plan``: plan (publish the batches of) round ``round`` of a campaign; round 0 is
    a scheduled start that freezes the audience first. Internal to the workers."""

    v: Version = 1
    campaign_id: int = Field(gt=0, le=MAX_ID)
    round: int = Field(ge=0, le=MAX_COUNT)
    #: A scheduled start: the planner holds the message until then (the delay ladder
    #: delivers up to a few seconds early, and the consumer's hold makes it exact).
    start_at: AwareDatetime | None = None


class RecipientBatch(_Model):
    """``nudge.batches``: recipients of a campaign for a dispatch worker, in contact id order,
    with the attempts recorded for each so far. Internal to the workers."""

    v: Version = 1
    message_id: int = Field(gt=0, le=MAX_ID)
    round: int = Field(ge=1, le=MAX_COUNT)
    contact_ids: tuple[Annotated[int, Field(gt=0, le=MAX_ID)], ...] = Field(
        min_length=1, max_length=10_000
    )
    attempts: tuple[Annotated[int, Field(ge=0, le=MAX_COUNT)], ...] = Field(
        min_length=1, max_length=10_000
    )

    @model_validator(mode="after")
    def _lengths(self) -> RecipientBatch:
        if len(self.attempts) != len(self.contact_ids):
            raise ValueError("attempts: must have one entry per contact_ids entry")
        return self


class CampaignControl(_Model):
    """``nudge.control`` (fanout): every worker hears that a campaign was paused, resumed or
    cancelled in planning round ``round``. Internal to the workers."""

    v: Version = 1
    campaign_id: int = Field(gt=0, le=MAX_ID)
    action: Literal["pause", "resume", "cancel"]
    round: int = Field(ge=0, le=MAX_COUNT)


M = TypeVar("M", bound=BaseModel)


def describe(exc: ValidationError) -> str:
    """One line naming each invalid field and what would be valid."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if ":" in msg.split(" ", 1)[0]:  # the validator already named the field
            parts.append(msg)
        else:
            parts.append(f"{loc or 'body'}: {msg}")
    return "; ".join(parts)


def build(model: type[M], **fields: Any) -> M:
    """Construct a contract model from Python values, raising :class:`InvalidMessage`."""
    _refuse_unstorable(fields)
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise InvalidMessage(describe(exc)) from exc


def encode(model: BaseModel) -> bytes:
    """The JSON body for ``model``; raises :class:`InvalidMessage` when it is too large."""
    body = model.model_dump_json(exclude_defaults=False).encode()
    if len(body) > MAX_BODY_BYTES:
        raise InvalidMessage(f"body: {len(body)} bytes, at most {MAX_BODY_BYTES} allowed")
    return body


def decode(
    model: type[M], body: bytes, *, content_type: str | None, message_id: str | None = None
) -> M:
    """Parse and validate a received body strictly, as the published JSON Schema does (no
    type coercion: ``"yes"`` is not a boolean, ``1700000000`` not a time), raising
    :class:`InvalidMessage` with a reason that names the field. Never raises anything else,
    whatever the bytes."""
    _parse(body, content_type)
    return _validate(model, body)


def decode_due(body: bytes, *, content_type: str | None) -> DueMessage | DueBatch:
    """:func:`decode` for ``nudge.due``, which carries a :class:`DueMessage` or, with a
    ``due`` list, a :class:`DueBatch`."""
    if "due" in _parse(body, content_type):
        return _validate(DueBatch, body)
    return _validate(DueMessage, body)


def _parse(body: bytes, content_type: str | None) -> dict[str, Any]:
    """The body as a JSON object, refused with the path of anything PostgreSQL could not
    store (NUL characters, NaN or infinite numbers, integers beyond bigint)."""
    if content_type not in (None, CONTENT_TYPE):
        raise InvalidMessage(f"content_type: {content_type!r}, expected {CONTENT_TYPE!r}")
    if len(body) > MAX_BODY_BYTES:
        raise InvalidMessage(f"body: {len(body)} bytes, at most {MAX_BODY_BYTES} allowed")
    try:
        # decoded first: json.loads(bytes) would also take UTF-16 and UTF-32
        text = body.decode("utf-8")
        try:
            raw, suspect = _loads_storable(text), False
        except _Suspect:
            raw, suspect = json.loads(text), True
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidMessage(f"body: not valid UTF-8 JSON ({exc})") from exc
    except RecursionError as exc:  # "[[[[...", well under the size limit, found by fuzzing
        raise InvalidMessage("body: nested too deeply") from exc
    if not isinstance(raw, dict):
        raise InvalidMessage("body: must be a JSON object")
    if suspect:  # walk it all to name the first offending value
        _refuse_unstorable(raw)
    return raw


class _Suspect(Exception):
    """The body may hold a value the contract refuses: :func:`_refuse_unstorable` decides."""


def _loads_storable(text: str) -> Any:
    """``json.loads(text)``, raising :class:`_Suspect` instead when the text may hold what
    :func:`_refuse_unstorable` refuses, at the parser's own cost: a NUL character can only
    be written ``\\u0000`` in valid JSON (strict parsing refuses a raw control character),
    and every number and constant goes through the hooks below. Walking every decoded value
    in Python instead costs about as much as parsing the body."""
    if "\\u0000" in text:
        raise _Suspect
    return json.loads(
        text, parse_int=_storable_int, parse_float=_finite_float, parse_constant=_constant
    )


def _storable_int(text: str) -> int:
    value = int(text)
    if not MIN_INT <= value <= MAX_INT:
        raise _Suspect
    return value


def _finite_float(text: str) -> float:
    value = float(text)  # "1e400" is infinite
    if not math.isfinite(value):
        raise _Suspect
    return value


def _constant(name: str) -> float:  # NaN, Infinity, -Infinity
    raise _Suspect


def _refuse_unstorable(raw: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidMessage` naming the first value, anywhere in ``raw``, that the
    contract refuses whatever the field: a NUL character (in a key or a string), a NaN or
    infinite number, an integer outside bigint."""
    stack: list[tuple[str, Any]] = [(k, v) for k, v in raw.items()]
    seen = 0
    while stack:
        path, value = stack.pop()
        seen += 1
        if seen > MAX_BODY_BYTES:  # a Python caller's self-referencing structure
            raise InvalidMessage("body: too many values")
        if "\x00" in path:
            where = path.rpartition(".")[0] or "body"
            raise InvalidMessage(f"{where}: keys must not contain NUL characters (\\u0000)")
        if isinstance(value, str):
            if "\x00" in value:
                raise InvalidMessage(f"{path}: must not contain NUL characters (\\u0000)")
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            if not MIN_INT <= value <= MAX_INT:
                raise InvalidMessage(f"{path}: integers must be between -2^63 and 2^63-1")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidMessage(f"{path}: must be a finite number (not NaN or Infinity)")
        elif isinstance(value, Mapping):
            stack += ((f"{path}.{k}", v) for k, v in value.items())
        elif isinstance(value, list | tuple):
            stack += ((f"{path}[{i}]", v) for i, v in enumerate(value))


def _validate(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        raise InvalidMessage(describe(exc)) from exc
    except RecursionError as exc:  # absurdly nested JSON
        raise InvalidMessage("body: nested too deeply") from exc


def idempotency_key(message_id: str | None) -> str:
    """Validate the AMQP ``message_id`` property, which is the idempotency key."""
    if not message_id:
        raise InvalidMessage("message_id: required, it is the idempotency key")
    if len(message_id) > 200:
        raise InvalidMessage("message_id: at most 200 characters")
    if "\x00" in message_id:
        raise InvalidMessage("message_id: must not contain NUL characters (\\u0000)")
    return message_id


def published_by_a_service(message_id: str | None, delivery_mode: int | None) -> str:
    """Check the AMQP properties a service must set (a persistent ``delivery_mode`` and the
    ``message_id``); returns the ``message_id``."""
    if delivery_mode is None or int(delivery_mode) != PERSISTENT:
        given = "absent" if delivery_mode is None else int(delivery_mode)
        raise InvalidMessage(f"delivery_mode: {given}, must be {PERSISTENT} (persistent)")
    return idempotency_key(message_id)


def contact_ref(contact: str | Mapping[str, Any] | ContactRef) -> ContactRef:
    """Accept a bare external id, a mapping of contact fields, or a :class:`ContactRef`."""
    if isinstance(contact, ContactRef):
        return contact
    if isinstance(contact, str):
        return build(ContactRef, id=contact)
    return build(ContactRef, **dict(contact))


class ScheduleOptions(TypedDict, total=False):
    """The keyword options of a scheduled message, shared by every producer's ``schedule``."""

    #: Seconds or a timedelta from now; or give ``deliver_at``; neither means now.
    delay: timedelta | float | None
    #: When to deliver (timezone-aware).
    deliver_at: datetime | None
    #: Do not send if the contact does one of these first (see ``exclude_scope``).
    exclude_events: Sequence[str]
    #: ``since_scheduled`` (default), ``ever`` or ``within`` (then give ``exclude_within``).
    exclude_scope: str
    exclude_within: timedelta | None
    #: Recorded ``expired`` instead of sent when due after this.
    expires_at: datetime | None
    #: The kind of content, for the category dedup window.
    category: str | None
    #: ``transactional``, ``automation`` (default) or ``campaign``.
    priority: str
    #: Variables for the template.
    data: Mapping[str, Any] | None


def schedule_request(
    contact: str | Mapping[str, Any] | ContactRef,
    template: str,
    channel: str,
    *,
    now: datetime | None = None,
    **options: Unpack[ScheduleOptions],
) -> ScheduleMessage:
    """Build a validated :class:`ScheduleMessage` from a producer's arguments.

    Exactly one of ``delay`` (a timedelta or seconds) and ``deliver_at`` may be given; neither
    means now.
    """
    delay = options.get("delay")
    deliver_at = options.get("deliver_at")
    exclude_within = options.get("exclude_within")
    if delay is not None and deliver_at is not None:
        raise InvalidMessage("delay: give either delay or deliver_at, not both")
    now = now or datetime.now(UTC)
    if delay is not None:
        if isinstance(delay, int | float):
            if delay != delay or delay in (float("inf"), float("-inf")):
                raise InvalidMessage("delay: must be a finite number of seconds")
            if delay > MAX_DELAY.total_seconds():
                raise InvalidMessage(f"delay: must be at most {MAX_DELAY.days} days")
            delay = timedelta(seconds=delay)
        if delay < timedelta(0):
            raise InvalidMessage("delay: must not be negative")
        if delay > MAX_DELAY:
            raise InvalidMessage(f"delay: must be at most {MAX_DELAY.days} days")
        deliver_at = now + delay
    if deliver_at is not None and deliver_at.tzinfo is None:
        raise InvalidMessage("deliver_at: must be timezone-aware (UTC)")
    return build(
        ScheduleMessage,
        contact=contact_ref(contact),
        template=template,
        channel=channel,
        deliver_at=deliver_at or now,
        expires_at=options.get("expires_at"),
        exclude_events=tuple(options.get("exclude_events", ())),
        exclude_scope=options.get("exclude_scope", "since_scheduled"),
        exclude_within_seconds=exclude_within.total_seconds() if exclude_within else None,
        category=options.get("category"),
        priority=options.get("priority", Priority.AUTOMATION),
        data=dict(options.get("data") or {}),
    )


def track_request(
    contact: str | Mapping[str, Any] | ContactRef,
    event: str,
    *,
    data: Mapping[str, Any] | None = None,
    occurred_at: datetime | None = None,
) -> TrackEvent:
    """Build a validated :class:`TrackEvent`; ``occurred_at`` defaults to now."""
    if occurred_at is not None and occurred_at.tzinfo is None:
        raise InvalidMessage("occurred_at: must be timezone-aware (UTC)")
    return build(
        TrackEvent,
        contact=contact_ref(contact),
        name=event,
        occurred_at=occurred_at or datetime.now(UTC),
        data=dict(data or {}),
    )


def read_request(message_id: int, contact: str, *, read_at: datetime | None = None) -> ReadReceipt:
    """Build a validated :class:`ReadReceipt`; ``read_at`` defaults to now."""
    if read_at is not None and read_at.tzinfo is None:
        raise InvalidMessage("read_at: must be timezone-aware (UTC)")
    return build(
        ReadReceipt, message_id=message_id, contact=contact, read_at=read_at or datetime.now(UTC)
    )
