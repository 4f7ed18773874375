"""infra/rabbitmq/definitions.json is the code's topology, so operators can pre-load it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shared import topology
from shared.contract import MAX_BODY_BYTES

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_the_definitions_file_equals_the_topology_in_code() -> None:
    shipped = json.loads((ROOT / "infra/rabbitmq/definitions.json").read_text())
    assert shipped == topology.to_definitions(topology.build("tiers")), (
        "regenerate with: nudge topology export > infra/rabbitmq/definitions.json"
    )


def test_every_work_queue_parks_poison_messages_after_an_explicit_limit() -> None:
    topo = topology.build("tiers")
    for name in (topology.INTAKE_QUEUE, topology.DUE_QUEUE):
        args = topo.queue(name).arguments
        assert args["x-delivery-limit"] == topology.DELIVERY_LIMIT
        assert args["x-dead-letter-exchange"] == topology.DEAD_EXCHANGE


@pytest.mark.parametrize("backend", ["tiers", "plugin"])
def test_every_queue_that_sets_an_overflow_behaviour_has_a_bound_that_makes_it_mean_something(
    backend: str,
) -> None:
    queues = topology.build(backend).queues  # type: ignore[arg-type]
    overflowing = [q for q in queues if "x-overflow" in q.arguments]
    assert len(overflowing) >= 7
    for q in overflowing:
        assert q.arguments["x-max-length"] > 0, q.name
        assert q.arguments["x-max-length-bytes"] > 0, q.name
    # a full nudge.dead drops its oldest message rather than stopping the workers
    dead = topology.build(backend).queue(topology.DEAD_QUEUE).arguments  # type: ignore[arg-type]
    assert (dead["x-overflow"], dead["x-max-length"]) == ("drop-head", topology.DEAD_MAX_LENGTH)


def test_the_broker_refuses_bodies_just_above_the_contract_limit() -> None:
    conf = (ROOT / "infra/rabbitmq/rabbitmq.conf").read_text()
    [size] = re.findall(r"^max_message_size = (\d+)$", conf, re.M)
    assert MAX_BODY_BYTES < int(size) <= MAX_BODY_BYTES * 1.2
    operations = (ROOT / "docs/operations.md").read_text()
    assert f"{topology.DEAD_MAX_LENGTH:,} messages" in operations
