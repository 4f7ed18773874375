"""The demo's scenario, through the real CLI in subprocesses, as an operator would run it."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.backends import both_backends
from tests.support import nudge, settings_env
from workers.config import Settings
from workers.demo.sink import Sink


@both_backends
def test_an_operator_schedules_runs_a_burst_worker_and_reads_the_outcomes(
    settings: Settings, sink: Sink
) -> None:
    assert nudge(settings, "db", "upgrade").returncode == 0
    applied = nudge(settings, "topology", "apply")
    assert applied.returncode == 0, applied.stderr
    assert f"backend={settings.delay_backend}" in applied.stdout
    for i, delay in enumerate(("500ms", "1.5s", "3s")):
        done = nudge(
            settings,
            "message",
            "schedule",
            f"user-{i}",
            "trial_end",
            "webhook",
            "--delay",
            delay,
            "--key",
            f"cli-{i}",
            "--data",
            '{"plan": "pro"}',
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"scheduled cli-{i}"
    cancelled = nudge(
        settings,
        "message",
        "schedule",
        "user-x",
        "trial_end",
        "webhook",
        "--delay",
        "6s",
        "--key",
        "cli-x",
    )
    assert cancelled.returncode == 0
    # The scheduler stores what was published and exits once its queue is empty...
    scheduler = nudge(settings, "worker", "scheduler", "--burst")
    assert scheduler.returncode == 0, scheduler.stderr
    out = nudge(settings, "message", "cancel", "cli-x")
    assert out.returncode == 0
    cancelled_id = json.loads(nudge(settings, "message", "show", "cli-x", "--json").stdout)["id"]
    assert out.stdout.strip() == f"message {cancelled_id} cancelled"
    # ...and a dispatch worker delivers everything that falls due, then exits too.
    dispatch = nudge(settings, "worker", "dispatch", "--burst")
    assert dispatch.returncode == 0, dispatch.stderr

    shown = json.loads(nudge(settings, "message", "show", "cli-1", "--json").stdout)
    assert [i["status"] for i in shown["items"]] == ["sent"]
    assert shown["items"][0]["external_id"] == "user-1"
    text = nudge(settings, "message", "show", "cli-x").stdout
    assert "user-x: cancelled (cancelled: message cancelled)" in text
    assert sorted(r.body["contact"]["id"] for r in sink.accepted()) == [
        "user-0",
        "user-1",
        "user-2",
    ]


@both_backends
def test_a_burst_dispatch_worker_waits_for_what_is_still_in_the_delay(
    settings: Settings, sink: Sink
) -> None:
    # The plugin's exchange holds its messages where AMQP cannot count them: burst must ask.
    done = nudge(settings, "message", "schedule", "u-1", "welcome", "webhook", "--delay", "25s")
    assert done.returncode == 0, done.stderr
    assert nudge(settings, "worker", "scheduler", "--burst").returncode == 0
    dispatch = nudge(settings, "worker", "dispatch", "--burst")
    assert dispatch.returncode == 0, dispatch.stderr
    assert [r.body["contact"]["id"] for r in sink.accepted()] == ["u-1"]


def test_cli_errors_name_the_problem_and_exit_with_documented_codes(settings: Settings) -> None:
    missing = nudge(settings, "message", "show", "no-such-key")
    assert missing.returncode == 4
    assert "no message 'no-such-key'" in missing.stderr
    bad = nudge(settings, "message", "schedule", "42", "trial_end", "sms")
    assert bad.returncode == 2
    assert "channel: Input should be 'webhook', 'log' or 'email'" in bad.stderr
    bad_delay = nudge(settings, "message", "schedule", "42", "t", "log", "--delay", "soon")
    assert bad_delay.returncode == 2
    assert "'soon' is not a duration" in bad_delay.stderr
    env_bad = settings.model_copy(update={"delay_backend": "auto"})
    result = subprocess.run(
        [sys.executable, "-m", "workers", "topology", "apply"],
        env={**settings_env(env_bad), "NUDGE_DELAY_BACKEND": "sometimes"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "NUDGE_DELAY_BACKEND" in result.stderr


def test_nudge_demo_runs_the_main_job_end_to_end(settings: Settings) -> None:
    env_settings = settings.model_copy(update={"webhook_url": None})
    done = nudge(env_settings, "demo", "--count", "6", timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo OK" in done.stdout
    assert "6 accepted, 0 duplicates, 0 bad signatures" in done.stdout
    assert "worker stopped on SIGTERM with exit code 0" in done.stdout


def test_campaign_pause_loads_neither_templates_nor_migrations_nor_the_http_client(
    settings: Settings,
) -> None:
    """What ``nudge campaign pause`` imports bounds how soon it returns: the database and the
    broker, not the template engine, alembic or the management API client."""
    code = (
        "import json, sys\n"
        "from workers.cli import main\n"
        "try:\n"
        "    main(['campaign', 'pause', 'no-such-campaign'])\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print(json.dumps([code, [m for m in ('jinja2', 'alembic', 'httpx', 'mako') "
        "if m in sys.modules]]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "no campaign 'no-such-campaign'" in done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [4, []]
