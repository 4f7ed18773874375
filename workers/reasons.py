"""Why a recipient was not sent, or not yet: a :class:`ReasonRule` and a detail for people.

A reason is stored in ``message_items.reason`` and shown by ``nudge message show`` as
``rule: detail``; the rule alone is the ``reason`` label of ``nudge_outcomes_total`` and
tells the campaign auto-pause which outcomes were failed sends.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ReasonRule(enum.StrEnum):
    """What decided a recipient's outcome: a check, or how its send ended (docs/operations.md
    lists each with its status). Named apart from :class:`workers.rules.definitions.Rule`,
    the automation rules."""

    CANCELLED = "cancelled"
    EXPIRED = "expired"
    UNSUBSCRIBED = "unsubscribed"
    EXCLUDED = "excluded"
    #: The message lists exclusion events and the events role has not recorded every event
    #: published before it was due: deferred, not sent blind.
    EVENTS_BEHIND = "events_behind"
    INTERACTION = "interaction"
    CATEGORY = "category"
    FREQUENCY = "frequency"
    QUIET_HOURS = "quiet_hours"
    CHANNEL = "channel"
    #: The email channel could not even try: the contact has no email address.
    EMAIL = "email"
    TEMPLATE = "template"
    RETRY = "retry"
    PERMANENT = "permanent"
    ATTEMPTS = "attempts"
    #: The recipient's claim ran out of its lease too many times (its claimers died after
    #: the send, or before recording it): never sent again.
    LEASE = "lease"
    #: Recording the recipient's outcome raised an error (named in the detail).
    RECORD = "record"

    @property
    def failed_send(self) -> bool:
        """The recipient's send was tried and failed (the campaign auto-pause counts these)."""
        return self in _FAILED_SENDS


_FAILED_SENDS = frozenset({ReasonRule.RETRY, ReasonRule.PERMANENT, ReasonRule.ATTEMPTS})


@dataclass(frozen=True)
class Reason:
    """A rule and what, in particular, decided: the event, category, window or cap."""

    rule: ReasonRule
    detail: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.detail}"

    @classmethod
    def parse(cls, text: str) -> Reason | None:
        """The reason stored as ``text``; None when the text before its first colon is not
        a rule."""
        rule, sep, detail = text.partition(":")
        try:
            return cls(ReasonRule(rule), detail.removeprefix(" ")) if sep else None
        except ValueError:
            return None
