"""The compose file gets the delayed-message plugin without an unpinned download: built in a
stage from a pinned release tag of the broker's series, and enabled. Checked offline by
parsing the YAML (no container engine needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

INFRA = Path(__file__).resolve().parents[2] / "infra"


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    return doc


def test_the_broker_image_builds_the_plugin_from_a_pinned_tag_of_its_own_series() -> None:
    build = _compose()["services"]["rabbitmq"]["build"]
    broker, tag = build["args"]["BROKER"], build["args"]["PLUGIN_TAG"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", broker), f"BROKER must be a full version: {broker}"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), f"PLUGIN_TAG must be a release tag: {tag}"
    assert tag[1:].rsplit(".", 1)[0] == broker.rsplit(".", 1)[0], (
        f"plugin {tag} is not for RabbitMQ {broker}'s series"
    )
    dockerfile = build["dockerfile_inline"].replace("$$", "")
    assert "$" not in dockerfile, "an unescaped $ would be interpolated by Compose, not Docker"
    dockerfile = build["dockerfile_inline"].replace("$$", "$")
    assert not re.search(r"^\s*ADD\s+https?://", dockerfile, re.M), "no unpinned ADD download"
    assert not re.search(r"\b(curl|wget)\b", dockerfile), "no download but the pinned tag"
    assert '--branch "${PLUGIN_TAG}"' in dockerfile
    images = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert images == ["rabbitmq:${BROKER}-management", "erlang:26", "broker"]
    assert "COPY --from=delayed-plugin" in dockerfile


def test_the_broker_enables_the_shipped_plugins_and_the_delayed_message_plugin() -> None:
    compose = _compose()
    content = compose["configs"]["enabled_plugins"]["content"]
    shipped = (INFRA / "rabbitmq/enabled_plugins").read_text().strip().strip("[].").split(",")
    assert content.strip().strip("[].").split(",") == [
        *shipped,
        "rabbitmq_delayed_message_exchange",
    ]
    mounted = compose["services"]["rabbitmq"]["configs"][0]
    assert mounted == {"source": "enabled_plugins", "target": "/etc/rabbitmq/enabled_plugins"}
