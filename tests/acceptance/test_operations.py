"""What an operator and an orchestrator see: liveness and readiness next to the metrics, and
``nudge status``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy import Engine

from producer import Producer
from tests.support import Worker, settings_env, wait_for
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store import templates


def _get(worker: Worker, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{worker.metrics_port}{path}", timeout=5)


def test_a_worker_answers_liveness_and_readiness_next_to_its_metrics(
    start_worker: Callable[..., Worker],
) -> None:
    worker = start_worker("scheduler", "dispatch", "events")
    alive = _get(worker, "/healthz")
    assert alive.status_code == 200
    assert alive.json()["alive"] is True
    wait_for(lambda: _get(worker, "/readyz").status_code == 200, timeout=20, message="readiness")
    assert _get(worker, "/readyz").json()["checks"] == {
        "rabbitmq": True,
        "not stopping": True,
        "consuming": True,
    }
    wait_for(
        lambda: 'nudge_queue_depth{queue="nudge.due"}' in _get(worker, "/metrics").text,
        timeout=20,
        message="the queue depth gauge",
    )
    assert _get(worker, "/nope").status_code == 404


def test_nudge_status_summarises_queues_and_outcomes_as_json(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    with engine.begin() as conn:
        templates.add(conn, "welcome", "Hello", "Welcome", None)
    start_worker("scheduler", "dispatch")
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "welcome", "webhook", idempotency_key="now")
        producer.schedule("c-2", "welcome", "webhook", idempotency_key="later", delay=3600)
    wait_for(lambda: len(sink.accepted()) == 1, timeout=30, message="one delivery")
    drafted = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers",
            "campaign",
            "create",
            "autumn",
            "--template",
            "welcome",
            "--channel",
            "webhook",
            "--all",
        ],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert drafted.returncode == 0, drafted.stderr

    def status() -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "workers", "status", "--json"],
            env=settings_env(settings),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        doc: dict[str, Any] = json.loads(done.stdout)
        return doc

    def settled() -> dict[str, Any]:
        # the management API refreshes its statistics every 5 s
        doc = status()
        queues = {q["queue"]: q for q in doc["queues"]}
        counts = [queues[q]["consumers"] for q in ("nudge.due", "nudge.intake")]
        return doc if counts == [1, 1] and queues["nudge.delay.*"]["messages"] == 1 else {}

    doc = wait_for(settled, timeout=30, interval=1, message="status to show both consumers")
    assert doc["outcomes"]["total"] == {"sent": 1}
    assert doc["outcomes"]["scheduled_not_due"] == 1
    assert [(c["name"], c["state"]) for c in doc["campaigns"]] == [("autumn", "draft")]
    text = subprocess.run(
        [sys.executable, "-m", "workers", "status"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "nudge.due" in text.stdout
    assert "sent" in text.stdout
    assert "campaign 'autumn' draft: " in text.stdout


def test_nudge_status_names_an_unreachable_management_api(settings: Settings) -> None:
    env = {**settings_env(settings), "NUDGE_RABBITMQ_MGMT_URL": "http://guest:guest@127.0.0.1:9"}
    done = subprocess.run(
        [sys.executable, "-m", "workers", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: RabbitMQ management API")
