"""``nudge``: the admin command line.

Exit codes a script can rely on: 0 success, 1 the operation failed (broker, database),
2 invalid input or configuration, 4 not found.

One module per command group; this one names them and imports only the group a command line
runs (``nudge campaign pause`` never imports the template engine or the management API
client), so that a command starts in the time its own work takes. ``nudge --help`` lists
the groups from :data:`COMMANDS` without importing any of them; a unit test checks each
summary against the command's own help.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import click

#: name -> (module, attribute, summary: the first sentence of the command's help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "campaign": (
        "workers.cli.campaigns",
        "campaign",
        "Broadcast campaigns: draft → scheduled → sending ⇄ paused → completed (or cancelled).",
    ),
    "contact": ("workers.cli.contacts", "contacts", "Contacts (the people messages go to)."),
    "contacts": ("workers.cli.contacts", "contacts", "Contacts (the people messages go to)."),
    "contract": (
        "workers.cli.system",
        "contract_group",
        "The wire contract for services in other languages.",
    ),
    "db": ("workers.cli.system", "db", "Database schema."),
    "dead": ("workers.cli.dead", "dead", "Parked messages (nudge.dead)."),
    "demo": (
        "workers.cli.system",
        "demo",
        "Run the main job end to end: a service schedules messages, workers deliver them to a "
        "local webhook receiver when due; prints what arrived and what the tables say.",
    ),
    "message": ("workers.cli.messages", "message", "Scheduled messages."),
    "policy": (
        "workers.cli.policies",
        "policy",
        "Anti-spam policies, one per priority class; dispatch workers apply changes from their "
        "next batch, no restart needed.",
    ),
    "rules": (
        "workers.cli.rules",
        "rules",
        "Automation rules: on an event, after a delay, send a template (docs/rules.md).",
    ),
    "status": (
        "workers.cli.status",
        "status",
        "Queues (depth, consumers, rates), recipient outcomes (in all, recently, rate) and the "
        "campaigns that are not finished.",
    ),
    "template": (
        "workers.cli.templates",
        "template",
        "Message templates (Jinja2, sandboxed, versioned).",
    ),
    "topology": ("workers.cli.system", "topology_group", "RabbitMQ exchanges and queues."),
    "worker": (
        "workers.cli.system",
        "worker",
        "Run worker ROLES in this process until SIGTERM (which finishes in-flight work and "
        "exits 0).",
    ),
}


def load(name: str) -> click.Command:
    """Import the command ``name`` (a key of :data:`COMMANDS`)."""
    module, attribute, _ = COMMANDS[name]
    command = getattr(importlib.import_module(module), attribute)
    assert isinstance(command, click.Command)
    return command


class _Lazy(click.Group):
    """A group whose commands are imported when a command line names them."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return load(cmd_name) if cmd_name in COMMANDS else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = [(n, click.Command(n, help=COMMANDS[n][2]).get_short_help_str(limit)) for n in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_Lazy)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, path_type=Path),
    envvar="NUDGE_CONFIG",
    help="TOML file of settings (NUDGE_* variables win).",
)
@click.pass_context
def main(ctx: click.Context, config_file: Path | None) -> None:
    """Nudge: the right message to the right person at the right time, never twice.

    Settings come from NUDGE_* environment variables (see docs/operations.md).
    """
    ctx.ensure_object(dict)["config_file"] = config_file
