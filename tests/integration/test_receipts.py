"""Read receipts: recorded for recipients that were sent, parked with a reason for any other."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select

from producer import Producer
from shared.topology import DEAD_QUEUE
from tests.support import Management, Worker, final_row, ready_count, wait_for
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store.schema import contact_events, contacts, message_items


def test_a_receipt_is_recorded_for_a_sent_recipient_and_parked_for_one_never_sent(
    settings: Settings,
    engine: Engine,
    sink: Sink,
    management: Management,
    vhost: str,
    start_worker: Callable[..., Worker],
) -> None:
    def respond(doc: dict[str, Any], attempt: int) -> tuple[int, dict[str, str]]:
        return (400, {}) if doc["contact"]["id"] == "c-failed" else (200, {})

    sink.respond = respond
    start_worker("scheduler", "dispatch", "events", "receipts")
    with Producer(settings.amqp_url) as producer:
        producer.track("c-excluded", "upgraded", event_id="ev-upgraded")
        wait_for(lambda: _recorded_event(engine), message="the excluding event")
        producer.schedule("c-sent", "welcome", "webhook", idempotency_key="sent")
        producer.schedule("c-failed", "welcome", "webhook", idempotency_key="failed")
        producer.schedule(
            "c-excluded",
            "welcome",
            "webhook",
            idempotency_key="excluded",
            exclude_events=["upgraded"],
        )
    rows = {key: final_row(engine, key) for key in ("sent", "failed", "excluded")}
    assert {k: r["status"] for k, r in rows.items()} == {
        "sent": "sent",
        "failed": "failed",
        "excluded": "excluded",
    }
    # A campaign recipient the planner froze into the audience but nobody sent yet.
    with engine.begin() as conn:
        planned = conn.execute(
            contacts.insert().values(external_id="c-planned").returning(contacts.c.id)
        ).scalar_one()
        conn.execute(
            message_items.insert().values(
                message_id=rows["sent"]["message_id"], contact_id=planned, status="planned"
            )
        )
    read_at = datetime.now(UTC) - timedelta(seconds=10)
    with Producer(settings.amqp_url) as producer:
        for contact, key in (
            ("c-failed", "failed"),
            ("c-excluded", "excluded"),
            ("c-planned", "sent"),
            ("c-sent", "sent"),
        ):
            producer.mark_read(rows[key]["message_id"], contact, read_at=read_at)
    assert wait_for(lambda: final_row(engine, "sent")["read_at"], message="c-sent read") == read_at
    wait_for(lambda: ready_count(settings.amqp_url, DEAD_QUEUE) == 3, message="3 parked")
    reasons = sorted(
        m["properties"]["headers"]["x-nudge-reason"]
        for m in management.get_messages(vhost, DEAD_QUEUE)
    )
    mid = rows["sent"]["message_id"]
    assert reasons == [
        f"contact: recipient 'c-excluded' of message {rows['excluded']['message_id']} was not "
        "sent (status excluded): only a sent message can be read",
        f"contact: recipient 'c-failed' of message {rows['failed']['message_id']} was not "
        "sent (status failed): only a sent message can be read",
        f"contact: recipient 'c-planned' of message {mid} was not sent (status planned): "
        "only a sent message can be read",
    ]
    with engine.connect() as conn:
        unread = conn.execute(
            select(contacts.c.external_id, message_items.c.read_at).join(
                message_items, message_items.c.contact_id == contacts.c.id
            )
        ).all()
    assert {c: r is not None for c, r in unread} == {
        "c-sent": True,
        "c-failed": False,
        "c-excluded": False,
        "c-planned": False,
    }


def _recorded_event(engine: Engine) -> bool:
    with engine.connect() as conn:
        return conn.execute(select(contact_events.c.id)).first() is not None
