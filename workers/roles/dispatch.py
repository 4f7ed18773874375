"""The ``dispatch`` role: delivers due messages from ``nudge.due``, each exactly once.

Per batch: claim the recipients' ``message_items`` rows in one statement, decide what each
claimed recipient gets (cancelled, expired, or a send), send concurrently through the
channels, then record every outcome in one statement. The row is claimed before the send and
finalised after it, so a redelivered AMQP message never sends twice, and a worker that dies
between the two leaves a ``sending`` row whose lease runs out and is claimed again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import contract
from shared.contract import DueBatch, DueMessage, Priority, due_message_id
from shared.errors import InvalidTemplate, StoreUnavailable
from shared.topology import DUE_DESTINATION, DUE_QUEUE
from workers import checks
from workers.channels import Channel, Delivery, SendResult, Verdict
from workers.checks import Decision, Defer, Record, Send
from workers.config import Settings
from workers.policies import Policy
from workers.ratelimit import Limits
from workers.runtime import metrics
from workers.runtime.consumer import Bundle
from workers.runtime.outcomes import DONE, Outcome, Reject, Retry
from workers.store import checks as checks_repo
from workers.store import messages
from workers.store import policies as policies_repo
from workers.store import templates as templates_repo
from workers.store.checks import Sent
from workers.store.db import Statement, autocommit, pipelined
from workers.store.messages import Claimed, ItemState, Key
from workers.store.schema import ItemStatus
from workers.store.templates import StoredTemplate
from workers.templating import Rendered, Renderer, contact_variables

log = structlog.get_logger("nudge.dispatch")

#: A batch that takes longer than this, finalise included, is logged phase by phase.
SLOW_BATCH_SECONDS = 0.25


def backoff(
    attempt: int,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds before attempt ``attempt + 1``: exponential with "equal jitter", at least what
    the receiver asked for in ``Retry-After``."""
    ceiling = min(cap, base * (1 << min(attempt - 1, 62)))
    seconds = ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
    return max(seconds, retry_after or 0.0)


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


@dataclass(frozen=True)
class _Delivery:
    """A claimed recipient and what goes out to it."""

    claimed: Claimed
    delivery: Delivery


def _due_message_id(due: DueMessage) -> str:
    return due_message_id(due.message_id, due.contact_id, due.attempt)


@dataclass(frozen=True)
class _Facts:
    """How far back the checks look, over every policy: the send history's window, and the
    interaction events with theirs. Asked for with the claim, before the batch's policies are
    read, so the dispatch asks with those of the batch before; :meth:`covers` says whether
    that was enough."""

    window: float = 0.0
    names: tuple[str, ...] = ()
    interaction_window: float = 0.0

    @classmethod
    def of(cls, policies: Mapping[str, Policy]) -> _Facts:
        used = policies.values()
        return cls(
            window=max(
                max(p.frequency_window_seconds, p.category_window_seconds or 0) for p in used
            ),
            names=tuple(sorted({n for p in used for n in p.interaction_events})),
            interaction_window=max(p.interaction_window_seconds for p in used),
        )

    def covers(self, other: _Facts) -> bool:
        """Facts fetched as ``self`` include all that ``other`` needs."""
        return (
            self.window >= other.window
            and set(other.names) <= set(self.names)
            and (not other.names or self.interaction_window >= other.interaction_window)
        )


class DispatchHandler:
    """Claims, checks, renders, delivers and records due messages from one due queue.

    A worker runs one handler per due queue (bulk and transactional), sharing the channels,
    the rate limits and the template cache."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        channels: Mapping[str, Channel],
        *,
        limits: Limits | None = None,
        renderer: Renderer | None = None,
        queue: str = DUE_QUEUE,
        destination: str = DUE_DESTINATION,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._channels = channels
        self._limits = limits or Limits({})
        self._renderer = renderer or Renderer()
        self.queue = queue
        self.destination = destination
        #: What the last batch's policies asked the checks to look at (nothing before the
        #: first batch: it asks a second time).
        self._facts = _Facts()

    def decode(self, message: AbstractIncomingMessage) -> DueMessage | Bundle[DueMessage]:
        due = contract.decode_due(message.body, content_type=message.content_type)
        if isinstance(due, DueBatch):
            return Bundle(due.due, contract.encode, _due_message_id)
        return due

    def due_at(self, item: DueMessage) -> datetime | None:
        return item.deliver_at

    async def handle(self, batch: Sequence[DueMessage]) -> Sequence[Outcome]:
        first: dict[Key, int] = {}
        for i, due in enumerate(batch):
            first.setdefault((due.message_id, due.contact_id), i)
        wanted = [
            (batch[i].message_id, batch[i].contact_id, batch[i].attempt) for i in first.values()
        ]
        keys = list(first)
        # A second copy in the same batch is dropped: the first copy carries the work.
        result: list[Outcome] = [DONE] * len(batch)
        records: list[messages.Outcome] = []
        sends: list[Claimed] = []
        marks = [("start", time.perf_counter())]
        async with pipelined(self._engine) as tx:
            # One round trip: lock (checks and claims of one contact are serialised across
            # all workers, so caps hold under concurrency), claim, and every fact the checks
            # and the rendering need, asked for every recipient before knowing which are
            # claimed. The checks' windows are those of the policies seen last.
            asked = self._facts
            rows = await tx.run(
                [
                    checks_repo.lock_statement([k[1] for k in keys]),
                    messages.claim_statement(wanted, self._settings.claim_lease_seconds),
                    policies_repo.LOAD_ALL,
                    templates_repo.latest_of_messages_statement(k[0] for k in keys),
                    *self._fact_statements(asked, keys, keys),
                ]
            )
            marks.append(("claim", time.perf_counter()))
            claimed = messages.claimed_from(rows[1])
            policies = policies_repo.from_rows(rows[2])
            stored = templates_repo.latest_from(rows[3])
            facts = rows[4:]
            started = time.perf_counter()
            self._facts = _Facts.of(policies)
            claimed_keys = {(c.message_id, c.contact_id) for c in claimed}
            rest = [k for k in keys if k not in claimed_keys]
            if rest or not asked.covers(self._facts):
                # Rare: a redelivery or a race left rows unclaimed (their state decides
                # the outcome, and their sends count in the history), or the policies
                # changed. Ask again, exactly.
                got = await tx.run(
                    [
                        *([messages.states_statement(rest)] if rest else []),
                        *self._fact_statements(self._facts, keys, sorted(claimed_keys)),
                    ]
                )
                states = messages.states_from(got[0]) if rest else {}
                facts = got[1:] if rest else got
                now = datetime.now(UTC)
                for key in rest:
                    i = first[key]
                    result[i] = self._not_claimed(batch[i], states.get(key), now)
                marks.append(("recheck", time.perf_counter()))
            now = datetime.now(UTC)
            decisions = self._decide(claimed, policies, self._facts, facts, now)
            marks.append(("decide", time.perf_counter()))
            metrics.check_seconds.inc(time.perf_counter() - started)
            metrics.checked.inc(len(claimed))
            for c, decision in decisions:
                if isinstance(decision, Send):
                    sends.append(c)
                elif isinstance(decision, Defer):
                    records.append(
                        self._record(
                            c, ItemStatus.DEFERRED, decision.reason, next_at=decision.until
                        )
                    )
                    result[first[(c.message_id, c.contact_id)]] = self._retry_at(
                        c, decision.until, now
                    )
                else:
                    records.append(self._record(c, decision.status, decision.reason))
            # Decisions not to send are final (or deferred) at once, with the claims. With
            # sends to come, the commit does not wait for the disk (a stall there is the
            # largest part of the batch's tail): the finalise after the sends commits
            # synchronously, and repairs what a Postgres crash in between lost.
            await tx.run(
                [messages.finalise_statement(records)] if records else [],
                commit=True,
                durable=not sends,
            )
        marks.append(("commit", time.perf_counter()))
        deliveries, sent_records = await asyncio.to_thread(self._render, sends, stored)
        sent = await self._send_all(deliveries)
        marks.append(("send", time.perf_counter()))
        done_at = datetime.now(UTC)
        for d, send_result in sent:
            c = d.claimed
            record, retry = self._after_send(c, send_result, d.delivery.content.version)
            sent_records.append(record)
            if retry is not None:
                result[first[(c.message_id, c.contact_id)]] = retry
            if record.status is ItemStatus.SENT:
                metrics.lateness.labels(c.channel).observe(
                    max(0.0, (done_at - c.deliver_at).total_seconds())
                )
        await self._finalise(sent_records, records)
        marks.append(("finalise", time.perf_counter()))
        self._observe(marks, len(batch))
        records += sent_records
        channel_of = {(c.message_id, c.contact_id): c.channel for c in claimed}
        counted = Counter(
            (
                channel_of[(r.message_id, r.contact_id)],
                r.status.value,
                (r.reason or "").split(":", 1)[0],
            )
            for r in records
        )
        for labels, n in counted.items():
            metrics.outcomes.labels(*labels).inc(n)
        return result

    @staticmethod
    def _observe(marks: Sequence[tuple[str, float]], size: int) -> None:
        """Time each phase of a batch; a slow batch is logged with them."""
        phases = {phase: at - before for (_, before), (phase, at) in pairwise(marks)}
        for phase, seconds in phases.items():
            metrics.dispatch_phase.labels(phase).observe(seconds)
        if sum(phases.values()) > SLOW_BATCH_SECONDS:
            log.warning(
                "slow batch",
                size=size,
                **{f"{k}_ms": round(v * 1000, 1) for k, v in phases.items()},
            )

    def _render(
        self, sends: Sequence[Claimed], stored: Mapping[str, StoredTemplate]
    ) -> tuple[list[_Delivery], list[messages.Outcome]]:
        """Render each recipient's message; a missing template or a failed render fails that
        recipient with the reason, never the batch."""
        deliveries: list[_Delivery] = []
        failed: list[messages.Outcome] = []
        for c in sends:
            template = stored.get(c.template)
            if template is None:
                failed.append(
                    self._record(
                        c,
                        ItemStatus.FAILED,
                        f"template: no template named {c.template!r} (add it with "
                        "`nudge template add`)",
                    )
                )
                continue
            contact = contact_variables(c.external_id, c.email, c.phone, c.timezone, c.attributes)
            try:
                content = self._renderer.render(
                    template.name,
                    template.version,
                    {
                        "subject": template.subject,
                        "text_body": template.text_body,
                        "html_body": template.html_body,
                    },
                    contact,
                    c.data,
                    track_opens=template.track_opens,
                    track_clicks=template.track_clicks,
                )
            except InvalidTemplate as exc:
                failed.append(
                    self._record(c, ItemStatus.FAILED, exc.reason, version=template.version)
                )
                continue
            deliveries.append(_Delivery(c, self._delivery(c, content)))
        return deliveries, failed

    async def _send_all(
        self, deliveries: Sequence[_Delivery]
    ) -> list[tuple[_Delivery, SendResult]]:
        """Send every delivery through its channel, as many requests as the channel's batch
        size asks, all concurrently, each waiting its turn under the channel's rate limit."""
        by_channel: dict[str, list[_Delivery]] = {}
        for d in deliveries:
            by_channel.setdefault(d.claimed.channel, []).append(d)
        chunks: list[tuple[Channel, list[_Delivery]]] = []
        for name, group in by_channel.items():
            channel = self._channels[name]
            # transactional first, so they take the first permits of the rate limit
            group.sort(key=lambda d: d.claimed.priority != Priority.TRANSACTIONAL)
            size = max(1, channel.batch_size)
            chunks += [(channel, group[i : i + size]) for i in range(0, len(group), size)]
        results = await asyncio.gather(*(self._send(ch, chunk) for ch, chunk in chunks))
        return [
            (d, r)
            for (_, chunk), rs in zip(chunks, results, strict=True)
            for d, r in zip(chunk, rs, strict=True)
        ]

    async def _finalise(
        self, records: Sequence[messages.Outcome], decided: Sequence[messages.Outcome]
    ) -> None:
        """Record the sends' outcomes, retrying while Postgres is unavailable: the sends
        happened, and handling the batch again would only wait out the lease and send them
        twice. This commit is synchronous, and makes the claim's durable with it. If a row
        was not found claimed by us, Postgres may have lost the claim's transaction in a
        crash (it commits without waiting for the disk): the outcomes of the batch, those
        ``decided`` with the claims included, are written again where they were lost."""
        pause = 0.5
        while True:
            try:
                async with autocommit(self._engine) as conn:  # one statement, usually
                    if await messages.finalise(conn, records) < len(records):
                        lost = await messages.repair(conn, [*records, *decided])
                        if lost:
                            log.warning(
                                "claims lost by Postgres, outcomes written again", count=lost
                            )
                return
            except StoreUnavailable as exc:
                metrics.store_unavailable.labels(self.queue).inc()
                log.warning("finalise failed, retrying", error=str(exc), retry_in=pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 10.0)

    def _not_claimed(self, due: DueMessage, state: ItemState | None, now: datetime) -> Outcome:
        if state is None:
            return Reject(f"message_id: no message {due.message_id} for contact {due.contact_id}")
        if state.status.final:
            return DONE  # already recorded: a redelivery or a duplicate
        if state.paused:
            return DONE  # a paused campaign's: resume plans every unfinished recipient again
        if state.status is ItemStatus.SENDING:
            # Another worker holds it; come back when its lease runs out.
            lease_end = (state.claimed_at or now) + timedelta(
                seconds=self._settings.claim_lease_seconds
            )
            return Retry(max(1000, _ms((lease_end - now).total_seconds()) + 100))
        # deferred: the copy that deferred it may have died before publishing its retry
        if due.attempt == state.attempts:
            at = state.next_attempt_at or now
            nxt = DueMessage(
                message_id=due.message_id,
                contact_id=due.contact_id,
                deliver_at=at,
                attempt=state.attempts + 1,
            )
            return Retry(
                _ms((at - now).total_seconds()),
                contract.encode(nxt),
                due_message_id(due.message_id, due.contact_id, nxt.attempt),
            )
        return DONE  # a stale copy of an older attempt

    @staticmethod
    def _record(
        c: Claimed,
        status: ItemStatus,
        reason: str | None = None,
        error: str | None = None,
        next_at: datetime | None = None,
        *,
        failed: bool = False,
        version: int | None = None,
    ) -> messages.Outcome:
        return messages.Outcome(
            c.message_id,
            c.contact_id,
            c.attempts,
            status,
            reason,
            error,
            next_at,
            failed,
            version,
        )

    def _fact_statements(
        self, facts: _Facts, keys: Sequence[Key], mine: Sequence[Key]
    ) -> list[Statement]:
        """The statements that fetch the checks' facts about the contacts of ``keys``: what
        they were sent (``mine``, this batch's claims, left out), their interactions when a
        policy looks at any, and the exclusion events of their messages. Read by
        :meth:`_decide` in this order."""
        cids = [k[1] for k in keys]
        return [
            checks_repo.history_statement(cids, facts.window, mine),
            *(
                [checks_repo.interactions_statement(cids, facts.names, facts.interaction_window)]
                if facts.names
                else []
            ),
            checks_repo.exclusions_statement(keys, self._settings.exclusion_buffer_seconds),
        ]

    def _decide(
        self,
        claimed: Sequence[Claimed],
        policies: Mapping[str, Policy],
        facts: _Facts,
        rows: Sequence[Sequence[Any]],
        now: datetime,
    ) -> list[tuple[Claimed, Decision]]:
        """Decide every claimed recipient with the facts of the whole batch (``rows``, as
        :meth:`_fact_statements` asked for them)."""
        sent = checks_repo.history_from(rows[0])
        interactions = checks_repo.interactions_from(rows[1] if facts.names else [])
        excluded = checks_repo.exclusions_from(rows[-1])
        out: list[tuple[Claimed, Decision]] = []
        for c in claimed:
            key = (c.message_id, c.contact_id)
            d = checks.decide(
                c,
                policies[c.priority],
                now,
                excluded_by=excluded.get(key),
                interactions=interactions[c.contact_id],
                sent=sent[c.contact_id],
            )
            if isinstance(d, Send) and c.channel not in self._channels:
                d = Record(
                    ItemStatus.FAILED,
                    f"channel: {c.channel!r} is not configured on this worker "
                    f"(configured: {', '.join(sorted(self._channels))})",
                )
            if isinstance(d, Send):  # later recipients in this batch see this send
                sent[c.contact_id].append(Sent(now, c.channel, c.category))
            out.append((c, d))
        return out

    def _retry_at(self, c: Claimed, at: datetime, now: datetime) -> Retry:
        """Come back at ``at`` as the next attempt of this recipient."""
        nxt = DueMessage(
            message_id=c.message_id, contact_id=c.contact_id, deliver_at=at, attempt=c.attempts + 1
        )
        return Retry(
            _ms((at - now).total_seconds()),
            contract.encode(nxt),
            due_message_id(c.message_id, c.contact_id, nxt.attempt),
        )

    @staticmethod
    def _delivery(c: Claimed, content: Rendered) -> Delivery:
        return Delivery(
            message_id=c.message_id,
            contact_id=c.contact_id,
            key=c.idempotency_key,
            external_id=c.external_id,
            template=c.template,
            channel=c.channel,
            category=c.category,
            priority=c.priority,
            data=c.data,
            deliver_at=c.deliver_at,
            attempt=c.attempts,
            content=content,
            email=c.email,
            phone=c.phone,
            attributes=c.attributes,
        )

    async def _send(self, channel: Channel, chunk: Sequence[_Delivery]) -> list[SendResult]:
        urgent = any(d.claimed.priority == Priority.TRANSACTIONAL for d in chunk)
        await self._limits.acquire(channel.name, len(chunk), urgent=urgent)
        started = time.monotonic()
        try:
            results = await channel.send([d.delivery for d in chunk])
        except Exception as exc:  # a channel bug must not lose the batch
            log.exception(
                "channel crashed",
                channel=channel.name,
                message_ids=[d.claimed.message_id for d in chunk],
            )
            results = [SendResult(Verdict.TRANSIENT, f"channel crashed: {exc!r}")] * len(chunk)
        metrics.send_latency.labels(channel.name).observe(time.monotonic() - started)
        return results

    def _after_send(
        self, c: Claimed, result: SendResult, version: int
    ) -> tuple[messages.Outcome, Retry | None]:
        """The outcome of a send of template ``version``, and when to try again."""
        if result.verdict is Verdict.SENT:
            return self._record(c, ItemStatus.SENT, version=version), None
        if result.verdict is Verdict.UNSENDABLE:  # nothing was tried: not a failed send
            return self._record(c, ItemStatus.FAILED, result.error, version=version), None
        if result.verdict is Verdict.PERMANENT:
            return self._record(
                c,
                ItemStatus.FAILED,
                "permanent: receiver refused",
                result.error,
                failed=True,
                version=version,
            ), None
        failures = c.failures + 1
        if failures >= self._settings.max_attempts:
            return self._record(
                c,
                ItemStatus.FAILED,
                f"attempts: gave up after {failures} failed sends",
                result.error,
                failed=True,
                version=version,
            ), None
        wait = backoff(
            failures,
            self._settings.retry_base_seconds,
            self._settings.retry_max_seconds,
            result.retry_after,
        )
        now = datetime.now(UTC)
        at = now + timedelta(seconds=wait)
        return (
            self._record(
                c,
                ItemStatus.DEFERRED,
                f"retry: after {failures} failed sends",
                result.error,
                at,
                failed=True,
                version=version,
            ),
            self._retry_at(c, at, now),
        )
