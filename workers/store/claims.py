"""A dispatch batch's reads and its first writes, in as few round trips as the work allows.

One pipeline locks the batch's contacts (their checks and claims are serialised across every
worker, so caps hold under concurrency), claims their rows, and reads every fact the decisions
and the rendering need, asked for every recipient before knowing which are claimed. Rarely a
second pipeline asks again (:func:`recheck`). Only this module knows which statements travel
together and in what order; dispatch reads the :class:`ClaimedBatch` they build.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from workers.policies import Policy
from workers.recipients import Claimed, Event, ItemOutcome, ItemState, Key, Sent
from workers.store import checks, messages, policies, templates, watermarks
from workers.store.db import Pipelined, Statement
from workers.store.templates import StoredTemplate


@dataclass(frozen=True)
class Lookback:
    """How far back the checks look, over every policy: the send history's window, and the
    interaction events with theirs. A batch's facts are asked for with the claim, before its
    policies are read, so dispatch asks with those of the batch before; :meth:`covers` says
    whether that was enough."""

    window: float = 0.0
    names: tuple[str, ...] = ()
    interaction_window: float = 0.0

    @classmethod
    def of(cls, policies: Mapping[str, Policy]) -> Lookback:
        used = policies.values()
        return cls(
            window=max(
                max(p.frequency_window_seconds, p.category_window_seconds or 0) for p in used
            ),
            names=tuple(sorted({n for p in used for n in p.interaction_events})),
            interaction_window=max(p.interaction_window_seconds for p in used),
        )

    def covers(self, other: Lookback) -> bool:
        """Facts fetched as ``self`` include all that ``other`` needs."""
        return (
            self.window >= other.window
            and set(other.names) <= set(self.names)
            and (not other.names or self.interaction_window >= other.interaction_window)
        )


@dataclass(frozen=True)
class ClaimedBatch:
    """A batch of due recipients as dispatch reads it: the rows it claimed and what their
    decisions and rendering need, for the whole batch."""

    #: The recipients asked for, (message_id, contact_id) without duplicates.
    keys: Sequence[Key]
    claimed: Sequence[Claimed]
    #: The recipients not claimed, and the state of their row (None: no such message or
    #: contact). Read by :func:`recheck`: empty until then.
    unclaimed: Mapping[Key, ItemState | None]
    #: The policy of every priority class.
    policies: Mapping[str, Policy]
    #: The newest version of each template the batch's messages name.
    templates: Mapping[str, StoredTemplate]
    #: Per contact: what it was sent within the window, and what other workers send it now.
    history: Mapping[int, Sequence[Sent]]
    #: Per contact: the latest of each interaction event a policy looks at, in its window.
    interactions: Mapping[int, Sequence[Event]]
    #: Per recipient whose message lists exclusion events: the first such event in scope.
    exclusions: Mapping[Key, Event]
    #: Per recipient whose message lists exclusion events: until when every event published
    #: to ``nudge.events`` is recorded (None: no events consumer is alive).
    events_recorded_until: Mapping[Key, datetime | None]
    #: How far back ``history`` and ``interactions`` look.
    asked: Lookback

    @property
    def lookback(self) -> Lookback:
        """How far back this batch's policies look."""
        return Lookback.of(self.policies)

    @property
    def complete(self) -> bool:
        """Every recipient is claimed and the facts look back far enough; else the batch
        needs a :func:`recheck`."""
        return len(self.claimed) + len(self.unclaimed) == len(self.keys) and self.asked.covers(
            self.lookback
        )


async def claim(
    tx: Pipelined,
    wanted: Sequence[tuple[int, int, int]],
    *,
    lease_seconds: float,
    max_takeovers: int,
    exclusion_buffer_seconds: float,
    asked: Lookback,
) -> ClaimedBatch:
    """Lock, claim ``wanted`` ((message_id, contact_id, attempt) without duplicate
    recipients), and read the policies, the templates and the facts looking back as far as
    ``asked``: one round trip."""
    keys = [(w[0], w[1]) for w in wanted]
    _locked, claimed, stored_policies, stored_templates, recorded, *facts = await tx.run(
        [
            checks.lock_statement([k[1] for k in keys]),
            messages.claim_statement(wanted, lease_seconds, max_takeovers),
            policies.LOAD_ALL,
            templates.latest_of_messages_statement(k[0] for k in keys),
            watermarks.recorded_until_statement(keys),
            *_fact_statements(asked, keys, keys, exclusion_buffer_seconds),
        ]
    )
    history, interactions, exclusions = _facts_from(asked, facts)
    return ClaimedBatch(
        keys=keys,
        claimed=messages.claimed_from(claimed),
        unclaimed={},
        policies=policies.from_rows(stored_policies),
        templates=templates.latest_from(stored_templates),
        history=history,
        interactions=interactions,
        exclusions=exclusions,
        events_recorded_until=watermarks.recorded_until_from(recorded),
        asked=asked,
    )


async def recheck(
    tx: Pipelined, batch: ClaimedBatch, *, exclusion_buffer_seconds: float
) -> ClaimedBatch:
    """Rare: a redelivery or a race left rows unclaimed (their state decides the outcome,
    and their sends count in the history), or the policies changed. Read the unclaimed
    rows' states and ask for the facts again, as far back as the batch's policies look:
    one more round trip."""
    mine = {(c.message_id, c.contact_id) for c in batch.claimed}
    rest = [k for k in batch.keys if k not in mine]
    asked = batch.lookback
    statements = _fact_statements(asked, batch.keys, sorted(mine), exclusion_buffer_seconds)
    found: dict[Key, ItemState] = {}
    if rest:
        states, *facts = await tx.run([messages.states_statement(rest), *statements])
        found = messages.states_from(states)
    else:
        facts = await tx.run(statements)
    history, interactions, exclusions = _facts_from(asked, facts)
    return ClaimedBatch(
        keys=batch.keys,
        claimed=batch.claimed,
        unclaimed={k: found.get(k) for k in rest},
        policies=batch.policies,
        templates=batch.templates,
        history=history,
        interactions=interactions,
        exclusions=exclusions,
        events_recorded_until=batch.events_recorded_until,
        asked=asked,
    )


async def commit(tx: Pipelined, decided: Sequence[ItemOutcome], *, durable: bool) -> None:
    """Record the outcomes decided without a send (final, or deferred) and commit the claims
    with them, in one round trip. ``durable=False`` when sends follow: see
    :meth:`Pipelined.run`, and :func:`messages.repair`."""
    await tx.run(
        [messages.finalise_statement(decided)] if decided else [], commit=True, durable=durable
    )


def _fact_statements(
    asked: Lookback, keys: Sequence[Key], mine: Sequence[Key], exclusion_buffer_seconds: float
) -> list[Statement]:
    """The statements that fetch the checks' facts about the contacts of ``keys``: what
    they were sent (``mine``, this batch's claims, left out), their interactions when a
    policy looks at any, and the exclusion events of their messages. Read by
    :func:`_facts_from` in this order."""
    cids = [k[1] for k in keys]
    return [
        checks.history_statement(cids, asked.window, mine),
        *(
            [checks.interactions_statement(cids, asked.names, asked.interaction_window)]
            if asked.names
            else []
        ),
        checks.exclusions_statement(keys, exclusion_buffer_seconds),
    ]


def _facts_from(
    asked: Lookback, rows: Sequence[Sequence[Any]]
) -> tuple[dict[int, list[Sent]], dict[int, list[Event]], dict[Key, Event]]:
    """The history, interactions and exclusions :func:`_fact_statements` fetched."""
    return (
        checks.history_from(rows[0]),
        checks.interactions_from(rows[1] if asked.names else []),
        checks.exclusions_from(rows[-1]),
    )
