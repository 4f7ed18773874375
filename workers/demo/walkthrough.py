"""``nudge demo``: the main job, end to end, on the real servers.

A service (the sync :class:`producer.Producer`) schedules messages with delays from 0.5 s to
9 s, one of them twice with the same idempotency key and one cancelled before it falls due;
a worker process (scheduler + dispatch) delivers them to a local webhook receiver. The demo
prints what arrived, how late, and what ``message_items`` says, then stops the worker with
SIGTERM.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import click
from sqlalchemy import Engine, select

from producer import Producer, scheduled
from shared import brokers
from shared.topology import DUE_QUEUE, INTAKE_QUEUE
from workers.config import Settings
from workers.demo.rules_walkthrough import run_rules_demo
from workers.demo.sink import Sink
from workers.store import messages as repo
from workers.store import templates
from workers.store.db import sync_engine
from workers.store.schema import contacts, message_items, messages

DEMO_TEMPLATE = "trial_end"


def _ensure_template(engine: Engine) -> None:
    """The demo's template, added on first use (messages naming an unknown one are parked)."""
    with engine.begin() as conn:
        if templates.missing(conn, [DEMO_TEMPLATE]):
            templates.add(
                conn,
                DEMO_TEMPLATE,
                "Hi {{ contact.id }}, your {{ plan }} trial ends soon.",
                "Your {{ plan }} trial ends soon",
                None,
            )


def run_demo(settings: Settings, count: int) -> bool:
    run = uuid.uuid4().hex[:8]
    # The demo's receiver and its worker share a key made for this run only.
    secret = secrets.token_urlsafe(32)
    sink = Sink(secret).start()
    env = {
        **os.environ,
        "NUDGE_WEBHOOK_URL": sink.url,
        "NUDGE_WEBHOOK_SECRET": secret,
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers", "worker", "scheduler", "dispatch", "events", "-c", "2"],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    engine = sync_engine(settings.database_url)
    try:
        _ensure_template(engine)
        _wait_consumers(settings.amqp_url, worker, deadline=time.monotonic() + 60)
        delays = [0.5 + 8.5 * i / max(1, count - 1) for i in range(count)]
        requests = [
            scheduled(
                f"demo-{run}-{i}",
                DEMO_TEMPLATE,
                "webhook",
                delay=d,
                idempotency_key=f"demo-{run}-{i}",
                data={"plan": "pro"},
            )
            for i, d in enumerate(delays)
        ]
        cancelled_key = f"demo-{run}-cancelled"
        with Producer(settings.amqp_url, name="nudge-demo") as producer:
            producer.schedule_many(requests)
            producer.schedule_many([requests[0]])  # a retried publish: same key
            producer.schedule(
                f"demo-{run}-c", DEMO_TEMPLATE, "webhook", delay=6, idempotency_key=cancelled_key
            )
        click.echo(
            f"scheduled {count} messages over {delays[0]:.1f}-{delays[-1]:.1f} s "
            f"(+1 duplicate publish, +1 to cancel) for run {run}"
        )
        keys = [r.idempotency_key for r in requests] + [cancelled_key]
        asked = {r.idempotency_key: d for r, d in zip(requests, delays, strict=True)}
        asked[cancelled_key] = 6.0
        _cancel_when_stored(engine, cancelled_key)
        click.echo(f"cancelled {cancelled_key} before it fell due")
        rows = _wait_outcomes(engine, keys, deadline=time.monotonic() + 60)
        arrivals = {r.body["message_id"]: r for r in sink.accepted()}
        click.echo(f"{'message':<24} {'contact':<20} {'delay':>6} {'late ms':>8}  outcome")
        ok = True
        for row in rows:
            arrival = arrivals.get(row.id)
            late = (
                f"{(arrival.at - row.deliver_at.timestamp()) * 1000:8.0f}"
                if arrival
                else f"{'-':>8}"
            )
            delay = asked[row.idempotency_key]
            click.echo(
                f"{row.idempotency_key:<24} {row.external_id:<20} {delay:5.1f}s "
                f"{late}  {row.status}" + (f" ({row.reason})" if row.reason else "")
            )
            expected = "cancelled" if row.idempotency_key == cancelled_key else "sent"
            ok &= row.status == expected
        click.echo(
            f"webhook receiver: {len(sink.requests)} requests, "
            f"{len(sink.accepted())} accepted, {sink.duplicates()} duplicates, "
            f"{sum(not r.signature_ok for r in sink.requests)} bad signatures"
        )
        ok &= len(sink.accepted()) == count and sink.duplicates() == 0
        ok &= run_rules_demo(settings, engine, run)
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
        click.echo(f"worker stopped on SIGTERM with exit code {code}")
        sink.stop()
        engine.dispose()
    ok &= code == 0
    click.echo("demo OK" if ok else "demo FAILED")
    return ok


def _wait_consumers(amqp_url: str, worker: subprocess.Popen[bytes], deadline: float) -> None:
    """Wait until the worker consumes both of its queues."""
    import pika

    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise click.ClickException(f"the worker exited with code {worker.returncode}")
        connection = pika.BlockingConnection(brokers.pika_parameters(amqp_url))
        try:
            channel = connection.channel()
            counts = [
                channel.queue_declare(q, passive=True).method.consumer_count
                for q in (INTAKE_QUEUE, DUE_QUEUE)
            ]
        finally:
            connection.close()
        if all(counts):
            return
        time.sleep(0.2)
    raise click.ClickException("the worker did not start consuming within 60 s")


def _cancel_when_stored(engine: Engine, key: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with engine.begin() as conn:
            found = repo.find(conn, key)
            if found is not None:
                repo.cancel(conn, found["id"])
                return
        time.sleep(0.1)
    raise click.ClickException(f"{key} was never stored: is the scheduler running?")


def _wait_outcomes(engine: Engine, keys: list[str], deadline: float) -> list[Any]:
    query = (
        select(
            messages.c.id,
            messages.c.idempotency_key,
            messages.c.deliver_at,
            messages.c.scheduled_at,
            contacts.c.external_id,
            message_items.c.status,
            message_items.c.reason,
        )
        .join(contacts, contacts.c.id == messages.c.contact_id)
        .outerjoin(message_items, message_items.c.message_id == messages.c.id)
        .where(messages.c.idempotency_key.in_(keys))
        .order_by(messages.c.deliver_at)
    )
    while True:
        with engine.connect() as conn:
            rows = list(conn.execute(query))
        final = [r for r in rows if r.status not in (None, "sending", "deferred")]
        if len(final) == len(keys) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)
