"""Templates at work: each recipient gets the newest version rendered with its own variables,
or a recorded reason why not; a message naming an unknown template never gets stored."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, func, select

from producer import Producer
from shared.topology import DEAD_QUEUE
from tests.support import Management, Worker, final_row, recipient_row, wait_for
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store.schema import messages


def test_a_missing_variable_fails_that_recipient_with_the_reason_and_sends_nothing(
    settings: Settings,
    sink: Sink,
    engine: Engine,
    add_template: Callable[..., int],
    start_worker: Callable[..., Worker],
) -> None:
    add_template("trial", "Your {{ plan }} trial ends, {{ contact.id }}", subject="{{ plan }}")
    start_worker()
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "trial", "webhook", idempotency_key="no-plan")
        producer.schedule(
            "c-2", "trial", "webhook", idempotency_key="with-plan", data={"plan": "pro"}
        )
    bad = final_row(engine, "no-plan")
    assert (bad["status"], bad["template_version"]) == ("failed", 1)
    assert bad["reason"] == "template: trial v1 subject: UndefinedError: 'plan' is undefined"
    assert final_row(engine, "with-plan")["status"] == "sent"
    [arrived] = sink.accepted()
    assert (arrived.body["subject"], arrived.body["text"]) == ("pro", "Your pro trial ends, c-2")
    assert arrived.body["template_version"] == 1


def test_a_sandbox_escape_in_a_stored_template_fails_the_recipient_and_sends_nothing(
    settings: Settings,
    sink: Sink,
    engine: Engine,
    add_template: Callable[..., int],
    start_worker: Callable[..., Worker],
) -> None:
    add_template("evil", "{{ cycler.__init__.__globals__.os.popen('id').read() }}")
    start_worker()
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "evil", "webhook", idempotency_key="evil")
    item = final_row(engine, "evil")
    assert item["status"] == "failed"
    assert item["reason"].startswith("template: evil v1 text_body: SecurityError: ")
    assert sink.requests == []


def test_a_worker_keeps_delivering_while_one_recipients_template_runs_to_its_time_limit(
    settings: Settings,
    sink: Sink,
    engine: Engine,
    add_template: Callable[..., int],
    start_worker: Callable[..., Worker],
) -> None:
    # ten billion loop iterations, no output: it only ever stops at the time limit
    add_template(
        "hostile",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    )
    add_template("hello", "Hello {{ contact.id }}")
    start_worker(render_timeout_seconds=10.0, claim_lease_seconds=120.0)
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-0", "hostile", "webhook", idempotency_key="hostile")
        wait_for(
            lambda: (recipient_row(engine, "hostile") or {}).get("status") == "sending",
            timeout=20,
            message="the hostile recipient to be claimed",
        )
        for i in range(1, 4):
            producer.schedule(f"c-{i}", "hello", "webhook", idempotency_key=f"hello-{i}")
        for i in range(1, 4):
            assert final_row(engine, f"hello-{i}")["status"] == "sent"
    # the others went out while the hostile template was still rendering, off the event loop
    assert (recipient_row(engine, "hostile") or {})["status"] == "sending"
    hostile = final_row(engine, "hostile", timeout=60)
    assert (hostile["status"], hostile["reason"]) == (
        "failed",
        "template: hostile v1 text_body: RenderTimeout: took longer than 10 s to render",
    )
    assert sorted(r.body["text"] for r in sink.accepted()) == [
        "Hello c-1",
        "Hello c-2",
        "Hello c-3",
    ]


def test_a_new_version_is_used_for_later_messages_and_recorded_on_each(
    settings: Settings,
    sink: Sink,
    engine: Engine,
    add_template: Callable[..., int],
    start_worker: Callable[..., Worker],
) -> None:
    add_template("news", "first")
    start_worker()
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "news", "webhook", idempotency_key="n1")
        assert final_row(engine, "n1")["template_version"] == 1
        assert add_template("news", "second") == 2
        producer.schedule("c-1", "news", "webhook", idempotency_key="n2")
    assert final_row(engine, "n2")["template_version"] == 2
    assert [r.body["text"] for r in sink.accepted()] == ["first", "second"]


def test_a_message_naming_an_unknown_template_is_parked_at_intake_with_the_reason(
    settings: Settings,
    vhost: str,
    management: Management,
    engine: Engine,
    start_worker: Callable[..., Worker],
) -> None:
    start_worker("scheduler")
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "no_such_template", "webhook", idempotency_key="unknown")
        producer.schedule("c-1", "welcome", "webhook", idempotency_key="known", delay=3600)
    wait_for(
        lambda: management.queue(vhost, DEAD_QUEUE).get("messages") == 1,
        timeout=20,
        message="the parked message",
    )
    [parked] = management.get_messages(vhost, DEAD_QUEUE)
    assert parked["properties"]["message_id"] == "unknown"
    assert parked["properties"]["headers"]["x-nudge-reason"] == (
        "template: no template named 'no_such_template' (add it with `nudge template add`)"
    )
    with engine.connect() as conn:
        wait_for(
            lambda: conn.scalar(select(func.count()).select_from(messages)) == 1,
            timeout=10,
            message="the known message stored",
        )
        assert conn.scalar(select(messages.c.idempotency_key)) == "known"
