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
due_batch_size = Histogram(
    "nudge_due_batch_size",
    "Recipients per due message the scheduler publishes (several: a DueBatch)",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500),
)
lateness = Histogram(
    "nudge_delivery_lateness_seconds",
    "Time between deliver_at and the send",
    ["channel"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
)
send_latency = Histogram("nudge_send_latency_seconds", "Time a channel took to send", ["channel"])
_STEPS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
dispatch_phase = Histogram(
    "nudge_dispatch_phase_seconds",
    "Time a dispatch batch spent in each phase: claim (lock, claim, facts: one round trip), "
    "recheck (facts asked again), decide, commit, send, finalise",
    ["phase"],
    buckets=_STEPS,
)
release_lag = Histogram(
    "nudge_release_lag_seconds",
    "How late the event loop ran a held tick's timer (a busy loop or a starved process)",
    ["queue"],
    buckets=_STEPS,
)
wait_for_batch = Histogram(
    "nudge_wait_for_batch_seconds",
    "From a batch's first message being ready to the batch gathered (a free task, the wait)",
    ["queue"],
    buckets=_STEPS,
)
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
rules_fired = Counter(
    "nudge_rules_fired_total", "Messages published to nudge.intake by automation rules", ["rule"]
)
# campaigns
campaign_batches_planned = Counter(
    "nudge_campaign_batches_planned_total", "Recipient batches the planner published"
)
campaign_batches_skipped = Counter(
    "nudge_campaign_batches_skipped_total",
    "Recipient batches dropped: campaign paused, done, or re-planned in a newer round",
)
campaign_chunks_stopped = Counter(
    "nudge_campaign_chunks_stopped_total", "Batches cut short between chunks by a pause or cancel"
)
receipts_recorded = Counter(
    "nudge_receipts_total", "Read receipts recorded (for recipients that were sent)"
)
queue_depth = Gauge(
    "nudge_queue_depth",
    "Messages ready in a queue this worker consumes (polled every 5 s): the queue lag",
    ["queue"],
)
# the web role
email_opens = Counter(
    "nudge_email_opens_total",
    "Open pixels loaded with a valid token; first=true for a recipient's first open",
    ["first"],
)
email_clicks = Counter("nudge_email_clicks_total", "Click redirects followed with a valid token")
unsubscribes = Counter(
    "nudge_unsubscribes_total", "Contacts unsubscribed through a signed link", ["via"]
)
web_rejected = Counter(
    "nudge_web_rejected_total",
    "Requests refused for a bad or tampered token or an unknown recipient",
    ["endpoint"],
)
