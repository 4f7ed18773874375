"""Rule files: the matrix example is valid, and every problem in a file is reported with the
file, line, rule and field that caused it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from workers.rules.definitions import parse
from workers.rules.delay_policies import Absolute, ContactFacts

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples/rules/service-matrix.yaml"
FAST = ROOT / "tests/rules/service-matrix-fast.yaml"
DURATIONS = {"after", "inactive_for", "expires_after"}


def _without_durations(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: None if k in DURATIONS else _without_durations(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_without_durations(v) for v in doc]
    return doc


def test_the_example_matrix_has_one_rule_per_stage_with_the_matrix_delays() -> None:
    rules = {r.name: r for r in parse(EXAMPLE.read_text(), str(EXAMPLE)).rules}
    t0 = datetime(2026, 6, 1, tzinfo=UTC)
    facts = ContactFacts({}, None)
    delays = {name: r.plan(t0, facts).deliver_at - t0 for name, r in rules.items()}
    assert delays == {
        "pre-sale-usage-guide": timedelta(minutes=15),
        "sale-shipping-status": timedelta(hours=2),
        "after-sale-survey": timedelta(days=7),
        "churn-warning": timedelta(days=30, hours=24),
    }
    churn = rules["churn-warning"]
    assert set(churn.exclude_events) == set(churn.event), "inactivity excludes its own trigger"


def test_the_fast_matrix_used_by_the_tests_differs_from_the_example_only_in_durations() -> None:
    example = parse(EXAMPLE.read_text()).rules
    fast = parse(FAST.read_text()).rules
    assert [_without_durations(r.definition()) for r in fast] == [
        _without_durations(r.definition()) for r in example
    ]


def _problems(text: str) -> list[str]:
    with pytest.raises(ValueError, match=r".") as caught:
        parse(text, "r.yaml")
    return str(caught.value).splitlines()


RULE = """rules:
  - name: welcome
    event: signed_up
    delay: {delay}
    template: welcome
    channel: webhook
"""


def test_a_negative_delay_names_the_line_rule_and_field() -> None:
    assert _problems(RULE.format(delay="-15m")) == [
        "r.yaml line 4: rule 'welcome', field delay: '-15m' is negative: a delay counts "
        "forward, e.g. 15m"
    ]


def test_an_unknown_policy_names_the_policy_line_and_the_valid_ones() -> None:
    text = RULE.format(delay="\n      policy: weekly\n      after: 1h")
    assert _problems(text) == [
        "r.yaml line 5: rule 'welcome', field delay.policy: unknown policy 'weekly': use one of "
        "fixed, contact, absolute"
    ]


def test_bad_yaml_names_the_line() -> None:
    assert _problems("rules:\n  - name: a\n    event: [x\n  - name: b\n") == [
        "r.yaml line 4: bad YAML: expected ',' or ']', but got ':'"
    ]
    assert _problems("rules:\n  - name: a\n\tevent: x\n") == [
        "r.yaml line 3: bad YAML: found character '\\t' that cannot start any token"
    ]


def test_every_problem_of_a_file_is_reported_at_once() -> None:
    text = """rules:
  - name: one
    event: a
    delay: 1x
    template: t
    channel: fax
  - name: two
    delay: 5m
    template: t
    channel: log
    colour: red
  - name: one
    event: a
    delay: 5m
    template: t
    channel: log
"""
    assert _problems(text) == [
        "r.yaml line 4: rule 'one', field delay: '1x' is not a duration: use a number and "
        "one of ms, s, m, h, d, w (e.g. 500ms, 15m, 2h, 7d)",
        "r.yaml line 6: rule 'one', field channel: Input should be 'webhook', 'log' or 'email'",
        "r.yaml line 7: rule 'two', field event: required",
        "r.yaml line 11: rule 'two', field colour: unknown field",
        "r.yaml line 12: rule 'one', field name: duplicate, first at line 2",
    ]


def test_yaml_1_1_surprises_stay_strings() -> None:
    text = """rules:
  - name: morning
    event: on
    delay: {policy: absolute, at: 10:30}
    template: no
    channel: log
"""
    rule = parse(text).rules[0]
    assert rule.event == ("on",)
    assert rule.template == "no"
    assert isinstance(rule.delay, Absolute)
    assert rule.delay.at == "10:30"


def test_a_file_without_a_rules_list_says_what_a_rule_file_is() -> None:
    assert _problems("- name: a\n") == [
        "r.yaml line 1: a rule file is a mapping with a 'rules' list"
    ]
