"""Poison messages end parked in nudge.dead with the reason, never loop, and an operator can
look at them and replay them once the cause is fixed. A re-delayed message is never lost to
RabbitMQ's dead-letter cycle detection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime

import pika
from sqlalchemy import Engine, select, text

from producer import Producer
from shared import amqp, contract, delay
from shared.contract import DueMessage
from shared.topology import DEAD_QUEUE, DUE_QUEUE, INTAKE_EXCHANGE, INTAKE_QUEUE, SCHEDULE_KEY
from tests.support import (
    Management,
    Worker,
    final_row,
    nudge,
    raw_publish,
    ready_count,
    wait_for,
)
from workers.asyncapi import EXAMPLE_SCHEDULE
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store.schema import messages


def test_a_message_crashing_its_handler_on_every_delivery_is_parked_then_replayed_once_fixed(
    settings: Settings,
    vhost: str,
    management: Management,
    sink: Sink,
    engine: Engine,
    start_worker: Callable[..., Worker],
) -> None:
    scheduler = start_worker("scheduler")
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "welcome", "webhook", idempotency_key="poison")
        producer.schedule("c-2", "welcome", "webhook", idempotency_key="healthy")
    with engine.connect() as conn:
        wait_for(
            lambda: len(conn.execute(select(messages.c.id)).all()) == 2,
            timeout=10,
            message="both messages stored",
        )
        poison_id = conn.execute(
            select(messages.c.id).where(messages.c.idempotency_key == "poison")
        ).scalar_one()
    scheduler.stop()
    # A bug only this message hits: claiming its row fails inside Postgres, every time.
    with engine.begin() as conn:
        conn.execute(
            text(f"""
            CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.message_id = {int(poison_id)} THEN RAISE EXCEPTION 'poisoned row'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER poison BEFORE INSERT ON message_items
               FOR EACH ROW EXECUTE FUNCTION poison();
        """)
        )
    dispatch = start_worker("dispatch")
    wait_for(
        lambda: management.queue(vhost, DEAD_QUEUE).get("messages") == 1,
        timeout=60,
        message="the poison message parked",
    )
    assert final_row(engine, "healthy")["status"] == "sent"
    assert dispatch.process is not None
    assert dispatch.process.poll() is None
    assert ready_count(settings.amqp_url, DUE_QUEUE) == 0

    listed = nudge(settings, "dead", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [parked] = json.loads(listed.stdout)
    assert parked["source_queue"] == DUE_QUEUE
    assert parked["reason"].startswith("delivery_limit: parked by RabbitMQ from nudge.due")
    assert parked["body"]["message_id"] == poison_id
    assert parked["headers"]["x-first-death-reason"] == "delivery_limit"
    assert parked["headers"]["x-death"][0]["count"] == 1
    shown = nudge(settings, "dead", "show", parked["message_id"])
    assert "reason: delivery_limit" in shown.stdout
    assert nudge(settings, "dead", "show", "nope").returncode == 4

    # Fixed: the operator replays it, and it is delivered once.
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER poison ON message_items"))
    replayed = nudge(settings, "dead", "replay", parked["message_id"])
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.splitlines() == [
        f"replayed {parked['message_id']} to nudge.due",
        "1 message(s) replayed",
    ]
    assert final_row(engine, "poison")["status"] == "sent"
    assert sorted(r.body["contact"]["id"] for r in sink.accepted()) == ["c-1", "c-2"]
    assert ready_count(settings.amqp_url, DEAD_QUEUE) == 0
    assert nudge(settings, "dead", "list").stdout.strip() == "nudge.dead is empty"


def test_an_operator_purges_parked_messages_by_id_or_all(
    settings: Settings, vhost: str, management: Management, start_worker: Callable[..., Worker]
) -> None:
    start_worker("scheduler")
    with Producer(settings.amqp_url) as producer:
        for key in ("a", "b", "c"):
            producer.schedule("c-1", "no_such_template", "log", idempotency_key=key)
    wait_for(
        lambda: management.queue(vhost, DEAD_QUEUE).get("messages") == 3,
        timeout=20,
        message="three parked",
    )
    listed = nudge(settings, "dead", "list").stdout.splitlines()
    assert listed[0] == (
        "a  from nudge.intake: template: no template named 'no_such_template' "
        "(add it with `nudge template add`)"
    )
    assert nudge(settings, "dead", "purge", "b").stdout.strip() == "1 message(s) purged"
    assert nudge(settings, "dead", "purge").returncode == 2
    assert nudge(settings, "dead", "purge", "--all", "--yes").stdout.strip() == (
        "2 message(s) purged"
    )
    assert ready_count(settings.amqp_url, DEAD_QUEUE) == 0


def _previous_trip(level: int) -> list[dict[str, object]]:
    """The x-death history of a message that already went through ``level`` of the ladder."""
    name = delay.level_name(level)
    return [
        {
            "count": 1,
            "reason": "expired",
            "queue": name,
            "exchange": name,
            "time": datetime.now(UTC),
            "routing-keys": ["previous"],
        }
    ]


def test_a_re_delayed_message_is_not_dropped_by_dead_letter_cycle_detection(
    settings: Settings, vhost: str, management: Management
) -> None:
    # 12.5 s: twelve whole seconds in the ladder, levels 3 and 2 (the two lowest levels are
    # held by the consumer). The history says it already expired from level 2 once, as a
    # retried due message would have.
    body = contract.encode(DueMessage(message_id=1, contact_id=1, deliver_at=datetime.now(UTC)))
    route = delay.route("tiers", "due", 12500)
    assert delay.levels_visited(delay.ladder_units(12500)) == [3, 2]

    # Control: published with its history, RabbitMQ drops it when level 3 dead-letters it
    # into level 2.
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            route.exchange,
            route.routing_key,
            body,
            pika.BasicProperties(
                message_id="with-history", delivery_mode=2, headers={"x-death": _previous_trip(2)}
            ),
            mandatory=True,
        )
    finally:
        connection.close()

    # Our re-delay path strips the history first.
    async def redelay() -> None:
        conn = await amqp.connect(settings.amqp_url)
        try:
            publisher = await amqp.Publisher.open(conn)
            await publisher.publish(
                amqp.Publisher.delayed(
                    "tiers",
                    "due",
                    12500,
                    body,
                    "stripped",
                    {"x-death": _previous_trip(2), "x-other": "kept"},
                )
            )
        finally:
            await conn.close()

    asyncio.run(redelay())
    wait_for(
        lambda: management.queue(vhost, DUE_QUEUE).get("messages") == 1,
        timeout=25,
        message="the re-delayed message in nudge.due",
    )
    [arrived] = management.get_messages(vhost, DUE_QUEUE)
    assert arrived["properties"]["message_id"] == "stripped"
    assert arrived["properties"]["headers"]["x-other"] == "kept"
    # the control has left the ladder (dropped), and never reached nudge.due
    for level in (delay.level_name(3), delay.level_name(2)):
        assert ready_count(settings.amqp_url, level) == 0
    assert ready_count(settings.amqp_url, DUE_QUEUE) == 1


def test_input_postgres_cannot_store_is_parked_at_once_naming_the_field_and_every_view_copes(
    settings: Settings, management: Management, vhost: str, start_worker: Callable[..., Worker]
) -> None:
    deep = b"[" * 50_000 + b"]" * 50_000  # parked by the workers, well under the size limit
    inputs = {
        "nul": (json.dumps({**EXAMPLE_SCHEDULE, "data": {"name": "a\x00"}}).encode(), 2),
        "nan": (json.dumps({**EXAMPLE_SCHEDULE, "data": {"n": float("nan")}}).encode(), 2),
        "big": (json.dumps({**EXAMPLE_SCHEDULE, "data": {"n": [2**64]}}).encode(), 2),
        "transient": (json.dumps(EXAMPLE_SCHEDULE).encode(), 1),
        "utf16": (json.dumps(EXAMPLE_SCHEDULE).encode("utf-16"), 2),
        "deep": (deep, 2),
        "binary": (bytes(range(256)) * 900, 2),  # 230,400 bytes, not UTF-8
    }
    start_worker("scheduler")
    for key, (body, mode) in inputs.items():
        raw_publish(
            settings.amqp_url,
            INTAKE_EXCHANGE,
            SCHEDULE_KEY,
            body,
            message_id=key,
            delivery_mode=mode,
        )
    wait_for(
        lambda: management.queue(vhost, DEAD_QUEUE).get("messages") == len(inputs),
        timeout=60,
        message="every input parked",
    )
    listed = nudge(settings, "dead", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    parked = {p["message_id"]: p for p in json.loads(listed.stdout)}
    assert {k: (p["source_queue"], p["reason"]) for k, p in parked.items()} == {
        "nul": (INTAKE_QUEUE, "data.name: must not contain NUL characters (\\u0000)"),
        "nan": (INTAKE_QUEUE, "data.n: must be a finite number (not NaN or Infinity)"),
        "big": (INTAKE_QUEUE, "data.n[0]: integers must be between -2^63 and 2^63-1"),
        "transient": (INTAKE_QUEUE, "delivery_mode: 1, must be 2 (persistent)"),
        "utf16": (INTAKE_QUEUE, parked["utf16"]["reason"]),
        "deep": (INTAKE_QUEUE, "body: nested too deeply"),
        "binary": (INTAKE_QUEUE, parked["binary"]["reason"]),
    }
    assert parked["utf16"]["reason"].startswith("body: not valid UTF-8 JSON")
    assert parked["binary"]["reason"].startswith("body: not valid UTF-8 JSON")
    assert parked["binary"]["body_bytes"] == 230_400
    assert parked["nul"]["body"]["data"] == {"name": "a\x00"}
    text_list = nudge(settings, "dead", "list")
    assert text_list.returncode == 0, text_list.stderr
    assert len(text_list.stdout.splitlines()) == len(inputs)
    for key in ("deep", "binary"):
        shown = nudge(settings, "dead", "show", key)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith(f"message {key} from {INTAKE_QUEUE}")
        as_json = nudge(settings, "dead", "show", key, "--json")
        assert as_json.returncode == 0, as_json.stderr
        assert isinstance(json.loads(as_json.stdout)["body"], str)  # shown as text
