"""The primary Postgres stopped hard (immediate shutdown) while a campaign sends and delayed
messages are in flight, and its synchronous standby promoted: the workers and the CLI name
both in a multi-host URL (``target_session_attrs=read-write``) and move to the promoted
standby by themselves. Every outcome committed before the failover is still there, unchanged
(synchronous replication: a commit returns once the standby has it); every recipient ends with
exactly one final outcome, ``sent``; the sink sees nothing twice beyond what one dispatch held
claimed (a claim commits without waiting, docs/operations.md, "Postgres high availability");
the campaign completes.

The flows, the judge and the in-flight bound are the fault suite's (``tests/faults``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

import pytest
from sqlalchemy import Engine, select, text

from tests.failover.conftest import Pair
from tests.faults import test_injected_faults as faults
from tests.faults.flows import Campaign, DelayedMessages, Flow, InFlight, Stream
from tests.support import Worker, wait_for
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store import templates
from workers.store.schema import message_items

SIZE = 600


@pytest.fixture
def run(engine: Engine) -> str:
    with engine.begin() as conn:
        templates.add(conn, "welcome", "Hello {{ contact.id }}", "Welcome", None)
    return f"p{uuid.uuid4().hex[:8]}"


@pytest.fixture
def fleet(start_worker: Callable[..., Worker]) -> dict[str, Worker]:
    """One worker per role (as in the fault suite), started together."""
    return faults.start_fleet(start_worker)


def _sent(engine: Engine) -> dict[tuple[int, int], datetime | None]:
    """Every recipient recorded ``sent``, with the time recorded."""
    query = select(
        message_items.c.message_id, message_items.c.contact_id, message_items.c.sent_at
    ).where(message_items.c.status == "sent")
    with engine.connect() as conn:
        return {(mid, cid): at for mid, cid, at in conn.execute(query)}


def test_promoting_the_standby_mid_campaign_loses_no_committed_outcome_and_sends_everything(
    pair: Pair,
    settings: Settings,
    sink: Sink,
    engine: Engine,
    run: str,
    fleet: dict[str, Worker],
) -> None:
    sink.latency = 0.005  # a slow receiver, so that the failover lands mid-send
    flows: list[Flow] = [
        Campaign(run, chunk=faults.BATCH, concurrency=faults.CONCURRENCY, size=SIZE).start(
            settings, engine
        ),
        DelayedMessages(run, limit=faults.CONCURRENCY * faults.BATCH, delay=(0.5, 3.0)),
    ]
    stream = Stream(settings.amqp_url, flows).start()
    try:
        wait_for(
            lambda: stream.confirmed() >= 100 and len(sink.requests) >= 150,
            timeout=60,
            message="a campaign sending and delayed messages in flight",
        )
        # What the primary says it committed: the failover may take none of it back, as long
        # as every commit waited for the standby.
        before = _sent(engine)
        with engine.connect() as conn:
            states = conn.execute(text("SELECT sync_state FROM pg_stat_replication")).all()
        assert [s for (s,) in states] == ["sync"], f"the standby is not synchronous: {states}"
        pair.servers("kill-postgres")
        pair.servers("pg-promote")
        engine.dispose()  # the test's own pooled connections died with the primary
        problems = faults._reconnected(fleet, stream)
    finally:
        stream.stop()
    after = _sent(engine)
    changed = {k: (at, after.get(k)) for k, at in before.items() if after.get(k) != at}
    if changed:
        problems.append(
            f"{len(changed)} of the {len(before)} outcomes committed before the failover were "
            f"lost or written again, e.g. {dict(list(changed.items())[:3])}"
        )
    faults._judge(
        "PostgreSQL failover",
        f"kill-postgres + pg-promote after {len(before)} outcomes",
        stream,
        engine,
        sink,
        InFlight(faults=1),
        problems,
    )
