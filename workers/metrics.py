"""Prometheus metrics of a worker process (``NUDGE_METRICS_PORT`` serves them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

received = Counter("nudge_received_total", "AMQP messages received", ["queue"])
dead_lettered = Counter(
    "nudge_dead_lettered_total", "Messages parked in nudge.dead", ["queue", "reason"]
)
outcomes = Counter(
    "nudge_outcomes_total", "Recipient outcomes recorded", ["channel", "status", "reason"]
)
retries = Counter("nudge_retries_total", "Messages re-published through the delay", ["queue"])
batch_size = Histogram(
    "nudge_batch_size",
    "Messages per handled batch",
    ["queue"],
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
)
lateness = Histogram(
    "nudge_delivery_lateness_seconds",
    "Time between deliver_at and the send",
    ["channel"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
)
send_latency = Histogram("nudge_send_latency_seconds", "Time a channel took to send", ["channel"])
held = Gauge("nudge_held_messages", "Messages held in memory until they fall due", ["queue"])
store_unavailable = Counter(
    "nudge_store_unavailable_total",
    "Batches retried because Postgres or RabbitMQ was unavailable",
    ["queue"],
)
events_recorded = Counter("nudge_events_recorded_total", "Contact events recorded (new ids)")
check_seconds = Counter(
    "nudge_check_seconds_total",
    "Time dispatch spent fetching facts and deciding (checks 1-8), per batch, summed",
)
checked = Counter("nudge_checked_total", "Recipients that went through the checks")
queue_depth = Gauge(
    "nudge_queue_depth",
    "Messages ready in a queue this worker consumes (polled every 5 s): the queue lag",
    ["queue"],
)
