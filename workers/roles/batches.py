"""Campaign recipients from ``nudge.batches``, sent through the very pipeline of single
messages: the dispatch role's :class:`~workers.roles.dispatch.DispatchHandler` claims, checks,
delivers and records every recipient, so a campaign gets the exclusions, windows, caps,
subscription and quiet hours of any message, and its idempotency.

A batch (500 recipients by default) is split into chunks (50): before the batch the
campaign's status is read from Postgres, and between chunks the worker asks what it heard on
``nudge.control``. A pause therefore stops this worker within the chunk in flight; the claim
refuses recipients of a paused campaign even if the announcement is late.

Batches of an older planning round are dropped: a resume or retry-failed starts a new round
that plans every recipient without a final outcome again, whatever was queued.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import contract, delay
from shared.amqp import Incoming, Publisher
from shared.contract import CampaignControl, DueMessage, RecipientBatch, due_message_id
from shared.topology import BATCHES_QUEUE, DUE_DESTINATION
from workers.recipients import ItemStatus, MessageStatus
from workers.runtime import metrics
from workers.runtime.control import Control, announce
from workers.runtime.outcomes import DONE, Outcome, Reject, Retry
from workers.store import campaigns
from workers.store.campaigns import Campaign
from workers.store.db import autocommit, transaction

log = structlog.get_logger("nudge.fanout")


#: What sends a chunk of due recipients: the dispatch role's ``handle``, passed in by the runner.
Deliver = Callable[[Sequence[DueMessage]], Awaitable[Sequence[Outcome]]]


class BatchHandler:
    """Sends batches of campaign recipients, chunk by chunk, through dispatch."""

    queue = BATCHES_QUEUE
    destination = None

    def __init__(
        self,
        engine: AsyncEngine,
        deliver: Deliver,
        publisher: Publisher,
        backend: delay.BackendName,
        control: Control,
    ) -> None:
        self._engine = engine
        self._deliver = deliver
        self._publisher = publisher
        self._backend = backend
        self._control = control
        #: Per campaign: True for each recent send that failed (this worker's last N sends).
        self._sends: dict[int, deque[bool]] = {}

    def decode(self, message: Incoming) -> RecipientBatch:
        return contract.decode(RecipientBatch, message.body, content_type=message.content_type)

    def due_at(self, item: RecipientBatch) -> datetime | None:
        return None

    async def handle(self, batch: Sequence[RecipientBatch]) -> Sequence[Outcome]:
        return [await self._one(b) for b in batch]

    async def _one(self, rb: RecipientBatch) -> Outcome:
        async with transaction(self._engine) as conn:
            campaign = await campaigns.load(conn, rb.message_id)
        if campaign is None:
            return Reject(f"message_id: no campaign {rb.message_id}")
        self._control.observe(campaign.id, campaign.plan_round)
        status = MessageStatus(campaign.status)
        if campaign.plan_round > rb.round or status not in (
            MessageStatus.SENDING,
            MessageStatus.CANCELLED,
        ):
            # an older round (re-planned since), paused (resume plans again), or done
            metrics.campaign_batches_skipped.inc()
            return DONE
        size = campaign.chunk_size
        pairs = list(zip(rb.contact_ids, rb.attempts, strict=True))
        for start in range(0, len(pairs), size):
            # A cancelled campaign's batches still run: claims of recipients whose worker
            # died finish as ``cancelled`` (the others were recorded so at cancel).
            if (
                start
                and status is MessageStatus.SENDING
                and self._control.stopped(campaign.id, rb.round)
            ):
                metrics.campaign_chunks_stopped.inc()
                break
            chunk = pairs[start : start + size]
            since = datetime.now(UTC)
            await self._chunk(campaign.id, chunk, since)
            if campaign.auto_pause_threshold is not None and status is MessageStatus.SENDING:
                await self._watch_failures(campaign, rb.round, [c for c, _ in chunk], since)
        async with autocommit(self._engine) as conn:  # one statement
            if await campaigns.complete_finished(conn, campaign.id):
                log.info("campaign completed", campaign_id=campaign.id)
        return DONE

    async def _chunk(self, campaign_id: int, chunk: list[tuple[int, int]], now: datetime) -> None:
        # built from our own rows: no validation to spend per recipient
        dues = [
            DueMessage.model_construct(
                message_id=campaign_id, contact_id=cid, deliver_at=now, attempt=attempt + 1
            )
            for cid, attempt in chunk
        ]
        outcomes = await self._deliver(dues)
        retries = []
        for due, outcome in zip(dues, outcomes, strict=True):
            if isinstance(outcome, Retry):
                # deferred (a window, a transient failure) or held by a worker that may have
                # died: it comes back through the delay to nudge.due like any message
                retries.append(
                    Publisher.delayed(
                        self._backend,
                        DUE_DESTINATION,
                        outcome.delay_ms,
                        outcome.body if outcome.body is not None else contract.encode(due),
                        outcome.message_id
                        or due_message_id(due.message_id, due.contact_id, due.attempt),
                    )
                )
            elif isinstance(outcome, Reject):
                log.warning("campaign recipient rejected", reason=outcome.reason)
        if retries:
            await self._publisher.publish_many(retries)

    async def _watch_failures(
        self, campaign: Campaign, round_: int, contact_ids: list[int], since: datetime
    ) -> None:
        """Auto-pause when more than the threshold of this worker's last N sends failed."""
        window = campaign.auto_pause_window or 100
        threshold = campaign.auto_pause_threshold or 1.0
        async with transaction(self._engine) as conn:
            recorded = await campaigns.recent_outcomes(conn, campaign.id, contact_ids, since)
        sends = self._sends.setdefault(campaign.id, deque(maxlen=window))
        for status, why in recorded:
            if status == ItemStatus.SENT:
                sends.append(False)
            elif why is not None and why.rule.failed_send:
                sends.append(True)
        failed = sum(sends)
        if len(sends) < window or failed / len(sends) <= threshold:
            return
        reason = (
            f"auto-pause: {failed} of the last {len(sends)} sends failed "
            f"(threshold {threshold:.0%})"
        )
        async with transaction(self._engine) as conn:
            paused = await campaigns.auto_pause(conn, campaign.id, round_, reason)
        if paused:
            log.warning("campaign auto-paused", campaign_id=campaign.id, reason=reason)
            control = CampaignControl(campaign_id=campaign.id, action="pause", round=round_)
            self._control.hear(control)
            await announce(self._publisher, control)
        sends.clear()
