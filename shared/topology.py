"""Topology as data: every exchange, queue, binding and argument Nudge uses, defined once,
and the broker users that may touch them.

``nudge topology apply`` declares it, every worker declares it at start (declaring is
idempotent), and ``infra/rabbitmq/definitions.json`` is this same data in RabbitMQ's
definitions format, kept equal by a test.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from shared import delay

ExchangeType = Literal["direct", "topic", "fanout", "x-delayed-message"]

#: Deliveries after which a work queue parks a message in ``nudge.dead``. RabbitMQ 3.10 has no
#: default (4.0 defaults to 20), so a message that crashes its consumer would loop forever.
DELIVERY_LIMIT = 10

# Bounds. An ``x-overflow`` behaviour means nothing without a length: past these, a work queue
# or a delay level refuses the publish (``reject-publish``: the publisher's confirm is a nack,
# and a broker dead-lettering into it waits, at-least-once), so a backlog pushes back on the
# publishers instead of filling the broker's disk. nudge.dead drops its oldest message instead
# (``drop-head``): a full dead-letter queue must never stop the workers.
WORK_QUEUE_MAX_LENGTH = 1_000_000
WORK_QUEUE_MAX_BYTES = 1024**3
DELAY_LEVEL_MAX_LENGTH = 10_000_000
DELAY_LEVEL_MAX_BYTES = 4 * 1024**3
DEAD_MAX_LENGTH = 100_000
DEAD_MAX_BYTES = 1024**3

INTAKE_EXCHANGE = "nudge.intake"
INTAKE_QUEUE = "nudge.intake"
SCHEDULE_KEY = "schedule"
EVENTS_EXCHANGE = "nudge.events"
EVENTS_QUEUE = "nudge.events"
EVENT_KEY = "event"
DUE_QUEUE = "nudge.due"
DUE_DESTINATION = "due"
#: Transactional due messages have a queue (and consumer) of their own, so they never wait
#: behind bulk work in nudge.due (or campaign batches).
DUE_TRANSACTIONAL_QUEUE = "nudge.due.transactional"
DUE_TRANSACTIONAL_DESTINATION = "due_transactional"
DEAD_EXCHANGE = "nudge.dead"
DEAD_QUEUE = "nudge.dead"
CONTROL_EXCHANGE = "nudge.control"
# Campaigns: planner messages (the scheduled start comes through the delay as destination
# "plan"), recipient batches for the dispatch workers, and read receipts from services.
PLAN_EXCHANGE = "nudge.plan"
PLAN_QUEUE = "nudge.plan"
PLAN_KEY = "plan"
PLAN_DESTINATION = "plan"
BATCHES_EXCHANGE = "nudge.batches"
BATCHES_QUEUE = "nudge.batches"
BATCH_KEY = "batch"
RECEIPTS_EXCHANGE = "nudge.receipts"
RECEIPTS_QUEUE = "nudge.receipts"
READ_KEY = "read"


@dataclass(frozen=True)
class Exchange:
    name: str
    type: ExchangeType
    arguments: dict[str, Any] = field(default_factory=dict)
    durable: bool = True


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    durable: bool = True


@dataclass(frozen=True)
class Binding:
    source: str
    destination: str
    routing_key: str
    destination_type: Literal["queue", "exchange"] = "queue"


@dataclass(frozen=True)
class Topology:
    backend: delay.BackendName
    exchanges: tuple[Exchange, ...]
    queues: tuple[Queue, ...]
    bindings: tuple[Binding, ...]

    def queue(self, name: str) -> Queue:
        return next(q for q in self.queues if q.name == name)


def _quorum(**extra: Any) -> dict[str, Any]:
    return {"x-queue-type": "quorum", **extra}


def work_queue(name: str) -> Queue:
    """A quorum queue that parks a message in ``nudge.dead`` after :data:`DELIVERY_LIMIT`
    deliveries, dead-lettering at-least-once (which requires ``reject-publish``), and refuses
    publishes past its bounds."""
    return Queue(
        name,
        _quorum(
            **{
                "x-delivery-limit": DELIVERY_LIMIT,
                "x-dead-letter-exchange": DEAD_EXCHANGE,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
                "x-max-length": WORK_QUEUE_MAX_LENGTH,
                "x-max-length-bytes": WORK_QUEUE_MAX_BYTES,
            }
        ),
    )


def _ladder() -> tuple[list[Exchange], list[Queue], list[Binding]]:
    # A due message whose destination has no binding would be retried by the level-0
    # dead-lettering forever (about every 3 minutes) and block the queue behind it; the
    # alternate exchange parks it in nudge.dead instead.
    exchanges = [
        Exchange(delay.TIERS_OUTPUT_EXCHANGE, "topic", {"alternate-exchange": DEAD_EXCHANGE})
    ]
    queues: list[Queue] = []
    bindings: list[Binding] = []
    for level in range(delay.LEVELS):
        name = delay.level_name(level)
        below = delay.level_name(level - 1) if level else delay.TIERS_OUTPUT_EXCHANGE
        exchanges.append(Exchange(name, "topic"))
        queues.append(
            Queue(
                name,
                _quorum(
                    **{
                        "x-message-ttl": delay.level_ttl_ms(level),
                        "x-dead-letter-exchange": below,
                        "x-dead-letter-strategy": "at-least-once",
                        "x-overflow": "reject-publish",
                        "x-max-length": DELAY_LEVEL_MAX_LENGTH,
                        "x-max-length-bytes": DELAY_LEVEL_MAX_BYTES,
                    }
                ),
            )
        )
        # Bit set: wait here. Bit clear: fall through to the level below at once.
        bindings.append(Binding(name, name, delay.level_binding_key(level, "1")))
        bindings.append(Binding(name, below, delay.level_binding_key(level, "0"), "exchange"))
    return exchanges, queues, bindings


def destination_binding(backend: delay.BackendName, destination: str, queue: str) -> Binding:
    """How the delay exchange hands a due message for ``destination`` to ``queue``."""
    if backend == "plugin":
        return Binding(delay.PLUGIN_EXCHANGE, queue, destination)
    return Binding(delay.TIERS_OUTPUT_EXCHANGE, queue, f"#.{destination}")


def due_destination(priority: str) -> str:
    """The delay destination of a due message of ``priority``, chosen when it is published."""
    return DUE_TRANSACTIONAL_DESTINATION if priority == "transactional" else DUE_DESTINATION


def build(backend: delay.BackendName) -> Topology:
    """The whole topology for a delay backend."""
    exchanges = [
        Exchange(INTAKE_EXCHANGE, "direct"),
        Exchange(EVENTS_EXCHANGE, "direct"),
        Exchange(DEAD_EXCHANGE, "fanout"),
        Exchange(CONTROL_EXCHANGE, "fanout"),
        Exchange(PLAN_EXCHANGE, "direct"),
        Exchange(BATCHES_EXCHANGE, "direct"),
        Exchange(RECEIPTS_EXCHANGE, "direct"),
    ]
    queues = [
        work_queue(INTAKE_QUEUE),
        work_queue(EVENTS_QUEUE),
        work_queue(DUE_QUEUE),
        work_queue(DUE_TRANSACTIONAL_QUEUE),
        Queue(
            DEAD_QUEUE,
            _quorum(
                **{
                    "x-overflow": "drop-head",
                    "x-max-length": DEAD_MAX_LENGTH,
                    "x-max-length-bytes": DEAD_MAX_BYTES,
                }
            ),
        ),
        work_queue(PLAN_QUEUE),
        work_queue(BATCHES_QUEUE),
        work_queue(RECEIPTS_QUEUE),
    ]
    bindings = [
        Binding(INTAKE_EXCHANGE, INTAKE_QUEUE, SCHEDULE_KEY),
        Binding(EVENTS_EXCHANGE, EVENTS_QUEUE, EVENT_KEY),
        Binding(DEAD_EXCHANGE, DEAD_QUEUE, ""),
        Binding(PLAN_EXCHANGE, PLAN_QUEUE, PLAN_KEY),
        Binding(BATCHES_EXCHANGE, BATCHES_QUEUE, BATCH_KEY),
        Binding(RECEIPTS_EXCHANGE, RECEIPTS_QUEUE, READ_KEY),
    ]
    if backend == "plugin":
        exchanges.append(
            Exchange(delay.PLUGIN_EXCHANGE, "x-delayed-message", {"x-delayed-type": "direct"})
        )
    else:
        ladder_exchanges, ladder_queues, ladder_bindings = _ladder()
        exchanges += ladder_exchanges
        queues += ladder_queues
        bindings += ladder_bindings
    bindings.append(destination_binding(backend, DUE_DESTINATION, DUE_QUEUE))
    bindings.append(
        destination_binding(backend, DUE_TRANSACTIONAL_DESTINATION, DUE_TRANSACTIONAL_QUEUE)
    )
    bindings.append(destination_binding(backend, PLAN_DESTINATION, PLAN_QUEUE))
    return Topology(backend, tuple(exchanges), tuple(queues), tuple(bindings))


def to_definitions(topology: Topology, vhost: str = "/") -> dict[str, Any]:
    """The topology in RabbitMQ's definitions format (``rabbitmqctl import_definitions``)."""
    return {
        "exchanges": [
            {
                "name": e.name,
                "vhost": vhost,
                "type": e.type,
                "durable": e.durable,
                "auto_delete": False,
                "internal": False,
                "arguments": e.arguments,
            }
            for e in topology.exchanges
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": q.durable,
                "auto_delete": False,
                "arguments": q.arguments,
            }
            for q in topology.queues
        ],
        "bindings": [
            {
                "source": b.source,
                "vhost": vhost,
                "destination": b.destination,
                "destination_type": b.destination_type,
                "routing_key": b.routing_key,
                "arguments": {},
            }
            for b in topology.bindings
        ],
    }


# ------------------------------------------------------------------------------ broker users

#: Services publish with this user: to the intake, events and receipts exchanges, nothing else.
SERVICE_USER = "nudge-service"
#: Workers and the ``nudge`` CLI connect with this user.
WORKER_USER = "nudge-worker"


def _only(*names: str) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


#: What no permission grants: a regular expression matching no resource name.
NOTHING = "^$"
#: Every name Nudge declares (each worker's ``nudge.control.<id>`` queue included) and the
#: default exchange (``nudge dead replay`` publishes back to a queue through it).
_NUDGE_RESOURCES = r"^(nudge\..*|amq\.default)$"


@dataclass(frozen=True)
class User:
    """A broker user and its permissions (regular expressions over resource names) in Nudge's
    vhost. ``configure`` declares and deletes, ``write`` publishes to an exchange or binds a
    queue, ``read`` consumes from a queue or binds from an exchange."""

    name: str
    configure: str
    write: str
    read: str
    tags: tuple[str, ...] = ()


def users() -> tuple[User, ...]:
    """The users Nudge's processes connect with.

    The service user may publish to the three exchanges of the contract and do nothing else:
    not declare (the workers and ``nudge topology apply`` declare the topology; a passive
    declare needs no permission), not read, not publish to the delay ladder, ``nudge.due``,
    ``nudge.dead``, ``nudge.control`` or through the default exchange. The broker refuses
    anything else with ``ACCESS_REFUSED`` and closes the channel.

    The workers share one user rather than one per role: every worker declares the whole
    topology at start (configure on every queue and exchange, read on every exchange it binds
    from), one process may run any set of roles, every role but ``receipts`` publishes into
    the delay ladder that leads to ``nudge.due``, and all of them share the database
    credentials, which decide far more than the broker does. Per-role users would forbid none
    of what matters."""
    return (
        User(
            SERVICE_USER,
            configure=NOTHING,
            write=_only(INTAKE_EXCHANGE, EVENTS_EXCHANGE, RECEIPTS_EXCHANGE),
            read=NOTHING,
        ),
        User(
            WORKER_USER,
            configure=_NUDGE_RESOURCES,
            write=_NUDGE_RESOURCES,
            read=_NUDGE_RESOURCES,
        ),
    )


def password_hash(password: str, salt: bytes | None = None) -> str:
    """``password`` as RabbitMQ stores it (``rabbit_password_hashing_sha256``): base64 of a
    4-byte salt followed by SHA-256(salt + password), for definitions files and the HTTP API."""
    salt = secrets.token_bytes(4) if salt is None else salt
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def users_definitions(
    vhost: str = "/", passwords: dict[str, str] | None = None, *, suffix: str = ""
) -> dict[str, Any]:
    """:func:`users` in RabbitMQ's definitions format. A user without an entry in
    ``passwords`` has an empty password hash: it cannot log in with a password until one is
    set (``rabbitmqctl change_password``). ``suffix`` is appended to every user name (tests
    create users per vhost)."""
    passwords = passwords or {}
    return {
        "users": [
            {
                "name": u.name + suffix,
                "password_hash": (password_hash(passwords[u.name]) if u.name in passwords else ""),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": ",".join(u.tags),
            }
            for u in users()
        ],
        "permissions": [
            {
                "user": u.name + suffix,
                "vhost": vhost,
                "configure": u.configure,
                "write": u.write,
                "read": u.read,
            }
            for u in users()
        ],
    }
