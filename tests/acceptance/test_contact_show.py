"""``nudge contact show``: why a contact did or did not get each message, in one command."""

from __future__ import annotations

import json
from collections.abc import Callable

from sqlalchemy import Engine, text

from producer import Producer
from tests.support import Worker, final_row, nudge, wait_for
from workers.config import Settings


def _count(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one())


def test_contact_show_pages_events_and_messages_with_outcome_reason_opens_and_clicks(
    settings: Settings, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    start_worker("scheduler", "dispatch", "events")
    kim = {"id": "kim", "email": "kim@example.com", "attributes": {"plan": "pro"}}
    with Producer(settings.amqp_url) as producer:
        producer.schedule(kim, "welcome", "webhook", idempotency_key="k-welcome")
        producer.track("kim", "upgraded", event_id="ev-kim-1", data={"to": "team"})
    sent = final_row(engine, "k-welcome")
    assert sent["status"] == "sent"
    wait_for(
        lambda: _count(engine, "SELECT count(*) FROM contact_events WHERE name = 'upgraded'"),
        timeout=20,
        message="the event to be recorded",
    )
    with Producer(settings.amqp_url) as producer:
        producer.schedule(
            "kim",
            "tip",
            "webhook",
            idempotency_key="k-tip",
            exclude_events=["upgraded"],
            exclude_scope="ever",
        )
        producer.schedule("kim", "digest", "webhook", idempotency_key="k-digest", delay=3600)
    assert final_row(engine, "k-tip")["status"] == "excluded"
    # what the web role records when kim opens the welcome email and clicks its link
    with engine.begin() as conn:
        key = {"m": sent["message_id"], "c": sent["contact_id"]}
        conn.execute(
            text("INSERT INTO message_opens (message_id, contact_id, opens) VALUES (:m, :c, 3)"),
            key,
        )
        conn.execute(
            text(
                "INSERT INTO message_clicks (message_id, contact_id, url)"
                " VALUES (:m, :c, 'https://example.com/start')"
            ),
            key,
        )
    wait_for(
        lambda: _count(engine, "SELECT count(*) FROM messages WHERE idempotency_key = 'k-digest'"),
        timeout=20,
        message="the scheduled message to be stored",
    )

    shown = nudge(settings, "contact", "show", "kim", "--limit", "2")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("contact kim (id ")
    assert lines[0].endswith("): subscribed")
    assert "  email kim@example.com" in lines
    assert '  attributes {"plan": "pro"}' in lines
    assert any(li.endswith(' upgraded {"to": "team"}') for li in lines)
    messages = [li for li in lines if li.startswith("  #")]
    # newest first: the digest waits, the tip was excluded (and why)
    assert "single k-digest: digest via webhook: scheduled " in messages[0]
    assert "single k-tip: tip via webhook: excluded " in messages[1]
    assert "(excluded: upgraded at " in messages[1]
    assert len(messages) == 2
    cursor = int(messages[1].split()[0].lstrip("#"))
    assert lines[-1] == f"more: nudge contact show kim --before {cursor} --limit 2"

    # the next page: the welcome was sent, opened three times and clicked
    rest = nudge(settings, "contact", "show", "kim", "--limit", "2", "--before", str(cursor))
    messages = [li for li in rest.stdout.splitlines() if li.startswith("  #")]
    assert len(messages) == 1
    assert "single k-welcome: welcome via webhook: sent " in messages[0]
    assert "opened " in messages[0]
    assert "(3 times)" in messages[0]
    assert "clicked https://example.com/start at " in messages[0]
    assert not rest.stdout.splitlines()[-1].startswith("more:")

    whole = json.loads(nudge(settings, "contact", "show", "kim", "--json").stdout)
    assert [m["idempotency_key"] for m in whole["messages"]] == ["k-digest", "k-tip", "k-welcome"]
    assert [m["status"] for m in whole["messages"]] == ["scheduled", "excluded", "sent"]
    assert whole["messages"][1]["reason"].startswith("excluded: upgraded at ")
    assert whole["messages"][2]["opens"] == 3
    assert [c["url"] for c in whole["messages"][2]["clicks"]] == ["https://example.com/start"]
    assert whole["contact"]["subscribed"] is True
    assert [e["name"] for e in whole["events"]] == ["upgraded"]
    assert whole["next_before"] is None

    missing = nudge(settings, "contact", "show", "nobody")
    assert missing.returncode == 4
    assert "no contact 'nobody'" in missing.stderr
