"""The dramatiq side of ``make bench celery``: one actor doing the same work as the Celery task,
writing one row to Postgres.

Configured from the environment the benchmark sets: ``BENCH_DRAMATIQ_BROKER`` (a vhost of the
same RabbitMQ) and ``BENCH_DRAMATIQ_DSN`` (the Celery half's database). dramatiq's RabbitMQ
broker as a user gets it, with publisher confirms turned on: a delayed message goes to the
queue's delay queue (``bench-dramatiq.DQ``, a classic queue); the worker takes it at once,
holds it unacked in memory until its ETA, then publishes it to ``bench-dramatiq`` from its
delay-queue consumer thread and acks the original. How many a worker process holds is its delay
prefetch (``dramatiq_delay_queue_prefetch``, by default 1,000 per worker thread).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import dramatiq
import psycopg
from dramatiq.brokers.rabbitmq import RabbitmqBroker

QUEUE = "bench-dramatiq"
TABLE = "celery_rows"

_local = threading.local()


def _conn() -> psycopg.Connection[Any]:
    conn: psycopg.Connection[Any] | None = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = psycopg.connect(os.environ["BENCH_DRAMATIQ_DSN"], autocommit=True)
        _local.conn = conn
    return conn


def record(key: str, due: float) -> None:
    """Write one row: the key, when it was due, and now."""
    _conn().execute(
        f"INSERT INTO {TABLE} (key, due_at, done_at) "  # noqa: S608 (a constant)
        "VALUES (%s, to_timestamp(%s), clock_timestamp())",
        (key, due),
    )


def make_actor(url: str) -> dramatiq.Actor[[str, float], None]:
    """The ``bench.record`` actor on a broker of its own for ``url``; publisher confirms on,
    as Nudge's producers and the Celery half use them."""
    broker = RabbitmqBroker(url=url, confirm_delivery=True)
    decorate = dramatiq.actor(broker=broker, actor_name="bench.record", queue_name=QUEUE)
    return decorate(record)


#: The worker's actor (``dramatiq bench.dramatiq_app``), on the global broker.
actor = make_actor(os.environ.get("BENCH_DRAMATIQ_BROKER", "amqp://localhost//"))
dramatiq.set_broker(actor.broker)
