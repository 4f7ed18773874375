"""``nudge rules`` as an operator uses it: load a file, read what is stored, switch rules off
and on, and ask what a rule would do for a contact; a bad file is refused with the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.support import nudge
from workers.config import Settings
from workers.store import templates
from workers.store.schema import contact_events, contacts

ROOT = Path(__file__).resolve().parents[2]
MATRIX = ROOT / "examples/rules/service-matrix.yaml"
TEMPLATES = ("usage-guide", "shipping-status", "satisfaction-survey", "churn-offer")


def add_templates(engine: Engine, *names: str) -> None:
    with engine.begin() as conn:
        for name in names:
            templates.add(conn, name, f"{name} body", name, None)


RULE = """rules:
  - name: welcome
    event: signed_up
    delay: {delay}
    template: {template}
    channel: webhook
"""


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            RULE.format(delay="15m", template="no-such-template"),
            "rules.yaml line 5: rule 'welcome', field template: no template named "
            "'no-such-template'",
        ),
        (
            RULE.format(delay="-2h", template="welcome"),
            "rules.yaml line 4: rule 'welcome', field delay: '-2h' is negative",
        ),
        (
            RULE.format(delay="{policy: fortnightly}", template="welcome"),
            "rules.yaml line 4: rule 'welcome', field delay.policy: unknown policy "
            "'fortnightly': use one of fixed, contact, absolute",
        ),
        (
            RULE.format(delay="[15m", template="welcome"),
            "rules.yaml line 5: bad YAML: ",
        ),
    ],
    ids=["unknown template", "negative delay", "unknown policy", "bad YAML"],
)
def test_an_invalid_rule_file_is_refused_with_the_line_rule_and_field(
    settings: Settings, engine: Engine, tmp_path: Path, text: str, error: str
) -> None:
    add_templates(engine, "welcome")
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    done = nudge(settings, "rules", "load", str(path))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {path.parent}/{error}"), done.stderr
    assert nudge(settings, "rules", "list").stdout.startswith("no rules")


def test_an_operator_loads_the_matrix_lists_shows_disables_and_enables_a_rule(
    settings: Settings, engine: Engine
) -> None:
    add_templates(engine, *TEMPLATES)
    loaded = nudge(settings, "rules", "load", str(MATRIX))
    assert loaded.returncode == 0, loaded.stderr
    assert f"loaded 4 rules from {MATRIX}: 4 new, 0 updated, 0 unchanged" in loaded.stdout
    again = nudge(settings, "rules", "load", str(MATRIX), "--json")
    assert json.loads(again.stdout)["rules"] == {
        "after-sale-survey": "unchanged",
        "churn-warning": "unchanged",
        "pre-sale-usage-guide": "unchanged",
        "sale-shipping-status": "unchanged",
    }
    listed = nudge(settings, "rules", "list").stdout.splitlines()
    assert listed[0].split() == ["rule", "on", "event", "delay", "template", "channel"]
    assert listed[3].split()[:4] == ["pre-sale-usage-guide", "yes", "resource_downloaded", "15m"]
    assert "inactive 30d + 1d" in listed[2]
    shown = nudge(settings, "rules", "show", "sale-shipping-status", "--json")
    doc = json.loads(shown.stdout)
    assert doc["delay"] == {"policy": "fixed", "after": "2h"}
    assert doc["priority"] == "transactional"
    assert doc["unless"] == ["order_cancelled"]

    off = nudge(settings, "rules", "disable", "churn-warning")
    assert off.stdout.strip() == "churn-warning: disabled"
    nudge(settings, "rules", "load", str(MATRIX))  # a reload keeps it off
    rows = json.loads(nudge(settings, "rules", "list", "--json").stdout)
    assert {r["name"]: r["enabled"] for r in rows}["churn-warning"] is False
    assert nudge(settings, "rules", "enable", "churn-warning").returncode == 0
    rows = json.loads(nudge(settings, "rules", "list", "--json").stdout)
    assert all(r["enabled"] for r in rows)

    missing = nudge(settings, "rules", "show", "nope")
    assert missing.returncode == 4
    assert missing.stderr == "error: no rule named 'nope': see `nudge rules list`\n"
    assert nudge(settings, "rules", "disable", "nope").returncode == 4


def test_explain_prints_the_delay_the_contact_would_get_and_the_checks_now(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    add_templates(engine, "follow-up")
    path = tmp_path / "rules.yaml"
    path.write_text("""rules:
  - name: follow-up
    event: quote_requested
    delay:
      policy: contact
      base: {vip: 1h, normal: 2h}
      otherwise: 24h
      active: {events: [login], within: 24h, factor: 0.6}
      min: 30m
    template: follow-up
    channel: webhook
    unless: [order_paid]
""")
    assert nudge(settings, "rules", "load", str(path)).returncode == 0
    with engine.begin() as conn:
        [vip] = conn.execute(
            contacts.insert()
            .values(external_id="ann", attributes={"tier": "vip"}, subscribed=False)
            .returning(contacts.c.id)
        ).scalars()
        conn.execute(contacts.insert().values(external_id="bob", attributes={"tier": "gold"}))
        conn.execute(
            contact_events.insert().values(
                contact_id=vip,
                name="login",
                event_id="e-1",
                occurred_at=conn.exec_driver_sql("SELECT now() - interval '2 hours'").scalar(),
            )
        )

    ann = nudge(settings, "rules", "explain", "follow-up", "--contact", "ann")
    assert ann.returncode == 0, ann.stderr
    lines = ann.stdout.splitlines()
    assert lines[0] == "rule follow-up for contact ann"
    assert lines[1].startswith("delay: 36m (tier=vip: 1h; active at ")
    assert lines[1].endswith("(within 1d): x0.6 = 36m)")
    assert lines[4].split() == [
        "subscription",
        "fail",
        "suppressed:",
        "unsubscribed:",
        "the",
        "contact",
        "unsubscribed",
    ]
    assert lines[5].startswith("  exclusion     pass  only events after the trigger exclude")
    assert lines[-1] == "decision now: fail  suppressed: unsubscribed: the contact unsubscribed"

    bob = json.loads(
        nudge(settings, "rules", "explain", "follow-up", "--contact", "bob", "--json").stdout
    )
    assert bob["delay_seconds"] == 24 * 3600
    assert bob["why"] == "tier=gold, not in base: otherwise 1d; not active within 1d"
    assert {c["check"]: c["verdict"] for c in bob["checks"]} == {
        "subscription": "pass",
        "exclusion": "pass",
        "interaction": "pass",
        "category": "pass",
        "frequency": "pass",
        "quiet_hours": "pass",
    }
    assert bob["decision"]["verdict"] == "pass"

    nobody = nudge(settings, "rules", "explain", "follow-up", "--contact", "zed")
    assert nobody.returncode == 4
    assert "no contact 'zed'" in nobody.stderr
