"""Every due message is checked against Postgres before it goes out: a reminder scheduled a
week ago must not reach a user who upgraded yesterday, and no user gets a fourth message
today because several workers decided at the same moment."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial

from sqlalchemy import Engine, select

from producer import Producer, scheduled
from shared.topology import DEAD_QUEUE, EVENT_KEY, EVENTS_EXCHANGE
from tests.backends import both_backends, waiting_in_delay
from tests.support import Management, Worker, nudge, raw_publish, wait_for
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store.schema import contacts, message_items, messages


def outcomes(engine: Engine) -> dict[str, tuple[str, str | None]]:
    """idempotency key -> (status, reason)"""
    with engine.connect() as conn:
        rows = conn.execute(
            select(messages.c.idempotency_key, message_items.c.status, message_items.c.reason).join(
                message_items, message_items.c.message_id == messages.c.id
            )
        )
        return {r.idempotency_key: (r.status, r.reason) for r in rows}


def final(engine: Engine, n: int) -> Callable[[], bool]:
    def check() -> bool:
        return sum(s not in ("sending", "deferred") for s, _ in outcomes(engine).values()) >= n

    return check


def test_the_trial_reminder_skips_a_contact_who_upgraded_before_it_fell_due(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    start_worker("scheduler", "dispatch", "events")
    with Producer(settings.amqp_url) as producer:
        producer.schedule(
            "u-1",
            "trial_end",
            "webhook",
            delay=3,
            idempotency_key="trial",
            exclude_events=["upgrade_subscription"],
        )
        producer.track("u-1", "upgrade_subscription", event_id="ev-1")
    wait_for(final(engine, 1), timeout=20, message="the reminder's outcome")
    status, reason = outcomes(engine)["trial"]
    assert status == "excluded"
    assert reason is not None
    assert reason.startswith("excluded: upgrade_subscription at ")
    assert sink.requests == []
    shown = nudge(settings, "message", "show", "trial").stdout
    assert "u-1: excluded (excluded: upgrade_subscription at" in shown


def test_exclusion_scopes_and_the_buffer(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    start_worker("events")
    now = datetime.now(UTC)
    with Producer(settings.amqp_url) as producer:
        # events recorded before anything is scheduled
        producer.track("old", "upgrade_subscription", occurred_at=now - timedelta(hours=1))
        producer.track("ever", "upgrade_subscription", occurred_at=now - timedelta(days=30))
        producer.track("within", "upgrade_subscription", occurred_at=now - timedelta(hours=1))
        producer.track({"id": "gone", "subscribed": False}, "unsubscribe")
    with engine.connect() as conn:
        wait_for(
            lambda: len(list(conn.execute(select(contacts.c.id)))) == 4,
            timeout=10,
            message="4 contacts",
        )
    start_worker("scheduler", "dispatch")
    with Producer(settings.amqp_url) as producer:
        for contact, scope, within in (
            ("old", "since_scheduled", None),
            ("ever", "ever", None),
            ("within", "within", timedelta(hours=2)),
            ("buffer", "since_scheduled", None),
            ("gone", "since_scheduled", None),
        ):
            producer.schedule(
                contact,
                "trial_end",
                "webhook",
                delay=4,
                idempotency_key=contact,
                exclude_events=["upgrade_subscription"],
                exclude_scope=scope,
                exclude_within=within,
            )
        # published after scheduling, but it happened 2 s before: inside the 5 s buffer
        producer.track(
            "buffer", "upgrade_subscription", occurred_at=datetime.now(UTC) - timedelta(seconds=2)
        )
    wait_for(final(engine, 5), timeout=30, message="5 outcomes")
    got = outcomes(engine)
    assert got["old"] == ("sent", None), "an event before scheduling does not exclude"
    assert got["ever"][0] == "excluded"
    assert got["within"][0] == "excluded"
    assert got["buffer"][0] == "excluded"
    assert got["gone"] == ("suppressed", "unsubscribed: the contact unsubscribed")
    assert [r.body["contact"]["id"] for r in sink.accepted()] == ["old"]


def start_dispatchers(
    start_worker: Callable[..., Worker], n: int, **settings: object
) -> list[Worker]:
    """Start ``n`` dispatch processes together and wait until all consume."""
    workers = [start_worker("dispatch", wait=False, **settings) for _ in range(n)]
    for w in workers:
        wait_for(partial(w.consuming, ["nudge.due"]), timeout=60, message=f"{n} consumers")
    return workers


def _zone_at(local_hour: int, now: datetime) -> str:
    """A fixed-offset IANA zone where it is ``local_hour`` o'clock now."""
    offset = (local_hour - now.hour) % 24
    offset = offset - 24 if offset > 14 else offset
    return "Etc/UTC" if offset == 0 else f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"


@both_backends
def test_quiet_hours_defer_to_each_contacts_local_opening(
    settings: Settings,
    engine: Engine,
    vhost: str,
    management: Management,
    start_worker: Callable[..., Worker],
) -> None:
    now = datetime.now(UTC)
    if now.minute >= 58:  # keep "now" inside the hour the zones are built from
        wait_for(
            lambda: datetime.now(UTC).minute < 58,
            timeout=150,
            interval=1,
            message="the top of the hour",
        )
        now = datetime.now(UTC)
    late, early = _zone_at(23, now), _zone_at(0, now)  # 23:xx and 00:xx local, across midnight
    done = nudge(settings, "policy", "set", "automation", "--quiet-hours", "22:00-01:00")
    assert done.returncode == 0, done.stderr
    start_worker()
    with Producer(settings.amqp_url) as producer:
        producer.schedule(
            {"id": "late", "timezone": late}, "digest", "webhook", idempotency_key="late"
        )
        producer.schedule(
            {"id": "early", "timezone": early}, "digest", "webhook", idempotency_key="early"
        )
    wait_for(
        lambda: (
            len(outcomes(engine)) == 2
            and all(s == "deferred" for s, _ in outcomes(engine).values())
        ),
        timeout=20,
        message="deferrals",
    )
    with engine.connect() as conn:
        rows = conn.execute(
            select(messages.c.idempotency_key, message_items.c.next_attempt_at).join(
                message_items, message_items.c.message_id == messages.c.id
            )
        )
        nxt = {r.idempotency_key: r.next_attempt_at for r in rows}
    top = now.replace(minute=0, second=0, microsecond=0)
    assert nxt["late"] == top + timedelta(hours=2)  # 23:xx local -> 01:00 local
    assert nxt["early"] == top + timedelta(hours=1)  # 00:xx local -> 01:00 local
    assert outcomes(engine)["late"][1] == (
        f"quiet_hours: 22:00-01:00 in {late}, until {nxt['late'].isoformat()}"
    )
    # the re-check waits in the delay (ladder queues or the plugin), not in a worker's memory
    wait_for(
        lambda: sum(waiting_in_delay(management, vhost).values()) == 2,
        timeout=15,
        message="2 deferred messages waiting in the delay",
    )


@both_backends
def test_a_capped_message_deferred_waits_in_the_delay_until_the_window_frees_then_is_sent(
    settings: Settings,
    sink: Sink,
    engine: Engine,
    vhost: str,
    management: Management,
    start_worker: Callable[..., Worker],
) -> None:
    window = 8.0
    done = nudge(
        settings,
        "policy",
        "set",
        "automation",
        "--frequency-cap",
        "1",
        "--frequency-window",
        f"{window:.0f}s",
        "--category-window",
        "none",
        "--cap-action",
        "defer",
    )
    assert done.returncode == 0, done.stderr
    start_worker()
    with Producer(settings.amqp_url) as producer:
        producer.schedule("busy", "tip", "webhook", idempotency_key="first")
        wait_for(lambda: sink.accepted(), timeout=20, message="the first message sent")
        producer.schedule("busy", "digest", "webhook", idempotency_key="second")
    wait_for(
        lambda: outcomes(engine).get("second", ("", None))[0] == "deferred",
        timeout=20,
        message="the second message deferred by the cap",
    )
    assert (outcomes(engine)["second"][1] or "").startswith("frequency: 1 sent on all channels")
    wait_for(
        lambda: sum(waiting_in_delay(management, vhost).values()) == 1,
        timeout=15,
        message="the deferred message waiting in the delay",
    )
    wait_for(final(engine, 2), timeout=30, message="2 outcomes")
    assert outcomes(engine)["second"] == ("sent", None)
    first, second = sink.accepted()
    assert second.at - first.at >= window - 0.5, "sent before the window freed"


def test_eight_workers_racing_on_one_contact_send_exactly_the_cap(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    n = 1000
    # small prefetch and batches, so that all eight take part
    workers = start_dispatchers(start_worker, 8, prefetch=20, batch_size=10)
    start_worker("scheduler")
    due = datetime.now(UTC) + timedelta(seconds=6)
    with Producer(settings.amqp_url) as producer:
        producer.schedule_many(
            scheduled("busy", "tip", "webhook", deliver_at=due, idempotency_key=f"tip-{i}")
            for i in range(n)
        )
    wait_for(final(engine, n), timeout=90, message=f"{n} outcomes")
    got = Counter(s for s, _ in outcomes(engine).values())
    assert got == Counter({"sent": 3, "suppressed": n - 3})
    reasons = Counter(
        (r or "").split(" (")[0] for s, r in outcomes(engine).values() if s == "suppressed"
    )
    assert list(reasons) == ["frequency: 3 sent on all channels within 1d"]
    assert len(sink.requests) == 3
    busy = [w for w in workers if w.metric("nudge_outcomes_total") > 0]
    assert len(busy) >= 4, "the race needs several workers deciding at once"


def test_many_contacts_at_once_under_eight_workers_never_deadlock(
    settings: Settings, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    contacts_n, per = 40, 25
    workers = start_dispatchers(start_worker, 8, prefetch=50, batch_size=25)
    start_worker("scheduler")
    due = datetime.now(UTC) + timedelta(seconds=6)
    with Producer(settings.amqp_url) as producer:
        producer.schedule_many(
            scheduled(f"c-{i % contacts_n}", "tip", "log", deliver_at=due, idempotency_key=f"m-{i}")
            for i in range(contacts_n * per)
        )
    wait_for(final(engine, contacts_n * per), timeout=90, message="every outcome")
    with engine.connect() as conn:
        sent = Counter(
            conn.scalars(select(message_items.c.contact_id).where(message_items.c.status == "sent"))
        )
    assert sorted(sent.values()) == [3] * contacts_n
    assert all("deadlock" not in w.log() for w in workers)


def test_invalid_events_are_parked_with_a_reason_and_record_nothing(
    settings: Settings,
    vhost: str,
    management: Management,
    engine: Engine,
    start_worker: Callable[..., Worker],
) -> None:
    start_worker("events")
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    for event_id, body in (
        ("no-name", b'{"v": 1, "contact": {"id": "1"}, "occurred_at": "2026-01-01T00:00:00Z"}'),
        (
            "future",
            (
                f'{{"v": 1, "contact": {{"id": "1"}}, "name": "login", "occurred_at": "{future}"}}'
            ).encode(),
        ),
        (
            "bad-tz",
            b'{"v": 1, "contact": {"id": "1", "timezone": "Mars/Base"}, "name": "x", '
            b'"occurred_at": "2026-01-01T00:00:00Z"}',
        ),
    ):
        raw_publish(settings.amqp_url, EVENTS_EXCHANGE, EVENT_KEY, body, message_id=event_id)
    wait_for(
        lambda: management.queue(vhost, DEAD_QUEUE).get("messages") == 3,
        timeout=20,
        message="3 parked events",
    )
    reasons = {
        m["properties"]["message_id"]: m["properties"]["headers"]["x-nudge-reason"]
        for m in management.get_messages(vhost, DEAD_QUEUE)
    }
    assert reasons["no-name"] == "name: Field required"
    assert reasons["future"].startswith("occurred_at: must not be in the future")
    assert reasons["bad-tz"].startswith("contact.timezone: must be an IANA time zone")
    with engine.connect() as conn:
        assert list(conn.execute(select(contacts.c.id))) == []


def test_an_invalid_policy_is_refused_whole_and_changes_nothing(settings: Settings) -> None:
    before = nudge(settings, "policy", "show", "automation", "--json").stdout
    bad = nudge(
        settings,
        "policy",
        "set",
        "automation",
        "--frequency-cap",
        "5",
        "--quiet-hours",
        "22:00-8am",
    )
    assert bad.returncode == 2
    assert "quiet_hours: must be HH:MM-HH:MM" in bad.stderr
    assert nudge(settings, "policy", "show", "automation", "--json").stdout == before
    unknown = nudge(settings, "policy", "set", "vip")
    assert unknown.returncode == 2
    assert "'transactional', 'automation', 'campaign'" in unknown.stderr
    ok = nudge(settings, "policy", "set", "automation", "--frequency-cap", "5", "--json")
    assert ok.returncode == 0
    assert '"frequency_cap": 5' in nudge(settings, "policy", "show", "automation", "--json").stdout
