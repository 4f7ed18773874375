"""Bad input gets an error naming the field and what would be valid, before it is published
(producer side) and when it arrives (worker side), with the same words."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from producer import InvalidMessage, Scheduled, Tracked, scheduled, tracked
from producer.testing import InMemoryProducer
from shared import contract
from shared.contract import ScheduleMessage


def _reason(**kwargs: object) -> str:
    args: dict[str, object] = {"contact": "42", "template": "trial_end", "channel": "webhook"}
    args.update(kwargs)
    with pytest.raises(InvalidMessage) as info:
        scheduled(**args)  # type: ignore[arg-type]
    return info.value.reason


def test_an_unknown_channel_is_named_with_the_valid_ones() -> None:
    reason = _reason(channel="sms")
    assert reason.startswith("channel:")
    assert "'webhook', 'log' or 'email'" in reason


def test_delay_errors_name_the_delay() -> None:
    assert _reason(delay=-1).startswith("delay: must not be negative")
    assert _reason(delay=float("nan")).startswith("delay:")
    assert _reason(delay=10**10).startswith("delay: must be at most")
    both = _reason(delay=1, deliver_at=datetime.now(UTC))
    assert both.startswith("delay: give either delay or deliver_at")


def test_naive_times_and_expiry_before_delivery_are_refused() -> None:
    assert _reason(deliver_at=datetime(2030, 1, 1)).startswith("deliver_at:")
    now = datetime.now(UTC)
    reason = _reason(deliver_at=now + timedelta(hours=1), expires_at=now)
    assert reason.startswith("expires_at: must be later than deliver_at")


def test_contact_fields_are_checked() -> None:
    assert _reason(contact="").startswith("id:")
    assert _reason(contact={"id": "1", "timezone": "Mars/Olympus"}).startswith("timezone:")
    assert _reason(contact={"id": "1", "email": "nope"}).startswith("email:")


def test_a_valid_request_round_trips_through_the_wire_format() -> None:
    request = scheduled(
        {"id": "42", "timezone": "Europe/Paris"},
        "trial_end",
        "webhook",
        delay=timedelta(days=7),
        exclude_events=["upgrade_subscription"],
        data={"plan": "pro"},
    )
    assert request.body == request.message.model_dump_json().encode()
    decoded = contract.decode(ScheduleMessage, request.body, content_type="application/json")
    assert decoded == request.message
    assert decoded.deliver_at.tzinfo is not None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\xff\xfe not utf-8", "body: not valid UTF-8 JSON"),
        (b"{not json", "body: not valid UTF-8 JSON"),
        (b"[1, 2]", "body: must be a JSON object"),
        (json.dumps({"v": 2}).encode(), "v: Input should be 1"),
        (b"{" * 100000 + b"}" * 100000, "body:"),
        (b"[" * 100000 + b"]" * 100000, "body: nested too deeply"),  # under the size limit
    ],
)
def test_a_worker_names_what_is_wrong_with_any_bytes(body: bytes, expected: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        contract.decode(ScheduleMessage, body, content_type="application/json")
    assert info.value.reason.startswith(expected)


def test_a_missing_field_is_named() -> None:
    body = json.dumps(
        {"v": 1, "contact": {"id": "42"}, "channel": "log", "deliver_at": "2030-01-01T00:00:00Z"}
    ).encode()
    with pytest.raises(InvalidMessage) as info:
        contract.decode(ScheduleMessage, body, content_type="application/json")
    assert info.value.reason == "template: Field required"


def test_the_idempotency_key_is_required() -> None:
    with pytest.raises(InvalidMessage, match="message_id: required"):
        contract.idempotency_key(None)


def test_the_in_memory_producer_validates_like_the_real_one() -> None:
    fake = InMemoryProducer()
    key = fake.schedule("42", "trial_end", "log", delay=5, idempotency_key="k-1")
    assert key == "k-1"
    first = fake.published[0]
    assert isinstance(first, Scheduled)
    assert first.message.template == "trial_end"
    with pytest.raises(InvalidMessage, match="channel"):
        fake.schedule("42", "trial_end", "pigeon")
    event_id = fake.track({"id": "42", "subscribed": False}, "upgrade_subscription")
    tracked = fake.published[1]
    assert isinstance(tracked, Tracked)
    assert tracked.idempotency_key == event_id
    assert tracked.message.contact.subscribed is False
    with pytest.raises(InvalidMessage, match=r"^name:"):
        fake.track("42", "has spaces")


def test_an_event_from_the_future_is_refused() -> None:
    with pytest.raises(InvalidMessage, match=r"^occurred_at: must not be in the future"):
        tracked("42", "login", occurred_at=datetime.now(UTC) + timedelta(hours=1))


def test_the_within_scope_needs_its_window_and_only_it_does() -> None:
    assert _reason(exclude_events=["x"], exclude_scope="within").startswith(
        "exclude_within_seconds: required"
    )
    assert _reason(exclude_within=timedelta(hours=1)).startswith("exclude_within_seconds:")
    assert _reason(exclude_scope="sometimes").startswith("exclude_scope: Input should be")
