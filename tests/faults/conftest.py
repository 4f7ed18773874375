"""The fault suite restarts the shared servers: it makes sure they are up again when its
module ends, and prints the table of faults injected at the end of the session."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT
from tests.faults import report


@pytest.fixture(scope="module", autouse=True)
def servers_up_afterwards(servers: None) -> Iterator[None]:
    yield
    subprocess.run(
        ["bash", str(ROOT / "infra/local/servers.sh"), "up"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if report.ROWS:
        terminalreporter.section("faults injected")
        terminalreporter.write_line(report.table(report.ROWS))
