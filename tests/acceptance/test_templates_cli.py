"""An operator manages templates with the CLI and sees a broken one refused at once."""

from __future__ import annotations

import json

from tests.support import nudge
from workers.config import Settings


def test_an_operator_adds_updates_renders_and_lists_templates(settings: Settings) -> None:
    added = nudge(
        settings,
        "template",
        "add",
        "promo",
        "--subject",
        "{{ plan }} for you",
        "--text",
        "Hi {{ contact.id }}, try {{ plan }}",
    )
    assert (added.returncode, added.stdout.strip()) == (0, "template promo version 1 added")
    again = nudge(settings, "template", "add", "promo", "--text", "x")
    assert again.returncode == 2
    assert "already exists; use `nudge template update`" in again.stderr
    broken = nudge(settings, "template", "add", "broken", "--text", "ok\n{% if x %}never closed")
    assert broken.returncode == 2
    assert broken.stderr.startswith("error: text_body: TemplateSyntaxError: ")
    assert "(line 2)" in broken.stderr
    updated = nudge(
        settings, "template", "update", "promo", "--html", "<b>{{ plan }}</b>", "--no-track-clicks"
    )
    assert updated.stdout.strip() == "template promo version 2 added"
    assert nudge(settings, "template", "update", "nope", "--text", "x").returncode == 4

    rendered = nudge(
        settings,
        "template",
        "render",
        "promo",
        "--contact",
        '{"id": "u-1"}',
        "--data",
        '{"plan": "<pro>"}',
        "--json",
    )
    assert json.loads(rendered.stdout) == {
        "template": "promo",
        "version": 2,
        "subject": "<pro> for you",
        "text": "Hi u-1, try <pro>",
        "html": "<b>&lt;pro&gt;</b>",
    }
    missing = nudge(settings, "template", "render", "promo")
    assert missing.returncode == 2
    assert "UndefinedError: 'plan' is undefined" in missing.stderr
    listed = json.loads(nudge(settings, "template", "list", "--json").stdout)
    promo = next(t for t in listed if t["name"] == "promo")
    assert promo["version"] == 2
    # the new version keeps its links as written; opens are still tracked (the default)
    assert (promo["track_clicks"], promo["track_opens"]) == (False, True)
    shown = nudge(settings, "template", "show", "promo", "--version", "1").stdout
    assert "Hi {{ contact.id }}, try {{ plan }}" in shown
    assert "html:" not in shown
