"""Both delay backends in one suite: the ladder (``tiers``) and the ``x-delayed-message`` plugin.

A test that exercises a delay behaviour takes both with :data:`both_backends`; every other test
runs on the ladder (the ``delay_backend`` fixture's default). The plugin cases need the plugin
loaded in the local broker (``infra/local/servers.sh`` builds and enables it when it finds its
source). When it is not loaded they are deselected at collection, and the terminal summary says
how many did not run and why. With ``CI`` set, a plugin source that was found but did not build
or load fails the run; no source at all is reported in a banner (a clean clone may have none).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shared import delay
from tests.support import Management

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ROOT / "infra/local/servers.sh"
BACKENDS: tuple[delay.BackendName, ...] = ("tiers", "plugin")
PLUGIN_APP = "rabbitmq_delayed_message_exchange"

#: Runs a test once per delay backend (ids ``[tiers]`` and ``[plugin]``).
both_backends = pytest.mark.parametrize("delay_backend", BACKENDS)


@pytest.fixture
def delay_backend() -> delay.BackendName:
    """The delay backend of this test's topology and workers: ``tiers`` unless the test is
    marked :data:`both_backends`."""
    return "tiers"


@dataclass(frozen=True)
class PluginState:
    loaded: bool
    #: A plugin source or prebuilt plugin was found (so not loading it is a failure).
    found: bool
    detail: str


def plugin_state() -> PluginState:
    """Whether the local broker (started if need be) has the plugin loaded, from ``servers.sh
    delayed-plugin``: exit 0 loaded, 4 none available, 5 available but not loaded."""
    up = subprocess.run(["bash", str(SERVERS), "up"], capture_output=True, text=True)
    if up.returncode != 0:
        return PluginState(False, True, f"servers.sh up failed: {up.stderr.strip()[-500:]}")
    probe = subprocess.run(["bash", str(SERVERS), "delayed-plugin"], capture_output=True, text=True)
    detail = " ".join(probe.stdout.split()[2:]) or probe.stderr.strip()
    return PluginState(probe.returncode == 0, probe.returncode != 4, detail)


def set_plugin_enabled(enabled: bool) -> None:
    """Enable or disable the plugin on the running local node (as ``rabbitmq-plugins``
    would on a production node)."""
    action = "enable" if enabled else "disable"
    subprocess.run(
        ["bash", str(SERVERS), "ctl", "rabbitmq-plugins", action, PLUGIN_APP],
        check=True,
        capture_output=True,
    )


def waiting_in_delay(management: Management, vhost: str) -> dict[str, int]:
    """Where messages wait in the delay of ``vhost``: ladder queues and the plugin's exchange
    (its ``messages_delayed``), each with a count above zero."""
    found = {
        name: q.get("messages", 0)
        for name, q in management.queues(vhost).items()
        if name.startswith("nudge.delay.") and q.get("messages", 0)
    }
    plugin: dict[str, Any] | None = management.exchange(vhost, delay.PLUGIN_EXCHANGE)
    if plugin and plugin.get("messages_delayed"):
        found[delay.PLUGIN_EXCHANGE] = plugin["messages_delayed"]
    return found


def _backend(item: pytest.Item) -> object:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("delay_backend") if callspec else None


_STATE = pytest.StashKey[tuple[PluginState, int]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    plugin_items = [item for item in items if _backend(item) == "plugin"]
    if not plugin_items:
        return
    state = plugin_state()
    config.stash[_STATE] = (state, len(plugin_items))
    if state.loaded:
        return
    if os.environ.get("CI") and state.found:
        raise pytest.UsageError(
            f"CI: the delayed-message plugin was found but is not loaded ({state.detail}); "
            f"{len(plugin_items)} plugin-backend tests cannot run"
        )
    items[:] = [item for item in items if _backend(item) != "plugin"]
    config.hook.pytest_deselected(items=plugin_items)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _STATE not in terminalreporter.config.stash:
        return
    state, count = terminalreporter.config.stash[_STATE]
    if state.loaded:
        terminalreporter.write_line(
            f"delay backends: {count} tests ran on both tiers and plugin ({state.detail})"
        )
        return
    line = (
        f"{count} plugin-backend tests DID NOT RUN: the delayed-message plugin is not loaded "
        f"({state.detail})"
    )
    if os.environ.get("CI"):
        terminalreporter.section("DELAY BACKEND NOT TESTED", sep="!", red=True, bold=True)
        terminalreporter.write_line(line, red=True, bold=True)
        terminalreporter.write_line(
            "No plugin source beside this clone: only the tiers backend was tested.",
            red=True,
            bold=True,
        )
        terminalreporter.write_sep("!", red=True, bold=True)
    else:
        terminalreporter.section("delay backends", yellow=True)
        terminalreporter.write_line(line, yellow=True)
