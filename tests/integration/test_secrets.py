"""No default secrets: a worker that would sign with a missing, placeholder or short key does not
start, and the key it signs with is never in its output."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine

from producer import Producer
from tests.conftest import SECRET, UNSUBSCRIBE_SECRET
from tests.support import Worker, final_row, nudge
from workers.config import Settings
from workers.demo.sink import Sink


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("change-me", "is a placeholder, not a secret"),
        ("change-me-too", "is a placeholder, not a secret"),
        ("CHANGE-ME-to-a-long-random-string", "is a placeholder, not a secret"),
        ("0123456789abcdef", "must be at least 32 characters (got 16)"),
    ],
)
def test_a_worker_with_a_default_or_short_webhook_secret_exits_naming_the_setting(
    settings: Settings, secret: str, problem: str
) -> None:
    done = nudge(
        settings.model_copy(update={"webhook_secret": SecretStr(secret)}), "worker", "dispatch"
    )
    assert done.returncode == 2, done.stderr
    assert "NUDGE_WEBHOOK_SECRET" in done.stderr
    assert problem in done.stderr
    assert secret not in done.stderr


def test_a_worker_that_would_sign_without_a_secret_exits_naming_it(settings: Settings) -> None:
    done = nudge(
        settings.model_copy(update={"webhook_secret": None, "unsubscribe_secret": None}),
        "worker",
        "dispatch",
    )
    assert done.returncode == 2, done.stderr
    assert "NUDGE_WEBHOOK_SECRET: required when NUDGE_WEBHOOK_URL is set" in done.stderr
    done = nudge(
        settings.model_copy(
            update={"webhook_url": None, "smtp_host": "127.0.0.1", "unsubscribe_secret": None}
        ),
        "worker",
        "dispatch",
    )
    assert done.returncode == 2, done.stderr
    assert "NUDGE_UNSUBSCRIBE_SECRET: required when NUDGE_SMTP_HOST is set" in done.stderr


def test_a_worker_that_does_not_deliver_needs_no_channel_secret(
    settings: Settings, start_worker: Callable[..., Worker]
) -> None:
    start_worker("scheduler", "events", webhook_secret=None, unsubscribe_secret=None)


def test_the_secrets_a_worker_signs_with_are_never_in_its_logs(
    settings: Settings, engine: Engine, sink: Sink, start_worker: Callable[..., Worker]
) -> None:
    worker = start_worker(
        "scheduler", "dispatch", log_level="debug", smtp_password=SecretStr("smtp-" + SECRET)
    )
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "welcome", "webhook", idempotency_key="signed")
    assert final_row(engine, "signed")["status"] == "sent"
    assert all(r.signature_ok for r in sink.requests)
    worker.stop()
    with open(worker.log_path) as f:
        log = f.read()
    assert "worker started" in log
    for secret in (SECRET, UNSUBSCRIBE_SECRET, "smtp-" + SECRET):
        assert secret not in log
        assert secret not in repr(worker.settings)
        assert secret not in str(worker.settings.model_dump())
