"""Automation rules end to end: an event reaches the events worker, its rules schedule
messages through nudge.intake, and the right template reaches the webhook after the right
delay; inactivity sends once, after the last interaction; nothing is sent twice."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, func, select

from producer import Producer
from shared.topology import EVENT_KEY, EVENTS_EXCHANGE
from tests.support import Worker, raw_publish, wait_for
from workers.config import Settings
from workers.demo.sink import Sink
from workers.rules.definitions import parse
from workers.store import rules as rules_repo
from workers.store import templates
from workers.store.schema import contact_events, message_items, messages, rule_runs

FAST_MATRIX = Path(__file__).resolve().parents[1] / "rules/service-matrix-fast.yaml"
#: How late a message may reach the sink on a loaded two-core machine.
LATE = 3.0


def load(engine: Engine, text: str) -> None:
    """Store a rule file and the templates it names, as `nudge rules load` would."""
    parsed = parse(text)
    with engine.begin() as conn:
        for name in templates.missing(conn, {r.template for r in parsed.rules}):
            templates.add(conn, name, f"{name} for {{{{ contact.id }}}}", name, None)
        rules_repo.put(conn, parsed.rules)


def rows(engine: Engine) -> list[tuple[str, datetime, str | None, str | None]]:
    """(idempotency key, deliver_at, status, reason) of every message, by deliver_at."""
    with engine.connect() as conn:
        return [
            (r.idempotency_key, r.deliver_at, r.status, r.reason)
            for r in conn.execute(
                select(
                    messages.c.idempotency_key,
                    messages.c.deliver_at,
                    message_items.c.status,
                    message_items.c.reason,
                )
                .outerjoin(message_items, message_items.c.message_id == messages.c.id)
                .order_by(messages.c.deliver_at)
            )
        ]


def decided(engine: Engine, n: int) -> bool:
    """Whether ``n`` messages exist and every one has a final outcome."""
    found = rows(engine)
    return len(found) == n and all(r[2] not in (None, "sending", "deferred") for r in found)


def test_each_row_of_the_service_matrix_sends_its_template_after_its_delay(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    load(engine, FAST_MATRIX.read_text())
    start_worker("scheduler", "dispatch", "events")
    matrix = {  # contact: (event, template, delay in the fast file)
        "pre-sale": ("resource_downloaded", "usage-guide", 1.0),
        "sale": ("order_paid", "shipping-status", 2.0),
        "after-sale": ("service_completed", "satisfaction-survey", 3.0),
        "churn": ("login", "churn-offer", 2.0 + 1.5),
    }
    occurred = {}
    with Producer(settings.amqp_url) as producer:
        for contact, (event, _, _) in matrix.items():
            occurred[contact] = datetime.now(UTC)
            producer.track(contact, event, occurred_at=occurred[contact], event_id=f"ev-{contact}")
    # every event is also an interaction: each contact gets its churn check as well
    wait_for(lambda: len(sink.accepted()) >= 7, timeout=30, message="7 messages")
    got = {(r.body["contact"]["id"], r.body["template"]): r for r in sink.accepted()}
    expected = {(c, t): d for c, (_, t, d) in matrix.items()}
    expected |= {(c, "churn-offer"): 2.0 + 1.5 for c in matrix}
    assert set(got) == set(expected)
    for (contact, template), delay in expected.items():
        received = got[(contact, template)]
        deliver_at = datetime.fromisoformat(received.body["deliver_at"])
        assert deliver_at - occurred[contact] == timedelta(seconds=delay), template
        late = received.at - deliver_at.timestamp()
        assert 0 <= late < LATE, f"{template} for {contact}: {late:.3f} s late"
    assert sink.duplicates() == 0


def test_delays_computed_from_the_contact_are_exactly_as_the_policy_says(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    load(
        engine,
        """rules:
  - name: follow-up
    event: quote_requested
    delay:
      policy: contact
      attribute: tier
      base: {vip: 2s, normal: 4s}
      otherwise: 8s
      active: {events: [login], within: 1h, factor: 0.6}
      min: 1s
      max: 6s
    template: quote-follow-up
    channel: webhook
""",
    )
    start_worker("scheduler", "dispatch", "events")
    expected = {  # contact: (tier, active, delay)
        "vip-idle": ("vip", False, timedelta(seconds=2)),
        "vip-active": ("vip", True, timedelta(seconds=1.2)),
        "normal-idle": ("normal", False, timedelta(seconds=4)),
        "normal-active": ("normal", True, timedelta(seconds=2.4)),
        "trial-idle": ("trial", False, timedelta(seconds=6)),  # 8 s, bounded by max
        "trial-active": ("trial", True, timedelta(seconds=4.8)),
    }
    with Producer(settings.amqp_url) as producer:
        for contact, (_, active, _) in expected.items():
            if active:
                producer.track(
                    contact, "login", occurred_at=datetime.now(UTC) - timedelta(minutes=20)
                )
    with engine.connect() as conn:
        wait_for(
            lambda: conn.execute(select(func.count()).select_from(contact_events)).scalar() == 3,
            timeout=15,
            message="the logins recorded",
        )
    occurred = {}
    with Producer(settings.amqp_url) as producer:
        for contact, (tier, _, _) in expected.items():
            occurred[contact] = datetime.now(UTC)
            producer.track(
                {"id": contact, "attributes": {"tier": tier}},
                "quote_requested",
                occurred_at=occurred[contact],
            )
    wait_for(lambda: len(sink.accepted()) >= 6, timeout=30, message="6 follow-ups")
    got = {r.body["contact"]["id"]: r for r in sink.accepted()}
    for contact, (_, _, delay) in expected.items():
        deliver_at = datetime.fromisoformat(got[contact].body["deliver_at"])
        assert deliver_at - occurred[contact] == delay, contact
        late = got[contact].at - deliver_at.timestamp()
        assert 0 <= late < LATE, f"{contact}: {late:.3f} s late"


CHURN = """rules:
  - name: churn-warning
    event: [login, page_view]
    inactive_for: 3s
    delay: 1s
    template: churn-offer
    channel: webhook
"""


def test_three_interactions_spaced_apart_produce_one_churn_message_after_the_last(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    load(engine, CHURN)
    start_worker("scheduler", "dispatch", "events")
    now = datetime.now(UTC)
    spaced = [now - timedelta(seconds=3), now - timedelta(seconds=1.5), now]
    with Producer(settings.amqp_url) as producer:
        for i, (at, event) in enumerate(zip(spaced, ("login", "page_view", "login"), strict=True)):
            producer.track("u-1", event, occurred_at=at, event_id=f"i-{i}")
    wait_for(lambda: decided(engine, 3), timeout=30, message="three checks decided")
    checks = rows(engine)
    assert [(k, s) for k, _, s, _ in checks] == [
        ("rule:churn-warning:i-0", "excluded"),
        ("rule:churn-warning:i-1", "excluded"),
        ("rule:churn-warning:i-2", "sent"),
    ]
    assert checks[0][3] == f"excluded: page_view at {spaced[1].isoformat(timespec='seconds')}"
    assert checks[1][3] == f"excluded: login at {spaced[2].isoformat(timespec='seconds')}"
    [churn] = sink.accepted()
    assert churn.body["template"] == "churn-offer"
    assert churn.at >= (spaced[2] + timedelta(seconds=4)).timestamp()


ONCE = """rules:
  - name: first-order-thanks
    event: order_paid
    delay: 1s
    template: thanks
    channel: webhook
    run_once: {once}
"""


def test_a_redelivered_event_schedules_its_message_once(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    load(engine, ONCE.format(once="false"))
    start_worker("scheduler", "dispatch", "events")
    body = json.dumps(
        {
            "v": 1,
            "contact": {"id": "u-1"},
            "name": "order_paid",
            "occurred_at": datetime.now(UTC).isoformat(),
        }
    ).encode()
    raw_publish(settings.amqp_url, EVENTS_EXCHANGE, EVENT_KEY, body, message_id="ev-1", copies=3)
    wait_for(lambda: sink.accepted(), timeout=20, message="the thanks")
    with Producer(settings.amqp_url) as producer:  # and once more, after it was sent
        producer.track("u-1", "order_paid", event_id="ev-1")
        producer.track("u-1", "order_paid", event_id="ev-2")  # another order: another thanks
    wait_for(lambda: len(sink.requests) >= 2, timeout=20, message="the second thanks")
    wait_for(lambda: decided(engine, 2), timeout=20, message="both decided")
    assert [k for k, *_ in rows(engine)] == [
        "rule:first-order-thanks:ev-1",
        "rule:first-order-thanks:ev-2",
    ]
    assert len(sink.requests) == 2
    assert sink.duplicates() == 0


def test_concurrent_events_for_a_run_once_rule_send_once(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    load(engine, ONCE.format(once="true"))
    start_worker("scheduler", "dispatch")
    # two events workers taking one event at a time: the events race in parallel batches
    racers = [start_worker("events", wait=False, concurrency=4, batch_size=1) for _ in range(2)]
    # each one, not just the queue: the first consumer would satisfy a queue-level check
    wait_for(
        lambda: all("worker started" in w.log() for w in racers),
        timeout=60,
        message="both events workers",
    )
    with Producer(settings.amqp_url) as producer:
        for i in range(8):
            producer.track("u-1", "order_paid", event_id=f"order-{i}")
    with engine.connect() as conn:
        wait_for(
            lambda: conn.execute(select(func.count()).select_from(contact_events)).scalar() == 8,
            timeout=20,
            message="8 events recorded",
        )
    wait_for(lambda: sink.accepted(), timeout=20, message="the thanks")
    wait_for(lambda: decided(engine, 1), timeout=20, message="the thanks decided")
    with engine.connect() as conn:
        runs = list(conn.execute(select(rule_runs.c.rule, rule_runs.c.event_id)))
    assert len(runs) == 1
    assert [k for k, *_ in rows(engine)] == [f"rule:first-order-thanks:{runs[0].event_id}"]
    assert len(sink.requests) == 1


def test_a_rules_message_is_stored_as_kind_rule_and_completes_like_a_single_message(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    load(
        engine,
        """rules:
  - name: hello
    event: signed_up
    delay: 0s
    template: hello
    channel: webhook
""",
    )
    start_worker("scheduler", "dispatch", "events")
    with Producer(settings.amqp_url) as producer:
        producer.track("ann", "signed_up", event_id="ev-ann")
        producer.schedule("ann", "welcome", "webhook", idempotency_key="from-a-service")
    wait_for(lambda: len(sink.accepted()) == 2, message="both messages sent")

    def kinds() -> dict[str, tuple[str, int]]:
        with engine.connect() as conn:
            found = conn.execute(select(messages.c.template, messages.c.kind, messages.c.status))
            return {r.template: (r.kind, r.status) for r in found}

    # status 3: completed once its recipient's outcome is final, whatever the kind
    wait_for(
        lambda: kinds() == {"hello": ("rule", 3), "welcome": ("single", 3)},
        message="the kinds, and both completed",
    )
