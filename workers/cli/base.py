"""What every ``nudge`` command shares: settings, database access, errors and exit codes.

Exit codes a script can rely on: 0 success, 1 the operation failed (broker, database),
2 invalid input or configuration, 4 not found.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn

import click

from shared.errors import ConfigError, InvalidMessage, NotFound, NudgeError
from workers.durations import parse_duration

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from workers.config import Settings


EXIT_FAILED, EXIT_INVALID, EXIT_NOT_FOUND = 1, 2, 4


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@contextmanager
def errors() -> Iterator[None]:
    try:
        yield
    except (InvalidMessage, ConfigError) as exc:
        fail(str(exc), EXIT_INVALID)
    except NotFound as exc:
        fail(str(exc), EXIT_NOT_FOUND)
    except NudgeError as exc:
        fail(str(exc), EXIT_FAILED)


def load_settings(ctx: click.Context) -> Settings:
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "settings" not in obj:
        from workers.config import Settings  # pydantic-settings: only for commands that run

        with errors():
            obj["settings"] = Settings.load(obj.get("config_file"))
    settings: Settings = obj["settings"]
    return settings


@contextmanager
def database(settings: Settings, *, write: bool = False) -> Iterator[Connection]:
    """A connection to the store (in one transaction when ``write``); driver errors leave as
    :class:`~shared.errors.StoreError`."""
    from workers.store.db import sync_engine, sync_errors

    engine = sync_engine(settings.database_url)
    try:
        with sync_errors(), engine.begin() if write else engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, sort_keys=True))


class _Duration(click.ParamType[timedelta, Any]):
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = _Duration()
