"""``nudge rules``: automation rules, loaded from a YAML file into Postgres."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from shared.errors import NotFound
from workers.cli.base import EXIT_INVALID, database, errors, load_settings, print_json
from workers.durations import format_duration

if TYPE_CHECKING:
    from workers.rules.definitions import Rule
    from workers.store.rules import StoredRule


def _invalid(problems: str) -> None:
    """Print every problem on its own ``error:`` line and exit 2."""
    for line in problems.splitlines():
        click.echo(f"error: {line}", err=True)
    sys.exit(EXIT_INVALID)


@click.group()
def rules() -> None:
    """Automation rules: on an event, after a delay, send a template (docs/rules.md)."""


@rules.command("load")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--check", is_flag=True, help="Validate only; store nothing.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rules_load(ctx: click.Context, file: Path, check: bool, as_json: bool) -> None:
    """Validate FILE and store its rules by name (rules it does not name are left as they
    are). Problems name the file, line, rule and field; any problem stores nothing (exit 2)."""
    from workers.rules import definitions as rules_mod
    from workers.store import rules as repo
    from workers.store import templates

    settings = load_settings(ctx)
    try:
        parsed = rules_mod.parse(file.read_text(encoding="utf-8"), str(file))
    except (ValueError, UnicodeDecodeError) as exc:
        _invalid(str(exc))
    changes: dict[str, str] = {}
    with errors(), database(settings, write=not check) as conn:
        problems = parsed.unknown_templates(
            templates.missing(conn, {r.template for r in parsed.rules})
        )
        if problems:
            _invalid("\n".join(problems))
        if not check:
            changes = dict(repo.put(conn, parsed.rules))
    if as_json:
        print_json(
            {
                "file": str(file),
                "stored": not check,
                "rules": changes or {r.name: "valid" for r in parsed.rules},
            }
        )
        return
    if check:
        click.echo(f"{file}: {len(parsed.rules)} rules valid")
        return
    counts = {k: sum(v == k for v in changes.values()) for k in ("new", "updated", "unchanged")}
    click.echo(
        f"loaded {len(changes)} rules from {file}: "
        + ", ".join(f"{n} {k}" for k, n in counts.items())
    )
    for name, change in changes.items():
        click.echo(f"  {name}: {change}")


def _delay(rule: Rule) -> str:
    d = rule.delay.model_dump(mode="json")
    text = d["after"] if d["policy"] == "fixed" else d["policy"]
    if rule.inactive_for is not None:
        return f"inactive {format_duration(rule.inactive_for)} + {text}"
    return str(text)


def _summary(s: StoredRule) -> dict[str, Any]:
    return {"name": s.rule.name, "enabled": s.enabled, "version": s.version, **s.rule.definition()}


@rules.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rules_list(ctx: click.Context, as_json: bool) -> None:
    """Every stored rule: trigger, delay, template, channel, and whether it is enabled."""
    from workers.store import rules as repo

    settings = load_settings(ctx)
    with errors(), database(settings) as conn:
        stored = repo.all_rules(conn)
    if as_json:
        print_json([_summary(s) for s in stored])
        return
    if not stored:
        click.echo("no rules: load some with `nudge rules load FILE`")
        return
    click.echo(f"{'rule':<24} {'on':<8} {'event':<28} {'delay':<20} {'template':<24} channel")
    for s in stored:
        r = s.rule
        click.echo(
            f"{r.name:<24} {'yes' if s.enabled else 'no':<8} {','.join(r.event):<28} "
            f"{_delay(r):<20} {r.template:<24} {r.channel.value}"
            + (" (once per contact)" if r.run_once else "")
        )


@rules.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rules_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """One rule as stored, with how many contacts a run-once rule has fired for."""
    import yaml

    from workers.store import rules as repo

    settings = load_settings(ctx)
    with errors(), database(settings) as conn:
        found = repo.get(conn, name)
        if found is None:
            raise NotFound(f"no rule named {name!r}: see `nudge rules list`")
        runs = repo.runs(conn, name) if found.rule.run_once else None
    doc = {**_summary(found), "updated_at": found.updated_at.isoformat(timespec="seconds")}
    if runs is not None:
        doc["contacts_fired"] = runs
    if as_json:
        print_json(doc)
        return
    click.echo(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).rstrip())


def _switch(ctx: click.Context, name: str, enabled: bool) -> None:
    from workers.store import rules as repo

    settings = load_settings(ctx)
    with errors(), database(settings, write=True) as conn:
        if not repo.set_enabled(conn, name, enabled):
            raise NotFound(f"no rule named {name!r}: see `nudge rules list`")
    click.echo(f"{name}: {'enabled' if enabled else 'disabled'}")


@rules.command("disable")
@click.argument("name")
@click.pass_context
def rules_disable(ctx: click.Context, name: str) -> None:
    """Stop NAME firing for new events (messages already scheduled still go out; cancel them
    with `nudge message cancel`). A reload of its file keeps it disabled unless the file
    says `enabled: true`."""
    _switch(ctx, name, False)


@rules.command("enable")
@click.argument("name")
@click.pass_context
def rules_enable(ctx: click.Context, name: str) -> None:
    """Let NAME fire again for new events."""
    _switch(ctx, name, True)


@rules.command("explain")
@click.argument("name")
@click.option("--contact", "contact", required=True, help="The contact's external id.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rules_explain(ctx: click.Context, name: str, contact: str, as_json: bool) -> None:
    """What NAME would do for CONTACT if its event happened now: the delay its policy gives,
    and which checks would pass or fail if the message fell due now."""
    from workers.rules.explain import explain
    from workers.store import rules as repo

    settings = load_settings(ctx)
    now = datetime.now(UTC)
    with errors():
        with database(settings) as conn:
            found = repo.get(conn, name)
        if found is None:
            raise NotFound(f"no rule named {name!r}: see `nudge rules list`")
        ex = asyncio.run(explain(settings.database_url, found.rule, contact, now))
    delay = ex.plan.deliver_at - now
    if as_json:
        print_json(
            {
                "rule": ex.rule,
                "contact": ex.contact,
                "enabled": found.enabled,
                "delay_seconds": delay.total_seconds(),
                "deliver_at": ex.plan.deliver_at.isoformat(),
                "why": ex.plan.why,
                "priority": ex.priority,
                "checks": [
                    {"check": c.name, "verdict": c.verdict, "detail": c.detail} for c in ex.checks
                ],
                "decision": {"verdict": ex.decision.verdict, "detail": ex.decision.detail},
            }
        )
        return
    click.echo(
        f"rule {ex.rule} for contact {ex.contact}" + ("" if found.enabled else " (rule disabled)")
    )
    click.echo(f"delay: {format_duration(delay)} ({ex.plan.why})")
    click.echo(
        f"due at: {ex.plan.deliver_at.isoformat(timespec='seconds')} if the event happened now"
    )
    click.echo(f"checks now ({ex.priority} policy):")
    for c in ex.checks:
        click.echo(f"  {c.name:<13} {c.verdict}" + (f"  {c.detail}" if c.detail else ""))
    d = ex.decision
    click.echo(
        f"decision now: {'send' if d.verdict == 'pass' else d.verdict}"
        + (f"  {d.detail}" if d.detail else "")
    )
