"""The ``dispatch`` role: delivers due messages from ``nudge.due``, each exactly once.

A batch goes through these phases, each a method of :class:`DispatchHandler`: read (claim
the recipients' ``message_items`` rows with every fact the checks need, one round trip),
decide (the checks, pure), record (the decisions not to send, committed with the claims),
render, send (concurrently through the channels), finalise (every send's outcome in one
statement), count (metrics). The row is claimed before the send and finalised after it, so
a redelivered AMQP message never sends twice, and a worker that dies between the two leaves
a ``sending`` row whose lease runs out and is claimed again.
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

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import contract
from shared.amqp import Incoming
from shared.contract import DueBatch, DueMessage, Priority, due_message_id
from shared.errors import InvalidTemplate, StoreUnavailable
from shared.topology import DUE_DESTINATION, DUE_QUEUE
from workers import checks
from workers.channels import Delivery, Sender, SendResult, Verdict
from workers.checks import Decision, Defer, Record, Send
from workers.config import Settings
from workers.ratelimit import Limits
from workers.reasons import Reason, ReasonRule
from workers.recipients import Claimed, ItemOutcome, ItemState, ItemStatus, Key, Sent
from workers.runtime import metrics
from workers.runtime.consumer import Bundle
from workers.runtime.outcomes import DONE, Outcome, Reject, Retry
from workers.store import claims, messages
from workers.store.claims import ClaimedBatch, Lookback
from workers.store.db import Pipelined, autocommit, pipelined
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


def _due_message_id(due: DueMessage) -> str:
    return due_message_id(due.message_id, due.contact_id, due.attempt)


def _first_copies(batch: Sequence[DueMessage]) -> list[tuple[int, int, int]]:
    """(message_id, contact_id, attempt) of each recipient's first copy in the batch: a second
    copy is dropped, the first carries the work."""
    first: dict[Key, int] = {}
    for due in batch:
        first.setdefault((due.message_id, due.contact_id), due.attempt)
    return [(m, c, attempt) for (m, c), attempt in first.items()]


@dataclass(frozen=True)
class _Prepared:
    """A claimed recipient and the delivery rendered for it."""

    claimed: Claimed
    delivery: Delivery


class _Phases:
    """When each phase of a batch ended; observed as metrics, and logged for a slow batch."""

    def __init__(self) -> None:
        self._marks = [("start", time.perf_counter())]

    def mark(self, phase: str) -> None:
        self._marks.append((phase, time.perf_counter()))

    def since(self, phase: str) -> float:
        """Seconds from the end of ``phase`` to the last mark."""
        return self._marks[-1][1] - dict(self._marks)[phase]

    def seconds(self) -> dict[str, float]:
        return {phase: at - before for (_, before), (phase, at) in pairwise(self._marks)}

    def observe(self, size: int) -> None:
        phases = self.seconds()
        for phase, seconds in phases.items():
            metrics.dispatch_phase.labels(phase).observe(seconds)
        if sum(phases.values()) > SLOW_BATCH_SECONDS:
            log.warning(
                "slow batch",
                size=size,
                **{f"{k}_ms": round(v * 1000, 1) for k, v in phases.items()},
            )


class DispatchHandler:
    """Claims, checks, renders, delivers and records due messages from one due queue.

    A worker runs one handler per due queue (bulk and transactional), sharing the channels,
    the rate limits and the template cache."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        channels: Mapping[str, Sender],
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
        #: How far back the last batch's policies look, and so the next batch's facts (nothing
        #: before the first batch: it asks a second time).
        self._asked = Lookback()

    def decode(self, message: Incoming) -> DueMessage | Bundle[DueMessage]:
        due = contract.decode_due(message.body, content_type=message.content_type)
        if isinstance(due, DueBatch):
            return Bundle(due.due, contract.encode, _due_message_id)
        return due

    def due_at(self, item: DueMessage) -> datetime | None:
        return item.deliver_at

    async def handle(self, batch: Sequence[DueMessage]) -> Sequence[Outcome]:
        phases = _Phases()
        async with pipelined(self._engine) as tx:
            read = await self._read(tx, _first_copies(batch), phases)
            now = datetime.now(UTC)
            decisions = self._decide(read, now, phases)
            decided, sends = await self._record(tx, decisions)
        phases.mark("commit")
        prepared, unrendered = await asyncio.to_thread(self._render, sends, read.templates)
        sent = await self._send_all(prepared)
        phases.mark("send")
        finished, retries = self._after_sends(sent)
        recorded = await self._finalise([*unrendered, *finished], decided)
        phases.mark("finalise")
        phases.observe(len(batch))
        self._count(read.claimed, [*decided, *recorded])
        return self._outcomes(batch, read, decisions, retries, now)

    async def _read(
        self, tx: Pipelined, wanted: Sequence[tuple[int, int, int]], phases: _Phases
    ) -> ClaimedBatch:
        """Claim the batch with every fact its decisions read: one round trip, two when rows
        were left unclaimed or the policies look further back than the last batch's did."""
        read = await claims.claim(
            tx,
            wanted,
            lease_seconds=self._settings.claim_lease_seconds,
            max_takeovers=self._settings.max_takeovers,
            exclusion_buffer_seconds=self._settings.exclusion_buffer_seconds,
            asked=self._asked,
        )
        phases.mark("claim")
        self._asked = read.lookback
        if not read.complete:
            read = await claims.recheck(
                tx, read, exclusion_buffer_seconds=self._settings.exclusion_buffer_seconds
            )
            phases.mark("recheck")
        return read

    def _decide(
        self, read: ClaimedBatch, now: datetime, phases: _Phases
    ) -> list[tuple[Claimed, Decision]]:
        """Decide every claimed recipient with the facts of the whole batch; a send counts in
        the history of the recipients decided after it."""
        sent: dict[int, list[Sent]] = {}
        out: list[tuple[Claimed, Decision]] = []
        for c in read.claimed:
            history = sent.get(c.contact_id)
            if history is None:
                history = sent[c.contact_id] = list(read.history.get(c.contact_id, ()))
            d = checks.decide(
                c,
                read.policies[c.priority],
                now,
                excluded_by=read.exclusions.get((c.message_id, c.contact_id)),
                interactions=read.interactions.get(c.contact_id, ()),
                sent=history,
            )
            if isinstance(d, Send):
                d = self._after_events(c, read, now) or d
            if isinstance(d, Send) and c.channel not in self._channels:
                d = Record(
                    ItemStatus.FAILED,
                    Reason(
                        ReasonRule.CHANNEL,
                        f"{c.channel!r} is not configured on this worker "
                        f"(configured: {', '.join(sorted(self._channels))})",
                    ),
                )
            if isinstance(d, Send):
                history.append(Sent(now, c.channel, c.category))
            out.append((c, d))
        phases.mark("decide")
        metrics.check_seconds.inc(phases.since("claim"))
        metrics.checked.inc(len(read.claimed))
        return out

    def _after_events(self, c: Claimed, read: ClaimedBatch, now: datetime) -> Defer | None:
        """A send of a message that lists exclusion events waits until the events role has
        recorded every event published before it was due (``read.events_recorded_until``
        has only those recipients: the others are not delayed)."""
        key = (c.message_id, c.contact_id)
        if key not in read.events_recorded_until:
            return None
        return checks.await_events(
            c, read.events_recorded_until[key], now, self._settings.events_wait_seconds
        )

    async def _record(
        self, tx: Pipelined, decisions: Sequence[tuple[Claimed, Decision]]
    ) -> tuple[list[ItemOutcome], list[Claimed]]:
        """Record the decisions not to send (final, or deferred) with the claims, and commit;
        returns them and the recipients to send to. With sends to come, the commit does not
        wait for the disk (a stall there is the largest part of the batch's tail): the
        finalise after the sends commits synchronously, and repairs what a Postgres crash in
        between lost."""
        decided: list[ItemOutcome] = []
        sends: list[Claimed] = []
        for c, d in decisions:
            if isinstance(d, Send):
                sends.append(c)
            elif isinstance(d, Defer):
                decided.append(_outcome(c, ItemStatus.DEFERRED, d.reason, next_at=d.until))
            else:
                decided.append(_outcome(c, d.status, d.reason))
        await claims.commit(tx, decided, durable=not sends)
        return decided, sends

    def _after_sends(
        self, sent: Sequence[tuple[_Prepared, SendResult]]
    ) -> tuple[list[ItemOutcome], dict[Key, Retry]]:
        """The outcome of each send, and when to try again those that failed for now."""
        done_at = datetime.now(UTC)
        finished: list[ItemOutcome] = []
        retries: dict[Key, Retry] = {}
        for p, result in sent:
            c = p.claimed
            outcome, retry = self._after_send(c, result, p.delivery.content.version)
            finished.append(outcome)
            if retry is not None:
                retries[(c.message_id, c.contact_id)] = retry
            if outcome.status is ItemStatus.SENT:
                metrics.lateness.labels(c.channel).observe(
                    max(0.0, (done_at - c.deliver_at).total_seconds())
                )
        return finished, retries

    @staticmethod
    def _count(claimed: Sequence[Claimed], outcomes: Sequence[ItemOutcome]) -> None:
        """Count the batch's recorded outcomes by channel, status and the rule of the reason."""
        channel_of = {(c.message_id, c.contact_id): c.channel for c in claimed}
        counted = Counter(
            (
                channel_of[(o.message_id, o.contact_id)],
                o.status.value,
                "" if o.reason is None else o.reason.rule.value,
            )
            for o in outcomes
        )
        for labels, n in counted.items():
            metrics.outcomes.labels(*labels).inc(n)

    def _outcomes(
        self,
        batch: Sequence[DueMessage],
        read: ClaimedBatch,
        decisions: Sequence[tuple[Claimed, Decision]],
        retries: Mapping[Key, Retry],
        now: datetime,
    ) -> list[Outcome]:
        """What becomes of each due message of the batch: done, unless its recipient comes
        back later (deferred, a send failed for now, another worker holds it) or does not
        exist. A second copy in the same batch is done: the first copy carried the work."""
        later: dict[Key, Outcome] = {
            (c.message_id, c.contact_id): self._retry_at(c, d.until, now)
            for c, d in decisions
            if isinstance(d, Defer)
        }
        later.update(retries)
        out: list[Outcome] = []
        seen: set[Key] = set()
        for due in batch:
            key = (due.message_id, due.contact_id)
            if key in seen:
                out.append(DONE)
            elif key in read.unclaimed:
                out.append(self._not_claimed(due, read.unclaimed[key], now))
            else:
                out.append(later.get(key, DONE))
            seen.add(key)
        return out

    def _render(
        self, sends: Sequence[Claimed], stored: Mapping[str, StoredTemplate]
    ) -> tuple[list[_Prepared], list[ItemOutcome]]:
        """Render each recipient's message; a missing template or a failed render fails that
        recipient with the reason, never the batch."""
        prepared: list[_Prepared] = []
        failed: list[ItemOutcome] = []
        for c in sends:
            template = stored.get(c.template)
            if template is None:
                failed.append(
                    _outcome(
                        c,
                        ItemStatus.FAILED,
                        Reason(
                            ReasonRule.TEMPLATE,
                            f"no template named {c.template!r} (add it with `nudge template add`)",
                        ),
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
                # the renderer's reason reads "template: <name> v<version> <part>: <error>"
                reason = Reason(
                    ReasonRule.TEMPLATE, exc.reason.removeprefix(f"{ReasonRule.TEMPLATE}: ")
                )
                failed.append(_outcome(c, ItemStatus.FAILED, reason, version=template.version))
                continue
            prepared.append(_Prepared(c, self._delivery(c, content)))
        return prepared, failed

    async def _send_all(self, prepared: Sequence[_Prepared]) -> list[tuple[_Prepared, SendResult]]:
        """Send every delivery through its channel, as many requests as the channel's batch
        size asks, all concurrently, each waiting its turn under the channel's rate limit."""
        by_channel: dict[str, list[_Prepared]] = {}
        for p in prepared:
            by_channel.setdefault(p.claimed.channel, []).append(p)
        chunks: list[tuple[Sender, list[_Prepared]]] = []
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
        self, finished: Sequence[ItemOutcome], decided: Sequence[ItemOutcome]
    ) -> list[ItemOutcome]:
        """Record the sends' outcomes (see :meth:`_finalise_batch`); returns those recorded.
        When recording them raises anything but an outage (a value Postgres refuses, a
        constraint, a trigger), each is recorded alone, and one that still raises is recorded
        ``failed`` with the reason ``record`` naming the error: one recipient's outcome, never
        a batch that crashes and is handled again after its lease, sending twice."""
        try:
            await self._finalise_batch(finished, decided)
            return list(finished)
        except Exception as exc:
            if len(finished) == 1:
                return [await self._record_failure(finished[0], decided, exc)]
            log.warning("finalise failed, recording each outcome alone", error=repr(exc))
        return [o for one in finished for o in await self._finalise([one], decided)]

    async def _record_failure(
        self, outcome: ItemOutcome, decided: Sequence[ItemOutcome], exc: Exception
    ) -> ItemOutcome:
        """Record ``outcome``'s recipient ``failed`` because recording ``outcome`` raised
        ``exc``; if even that cannot be recorded, log it (the row stays ``sending``, and its
        lease cap ends it)."""
        failed = ItemOutcome(
            outcome.message_id,
            outcome.contact_id,
            outcome.attempts,
            ItemStatus.FAILED,
            Reason(
                ReasonRule.RECORD,
                f"{_error_class(exc)} while recording the outcome {outcome.status}",
            ),
            str(exc),
            None,
            outcome.failed,
            outcome.template_version,
        )
        log.warning(
            "outcome could not be recorded, recipient failed",
            message_id=outcome.message_id,
            contact_id=outcome.contact_id,
            error=repr(exc),
        )
        try:
            await self._finalise_batch([failed], decided)
        except Exception:
            log.exception(
                "failure could not be recorded either",
                message_id=outcome.message_id,
                contact_id=outcome.contact_id,
            )
        return failed

    async def _finalise_batch(
        self, finished: Sequence[ItemOutcome], decided: Sequence[ItemOutcome]
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
                    if await messages.finalise(conn, finished) < len(finished):
                        lost = await messages.repair(conn, [*finished, *decided])
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
        if state is None:  # no row, and the claim would not create one: not its recipient
            return Reject(
                f"due: contact {due.contact_id} is not a recipient of message {due.message_id}"
            )
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

    async def _send(self, channel: Sender, chunk: Sequence[_Prepared]) -> list[SendResult]:
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
    ) -> tuple[ItemOutcome, Retry | None]:
        """The outcome of a send of template ``version``, and when to try again."""
        if result.verdict is Verdict.SENT:
            return _outcome(c, ItemStatus.SENT, version=version), None
        if result.verdict is Verdict.UNSENDABLE:  # nothing was tried: not a failed send
            error = result.error or "the channel cannot send to this contact"
            reason = Reason.parse(error) or Reason(ReasonRule.CHANNEL, error)
            return _outcome(c, ItemStatus.FAILED, reason, version=version), None
        if result.verdict is Verdict.PERMANENT:
            return _outcome(
                c,
                ItemStatus.FAILED,
                Reason(ReasonRule.PERMANENT, "receiver refused"),
                result.error,
                failed=True,
                version=version,
            ), None
        failures = c.failures + 1
        if failures >= self._settings.max_attempts:
            return _outcome(
                c,
                ItemStatus.FAILED,
                Reason(ReasonRule.ATTEMPTS, f"gave up after {failures} failed sends"),
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
            _outcome(
                c,
                ItemStatus.DEFERRED,
                Reason(ReasonRule.RETRY, f"after {failures} failed sends"),
                result.error,
                at,
                failed=True,
                version=version,
            ),
            self._retry_at(c, at, now),
        )


def _error_class(exc: BaseException) -> str:
    """The class of the error behind ``exc``: the driver's (``CheckViolation``,
    ``DataError``) rather than the store's wrapper."""
    cause = exc.__cause__ or exc
    return type(getattr(cause, "orig", None) or cause).__name__


def _outcome(
    c: Claimed,
    status: ItemStatus,
    reason: Reason | None = None,
    error: str | None = None,
    next_at: datetime | None = None,
    *,
    failed: bool = False,
    version: int | None = None,
) -> ItemOutcome:
    """What the claimed recipient ``c``'s row is finalised with."""
    return ItemOutcome(
        c.message_id, c.contact_id, c.attempts, status, reason, error, next_at, failed, version
    )
