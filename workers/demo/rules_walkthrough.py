"""The rules part of ``nudge demo``: the service node matrix of
``examples/rules/service-matrix.yaml`` is loaded (its templates created if missing), a demo
contact goes through every stage, and the demo prints when each rule's message falls due.
Those are 15 minutes to a month away, so the demo then cancels them."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Engine, select

from producer import Producer
from workers.config import Settings
from workers.durations import format_duration
from workers.rules import definitions as rules
from workers.rules import firing
from workers.rules.delay_policies import ContactFacts
from workers.store import messages as messages_repo
from workers.store import rules as rules_repo
from workers.store import templates
from workers.store.schema import messages

MATRIX = Path(__file__).resolve().parents[2] / "examples/rules/service-matrix.yaml"
#: The stage each row's event stands for, in the matrix's order.
STAGES = {
    "resource_downloaded": "pre-sale",
    "order_paid": "sale",
    "service_completed": "after-sale",
    "login": "churn warning",
}


def run_rules_demo(settings: Settings, engine: Engine, run: str) -> bool:
    """Load the matrix, fire every row for one contact, print the delays; True when each row
    scheduled its template after the matrix's delay."""
    parsed = rules.parse(MATRIX.read_text(encoding="utf-8"), str(MATRIX.name))
    with engine.begin() as conn:
        for name in sorted(templates.missing(conn, {r.template for r in parsed.rules})):
            templates.add(conn, name, f"{name} for {{{{ contact.id }}}}", name, None)
        rules_repo.put(conn, parsed.rules)
    contact = f"demo-{run}-matrix"
    occurred = datetime.now(UTC)
    with Producer(settings.amqp_url, name="nudge-demo") as producer:
        for event in STAGES:
            producer.track(contact, event, occurred_at=occurred, event_id=f"{contact}-{event}")
    # every event also schedules a churn check: all of them, the matrix rows among them
    fired = {
        firing.message_key(r.name, f"{contact}-{event}"): (STAGES[event], r)
        for r in parsed.rules
        for event in STAGES
        if event in r.event
    }
    wanted = {k: v for k, v in fired.items() if v[1].inactive_for is None or "login" in k}
    found = _wait_rows(engine, list(fired), deadline=time.monotonic() + 30)
    click.echo(f"rules: {MATRIX.name} loaded; {contact} went through every stage")
    click.echo(f"{'stage':<14} {'rule':<22} {'template':<20} {'due after':>9}")
    ok = len(found) == len(fired)
    for key, (stage, rule) in wanted.items():
        row = found.get(key)
        after = format_duration(row.deliver_at - occurred) if row else "-"
        expected = rule.plan(occurred, ContactFacts({}, None)).deliver_at - occurred
        ok &= row is not None and row.deliver_at - occurred == expected
        click.echo(f"{stage:<14} {rule.name:<22} {rule.template:<20} {after:>9}")
    with engine.begin() as conn:
        for row in found.values():
            messages_repo.cancel(conn, row.id)
    click.echo(f"rules: cancelled the {len(found)} pending matrix messages (the demo cannot wait)")
    return ok


def _wait_rows(engine: Engine, keys: list[str], deadline: float) -> dict[str, Any]:
    query = select(messages.c.id, messages.c.idempotency_key, messages.c.deliver_at).where(
        messages.c.idempotency_key.in_(keys)
    )
    while True:
        with engine.connect() as conn:
            found = {r.idempotency_key: r for r in conn.execute(query)}
        if len(found) == len(keys) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)
