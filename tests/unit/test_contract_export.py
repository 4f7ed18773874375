"""The published contract (``docs/contract/``) says what the workers accept, and never drifts
from the pydantic models it is generated from."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import contract
from shared.contract import DueMessage, ScheduleMessage, TrackEvent
from shared.errors import InvalidMessage
from shared.topology import (
    DEAD_QUEUE,
    EVENT_KEY,
    EVENTS_EXCHANGE,
    EVENTS_QUEUE,
    INTAKE_EXCHANGE,
    SCHEDULE_KEY,
)
from workers import asyncapi

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "contract"

# A JSON Schema subset, enough for what pydantic emits for our models (no jsonschema package
# in the environment). test_the_schema_uses_only_keywords_this_validator_checks keeps it honest.
_CHECKED = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "enum",
    "const",
    "anyOf",
    "items",
    "maxItems",
    "minLength",
    "maxLength",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "$ref",
}
_ANNOTATIONS = {"$schema", "$comment", "$defs", "title", "description", "default", "format"}
_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "null": type(None),
    "boolean": bool,
    "integer": int,
    "number": int | float,
}


def _errors(
    instance: Any, node: dict[str, Any], root: dict[str, Any], at: str = "body"
) -> list[str]:
    """Why ``instance`` does not match ``node`` (empty when it does)."""
    if "$ref" in node:
        target: Any = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return _errors(instance, target, root, at)
    if "anyOf" in node:
        if all(_errors(instance, option, root, at) for option in node["anyOf"]):
            return [f"{at}: matches no anyOf option"]
        return []
    if "type" in node:
        wanted = _TYPES[node["type"]]
        if isinstance(instance, bool) and node["type"] in ("integer", "number"):
            return [f"{at}: not {node['type']}"]
        if not isinstance(instance, wanted):
            return [f"{at}: not {node['type']}"]
    found: list[str] = []
    if "const" in node and instance != node["const"]:
        found.append(f"{at}: not {node['const']!r}")
    if "enum" in node and instance not in node["enum"]:
        found.append(f"{at}: not one of {node['enum']}")
    if isinstance(instance, str):
        if len(instance) < node.get("minLength", 0):
            found.append(f"{at}: too short")
        if len(instance) > node.get("maxLength", len(instance)):
            found.append(f"{at}: too long")
        if "pattern" in node and not re.search(node["pattern"], instance):
            found.append(f"{at}: does not match {node['pattern']}")
    if isinstance(instance, int | float) and not isinstance(instance, bool):
        if "minimum" in node and instance < node["minimum"]:
            found.append(f"{at}: below minimum")
        if "maximum" in node and instance > node["maximum"]:
            found.append(f"{at}: above maximum")
        if "exclusiveMinimum" in node and instance <= node["exclusiveMinimum"]:
            found.append(f"{at}: not above exclusiveMinimum")
    if isinstance(instance, list):
        if len(instance) > node.get("maxItems", len(instance)):
            found.append(f"{at}: too many items")
        for i, item in enumerate(instance):
            found += _errors(item, node.get("items", {}), root, f"{at}[{i}]")
    if isinstance(instance, dict):
        properties: dict[str, Any] = node.get("properties", {})
        found += [
            f"{at}.{name}: required" for name in node.get("required", []) if name not in instance
        ]
        extra = node.get("additionalProperties", True)
        for name, value in instance.items():
            if name in properties:
                found += _errors(value, properties[name], root, f"{at}.{name}")
            elif extra is False:
                found.append(f"{at}.{name}: not allowed")
            elif isinstance(extra, dict):
                found += _errors(value, extra, root, f"{at}.{name}")
    return found


def _keywords(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            if key == "properties" or key == "$defs":
                for sub in value.values():
                    yield from _keywords(sub)
            elif key not in ("enum", "const", "default", "required"):
                yield from _keywords(value)
    elif isinstance(node, list):
        for item in node:
            yield from _keywords(item)


def _committed_schema(name: str) -> dict[str, Any]:
    """A committed schema, as a service in another language would read it."""
    loaded: dict[str, Any] = json.loads(
        (COMMITTED / "schemas" / f"{name}.json").read_text(encoding="utf-8")
    )
    return loaded


@pytest.fixture(scope="module")
def published() -> dict[str, Any]:
    """The committed ScheduleMessage schema."""
    return _committed_schema("ScheduleMessage")


@pytest.fixture(scope="module")
def published_event() -> dict[str, Any]:
    """The committed TrackEvent schema."""
    return _committed_schema("TrackEvent")


@pytest.mark.parametrize("model", asyncapi.PUBLIC_MODELS, ids=lambda m: m.__name__)
def test_the_schema_uses_only_keywords_this_validator_checks(model: type[Any]) -> None:
    unknown = {
        k
        for k in _keywords(_committed_schema(model.__name__))
        if k not in _CHECKED | _ANNOTATIONS and not k.startswith("x-")
    }
    assert unknown == set()


def test_every_public_model_has_a_channel_and_rules() -> None:
    assert tuple(spec.model for spec in asyncapi.PUBLIC) == asyncapi.PUBLIC_MODELS
    assert TrackEvent in asyncapi.PUBLIC_MODELS
    for model in asyncapi.PUBLIC_MODELS:
        assert _committed_schema(model.__name__)["x-nudge-rules"] == list(asyncapi.RULES[model])


def test_the_published_schema_accepts_the_example_body(published: dict[str, Any]) -> None:
    assert _errors(asyncapi.EXAMPLE_SCHEDULE, published, published) == []
    # and so do the workers
    decoded = contract.decode(
        ScheduleMessage,
        json.dumps(asyncapi.EXAMPLE_SCHEDULE).encode(),
        content_type=contract.CONTENT_TYPE,
    )
    assert decoded.template == asyncapi.EXAMPLE_SCHEDULE["template"]


def test_the_published_schema_names_the_required_fields(published: dict[str, Any]) -> None:
    assert published["required"] == ["contact", "template", "channel", "deliver_at"]
    assert published["$defs"]["ContactRef"]["required"] == ["id"]
    minimal = {
        "contact": {"id": "42"},
        "template": "welcome",
        "channel": "log",
        "deliver_at": "2030-01-01T00:00:00Z",
    }
    assert _errors(minimal, published, published) == []
    for field in published["required"]:
        body = {k: v for k, v in minimal.items() if k != field}
        assert _errors(body, published, published) == [f"body.{field}: required"]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"colour": "red"}, "body.colour: not allowed"),
        ({"channel": "pigeon"}, "body.channel: not one of"),
        ({"template": "trial end"}, "body.template: does not match"),
        ({"v": 2}, "body.v: not 1"),
        ({"exclude_events": ["e"] * 51}, "body.exclude_events: too many items"),
        ({"contact": {"id": ""}}, "body.contact.id: too short"),
        ({"exclude_scope": "lately"}, "body.exclude_scope: not one of"),
        (
            {"exclude_scope": "within", "exclude_within_seconds": 0},
            "body.exclude_within_seconds: matches no anyOf option",
        ),
        ({"contact": {"id": "42", "subscribed": "maybe"}}, "body.contact.subscribed: matches no"),
    ],
)
def test_the_published_schema_rejects_what_the_workers_reject(
    published: dict[str, Any], change: dict[str, Any], error: str
) -> None:
    body = {**asyncapi.EXAMPLE_SCHEDULE, **change}
    found = _errors(body, published, published)
    assert any(e.startswith(error) for e in found), found
    with pytest.raises(InvalidMessage):
        contract.decode(ScheduleMessage, json.dumps(body).encode(), content_type=None)


def test_exclude_within_seconds_goes_with_the_within_scope(published: dict[str, Any]) -> None:
    within = {**asyncapi.EXAMPLE_SCHEDULE, "exclude_scope": "within"}
    good = {**within, "exclude_within_seconds": 3600}
    assert _errors(good, published, published) == []
    decoded = contract.decode(ScheduleMessage, json.dumps(good).encode(), content_type=None)
    assert (decoded.exclude_scope, decoded.exclude_within_seconds) == ("within", 3600)
    # JSON Schema cannot say "required iff"; the rule is in x-nudge-rules and the workers check it
    for body in (within, {**asyncapi.EXAMPLE_SCHEDULE, "exclude_within_seconds": 3600}):
        assert _errors(body, published, published) == []
        with pytest.raises(InvalidMessage, match="exclude_within_seconds"):
            contract.decode(ScheduleMessage, json.dumps(body).encode(), content_type=None)
    assert any("exclude_within_seconds" in rule for rule in published["x-nudge-rules"])


def test_the_published_event_schema_accepts_the_example_body(
    published_event: dict[str, Any],
) -> None:
    assert _errors(asyncapi.EXAMPLE_EVENT, published_event, published_event) == []
    decoded = contract.decode(
        TrackEvent,
        json.dumps(asyncapi.EXAMPLE_EVENT).encode(),
        content_type=contract.CONTENT_TYPE,
    )
    assert decoded.name == asyncapi.EXAMPLE_EVENT["name"]
    assert decoded.contact.subscribed is True


def test_the_published_event_schema_names_the_required_fields(
    published_event: dict[str, Any],
) -> None:
    assert published_event["required"] == ["contact", "name", "occurred_at"]
    minimal = {
        "contact": {"id": "42"},
        "name": "signed_in",
        "occurred_at": "2025-01-01T00:00:00Z",
    }
    assert _errors(minimal, published_event, published_event) == []
    contract.decode(TrackEvent, json.dumps(minimal).encode(), content_type=None)
    for field in published_event["required"]:
        body = {k: v for k, v in minimal.items() if k != field}
        assert _errors(body, published_event, published_event) == [f"body.{field}: required"]
        with pytest.raises(InvalidMessage, match=field):
            contract.decode(TrackEvent, json.dumps(body).encode(), content_type=None)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"colour": "red"}, "body.colour: not allowed"),
        ({"name": "signed in"}, "body.name: does not match"),
        ({"v": 2}, "body.v: not 1"),
        ({"contact": {"id": ""}}, "body.contact.id: too short"),
        ({"contact": {"id": "42", "subscribed": "maybe"}}, "body.contact.subscribed: matches no"),
        ({"data": []}, "body.data: not object"),
    ],
)
def test_the_published_event_schema_rejects_what_the_workers_reject(
    published_event: dict[str, Any], change: dict[str, Any], error: str
) -> None:
    body = {**asyncapi.EXAMPLE_EVENT, **change}
    found = _errors(body, published_event, published_event)
    assert any(e.startswith(error) for e in found), found
    with pytest.raises(InvalidMessage):
        contract.decode(TrackEvent, json.dumps(body).encode(), content_type=None)


def test_occurred_at_may_be_only_a_clock_skew_ahead(published_event: dict[str, Any]) -> None:
    skew = timedelta(seconds=asyncapi.MAX_EVENT_SKEW_SECONDS)
    now = datetime.now(UTC)
    for ahead, accepted in ((skew - timedelta(seconds=30), True), (skew * 2, False)):
        at = (now + ahead).isoformat()
        body = {**asyncapi.EXAMPLE_EVENT, "occurred_at": at}
        assert _errors(body, published_event, published_event) == []  # not a schema rule
        encoded = json.dumps(body).encode()
        if accepted:
            contract.decode(TrackEvent, encoded, content_type=None)
        else:
            with pytest.raises(InvalidMessage, match="occurred_at"):
                contract.decode(TrackEvent, encoded, content_type=None)


def test_the_internal_model_is_marked_internal() -> None:
    due: dict[str, Any] = json.loads(
        (COMMITTED / "schemas" / "DueMessage.json").read_text(encoding="utf-8")
    )
    assert due["x-nudge-internal"] is True
    assert due["required"] == list(DueMessage.model_json_schema()["required"])


def test_the_asyncapi_document_routes_to_the_topology() -> None:
    doc: dict[str, Any] = yaml.safe_load((COMMITTED / "asyncapi.yaml").read_text(encoding="utf-8"))
    intake = doc["channels"][INTAKE_EXCHANGE]
    assert intake["address"] == SCHEDULE_KEY
    assert intake["bindings"]["amqp"]["exchange"]["name"] == INTAKE_EXCHANGE
    assert intake["bindings"]["amqp"]["exchange"]["type"] == "direct"
    assert doc["channels"][DEAD_QUEUE]["bindings"]["amqp"]["queue"]["name"] == DEAD_QUEUE
    message = doc["components"]["messages"]["ScheduleMessage"]
    assert message["x-amqp-properties"]["properties"]["message_id"]["maxLength"] == 200
    assert message["examples"][0]["payload"] == asyncapi.EXAMPLE_SCHEDULE
    assert (
        doc["operations"]["scheduleMessage"]["channel"]["$ref"] == f"#/channels/{INTAKE_EXCHANGE}"
    )


def test_the_asyncapi_document_routes_events_to_the_topology() -> None:
    doc: dict[str, Any] = yaml.safe_load((COMMITTED / "asyncapi.yaml").read_text(encoding="utf-8"))
    events = doc["channels"][EVENTS_EXCHANGE]
    assert events["address"] == EVENT_KEY
    assert events["bindings"]["amqp"]["exchange"]["name"] == EVENTS_EXCHANGE
    assert events["bindings"]["amqp"]["exchange"]["type"] == "direct"
    assert EVENTS_QUEUE in events["description"]
    operation = doc["operations"]["trackEvent"]
    assert operation["action"] == "send"
    assert operation["channel"]["$ref"] == f"#/channels/{EVENTS_EXCHANGE}"
    assert operation["bindings"]["amqp"]["mandatory"] is True
    message = doc["components"]["messages"]["TrackEvent"]
    properties = message["x-amqp-properties"]
    schedule = doc["components"]["messages"]["ScheduleMessage"]["x-amqp-properties"]
    assert (
        properties["required"]
        == schedule["required"]
        == [
            "message_id",
            "delivery_mode",
            "content_type",
        ]
    )
    assert properties["properties"].keys() == schedule["properties"].keys()
    assert properties["properties"]["message_id"]["maxLength"] == 200
    assert "event id" in properties["properties"]["message_id"]["description"]
    assert message["examples"][0]["payload"] == asyncapi.EXAMPLE_EVENT
    dead = doc["components"]["messages"]["DeadLetter"]["headers"]["properties"]
    assert EVENTS_QUEUE in dead["x-nudge-source-queue"]["enum"]


def test_every_reference_in_the_asyncapi_document_resolves() -> None:
    doc = asyncapi.document()
    refs = [v for k, v in _pairs(doc) if k == "$ref"]
    assert refs
    for ref in refs:
        target: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            assert part in target, ref
            target = target[part]


def _pairs(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _pairs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _pairs(item)


def test_the_committed_contract_equals_a_fresh_export(tmp_path: Path) -> None:
    written = asyncapi.export(tmp_path)
    fresh = {p.relative_to(tmp_path) for p in written}
    committed = {p.relative_to(COMMITTED) for p in COMMITTED.rglob("*") if p.is_file()}
    assert committed == fresh, "run `nudge contract export` and commit docs/contract/"
    for relative in sorted(fresh):
        assert (COMMITTED / relative).read_text(encoding="utf-8") == (
            tmp_path / relative
        ).read_text(encoding="utf-8"), (
            f"docs/contract/{relative} is stale: run `nudge contract export`"
        )


def test_the_examples_in_the_contract_guide_are_the_exported_ones() -> None:
    guide = (COMMITTED.parent / "contract.md").read_text(encoding="utf-8")
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", guide, re.S)]
    assert asyncapi.EXAMPLE_SCHEDULE in blocks
    assert asyncapi.EXAMPLE_EVENT in blocks
