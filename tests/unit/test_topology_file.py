"""infra/rabbitmq/definitions.json is the code's topology, so operators can pre-load it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from shared import topology
from shared.contract import MAX_BODY_BYTES

ROOT = Path(__file__).resolve().parents[2]


def test_the_definitions_file_equals_the_topology_in_code() -> None:
    shipped = json.loads((ROOT / "infra/rabbitmq/definitions.json").read_text())
    in_code = {**topology.to_definitions(topology.build("tiers")), **topology.users_definitions()}
    assert shipped == in_code, (
        "regenerate with: nudge topology export > infra/rabbitmq/definitions.json"
    )


def test_every_work_queue_parks_poison_messages_after_an_explicit_limit() -> None:
    topo = topology.build("tiers")
    for name in (topology.INTAKE_QUEUE, topology.DUE_QUEUE):
        args = topo.queue(name).arguments
        assert args["x-delivery-limit"] == topology.DELIVERY_LIMIT
        assert args["x-dead-letter-exchange"] == topology.DEAD_EXCHANGE


def test_the_service_user_may_only_publish_to_the_exchanges_of_the_contract() -> None:
    service = next(u for u in topology.users() if u.name == topology.SERVICE_USER)
    names = [e.name for e in topology.build("tiers").exchanges] + [
        e.name for e in topology.build("plugin").exchanges
    ]
    writable = {n for n in {*names, "amq.default", "amq.topic"} if re.match(service.write, n)}
    assert writable == {
        topology.INTAKE_EXCHANGE,
        topology.EVENTS_EXCHANGE,
        topology.RECEIPTS_EXCHANGE,
    }
    queues = [q.name for q in topology.build("tiers").queues]
    for name in {*names, *queues, "amq.gen-x", "amq_x"}:
        assert not re.match(service.configure, name), name
        assert not re.match(service.read, name), name


def test_a_password_hash_is_salted_sha256_as_rabbitmq_stores_it() -> None:
    # the example of RabbitMQ's docs (passwords.html, "Computing Password Hash")
    salt = bytes.fromhex("908DC60A")
    assert (
        topology.password_hash("test12", salt) == "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
    )


def test_the_kubernetes_broker_users_have_the_permissions_in_code() -> None:
    docs = list(yaml.safe_load_all((ROOT / "infra/k8s/rabbitmq-users.yaml").read_text()))
    shipped = {
        d["spec"]["userReference"]["name"]: d["spec"]["permissions"]
        for d in docs
        if d["kind"] == "Permission"
    }
    assert shipped == {
        u.name: {"configure": u.configure, "write": u.write, "read": u.read}
        for u in topology.users()
    }
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "User"} == set(shipped)


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
