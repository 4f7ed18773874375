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
from shared.contract import DueMessage, ReadReceipt, ScheduleMessage, TrackEvent
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
    "format",
}
_ANNOTATIONS = {"$schema", "$comment", "$defs", "title", "description", "default"}
#: JSON Schema's date-time format is RFC 3339's: the offset is required.
_DATE_TIME = re.compile(r"^\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)$")
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
        if node.get("format") == "date-time" and not _DATE_TIME.match(instance):
            found.append(f"{at}: not a date-time with an offset")
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
    assert properties["required"] == schedule["required"] == ["message_id", "delivery_mode"]
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


@pytest.mark.parametrize("model", asyncapi.PUBLIC_MODELS, ids=lambda m: m.__name__)
def test_the_asyncapi_document_requires_the_properties_the_workers_require(
    model: type[Any],
) -> None:
    doc: dict[str, Any] = yaml.safe_load((COMMITTED / "asyncapi.yaml").read_text(encoding="utf-8"))
    properties = doc["components"]["messages"][model.__name__]["x-amqp-properties"]
    assert properties["required"] == ["message_id", "delivery_mode"]
    content_type = properties["properties"]["content_type"]["const"]
    body = json.dumps(next(s.example for s in asyncapi.PUBLIC if s.model is model)).encode()
    # the workers take the documented content type, or none at all, and nothing else
    for accepted in (content_type, None):
        contract.decode(model, body, content_type=accepted)
    for refused in (f"{content_type}; charset=utf-8", "text/plain", ""):
        with pytest.raises(InvalidMessage, match="content_type"):
            contract.decode(model, body, content_type=refused)


def _type_words(node: dict[str, Any], root: dict[str, Any]) -> str:
    """How docs/contract.md words the type of a JSON Schema node."""
    if "$ref" in node:
        target: Any = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return _type_words(target, root)
    if "anyOf" in node:
        return " or ".join(_type_words(option, root) for option in node["anyOf"])
    if node.get("type") == "array":
        return f"array of {_type_words(node['items'], root)}s"
    return str(node["type"])


def _guide_tables() -> dict[str, list[list[str]]]:
    """The field tables of docs/contract.md, by the ``##`` section holding them (the body
    first, then the contact's), each row as its cells without backquotes."""
    guide = (COMMITTED.parent / "contract.md").read_text(encoding="utf-8")
    tables: dict[str, list[list[list[str]]]] = {}
    for section in re.split(r"^## ", guide, flags=re.M)[1:]:
        heading = section.splitlines()[0]
        for table in re.findall(
            r"^\| field \| type \| required \| rules \|\n\|[-|]+\|\n((?:\|.*\n)+)", section, re.M
        ):
            rows = [
                [cell.strip().strip("`") for cell in line.strip("|").split(" | ")]
                for line in table.splitlines()
            ]
            tables.setdefault(heading, []).append(rows)
    return {f"{h}/{i}": t for h, ts in tables.items() for i, t in enumerate(ts)}


@pytest.mark.parametrize(
    ("model", "table", "definition"),
    [
        (ScheduleMessage, "Publishing a scheduled message/0", None),
        (ScheduleMessage, "Publishing a scheduled message/1", "ContactRef"),
        (TrackEvent, "Recording events/0", None),
        (ReadReceipt, "Recording read receipts/0", None),
    ],
    ids=["ScheduleMessage", "ContactRef", "TrackEvent", "ReadReceipt"],
)
def test_the_guide_the_json_schema_and_the_asyncapi_document_agree_field_by_field(
    model: type[Any], table: str, definition: str | None
) -> None:
    schema_doc = _committed_schema(model.__name__)
    asyncapi_doc: dict[str, Any] = yaml.safe_load(
        (COMMITTED / "asyncapi.yaml").read_text(encoding="utf-8")
    )
    node = schema_doc["$defs"][definition] if definition else schema_doc
    in_asyncapi = asyncapi_doc["components"]["schemas"][definition or model.__name__]
    # the AsyncAPI document carries the same schema, with its references moved
    assert json.dumps(in_asyncapi).replace("#/components/schemas/", "#/$defs/") == json.dumps(
        {k: v for k, v in node.items() if k != "$defs" and not k.startswith(("$", "x-"))}
    )
    rows = _guide_tables()[table]
    assert [r[0] for r in rows] == list(node["properties"]), "fields and their order"
    for name, words, required, _ in rows:
        assert words == _type_words(node["properties"][name], schema_doc), name
        assert required.startswith("yes") == (name in node.get("required", [])), name


@pytest.mark.parametrize(
    ("model", "change", "field"),
    [
        (ScheduleMessage, {"contact": {"id": "42", "subscribed": "yes"}}, "contact.subscribed"),
        (ScheduleMessage, {"contact": {"id": "42", "subscribed": 1}}, "contact.subscribed"),
        (
            ScheduleMessage,
            {"exclude_scope": "within", "exclude_within_seconds": "60"},
            "exclude_within_seconds",
        ),
        (
            ScheduleMessage,
            {"exclude_scope": "within", "exclude_within_seconds": True},
            "exclude_within_seconds",
        ),
        (ScheduleMessage, {"deliver_at": 1900000000}, "deliver_at"),
        (ScheduleMessage, {"deliver_at": "2030-06-01T09:00:00"}, "deliver_at"),
        (ScheduleMessage, {"v": True}, "v"),
        (ScheduleMessage, {"exclude_events": "upgrade"}, "exclude_events"),
        (TrackEvent, {"occurred_at": 1700000000}, "occurred_at"),
        (TrackEvent, {"contact": {"id": 42}}, "contact.id"),
        (ReadReceipt, {"message_id": "1234"}, "message_id"),
        (ReadReceipt, {"message_id": 1234.0}, "message_id"),
    ],
)
def test_the_workers_refuse_what_the_published_schema_refuses_without_coercing(
    model: type[Any], change: dict[str, Any], field: str
) -> None:
    example: dict[type[Any], dict[str, Any]] = {
        ScheduleMessage: asyncapi.EXAMPLE_SCHEDULE,
        TrackEvent: asyncapi.EXAMPLE_EVENT,
        ReadReceipt: asyncapi.EXAMPLE_RECEIPT,
    }
    body = {**example[model], **change}
    published = _committed_schema(model.__name__)
    assert _errors(body, published, published) != []
    with pytest.raises(InvalidMessage) as info:
        contract.decode(model, json.dumps(body).encode(), content_type=None)
    assert info.value.reason.startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"n": 1e999}', "data.n: must be a finite number"),
        (b'{"n": -1E400}', "data.n: must be a finite number"),
        (b'{"n": 1' + b"0" * 400 + b".5}", "data.n: must be a finite number"),
        (b'{"a": {"b": "x\\u0000"}}', "data.a.b: must not contain NUL characters"),
        (b'{"n": 99999999999999999999}', "data.n: integers must be between"),
    ],
)
def test_unstorable_values_however_the_json_spells_them_are_refused(
    raw: bytes, reason: str
) -> None:
    example = json.dumps({**asyncapi.EXAMPLE_SCHEDULE, "data": {}}).encode()
    body = example.replace(b'"data": {}', b'"data": ' + raw)
    with pytest.raises(InvalidMessage, match=f"^{re.escape(reason)}"):
        contract.decode(ScheduleMessage, body, content_type=None)


def test_words_and_escapes_that_only_look_unstorable_are_accepted() -> None:
    data = {"note": "NaN and Infinity, 1e5 and \\u0000", "n": 1.5e3, "big": 2**62}
    body = json.dumps({**asyncapi.EXAMPLE_SCHEDULE, "data": data}).encode()
    assert contract.decode(ScheduleMessage, body, content_type=None).data == data


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"name": "a\x00b"}, "data.name: must not contain NUL characters"),
        ({"lines": [{"k\x00": 1}]}, "data.lines[0]: keys must not contain NUL characters"),
        ({"n": float("nan")}, "data.n: must be a finite number (not NaN or Infinity)"),
        ({"n": float("-inf")}, "data.n: must be a finite number (not NaN or Infinity)"),
        ({"n": [1, 2**63]}, "data.n[1]: integers must be between -2^63 and 2^63-1"),
        ({"n": -(2**63) - 1}, "data.n: integers must be between -2^63 and 2^63-1"),
    ],
)
def test_values_postgres_cannot_store_are_refused_anywhere_naming_the_path(
    data: dict[str, Any], reason: str
) -> None:
    for model, example in (
        (ScheduleMessage, asyncapi.EXAMPLE_SCHEDULE),
        (TrackEvent, asyncapi.EXAMPLE_EVENT),
    ):
        body = json.dumps({**example, "data": data}).encode()  # NaN and Infinity as Python writes
        with pytest.raises(InvalidMessage) as info:
            contract.decode(model, body, content_type=None)
        assert info.value.reason.startswith(reason)
        with pytest.raises(InvalidMessage, match=re.escape(reason)):  # and before publishing
            contract.build(model, **{**example, "data": data})
    nul_id = {**asyncapi.EXAMPLE_SCHEDULE, "contact": {"id": "user\x00"}}
    with pytest.raises(InvalidMessage, match=r"^contact\.id: must not contain NUL"):
        contract.decode(ScheduleMessage, json.dumps(nul_id).encode(), content_type=None)
    too_big = json.dumps({**asyncapi.EXAMPLE_RECEIPT, "message_id": 2**63}).encode()
    with pytest.raises(InvalidMessage, match=r"^message_id: integers must be between"):
        contract.decode(ReadReceipt, too_big, content_type=None)
    assert any("NUL" in rule for rule in _committed_schema("ScheduleMessage")["x-nudge-rules"])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ('{"n": 1e400}', "data.n: must be a finite number"),
        ('{"n": [1, -1E+400]}', "data.n[1]: must be a finite number"),
        ('{"n": -Infinity}', "data.n: must be a finite number"),
        ('{"n": 99999999999999999999}', "data.n: integers must be between"),
        ('{"k\\u0000": 1}', "data: keys must not contain NUL characters"),
        ('{"s": "a\\u0000"}', "data.s: must not contain NUL characters"),
        ('{"s": "NaN, 1e400 and \\\\u0000 as text"}', None),
        ('{"n": -9223372036854775808, "x": 1.5e300}', None),
    ],
)
def test_refused_values_are_found_however_the_json_text_writes_them(
    data: str, reason: str | None
) -> None:
    body = json.dumps({**asyncapi.EXAMPLE_SCHEDULE, "data": "DATA"}).replace('"DATA"', data)
    if reason is None:
        decoded = contract.decode(ScheduleMessage, body.encode(), content_type=None)
        assert decoded.data == json.loads(data)
        return
    with pytest.raises(InvalidMessage) as info:
        contract.decode(ScheduleMessage, body.encode(), content_type=None)
    assert info.value.reason.startswith(reason)


def test_a_body_in_another_encoding_than_utf8_is_refused() -> None:
    text = json.dumps(asyncapi.EXAMPLE_SCHEDULE)
    contract.decode(ScheduleMessage, text.encode("utf-8"), content_type=None)
    for encoding in ("utf-16", "utf-16-le", "utf-32", "utf-8-sig"):
        with pytest.raises(InvalidMessage, match=r"^body: not valid UTF-8 JSON"):
            contract.decode(ScheduleMessage, text.encode(encoding), content_type=None)


def test_delivery_mode_is_persistent_in_the_document_the_guide_and_the_workers() -> None:
    doc: dict[str, Any] = yaml.safe_load((COMMITTED / "asyncapi.yaml").read_text(encoding="utf-8"))
    guide = (COMMITTED.parent / "contract.md").read_text(encoding="utf-8")
    for spec in asyncapi.PUBLIC:
        message = doc["components"]["messages"][spec.model.__name__]
        assert message["x-amqp-properties"]["properties"]["delivery_mode"]["const"] == 2
        assert doc["operations"][spec.operation]["bindings"]["amqp"]["deliveryMode"] == 2
    assert guide.count("| `delivery_mode` property | `2` (persistent) |") == 2
    assert contract.published_by_a_service("key", 2) == "key"
    for mode in (1, None):
        with pytest.raises(InvalidMessage, match=r"^delivery_mode: .*must be 2 \(persistent\)"):
            contract.published_by_a_service("key", mode)
