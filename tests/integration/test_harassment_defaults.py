"""The anti-harassment rules hold by default, through real workers: a template's category
dedups messages whose producer gave none, and a contact who just started a conversation is
not sent an automated message, with no policy set by an operator."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select

from producer import Producer
from tests.support import Worker, final_row, nudge, wait_for
from workers.config import Settings
from workers.demo.sink import Sink
from workers.policies import DEFAULT_INTERACTION_EVENTS
from workers.store.schema import contact_events, messages

pytestmark = pytest.mark.integration


def test_two_messages_of_one_templates_category_within_72_hours_send_only_the_first(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    text = "News for {{ contact.id }}"
    added = nudge(settings, "template", "add", "news", "--text", text, "--category", "newsletter")
    assert added.returncode == 0, added.stderr
    assert "category: newsletter" in nudge(settings, "template", "show", "news").stdout
    start_worker("scheduler", "dispatch")
    with Producer(settings.amqp_url) as producer:
        # neither message names a category: the producer does not help
        producer.schedule("ann", "news", "webhook", idempotency_key="news-1")
    first = final_row(engine, "news-1")
    assert first["status"] == "sent"
    with Producer(settings.amqp_url) as producer:
        producer.schedule("ann", "news", "webhook", idempotency_key="news-2")
        producer.schedule("ann", "news", "webhook", idempotency_key="other", category="promo")
    second = final_row(engine, "news-2")
    assert second["status"] == "suppressed"
    assert second["reason"].startswith("category: newsletter sent at ")
    assert second["reason"].endswith(", within 3d")
    # a category the producer gives wins over the template's
    assert final_row(engine, "other")["status"] == "sent"
    with engine.connect() as conn:
        stored = dict(conn.execute(select(messages.c.idempotency_key, messages.c.category)).all())
    assert stored == {"news-1": "newsletter", "news-2": "newsletter", "other": "promo"}
    assert [r.body["contact"]["id"] for r in sink.accepted()] == ["ann", "ann"]


@pytest.mark.parametrize("event", DEFAULT_INTERACTION_EVENTS)
def test_a_contact_who_just_started_a_conversation_is_not_sent_an_automated_message(
    event: str,
    settings: Settings,
    sink: Sink,
    engine: Engine,
    start_worker: Callable[..., Worker],
) -> None:
    start_worker("scheduler", "dispatch", "events")
    with Producer(settings.amqp_url) as producer:
        producer.track("talking", event, occurred_at=datetime.now(UTC) - timedelta(minutes=5))
        producer.track("quiet", event, occurred_at=datetime.now(UTC) - timedelta(hours=2))
    with engine.connect() as conn:
        wait_for(
            lambda: len(conn.execute(select(contact_events.c.id)).all()) == 2,
            message="both events recorded",
        )
    with Producer(settings.amqp_url) as producer:
        producer.schedule("talking", "tip", "webhook", idempotency_key="tip-talking")
        producer.schedule("quiet", "tip", "webhook", idempotency_key="tip-quiet")
    talking = final_row(engine, "tip-talking")
    assert talking["status"] == "excluded"
    assert talking["reason"].startswith(f"interaction: {event} at ")
    assert talking["reason"].endswith(", within 1h")
    # the window is an hour: an older conversation does not hold the message back
    assert final_row(engine, "tip-quiet")["status"] == "sent"
    assert [r.body["contact"]["id"] for r in sink.accepted()] == ["quiet"]
