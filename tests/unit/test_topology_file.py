"""infra/rabbitmq/definitions.json is the code's topology, so operators can pre-load it."""

from __future__ import annotations

import json
from pathlib import Path

from shared import topology

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
