"""``nudge policy``: the anti-spam policies per priority."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from shared.errors import InvalidMessage
from workers.cli.base import (
    database,
    errors,
    load_settings,
    print_json,
)
from workers.durations import parse_duration

PRIORITIES = click.Choice(["transactional", "automation", "campaign"])


def _optional_duration(value: str) -> float | None:
    """Seconds of a duration option, or None for ``none``."""
    if value == "none":
        return None
    try:
        return parse_duration(value).total_seconds()
    except ValueError as exc:
        raise InvalidMessage(str(exc)) from exc


def _optional_int(value: str) -> int | None:
    if value == "none":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise InvalidMessage(f"{value!r} is not a whole number or 'none'") from exc


@click.group()
def policy() -> None:
    """Anti-spam policies, one per priority class; dispatch workers apply changes from their
    next batch, no restart needed."""


@policy.command("set")
@click.argument("priority", type=PRIORITIES)
@click.option("--frequency-cap", help="Messages per contact per window, all channels, or none.")
@click.option("--channel-cap", help="Messages per contact per window on one channel, or none.")
@click.option("--frequency-window", help="Rolling window of the caps, e.g. 24h.")
@click.option("--category-window", help="No repeat of a category within this, e.g. 72h, or none.")
@click.option(
    "--interaction-events", help="Comma-separated events that mean 'talking to us', or none."
)
@click.option("--interaction-window", help="How recent an interaction skips a message, e.g. 2h.")
@click.option("--quiet-hours", help="HH:MM-HH:MM in the contact's timezone, or none.")
@click.option("--default-timezone", help="For contacts without one, e.g. Europe/Paris.")
@click.option("--cap-action", type=click.Choice(["suppress", "defer"]))
@click.option("--bypass-caps/--no-bypass-caps", default=None)
@click.option("--bypass-subscription/--no-bypass-subscription", default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def policy_set(ctx: click.Context, /, priority: str, as_json: bool, **options: Any) -> None:
    """Change the policy of PRIORITY; options not given keep their current value."""
    from shared.contract import Priority
    from workers import policies as policy_mod
    from workers.store import policies

    settings = load_settings(ctx)
    converters: dict[str, Callable[[str], object]] = {
        "frequency_cap": _optional_int,
        "channel_cap": _optional_int,
        "frequency_window": lambda v: _required(_optional_duration(v), "frequency_window"),
        "category_window": _optional_duration,
        "interaction_events": lambda v: (
            () if v == "none" else tuple(e.strip() for e in v.split(",") if e.strip())
        ),
        "interaction_window": lambda v: _required(_optional_duration(v), "interaction_window"),
        "quiet_hours": lambda v: None if v == "none" else v,
    }
    fields = {
        "frequency_window": "frequency_window_seconds",
        "category_window": "category_window_seconds",
        "interaction_window": "interaction_window_seconds",
    }
    with errors():
        changes = {
            fields.get(name, name): converters[name](value) if name in converters else value
            for name, value in options.items()
            if value is not None
        }
        with database(settings, write=True) as conn:
            current, _ = policies.get(conn, Priority(priority), for_update=True)
            updated = policy_mod.parse({**current.model_dump(), **changes})
            policies.put(conn, Priority(priority), updated)
    _show_policy(priority, updated, stored=True, as_json=as_json)


def _required(value: float | None, name: str) -> float:
    if value is None:
        raise InvalidMessage(f"{name}: cannot be none")
    return value


def _show_policy(name: str, p: Any, *, stored: bool, as_json: bool) -> None:
    if as_json:
        print_json({"name": name, "stored": stored, **p.model_dump(mode="json")})
        return
    click.echo(f"{name}{'' if stored else ' (built-in default)'}")
    for key, value in p.model_dump(mode="json").items():
        click.echo(f"  {key}: {value}")


@policy.command("show")
@click.argument("priority", type=PRIORITIES)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def policy_show(ctx: click.Context, priority: str, as_json: bool) -> None:
    """Show the policy dispatch workers apply to PRIORITY messages."""
    from shared.contract import Priority
    from workers.store import policies

    settings = load_settings(ctx)
    with errors(), database(settings) as conn:
        p, stored = policies.get(conn, Priority(priority))
    _show_policy(priority, p, stored=stored, as_json=as_json)


@policy.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def policy_list(ctx: click.Context, as_json: bool) -> None:
    """Show the policy of every priority class."""
    from shared.contract import Priority
    from workers.store import policies

    settings = load_settings(ctx)
    with errors(), database(settings) as conn:
        found = {p.value: policies.get(conn, p) for p in Priority}
    if as_json:
        print_json(
            [{"name": n, "stored": s, **p.model_dump(mode="json")} for n, (p, s) in found.items()]
        )
        return
    for n, (p, s) in found.items():
        _show_policy(n, p, stored=s, as_json=False)


@policy.command("reset")
@click.argument("priority", type=PRIORITIES)
@click.pass_context
def policy_reset(ctx: click.Context, priority: str) -> None:
    """Forget the stored policy of PRIORITY: the built-in default applies again."""
    from shared.contract import Priority
    from workers.store import policies

    settings = load_settings(ctx)
    with errors(), database(settings, write=True) as conn:
        policies.reset(conn, Priority(priority))
    click.echo(f"{priority}: built-in default restored")
