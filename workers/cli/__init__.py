"""``nudge``: the admin command line.

Exit codes a script can rely on: 0 success, 1 the operation failed (broker, database),
2 invalid input or configuration, 4 not found.

One module per command group; this one assembles them.
"""

from __future__ import annotations

from pathlib import Path

import click

from workers.cli.campaigns import campaign
from workers.cli.contacts import contacts
from workers.cli.dead import dead
from workers.cli.messages import message
from workers.cli.policies import policy
from workers.cli.rules import rules
from workers.cli.status import status
from workers.cli.system import contract_group, db, demo, topology_group, worker
from workers.cli.templates import template


@click.group()
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


for command in (db, topology_group, worker, message, policy, demo, contract_group, status):
    main.add_command(command)
main.add_command(rules)
main.add_command(template)
main.add_command(dead)
main.add_command(campaign)
main.add_command(contacts)
main.add_command(contacts, name="contact")  # `nudge contact show` reads as the others do
