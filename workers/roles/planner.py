"""The ``planner`` role: fans a campaign out from Postgres into ``nudge.batches``.

A plan message (``nudge.plan``) names a campaign and a planning round. The planner pages the
recipients without a final outcome by contact id (keyset on a partial index, never OFFSET),
publishes them in batches with confirms, and records after each page how far it got. A
round-0 message is a scheduled start that came through the delay: it freezes the audience
first. The delay ladder therefore carries one start per campaign, never one message per
recipient to send (only retries go through it one by one, as any message's do).

A ``deferred`` recipient whose retry time is still ahead is not batched: it goes back through
the delay for that time, so a resume or retry-failed round honours backoffs and windows.

Several planners may run: one campaign is planned by one of them at a time (a session
advisory lock); another that receives a message for it comes back a second later. A planner
works on a campaign for at most :data:`SLICE_SECONDS`, then hands the rest on as a new plan
message (continuing from the recorded cursor), so a slow campaign never holds an unacked
message for hours. The per-campaign send rate is enforced here, by pacing the batches.

It also completes campaigns whose every recipient is final (a sweep every few seconds),
whichever worker recorded the last outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import contract, delay
from shared.amqp import Incoming, Outgoing, Publisher
from shared.contract import DueMessage, PlanCampaign, RecipientBatch, due_message_id
from shared.errors import StoreError
from shared.topology import (
    BATCH_KEY,
    BATCHES_EXCHANGE,
    DUE_DESTINATION,
    PLAN_DESTINATION,
    PLAN_QUEUE,
)
from workers.recipients import MessageStatus
from workers.runtime import metrics
from workers.runtime.outcomes import DONE, Outcome, Reject, Retry
from workers.store import campaigns
from workers.store.db import transaction

log = structlog.get_logger("nudge.planner")

#: How long one plan message may keep a planner on one campaign.
SLICE_SECONDS = 20.0
#: Batches published per round trip to Postgres (their confirms awaited together).
PAGES_PER_QUERY = 10
SWEEP_SECONDS = 2.0


def batch_message_id(campaign_id: int, round_: int, first_contact: int) -> str:
    return f"batch-{campaign_id}-{round_}-{first_contact}"


class PlannerHandler:
    """Plans campaign rounds into batches of recipients."""

    queue = PLAN_QUEUE
    destination = PLAN_DESTINATION

    def __init__(
        self, engine: AsyncEngine, publisher: Publisher, backend: delay.BackendName
    ) -> None:
        self._engine = engine
        self._publisher = publisher
        self._backend = backend

    def decode(self, message: Incoming) -> PlanCampaign:
        return contract.decode(PlanCampaign, message.body, content_type=message.content_type)

    def due_at(self, item: PlanCampaign) -> datetime | None:
        return item.start_at

    async def handle(self, batch: Sequence[PlanCampaign]) -> Sequence[Outcome]:
        return [await self._plan(p) for p in batch]

    async def _plan(self, plan: PlanCampaign) -> Outcome:
        round_ = plan.round
        if round_ == 0:
            async with transaction(self._engine) as conn:
                started = await campaigns.start_scheduled(conn, plan.campaign_id)
            if started is None:
                async with transaction(self._engine) as conn:
                    if await campaigns.load(conn, plan.campaign_id) is None:
                        return Reject(f"campaign_id: no campaign {plan.campaign_id}")
                return DONE  # started by hand, rescheduled, or cancelled
            log.info("scheduled campaign started", campaign_id=plan.campaign_id)
            round_ = started
        async with campaigns.planning_lock(self._engine, plan.campaign_id) as mine:
            if not mine:
                return Retry(1000)  # another planner is on it; see what is left then
            return await self._slice(plan.campaign_id, round_)

    async def _slice(self, campaign_id: int, round_: int) -> Outcome:
        deadline = time.monotonic() + SLICE_SECONDS
        while True:
            async with transaction(self._engine) as conn:
                c = await campaigns.load(conn, campaign_id)
                if c is None:
                    return Reject(f"campaign_id: no campaign {campaign_id}")
                if (
                    c.status != MessageStatus.SENDING
                    or c.plan_round != round_
                    or (c.plan_done and c.plan_round == round_)
                ):
                    return DONE  # paused, cancelled, re-planned, or planned already
                size = c.batch_size
                if c.rate_per_second is not None:
                    size = max(1, min(size, int(c.rate_per_second)))
                pages = 1 if c.rate_per_second is not None else PAGES_PER_QUERY
                rows = await campaigns.page(conn, campaign_id, c.planned_through or 0, size * pages)
            if not rows:
                async with transaction(self._engine) as conn:
                    await campaigns.finish_round(conn, campaign_id, round_)
                async with transaction(self._engine) as conn:
                    await campaigns.complete_finished(conn, campaign_id)
                log.info("campaign round planned", campaign_id=campaign_id, round=round_)
                return DONE
            started = time.monotonic()
            now = datetime.now(UTC)
            ready = [r for r in rows if r.retry_at is None]
            waiting = [r for r in rows if r.retry_at is not None]
            batches = [ready[i : i + size] for i in range(0, len(ready), size)]
            await self._publisher.publish_many(
                [
                    *(
                        Outgoing(
                            BATCHES_EXCHANGE,
                            BATCH_KEY,
                            contract.encode(
                                RecipientBatch(
                                    message_id=campaign_id,
                                    round=round_,
                                    contact_ids=tuple(r.contact_id for r in b),
                                    attempts=tuple(r.attempts for r in b),
                                )
                            ),
                            batch_message_id(campaign_id, round_, b[0].contact_id),
                        )
                        for b in batches
                    ),
                    *(self._retry(campaign_id, r, now) for r in waiting),
                ]
            )
            metrics.campaign_batches_planned.inc(len(batches))
            async with transaction(self._engine) as conn:
                await campaigns.advance(conn, campaign_id, round_, rows[-1].contact_id)
            if c.rate_per_second is not None:
                await asyncio.sleep(
                    max(0.0, len(rows) / c.rate_per_second - (time.monotonic() - started))
                )
            if time.monotonic() > deadline:
                return Retry(0)  # the rest from the recorded cursor, maybe by another planner

    def _retry(self, campaign_id: int, r: campaigns.Unfinished, now: datetime) -> Outgoing:
        """A deferred recipient whose retry time is still ahead (a resume or retry-failed
        round meets it) goes back through the delay to ``nudge.due`` for that time, as its
        deferral had scheduled, instead of into a batch sent now. A copy of the original retry
        still in the delay is harmless: the later attempt number claims once."""
        assert r.retry_at is not None
        due = DueMessage(
            message_id=campaign_id,
            contact_id=r.contact_id,
            deliver_at=r.retry_at,
            attempt=r.attempts + 1,
        )
        return Publisher.delayed(
            self._backend,
            DUE_DESTINATION,
            delay.delay_until(r.retry_at, now),
            contract.encode(due),
            due_message_id(campaign_id, r.contact_id, due.attempt),
        )

    async def sweep_forever(self) -> None:
        """Complete every campaign whose recipients are all final, every few seconds."""
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                async with transaction(self._engine) as conn:
                    done = await campaigns.complete_finished(conn)
                for campaign_id in done:
                    log.info("campaign completed", campaign_id=campaign_id)
            except StoreError as exc:
                log.warning("campaign sweep failed", error=str(exc))
