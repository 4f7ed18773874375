"""``auto`` asks the broker which delay backend it offers: the plugin when it is loaded, the
ladder when it is not, and the plugin once it is enabled later, without losing what already
waits in the ladder. The plugin is disabled and enabled on this checkout's own node, as an
operator would with ``rabbitmq-plugins``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest

from producer import Producer
from shared import amqp, delay
from tests.backends import plugin_state, set_plugin_enabled, waiting_in_delay
from tests.support import Management, Worker, nudge, wait_for
from workers.config import Settings
from workers.demo.sink import Sink

pytestmark = pytest.mark.integration


@pytest.fixture
def without_plugin(servers: None) -> Iterator[None]:
    """The broker without the plugin for this test; enabled again afterwards if it was."""
    loaded = plugin_state().loaded
    if loaded:
        set_plugin_enabled(False)
    try:
        yield
    finally:
        if loaded:
            set_plugin_enabled(True)


def _backend_of(worker: Worker) -> str:
    """The backend a worker chose, from its "worker started" log line."""
    line = wait_for(
        lambda: next((x for x in worker.log().splitlines() if "worker started" in x), None),
        timeout=30,
        message="the worker's start line",
    )
    assert line is not None
    backend: str = json.loads(line)["backend"]
    return backend


def _apply_auto(settings: Settings) -> str:
    applied = nudge(settings.model_copy(update={"delay_backend": "auto"}), "topology", "apply")
    assert applied.returncode == 0, applied.stderr
    return applied.stdout


@pytest.mark.parametrize("delay_backend", ["plugin"])
def test_auto_picks_the_plugin_when_the_broker_has_it(
    settings: Settings, sink: Sink, start_worker: Callable[..., Worker]
) -> None:
    assert asyncio.run(amqp.detect_backend(settings.amqp_url)) == "plugin"
    assert "backend=plugin" in _apply_auto(settings)
    worker = start_worker(delay_backend="auto")
    assert _backend_of(worker) == "plugin"
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "welcome", "webhook", delay=1.5, idempotency_key="auto")
    wait_for(lambda: len(sink.accepted()) == 1, timeout=20, message="the message delivered")


def test_auto_picks_the_ladder_on_a_broker_without_the_plugin(
    settings: Settings, without_plugin: None
) -> None:
    assert asyncio.run(amqp.detect_backend(settings.amqp_url)) == "tiers"
    assert "backend=tiers" in _apply_auto(settings)


@pytest.mark.parametrize("delay_backend", ["plugin"])
def test_a_plugin_enabled_after_the_ladder_was_applied_takes_over_and_the_ladder_still_delivers(
    settings: Settings,
    vhost: str,
    management: Management,
    sink: Sink,
    start_worker: Callable[..., Worker],
) -> None:
    management.delete_exchange(vhost, delay.PLUGIN_EXCHANGE)  # as if never declared
    set_plugin_enabled(False)
    try:
        assert "backend=tiers" in _apply_auto(settings)
        before = start_worker("scheduler", delay_backend="auto")
        assert _backend_of(before) == "tiers"
        with Producer(settings.amqp_url) as producer:
            producer.schedule(
                "c-ladder", "welcome", "webhook", delay=timedelta(seconds=40), idempotency_key="a"
            )
        wait_for(
            lambda: sum(waiting_in_delay(management, vhost).values()) == 1,
            timeout=15,
            message="the first message waiting in the ladder",
        )
        before.stop()
    finally:
        set_plugin_enabled(True)
    after = start_worker(delay_backend="auto")
    assert _backend_of(after) == "plugin"
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-plugin", "welcome", "webhook", delay=2, idempotency_key="b")
    wait_for(
        lambda: (
            delay.PLUGIN_EXCHANGE in waiting_in_delay(management, vhost)
            or len(sink.accepted()) >= 1
        ),
        timeout=15,
        message="the second message in the plugin's exchange",
    )
    wait_for(lambda: len(sink.accepted()) == 2, timeout=90, message="both messages delivered")
    assert sorted(r.body["contact"]["id"] for r in sink.accepted()) == ["c-ladder", "c-plugin"]
