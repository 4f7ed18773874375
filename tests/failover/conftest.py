"""The failover suite: a primary and a synchronous streaming standby of its own
(``servers.sh pg-standby-up``, on ports and in a data directory apart from the suite's
Postgres, which this suite never touches), and settings whose ``database_url`` names both."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BASE, ROOT
from workers.config import Settings
from workers.store.db import upgrade

SERVERS = ROOT / "infra/local/servers.sh"
#: Two ports above the suite's Postgres: the standby of ``servers.sh pg-standby-up`` run on the
#: suite's own Postgres would take the one just above it.
PORT_OFFSET = 2


@dataclass(frozen=True)
class Pair:
    """The primary and its standby: ``servers.sh`` commands run against them."""

    local_dir: Path
    port: int
    #: Both addresses, read-write sessions only (``pg-standby-env``).
    database_url: str

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "NUDGE_LOCAL_DIR": str(self.local_dir),
            "NUDGE_POSTGRES_PORT": str(self.port),
        }

    def servers(self, *args: str) -> str:
        """Run ``servers.sh ARGS`` on the pair; returns its stdout."""
        done = subprocess.run(
            ["bash", str(SERVERS), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, f"servers.sh {' '.join(args)}: {done.stderr[-2000:]}"
        return done.stdout


@pytest.fixture(scope="module")
def pair(servers: None) -> Iterator[Pair]:
    """A fresh primary and synchronous standby, stopped and removed at the end of the module
    (after a promotion the old primary's data has left the new timeline)."""
    port = (urllib.parse.urlsplit(BASE.database_url).port or 35432) + PORT_OFFSET
    local_dir = ROOT / ".local" / "failover"
    shutil.rmtree(local_dir, ignore_errors=True)
    pair = Pair(local_dir, port, "")
    try:
        env = dict(
            line.split("=", 1) for line in pair.servers("pg-standby-up").splitlines() if "=" in line
        )
        yield Pair(
            local_dir, port, Settings.load(database_url=env["NUDGE_DATABASE_URL"]).database_url
        )
    finally:
        # Hard: the data goes with the directory.
        pair.servers("pg-standby-down")
        pair.servers("kill-postgres")
        shutil.rmtree(local_dir, ignore_errors=True)


@pytest.fixture
def database_url(pair: Pair) -> str:
    """The pair's ``nudge`` database, migrated (the suite's template lives on its own
    Postgres); it replaces the usual per-test database in ``settings`` and ``engine``."""
    upgrade(pair.database_url)
    return pair.database_url
