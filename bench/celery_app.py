"""The Celery side of ``make bench celery``: one task that does the same minimal work as a
Nudge delivery to the ``log`` channel is measured by, writing one row to Postgres.

Configured from the environment the benchmark sets: ``BENCH_CELERY_BROKER`` (a vhost of the
same RabbitMQ), ``BENCH_CELERY_DSN`` (a database of the same Postgres) and
``BENCH_CELERY_MODE``: ``native`` (a quorum queue on a topic exchange, so Celery 5.5+ sends
countdowns through its native delayed delivery, the binary ladder of ``celery_delayed_*``
queues) or ``eta`` (a classic queue: the worker receives ETA tasks at once and holds them in
memory until due, Celery's behaviour before 5.5).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import psycopg
from celery import Celery
from kombu import Exchange, Queue

QUEUE = "bench-celery"
TABLE = "celery_rows"
MODE = os.environ.get("BENCH_CELERY_MODE", "native")

_local = threading.local()


def _conn() -> psycopg.Connection[Any]:
    conn: psycopg.Connection[Any] | None = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = psycopg.connect(os.environ["BENCH_CELERY_DSN"], autocommit=True)
        _local.conn = conn
    return conn


def record(key: str, due: float) -> None:
    """Write one row: the key, when it was due, and now."""
    _conn().execute(
        f"INSERT INTO {TABLE} (key, due_at, done_at) "  # noqa: S608 (a constant)
        "VALUES (%s, to_timestamp(%s), clock_timestamp())",
        (key, due),
    )


def make_app(broker: str, mode: str) -> Celery:
    """A Celery app for ``broker`` in ``mode`` with the ``bench.record`` task."""
    app = Celery("bench", broker=broker)
    app.conf.update(
        task_queues=[
            Queue(
                QUEUE,
                Exchange(QUEUE, type="topic"),  # native delayed delivery needs topic or fanout
                routing_key=QUEUE,
                queue_arguments={"x-queue-type": "quorum" if mode == "native" else "classic"},
            )
        ],
        task_default_queue=QUEUE,
        task_default_exchange=QUEUE,
        task_default_exchange_type="topic",
        task_default_routing_key=QUEUE,
        broker_transport_options={"confirm_publish": True},  # as Nudge's producers do
        task_acks_late=True,  # ack after the row is written, like Nudge
        worker_prefetch_multiplier=100,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
    )
    app.task(name="bench.record")(record)
    return app


#: The worker's app (``celery -A bench.celery_app worker``).
app = make_app(os.environ.get("BENCH_CELERY_BROKER", "amqp://localhost//"), MODE)
