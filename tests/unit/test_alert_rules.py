"""infra/prometheus/alerts.yml is valid Prometheus (``promtool check rules``), its alerts fire
as infra/prometheus/alerts_test.yml says (``promtool test rules``), and every Nudge metric it
names is one the workers export."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import workers.runtime.metrics  # noqa: F401 (registers the workers' metrics)

pytestmark = pytest.mark.unit

RULES = Path(__file__).resolve().parents[2] / "infra/prometheus"


@pytest.fixture(scope="session")
def promtool() -> str:
    """Debian's promtool (package ``prometheus``), installed with apt-get when missing and the
    suite runs as root."""
    found = shutil.which("promtool")
    if found is None and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
            subprocess.run(install, env=env, capture_output=True, check=True)
        found = shutil.which("promtool")
    assert found is not None, "promtool is missing: apt-get install prometheus (as root)"
    return found


def run(promtool: str, *args: str) -> str:
    done = subprocess.run([promtool, *args], cwd=RULES, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_alert_rules_file_is_valid_prometheus(promtool: str) -> None:
    assert "SUCCESS: 6 rules found" in run(promtool, "check", "rules", "alerts.yml")


def test_the_alerts_fire_as_their_unit_tests_say(promtool: str) -> None:
    assert "SUCCESS" in run(promtool, "test", "rules", "alerts_test.yml")


def test_every_nudge_metric_the_alerts_name_is_exported_by_the_workers() -> None:
    named = set(re.findall(r"\bnudge_[a-z_]+", (RULES / "alerts.yml").read_text()))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    exported = {
        metric.name + suffix
        for metric in REGISTRY.collect()
        for suffix in ("", *suffixes.get(metric.type, ()))
    }
    assert named, "the alerts name no nudge metric"
    assert named <= exported, f"not exported: {sorted(named - exported)}"
