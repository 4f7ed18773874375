"""Reasons are stored and shown as ``rule: detail``; the rules are the ones the docs list."""

from __future__ import annotations

import re
from pathlib import Path

from workers.reasons import Reason, ReasonRule

ROOT = Path(__file__).resolve().parents[2]


def test_a_reason_reads_as_its_rule_a_colon_and_its_detail() -> None:
    reason = Reason(ReasonRule.QUIET_HOURS, "22:00-08:00 in Europe/Paris, until 07:00")
    assert str(reason) == "quiet_hours: 22:00-08:00 in Europe/Paris, until 07:00"
    assert f"{reason}" == str(reason)


def test_a_stored_reason_parses_back_to_the_same_reason() -> None:
    for rule in ReasonRule:
        reason = Reason(rule, "at 2026-06-14T12:00:00+00:00: a detail with colons")
        assert Reason.parse(str(reason)) == reason


def test_text_that_does_not_begin_with_a_rule_has_no_reason() -> None:
    assert Reason.parse("auto-pause: 40 of the last 40 sends failed") is None
    assert Reason.parse("no colon at all") is None
    assert Reason.parse("") is None


def test_only_tried_and_failed_sends_count_as_failed_sends() -> None:
    failed = {rule for rule in ReasonRule if rule.failed_send}
    assert failed == {ReasonRule.RETRY, ReasonRule.PERMANENT, ReasonRule.ATTEMPTS}


def test_the_operations_guide_lists_exactly_the_rules_of_the_outcomes_metric() -> None:
    text = (ROOT / "docs/operations.md").read_text()
    after = text.split("The `reason` label of `nudge_outcomes_total`, by `status`:", 1)[1]
    table = after.split("\n\n", 2)[1].splitlines()
    header, rows = table[0], table[2:]  # between them, the |---| line
    assert header == "| status | `reason` | what decided |"
    # each row: a status, then the rule in backticks (``empty`` for a sent recipient)
    cells = [re.fullmatch(r"\| [^|]+ \| (?:`([a-z_]+)`|empty) \|.*", row) for row in rows]
    assert all(cells), f"a row of the table is not `| status | rule | ... |`: {rows}"
    documented = {m.group(1) for m in cells if m is not None and m.group(1)}
    assert documented == {rule.value for rule in ReasonRule}
