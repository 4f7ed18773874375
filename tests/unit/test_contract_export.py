"""The published contract (``docs/contract/``) says what the workers accept, and never drifts
from the pydantic models it is generated from."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import asyncapi, contract
from shared.contract import DueMessage, ScheduleMessage
from shared.errors import InvalidMessage
from shared.topology import DEAD_QUEUE, INTAKE_EXCHANGE, SCHEDULE_KEY

pytestmark = pytest.mark.unit

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


@pytest.fixture(scope="module")
def published() -> dict[str, Any]:
    """The committed ScheduleMessage schema, as a service in another language would read it."""
    loaded: dict[str, Any] = json.loads(
        (COMMITTED / "schemas" / "ScheduleMessage.json").read_text(encoding="utf-8")
    )
    return loaded


def test_the_schema_uses_only_keywords_this_validator_checks(published: dict[str, Any]) -> None:
    unknown = {
        k
        for k in _keywords(published)
        if k not in _CHECKED | _ANNOTATIONS and not k.startswith("x-")
    }
    assert unknown == set()


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
