"""The read-only queries benchmarks run against Postgres, for one run's messages (those whose
idempotency key starts with the run's prefix)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Engine, Float, cast, func, select
from sqlalchemy.sql.elements import ColumnElement

from workers.recipients import ItemStatus
from workers.store.db import sync_errors
from workers.store.schema import message_items, messages

_PENDING = [ItemStatus.SENDING.value, ItemStatus.DEFERRED.value]


@dataclass(frozen=True)
class Outcomes:
    """What Postgres says about a finished run. Times are epoch seconds, lateness in ms."""

    sent: int
    not_sent: int
    first_due: float
    first_sent: float
    last_sent: float
    peak_per_second: int
    stored_first: float
    stored_last: float
    lateness_p50: float
    lateness_p99: float
    lateness_max: float


def _of_run(prefix: str) -> ColumnElement[bool]:
    return messages.c.idempotency_key.like(f"{prefix}%")


def wait_final(engine: Engine, prefix: str, count: int, deadline: float) -> int:
    """Poll every second until ``count`` recipients of the run have a final status or ``deadline``
    (monotonic) passes; returns how many are final."""
    query = (
        select(func.count())
        .select_from(message_items.join(messages))
        .where(_of_run(prefix), message_items.c.status.not_in(_PENDING))
    )
    while True:
        with sync_errors(), engine.connect() as conn:
            final = conn.execute(query).scalar_one()
        if final >= count or time.monotonic() > deadline:
            return final
        time.sleep(1.0)  # each poll costs Postgres ~40 ms at N = 20,000


def outcomes(engine: Engine, prefix: str) -> Outcomes:
    """Delivery and lateness figures of a finished run; ``sent_at`` is the start of the
    dispatch's finalise transaction, so lateness includes the send and the claim."""
    mi, m = message_items.c, messages.c
    sent = mi.status == ItemStatus.SENT.value
    late_ms = cast(func.extract("epoch", mi.sent_at - m.deliver_at), Float) * 1000

    def epoch(column: ColumnElement[object]) -> ColumnElement[float]:
        return cast(func.extract("epoch", column), Float)

    joined = message_items.join(messages)
    with sync_errors(), engine.connect() as conn:
        row = conn.execute(
            select(
                func.count().filter(sent),
                func.count().filter(~sent),
                epoch(func.min(m.deliver_at)),
                epoch(func.min(mi.sent_at)),
                epoch(func.max(mi.sent_at)),
                epoch(func.min(m.created_at)),
                epoch(func.max(m.created_at)),
                func.percentile_cont(0.5).within_group(late_ms).filter(sent),
                func.percentile_cont(0.99).within_group(late_ms).filter(sent),
                func.max(late_ms).filter(sent),
            )
            .select_from(joined)
            .where(_of_run(prefix))
        ).one()
        per_second = (
            select(func.count().label("n"))
            .select_from(joined)
            .where(_of_run(prefix), sent)
            .group_by(func.floor(epoch(mi.sent_at)))
            .subquery()
        )
        peak = conn.execute(select(func.coalesce(func.max(per_second.c.n), 0))).scalar_one()
    t = [0.0 if x is None else float(x) for x in row[2:]]  # None when nothing was sent
    return Outcomes(row[0], row[1], t[0], t[1], t[2], peak, t[3], t[4], t[5], t[6], t[7])


def server_version(engine: Engine) -> str:
    """Postgres' ``server_version``."""
    with sync_errors(), engine.connect() as conn:
        return str(conn.exec_driver_sql("SHOW server_version").scalar_one())
