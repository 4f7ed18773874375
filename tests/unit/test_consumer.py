"""The consumer loop against the in-memory broker: what is held, how batches form, and how
each outcome is settled (acked, republished then acked, parked then acked, given back)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from shared import delay
from shared.amqp import Incoming
from shared.errors import InvalidMessage, StoreUnavailable
from shared.topology import DEAD_EXCHANGE, DUE_DESTINATION
from workers.runtime import consumer as consumer_module
from workers.runtime.consumer import Bundle, Consumer
from workers.runtime.outcomes import DONE, Outcome, Reject, Retry
from workers.runtime.testing import InMemoryBroker

QUEUE = "nudge.test"


@dataclass(frozen=True)
class Item:
    id: str
    #: done, retry, reject, crash (raises), or unavailable (Postgres down once).
    does: str = "done"
    due: datetime | None = None


def encode(item: Item) -> bytes:
    return json.dumps(
        {"id": item.id, "does": item.does, "due": item.due.isoformat() if item.due else None}
    ).encode()


def _item(raw: dict[str, str | None]) -> Item:
    due = raw.get("due")
    return Item(str(raw["id"]), str(raw["does"]), datetime.fromisoformat(due) if due else None)


@dataclass
class Recorder:
    """A role that does what each item says and records the batches it was given."""

    destination: str | None = DUE_DESTINATION
    queue: str = QUEUE
    batches: list[list[str]] = field(default_factory=list)
    handled_at: dict[str, datetime] = field(default_factory=dict)
    unavailable_once: set[str] = field(default_factory=set)

    def decode(self, message: Incoming) -> Item | Bundle[Item]:
        try:
            raw = json.loads(message.body)
        except ValueError:
            raise InvalidMessage("body: not JSON") from None
        if "bundle" in raw:
            return Bundle([_item(r) for r in raw["bundle"]], encode, lambda i: i.id)
        if "id" not in raw:
            raise InvalidMessage("id: field required")
        return _item(raw)

    def due_at(self, item: Item) -> datetime | None:
        return item.due

    async def handle(self, batch: Sequence[Item]) -> Sequence[Outcome]:
        self.batches.append([i.id for i in batch])
        for i in batch:
            if i.does == "unavailable" and i.id not in self.unavailable_once:
                self.unavailable_once.add(i.id)
                raise StoreUnavailable("postgres: the database system is starting up")
            if i.does == "crash":
                raise ValueError(f"{i.id} crashes its handler")
        self.handled_at.update((i.id, datetime.now(UTC)) for i in batch)
        outcomes: dict[str, Outcome] = {
            "retry": Retry(1000),
            "reject": Reject("template: no template named nope"),
        }
        return [outcomes.get(i.does, DONE) for i in batch]


@asynccontextmanager
async def running(
    handler: Recorder, *, batch_size: int = 10, batch_wait: float = 0.0, concurrency: int = 1
) -> AsyncIterator[InMemoryBroker]:
    broker = InMemoryBroker()
    consumer = Consumer(
        handler,
        broker.inbox,
        broker.publisher,
        "tiers",
        concurrency=concurrency,
        batch_size=batch_size,
        batch_wait=batch_wait,
    )
    await consumer.start()
    try:
        yield broker
    finally:
        await consumer.stop(grace=5.0)


async def deliver(broker: InMemoryBroker, *items: Item) -> None:
    for item in items:
        await broker.deliver(encode(item), message_id=item.id)


def soon(ms: int) -> datetime:
    return datetime.now(UTC) + timedelta(milliseconds=ms)


async def test_messages_ready_together_are_handled_in_batches_of_at_most_batch_size() -> None:
    handler = Recorder()
    async with running(handler, batch_size=3, batch_wait=30.0) as broker:
        await deliver(broker, *(Item(f"m{i}") for i in range(6)))
        await broker.join()
    assert handler.batches == [["m0", "m1", "m2"], ["m3", "m4", "m5"]]
    assert broker.acked == [f"m{i}" for i in range(6)]
    assert broker.published == []


async def test_a_batch_waits_up_to_batch_wait_for_more_messages_then_goes_without_them() -> None:
    handler = Recorder()
    async with running(handler, batch_size=10, batch_wait=0.2) as broker:
        await deliver(broker, Item("first"))
        await asyncio.sleep(0)  # the batch task takes "first" and waits for more
        await deliver(broker, Item("second"))
        await broker.join()
    assert handler.batches == [["first", "second"]]
    assert broker.acked == ["first", "second"]


async def test_an_early_message_is_held_and_handled_once_it_is_due_never_before() -> None:
    handler = Recorder()
    due = soon(60)
    async with running(handler) as broker:
        await deliver(broker, Item("early", due=due))
        assert handler.batches == []
        await broker.join()
    assert handler.handled_at["early"] >= due
    assert broker.journal == [("ack", "early")]


async def test_held_messages_due_in_one_tick_make_one_batch_without_waiting_for_batch_wait() -> (
    None
):
    handler = Recorder()
    due = soon(50)
    async with running(handler, batch_size=10, batch_wait=30.0) as broker:
        await deliver(broker, *(Item(f"h{i}", due=due) for i in range(3)))
        await broker.join()
    assert handler.batches == [["h0", "h1", "h2"]]


async def test_a_message_due_beyond_the_hold_limit_goes_back_into_the_delay_unhandled() -> None:
    handler = Recorder()
    wait = delay.HOLD_LIMIT + timedelta(minutes=5)
    async with running(handler) as broker:
        await deliver(broker, Item("later", due=datetime.now(UTC) + wait))
        await broker.join()
    assert handler.batches == []
    assert broker.journal == [("publish", "later"), ("ack", "later")]
    [out] = broker.published
    ladder = delay.route("tiers", DUE_DESTINATION, int(wait.total_seconds() * 1000))
    assert out.exchange == ladder.exchange
    assert json.loads(out.body)["id"] == "later"


async def test_a_retry_is_republished_without_its_death_history_before_its_delivery_is_acked() -> (
    None
):
    handler = Recorder()
    async with running(handler) as broker:
        await broker.deliver(
            encode(Item("again", "retry")),
            message_id="again",
            headers={"x-death": [{"queue": "nudge.delay.0"}], "x-trace": "t-1"},
        )
        await broker.join()
    assert broker.journal == [("publish", "again"), ("ack", "again")]
    [out] = broker.published
    ladder = delay.route("tiers", DUE_DESTINATION, 1000)
    assert (out.exchange, out.routing_key) == (ladder.exchange, ladder.routing_key)
    assert out.body == encode(Item("again", "retry"))
    assert "x-death" not in out.headers
    assert out.headers["x-trace"] == "t-1"


async def test_a_rejected_message_is_parked_in_nudge_dead_with_its_reason_then_acked() -> None:
    handler = Recorder()
    async with running(handler) as broker:
        await deliver(broker, Item("bad", "reject"), Item("good"))
        await broker.join()
    assert broker.acked == ["bad", "good"]
    [parked] = broker.published
    assert (parked.exchange, parked.routing_key) == (DEAD_EXCHANGE, QUEUE)
    assert parked.headers["x-nudge-reason"] == "template: no template named nope"
    assert parked.headers["x-nudge-source-queue"] == QUEUE
    assert broker.journal.index(("publish", "bad")) < broker.journal.index(("ack", "bad"))


async def test_an_undecodable_message_is_parked_with_the_field_named_and_never_handled() -> None:
    handler = Recorder()
    async with running(handler) as broker:
        await broker.deliver(b'{"does": "done"}', message_id="no-id")
        await broker.join()
    assert handler.batches == []
    assert broker.journal == [("publish", "no-id"), ("ack", "no-id")]
    assert broker.published[0].headers["x-nudge-reason"] == "id: field required"


async def test_a_republish_not_confirmed_gives_the_delivery_back_instead_of_acking_it() -> None:
    handler = Recorder()
    async with running(handler) as broker:
        broker.refuse_publishes = True
        await deliver(broker, Item("again", "retry"), Item("bad", "reject"), Item("good"))
        await broker.join()
    assert broker.nacked == ["again", "bad"]
    assert broker.acked == ["good"]


async def test_a_crashing_batch_is_split_so_that_only_the_poison_message_goes_back() -> None:
    handler = Recorder()
    async with running(handler, batch_size=10) as broker:
        await deliver(broker, Item("a"), Item("poison", "crash"), Item("b"))
        await broker.join()
    assert handler.batches == [["a", "poison", "b"], ["a"], ["poison"], ["b"]]
    assert broker.acked == ["a", "b"]
    assert broker.nacked == ["poison"]


async def test_a_bundle_is_acked_once_after_every_item_is_settled_and_a_retry_travels_alone() -> (
    None
):
    handler = Recorder()
    bundle = [Item("x1"), Item("x2", "retry"), Item("x3")]
    async with running(handler, batch_size=2, batch_wait=0.0) as broker:
        await broker.deliver(
            json.dumps({"bundle": [json.loads(encode(i)) for i in bundle]}).encode(),
            message_id="bundle",
        )
        await broker.join()
    assert handler.batches == [["x1", "x2"], ["x3"]]
    assert broker.journal == [("publish", "x2"), ("ack", "bundle")]
    assert broker.published[0].body == encode(Item("x2", "retry"))


async def test_a_crashing_item_of_a_bundle_travels_on_alone_and_the_bundle_is_acked() -> None:
    handler = Recorder()
    bundle = [Item("y1"), Item("poison", "crash"), Item("y2")]
    async with running(handler) as broker:
        await broker.deliver(
            json.dumps({"bundle": [json.loads(encode(i)) for i in bundle]}).encode(),
            message_id="bundle",
        )
        await broker.join()
    assert broker.journal == [("publish", "poison"), ("ack", "bundle")]
    [alone] = broker.published
    assert alone.body == encode(Item("poison", "crash"))
    assert alone.headers["x-delay"] == 0


async def test_a_bundle_whose_crashing_item_cannot_travel_alone_goes_back_whole_once() -> None:
    handler = Recorder(destination=None)
    bundle = [Item("z1"), Item("poison", "crash"), Item("z2")]
    async with running(handler) as broker:
        await broker.deliver(
            json.dumps({"bundle": [json.loads(encode(i)) for i in bundle]}).encode(),
            message_id="bundle",
        )
        await broker.join()
    assert set(handler.handled_at) == {"z1", "z2"}
    assert broker.journal == [("nack", "bundle")]


async def test_a_batch_that_finds_the_store_unavailable_is_handled_again_not_given_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(consumer_module, "UNAVAILABLE_FIRST_WAIT", 0.01)
    handler = Recorder()
    async with running(handler) as broker:
        await deliver(broker, Item("a"), Item("waits", "unavailable"))
        await broker.join()
    assert handler.batches == [["a", "waits"], ["a", "waits"]]
    assert broker.journal == [("ack", "a"), ("ack", "waits")]


async def test_stopping_finishes_the_held_messages_before_it_returns() -> None:
    handler = Recorder()
    broker = InMemoryBroker()
    consumer = Consumer(
        handler,
        broker.inbox,
        broker.publisher,
        "tiers",
        concurrency=1,
        batch_size=10,
        batch_wait=0.0,
    )
    await consumer.start()
    await deliver(broker, Item("held", due=soon(80)))
    await consumer.stop(grace=5.0)
    assert broker.on_message is None  # no longer consuming
    assert broker.journal == [("ack", "held")]
