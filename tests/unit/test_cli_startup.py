"""The ``nudge`` command line imports what the command it runs needs, and nothing else."""

from __future__ import annotations

import json
import subprocess
import sys

from workers.cli import COMMANDS, load

HEAVY = ("sqlalchemy", "aio_pika", "jinja2", "pydantic", "httpx", "alembic", "psycopg")


def _imported_after(code: str) -> list[str]:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import json, sys\n{code}\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return list(json.loads(done.stdout.splitlines()[-1]))


def test_importing_the_cli_imports_no_database_broker_template_or_settings_library() -> None:
    assert _imported_after("import workers.cli") == []


def test_nudge_help_lists_every_command_without_importing_any_of_them() -> None:
    code = (
        "from workers.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "sys.stdout.flush()"
    )
    assert _imported_after(code) == []


def test_each_summary_in_nudge_help_is_the_first_sentence_of_that_commands_own_help() -> None:
    for name, (_, _, summary) in COMMANDS.items():
        assert load(name).get_short_help_str(limit=1000) == summary, name
