"""Campaigns end to end: the nudge CLI in subprocesses, real workers, the webhook sink.

Every test judges what a user would: what reached the sink (first per Idempotency-Key),
what ``message_items`` records per recipient, and what the CLI prints.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, text

from producer import Producer
from shared import contract
from shared.contract import PlanCampaign
from shared.topology import PLAN_EXCHANGE, PLAN_KEY
from tests.support import Worker, nudge, raw_publish, wait_for
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store import templates
from workers.store.campaigns import PLANNING_LOCK_SPACE as SPACE

FINAL = ("sent", "failed", "excluded", "suppressed", "expired", "cancelled")


def ok(settings: Settings, *args: str) -> str:
    done = nudge(settings, *args)
    assert done.returncode == 0, f"nudge {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def seed(engine: Engine, n: int, *, template: str = "promo") -> None:
    """``n`` subscribed contacts c-1..c-n, and the template."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO contacts (external_id, attributes) SELECT 'c-' || g, "
                "jsonb_build_object('tier', CASE WHEN g % 10 = 0 THEN 'vip' ELSE 'free' END) "
                "FROM generate_series(1, :n) g"
            ),
            {"n": n},
        )
        templates.add(conn, template, "Hello {{ contact.id }}", "News", None)


def create(settings: Settings, name: str, *extra: str) -> None:
    ok(
        settings,
        "campaign",
        "create",
        name,
        "--template",
        "promo",
        "--channel",
        "webhook",
        "--all",
        *extra,
    )


def status(settings: Settings, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(ok(settings, "campaign", "status", name, "--json"))
    return doc


def items(engine: Engine, name: str) -> Counter[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT mi.status, count(*) FROM message_items mi JOIN messages m "
                "ON m.id = mi.message_id WHERE m.name = :n GROUP BY mi.status"
            ),
            {"n": name},
        )
        return Counter({r[0]: int(r[1]) for r in rows})


def sent_keys(sink: Sink) -> Counter[str]:
    """2xx requests per Idempotency-Key (what a receiver that did not dedupe would keep)."""
    with sink._lock:
        return Counter(r.idempotency_key for r in sink.requests if 200 <= r.status < 300)


def completed(settings: Settings, name: str, timeout: float = 120) -> dict[str, Any]:
    return wait_for(
        lambda: (s := status(settings, name))["state"] == "completed" and s,
        timeout=timeout,
        interval=0.5,
        message=f"campaign {name} to complete",
    )


def workers(start_worker: Callable[..., Worker], n: int = 2) -> list[Worker]:
    """``n`` dispatch workers (one batch in flight each) and a planner."""
    started = [start_worker("dispatch", concurrency=1) for _ in range(n)]
    start_worker("planner", concurrency=1)
    return started


def test_a_campaign_paused_and_resumed_five_times_reaches_everyone_exactly_once(
    settings: Settings, engine: Engine, sink: Sink, start_worker: Callable[..., Worker]
) -> None:
    n = 8_000
    seed(engine, n)
    workers(start_worker)
    create(settings, "spring")
    assert ok(settings, "campaign", "start", "spring").strip() == (
        f"campaign 'spring' sending: {n} recipients frozen"
    )
    rng = random.Random(4)
    for i in range(5):
        # a random moment while sending
        target = (i + 1) * n // 7 + rng.randrange(n // 20)
        wait_for(lambda: len(sink.accepted()) >= target, timeout=90, message=f"{target} sent")  # noqa: B023
        assert ok(settings, "campaign", "pause", "spring").strip() == "campaign 'spring' paused"
        paused = status(settings, "spring")
        assert paused["state"] == "paused"
        assert paused["counts"]["planned"] > 0
        time.sleep(rng.uniform(0.1, 1.0))
        ok(settings, "campaign", "resume", "spring")
    done = completed(settings, "spring")
    assert done["done"] == done["recipients"] == n
    assert sum(done["counts"][s] for s in FINAL) == n
    assert items(engine, "spring") == Counter({"sent": n})
    keys = sent_keys(sink)
    assert len(keys) == n
    assert max(keys.values()) == 1, "a recipient was sent twice"


def test_after_pause_returns_each_worker_sends_at_most_the_chunk_in_flight(
    settings: Settings, engine: Engine, sink: Sink, start_worker: Callable[..., Worker]
) -> None:
    seed(engine, 4000)
    sink.latency = 0.01  # a slow API, so the pause lands mid-batch
    chunk = 50
    workers(start_worker)
    create(settings, "latency", "--chunk-size", str(chunk))
    ok(settings, "campaign", "start", "latency")
    wait_for(lambda: len(sink.requests) >= 1000, timeout=60, message="1000 sent")
    ok(settings, "campaign", "pause", "latency")
    at_pause = len(sink.requests)
    time.sleep(3)  # anything still to come would have come by now
    after = len(sink.requests) - at_pause
    assert after <= 2 * chunk, f"{after} sends after pause returned (2 workers x {chunk})"
    assert status(settings, "latency")["counts"]["planned"] > 0


def test_cancel_mid_send_records_every_unsent_recipient_cancelled(
    settings: Settings, engine: Engine, sink: Sink, start_worker: Callable[..., Worker]
) -> None:
    n = 4000
    seed(engine, n)
    sink.latency = 0.005
    workers(start_worker)
    create(settings, "oops")
    ok(settings, "campaign", "start", "oops")
    wait_for(lambda: len(sink.requests) >= 500, timeout=60, message="500 sent")
    out = ok(settings, "campaign", "cancel", "oops")
    assert out.startswith("campaign 'oops' cancelled: ")
    wait_for(
        lambda: sum(items(engine, "oops")[s] for s in FINAL) == n,
        timeout=30,
        message="every recipient final",
    )
    final = items(engine, "oops")
    assert set(final) == {"sent", "cancelled"}
    assert final["sent"] == len(sink.accepted())
    assert final["cancelled"] > n // 2
    s = status(settings, "oops")
    assert s["state"] == "cancelled"
    again = nudge(settings, "campaign", "resume", "oops")
    assert again.returncode == 2
    assert "cannot resume campaign 'oops': it is cancelled" in again.stderr


def test_retry_failed_resends_to_the_failed_recipients_and_nobody_else(
    settings: Settings, engine: Engine, sink: Sink, start_worker: Callable[..., Worker]
) -> None:
    n = 1000
    seed(engine, n)
    failing = {"on": True}
    calls = {"n": 0}

    def respond(doc: dict[str, Any], attempt: int) -> tuple[int, dict[str, str]]:
        calls["n"] += 1
        # 10% of calls refused for good (422): those recipients end failed
        return (422, {}) if failing["on"] and calls["n"] % 10 == 0 else (200, {})

    sink.respond = respond
    workers(start_worker)
    create(settings, "flaky")
    ok(settings, "campaign", "start", "flaky")
    first = completed(settings, "flaky")
    failed = first["counts"]["failed"]
    assert n // 20 < failed < n // 5
    assert first["counts"]["sent"] == n - failed
    failed_keys = {r.idempotency_key for r in sink.requests if r.status == 422}
    before = sent_keys(sink)
    failing["on"] = False
    out = ok(settings, "campaign", "retry-failed", "flaky").strip()
    assert out == f"campaign 'flaky': {failed} failed recipients planned again"
    again = completed(settings, "flaky")
    assert again["counts"]["sent"] == n
    resent = sent_keys(sink) - before
    assert set(resent) == failed_keys, "retry-failed sent to someone who had not failed"
    assert max(sent_keys(sink).values()) == 1
    none = ok(settings, "campaign", "retry-failed", "flaky").strip()
    assert none == "campaign 'flaky': no failed recipients"


def test_a_campaign_pauses_itself_when_the_receiver_fails_every_call(
    settings: Settings, engine: Engine, sink: Sink, start_worker: Callable[..., Worker]
) -> None:
    seed(engine, 3000)
    sink.respond = lambda doc, attempt: (503, {})
    workers(start_worker)
    create(
        settings,
        "down",
        "--chunk-size",
        "20",
        "--auto-pause-threshold",
        "0.5",
        "--auto-pause-window",
        "40",
    )
    ok(settings, "campaign", "start", "down")
    s = wait_for(
        lambda: (s := status(settings, "down"))["state"] == "paused" and s,
        timeout=60,
        message="auto-pause",
    )
    assert s["reason"].startswith("auto-pause: 40 of the last 40 sends failed (threshold 50%)")
    tried = len(sink.requests)
    assert tried < 500, f"{tried} calls before the auto-pause"
    assert s["counts"]["planned"] > 2000


def test_a_dispatch_worker_killed_mid_batch_loses_nothing_and_resends_at_most_its_chunk(
    settings: Settings, engine: Engine, sink: Sink, start_worker: Callable[..., Worker]
) -> None:
    n = 3000
    chunk = 50
    seed(engine, n)
    sink.latency = 0.005
    victim = start_worker("dispatch", concurrency=1)
    start_worker("dispatch", concurrency=1)
    start_worker("planner", concurrency=1)
    create(settings, "crash", "--chunk-size", str(chunk))
    ok(settings, "campaign", "start", "crash")
    wait_for(lambda: len(sink.requests) >= 1000, timeout=60, message="1000 sent")
    victim.kill()
    done = completed(settings, "crash", timeout=120)
    assert done["counts"]["sent"] == n
    keys = sent_keys(sink)
    assert len(keys) == n, "a recipient was lost"
    twice = sum(1 for v in keys.values() if v > 1)
    assert twice <= chunk, f"{twice} recipients reached the sink twice"
    # the duplicates carry the same Idempotency-Key: a receiver that dedupes keeps one each
    assert len(sink.accepted()) == n


def test_read_receipts_are_recorded_once_and_unknown_ones_are_parked(
    settings: Settings, engine: Engine, sink: Sink, start_worker: Callable[..., Worker]
) -> None:
    from datetime import UTC, datetime, timedelta

    from producer import Producer
    from tests.support import ready_count

    seed(engine, 20)
    workers(start_worker, 1)
    start_worker("receipts")
    create(settings, "readme")
    ok(settings, "campaign", "start", "readme")
    completed(settings, "readme")
    first = datetime.now(UTC) - timedelta(minutes=1)
    mid = status(settings, "readme")["id"]
    with Producer(settings.amqp_url) as producer:
        for i in range(1, 6):
            producer.mark_read(mid, f"c-{i}", read_at=first)
        producer.mark_read(mid, "c-1", read_at=first + timedelta(seconds=30))  # later: ignored
        producer.mark_read(mid, "nobody")
    wait_for(lambda: status(settings, "readme")["counts"]["read"] == 5, message="5 read")
    wait_for(lambda: ready_count(settings.amqp_url, "nudge.dead") == 1, message="1 parked")
    with engine.connect() as conn:
        read_at = conn.execute(
            text(
                "SELECT read_at FROM message_items mi JOIN contacts c ON c.id = mi.contact_id "
                "WHERE c.external_id = 'c-1'"
            )
        ).scalar_one()
    assert abs((read_at - first).total_seconds()) < 0.01


def test_a_scheduled_campaign_starts_on_time_and_keeps_to_its_rate(
    settings: Settings, engine: Engine, sink: Sink, start_worker: Callable[..., Worker]
) -> None:
    seed(engine, 300)
    workers(start_worker, 1)
    create(settings, "later", "--rate", "100")
    out = ok(settings, "campaign", "schedule", "later", "--in", "4s")
    assert out.startswith("campaign 'later' scheduled to start at ")
    with engine.connect() as conn:
        row = conn.execute(text("SELECT status, start_at FROM messages WHERE name = 'later'")).one()
    assert row.status == 0, "started before its time"  # scheduled: not started, start_at set
    done = completed(settings, "later", timeout=60)
    assert done["counts"]["sent"] == 300
    first = min(r.at for r in sink.requests)
    last = max(r.at for r in sink.requests)
    assert first >= row.start_at.timestamp() - 0.5, "started before its time"
    assert last - first >= 1.8, f"300 recipients at 100/s took {last - first:.2f} s"


def test_cli_errors_name_the_problem_and_exit_non_zero(settings: Settings, engine: Engine) -> None:
    seed(engine, 10)
    missing = nudge(settings, "campaign", "status", "nope")
    assert missing.returncode == 4
    assert "error: no campaign 'nope'" in missing.stderr
    bad_filter = nudge(
        settings,
        "campaign",
        "create",
        "x",
        "--template",
        "promo",
        "--channel",
        "webhook",
        "--where",
        "tier~vip",
    )
    assert bad_filter.returncode == 2
    assert "audience: bad filter 'tier~vip': expected ATTRIBUTE=VALUE" in bad_filter.stderr
    no_template = nudge(
        settings, "campaign", "create", "x", "--template", "ghost", "--channel", "webhook", "--all"
    )
    assert no_template.returncode == 2
    assert "template: no template named 'ghost'" in no_template.stderr
    unknown = nudge(
        settings,
        "campaign",
        "create",
        "x",
        "--template",
        "promo",
        "--channel",
        "webhook",
        "--ids",
        "c-1,who",
    )
    assert unknown.returncode == 2
    assert "audience: 1 external ids are not contacts (e.g. 'who')" in unknown.stderr
    out = ok(
        settings,
        "campaign",
        "create",
        "vips",
        "--template",
        "promo",
        "--channel",
        "webhook",
        "--where",
        "tier=vip",
    )
    assert "contacts where tier=vip, 1 matching now" in out
    invalid = nudge(settings, "campaign", "pause", "vips")
    assert invalid.returncode == 2
    assert (
        "cannot pause campaign 'vips': it is draft (pause needs a campaign that is "
        "sending)" in invalid.stderr
    )
    listed = json.loads(ok(settings, "campaign", "list", "--json"))
    assert [(c["name"], c["state"]) for c in listed] == [("vips", "draft")]


def test_a_transactional_message_arrives_within_a_second_during_a_20000_recipient_campaign(
    settings: Settings, engine: Engine, sink: Sink, start_worker: Callable[..., Worker]
) -> None:
    n = 20_000
    seed(engine, n)
    start_worker("scheduler", "dispatch", "planner", concurrency=2)
    create(settings, "flood")
    ok(settings, "campaign", "start", "flood")
    wait_for(lambda: len(sink.accepted()) >= 1000, timeout=90, message="the campaign sending")
    with Producer(settings.amqp_url) as producer:
        published = time.time()
        producer.schedule(
            "vip-1",
            "welcome",
            "webhook",
            idempotency_key="password-reset",
            priority="transactional",
        )
    [arrived] = wait_for(
        lambda: [r for r in sink.accepted() if r.body.get("template") == "welcome"],
        timeout=30,
        message="the transactional message",
    )
    campaign_sent = sum(1 for r in sink.accepted() if r.body.get("template") == "promo")
    assert campaign_sent < n - 1000, "the campaign was nearly over: proves nothing"
    assert arrived.at - published < 1.0, f"arrived after {arrived.at - published:.2f} s"
    ok(settings, "campaign", "cancel", "flood")


def test_nudge_message_cancel_on_a_campaign_records_its_recipients_and_views_page_them(
    settings: Settings, engine: Engine
) -> None:
    seed(engine, 45)
    create(settings, "mistake")
    ok(settings, "campaign", "start", "mistake")  # no worker runs: every recipient planned
    mid = status(settings, "mistake")["id"]
    out = ok(settings, "message", "cancel", str(mid)).strip()
    assert out == f"message {mid} (campaign 'mistake') cancelled: 45 recipients recorded cancelled"
    assert items(engine, "mistake") == Counter({"cancelled": 45})
    assert status(settings, "mistake")["state"] == "cancelled"
    again = ok(settings, "message", "cancel", str(mid)).strip()
    assert again == f"message {mid} had already completed or been cancelled"
    # a page at a time, by contact id
    shown = []
    after = "0"
    while True:
        page = json.loads(
            ok(settings, "message", "show", str(mid), "--limit", "20", "--after", after, "--json")
        )
        assert page["total"] == 45
        shown += [i["external_id"] for i in page["items"]]
        if page["next_after"] is None:
            break
        after = str(page["next_after"])
    assert shown == [f"c-{i}" for i in range(1, 46)]
    text_page = ok(settings, "message", "show", str(mid), "--limit", "2").splitlines()
    assert text_page[2:] == [
        "  c-1: cancelled (cancelled: cancelled by an operator)",
        "  c-2: cancelled (cancelled: cancelled by an operator)",
        "  ... 2 of 45 recipients shown; next page: --after 2",
    ]
    assert ok(settings, "message", "show", str(mid), "--status", "sent").splitlines()[2:] == [
        "  none sent"
    ]
    s = json.loads(
        ok(
            settings,
            "campaign",
            "status",
            "mistake",
            "--status",
            "cancelled",
            "--limit",
            "3",
            "--json",
        )
    )
    assert [i["external_id"] for i in s["recipients_page"]["items"]] == ["c-1", "c-2", "c-3"]
    assert s["recipients_page"]["total"] == 45
    assert "recipients_page" not in status(settings, "mistake"), "counts only by default"


def test_a_resumed_campaign_waits_out_a_deferred_recipients_retry_backoff(
    settings: Settings, engine: Engine, sink: Sink, start_worker: Callable[..., Worker]
) -> None:
    n = 20
    seed(engine, n)

    def respond(doc: dict[str, Any], attempt: int) -> tuple[int, dict[str, str]]:
        # c-1's first send is refused for an hour; everyone else is accepted
        if doc["contact"]["id"] == "c-1" and attempt == 0:
            return 429, {"Retry-After": "3600"}
        return 200, {}

    sink.respond = respond
    # one dispatch slot: batches are handled in the order the planner publishes them
    workers(start_worker, 1)
    # one recipient a second, c-1 first: the pause lands long before the last is planned
    create(settings, "backoff", "--rate", "1")
    ok(settings, "campaign", "start", "backoff")

    def c1() -> dict[str, Any]:
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT mi.status, mi.attempts, mi.next_attempt_at FROM message_items mi "
                    "JOIN contacts c ON c.id = mi.contact_id WHERE c.external_id = 'c-1'"
                )
            ).one()
        return dict(row._mapping)

    wait_for(lambda: c1()["status"] == "deferred", message="c-1 deferred")
    deferred = c1()
    ok(settings, "campaign", "pause", "backoff")
    assert status(settings, "backoff")["counts"]["planned"] > 0, "all planned: proves nothing"
    ok(settings, "campaign", "resume", "backoff")
    # the new round pages c-1 first; once the last recipient is sent, any batch with c-1 in
    # it has been handled
    wait_for(
        lambda: status(settings, "backoff")["counts"]["sent"] >= n - 1,
        timeout=120,
        interval=0.5,
        message="the others sent",
    )
    assert c1() == deferred, "c-1 was tried again before its retry time"
    assert [r.status for r in sink.requests if r.body["contact"]["id"] == "c-1"] == [429]
    assert status(settings, "backoff")["state"] == "sending"


def test_two_planners_given_the_same_campaign_twice_plan_it_one_at_a_time(
    settings: Settings,
    engine: Engine,
    sink: Sink,
    start_worker: Callable[..., Worker],
) -> None:
    # Given two planners, and a campaign of 1,000 recipients held by a third planner (this
    # test, holding the campaign's planning lock)
    seed(engine, 1000)
    start_worker("dispatch", concurrency=2)
    planners = [start_worker("planner", concurrency=1) for _ in range(2)]
    create(settings, "twice")
    with engine.connect() as conn:
        cid = conn.scalar(text("SELECT id FROM messages WHERE name = 'twice'"))
    with engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_lock(:space, :id)"), {"space": SPACE, "id": cid})
        # When it is started, and its plan message arrives a second time (as a redelivery
        # would), so that each planner may get a copy
        ok(settings, "campaign", "start", "twice")
        with engine.connect() as conn:
            round_ = conn.scalar(
                text("SELECT plan_round FROM messages WHERE id = :id"), {"id": cid}
            )
        raw_publish(
            settings.amqp_url,
            PLAN_EXCHANGE,
            PLAN_KEY,
            contract.encode(PlanCampaign(campaign_id=cid, round=round_)),
            message_id=f"plan-{cid}-{round_}",
        )

        # Then both copies wait (a retry each, at least) and nothing is planned or sent
        def published() -> list[float]:
            return [p.metric("nudge_campaign_batches_planned_total") for p in planners]

        def refused_or_planned() -> bool:
            retries = sum(p.metric("nudge_retries_total", queue="nudge.plan") for p in planners)
            return retries >= 2 or any(published())

        wait_for(refused_or_planned, timeout=60, message="both copies refused")
        assert published() == [0, 0], "a planner planned a campaign another one holds"
        assert not sink.requests
        holder.execute(text("SELECT pg_advisory_unlock(:space, :id)"), {"space": SPACE, "id": cid})
    # And once it is released, one planner plans it and everyone gets it once
    done = completed(settings, "twice", timeout=90)
    assert done["counts"]["sent"] == 1000
    keys = sent_keys(sink)
    assert len(keys) == 1000
    assert set(keys.values()) == {1}, "a recipient sent twice"
