"""A due message is claimed only for its own recipient, and every claim ends in one recorded
outcome: a forged pair is parked, a receiver's hostile error body, a finalise that Postgres
refuses and a dispatch killed after every send each end as one outcome of that recipient."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import Engine, select, text

from producer import Producer
from shared import contract, delay
from shared.contract import DueMessage
from shared.topology import DEAD_QUEUE
from tests.support import Management, Worker, final_row, raw_publish, wait_for
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store.schema import contacts, message_items, messages


def _message(engine: Engine, key: str) -> tuple[int, int]:
    """(id, contact_id) of the stored message ``key``."""
    query = select(messages.c.id, messages.c.contact_id).where(messages.c.idempotency_key == key)

    def stored() -> tuple[int, int] | None:
        with engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else (row.id, row.contact_id)

    found = wait_for(stored, timeout=15, message=f"the stored message {key}")
    assert found is not None
    return found


def _contact_id(engine: Engine, external_id: str) -> int:
    with engine.connect() as conn:
        cid = conn.scalar(select(contacts.c.id).where(contacts.c.external_id == external_id))
    assert cid is not None
    return int(cid)


def _publish_due(settings: Settings, due: DueMessage) -> None:
    """A due message straight onto the last step of the delay ladder, as only a worker can."""
    raw_publish(
        settings.amqp_url, "nudge.delay.out", "0." * delay.LEVELS + "due", contract.encode(due)
    )


def test_a_due_message_naming_another_contact_is_parked_and_the_message_reaches_only_its_own(
    settings: Settings,
    vhost: str,
    management: Management,
    sink: Sink,
    engine: Engine,
    start_worker: Callable[..., Worker],
) -> None:
    worker = start_worker()
    with Producer(settings.amqp_url) as producer:
        producer.schedule("alice", "welcome", "webhook", delay=4, idempotency_key="reset-code")
        producer.schedule("bob", "welcome", "webhook", delay=3600, idempotency_key="bob-later")
    mid, alice = _message(engine, "reset-code")
    _message(engine, "bob-later")
    bob = _contact_id(engine, "bob")
    _publish_due(settings, DueMessage(message_id=mid, contact_id=bob, deliver_at=datetime.now(UTC)))

    wait_for(
        lambda: management.queue(vhost, DEAD_QUEUE).get("messages") == 1,
        timeout=15,
        message="the forged due message parked",
    )
    [parked] = management.get_messages(vhost, DEAD_QUEUE)
    assert json.loads(parked["payload"])["contact_id"] == bob
    assert parked["properties"]["headers"]["x-nudge-reason"] == (
        f"due: contact {bob} is not a recipient of message {mid}"
    )
    assert worker.metric("nudge_dead_lettered_total", reason="due") == 1
    with engine.connect() as conn:
        rows = conn.execute(select(message_items.c.contact_id)).scalars().all()
    assert bob not in rows, "no recipient row created for the forged pair"

    row = final_row(engine, "reset-code")
    assert (row["contact_id"], row["status"]) == (alice, "sent")
    assert [r.body["contact"]["id"] for r in sink.requests] == ["alice"], "bob received nothing"
    with engine.connect() as conn:
        due_at = conn.scalar(select(messages.c.deliver_at).where(messages.c.id == mid))
    assert due_at is not None
    assert sink.requests[0].at >= due_at.timestamp(), "at its time"


class _Receiver:
    """A webhook receiver answering every request with ``status`` and ``body``."""

    def __init__(self, status: int, body: bytes) -> None:
        receiver = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests += 1
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/hook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def nul_receiver() -> Iterator[_Receiver]:
    r = _Receiver(400, b"bad request\x00 from \x00 the receiver")
    yield r
    r.stop()


def test_a_receiver_error_body_with_a_nul_byte_is_stored_cleaned_as_the_recipients_outcome(
    settings: Settings,
    nul_receiver: _Receiver,
    engine: Engine,
    start_worker: Callable[..., Worker],
) -> None:
    start_worker(webhook_url=nul_receiver.url)
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "welcome", "webhook", idempotency_key="nul")
    row = final_row(engine, "nul")
    assert (row["status"], row["reason"]) == ("failed", "permanent: receiver refused")
    assert row["last_error"] == "HTTP 400: bad request\ufffd from \ufffd the receiver"
    assert nul_receiver.requests == 1


def test_a_finalise_that_postgres_refuses_records_that_recipient_failed_naming_the_error(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    # This test's own database refuses to record one recipient as sent.
    with engine.begin() as conn:
        conn.execute(
            text("""
            CREATE FUNCTION refuse_sent() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF NEW.status = 'sent' AND NEW.message_id =
                 (SELECT id FROM messages WHERE idempotency_key = 'refused') THEN
                RAISE EXCEPTION 'refused by the test';
              END IF;
              RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_sent BEFORE UPDATE ON message_items
              FOR EACH ROW EXECUTE FUNCTION refuse_sent();
            """)
        )
    worker = start_worker()
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "welcome", "webhook", idempotency_key="refused")
        producer.schedule("c-2", "welcome", "webhook", idempotency_key="fine")
    row = final_row(engine, "refused")
    assert (row["status"], row["reason"]) == (
        "failed",
        "record: RaiseException while recording the outcome sent",
    )
    assert "refused by the test" in row["last_error"]
    assert final_row(engine, "fine")["status"] == "sent", "the batch's other recipient"
    assert len(sink.requests) == 2, "each sent once"
    assert _alive(worker)


def test_a_dispatch_killed_after_every_send_sends_at_most_one_plus_the_takeover_cap(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    # With NUDGE_MAX_TAKEOVERS=2 a recipient is claimed at most 3 times (the first claim and
    # two takeovers), so it is sent at most 3 times; the claim after that records it failed.
    workers: list[Worker] = []

    def kill_the_sender(body: dict[str, Any], n: int) -> tuple[int, dict[str, str]]:
        workers[-1].kill()
        return 200, {}

    sink.respond = kill_the_sender
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "welcome", "webhook", idempotency_key="killed")
    for kills in range(1, 4):
        workers.append(start_worker(claim_lease_seconds=1.0, max_takeovers=2))
        wait_for(_sends(sink, kills), timeout=30, message=f"send {kills}")
        wait_for(lambda: not _alive(workers[-1]), timeout=10, message=f"kill {kills}")
    survivor = start_worker(claim_lease_seconds=1.0, max_takeovers=2)
    row = final_row(engine, "killed")
    assert (row["status"], row["reason"], row["takeovers"]) == (
        "failed",
        "lease: the lease ran out 3 times before the outcome was recorded "
        "(NUDGE_MAX_TAKEOVERS=2); not sent again",
        3,
    )
    assert len(sink.requests) == 3
    assert _alive(survivor)


def _sends(sink: Sink, count: int) -> Callable[[], bool]:
    return lambda: len(sink.requests) == count


def _alive(worker: Worker) -> bool:
    return worker.process is not None and worker.process.poll() is None


def test_a_copy_of_a_due_message_arriving_while_its_recipient_is_being_sent_is_not_sent_again(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    # The first send is held at the receiver, so the recipient stays `sending` under a live
    # lease; a copy of its due message (a redelivery) must wait for the lease, not send again.
    release = threading.Event()

    def hold_the_first(body: dict[str, Any], n: int) -> tuple[int, dict[str, str]]:
        if n == 0:
            release.wait(timeout=60)
        return 200, {}

    sink.respond = hold_the_first
    worker = start_worker(concurrency=2)
    with Producer(settings.amqp_url) as producer:
        producer.schedule("held", "welcome", "webhook", idempotency_key="held")
    mid, cid = _message(engine, "held")

    def held() -> bool:
        with engine.connect() as conn:
            status = conn.scalar(
                select(message_items.c.status).where(message_items.c.message_id == mid)
            )
        return status == "sending"

    wait_for(held, timeout=15, message="the first send in flight")
    _publish_due(settings, DueMessage(message_id=mid, contact_id=cid, deliver_at=datetime.now(UTC)))
    try:
        wait_for(
            lambda: worker.metric("nudge_retries_total", queue="nudge.due") >= 1,
            timeout=15,
            message="the copy sent back to wait for the lease",
        )
    finally:
        release.set()
    row = final_row(engine, "held")
    assert (row["status"], row["takeovers"]) == ("sent", 0)
    assert len(sink.requests) == 1, "sent once"
