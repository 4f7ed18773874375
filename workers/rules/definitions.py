"""Automation rules as data: on event E, after a delay, send template T on channel C, unless the
contact did any of X since; once per contact or every time.

A rule file is YAML (``nudge rules load FILE``)::

    rules:
      - name: sale-shipping
        event: order_paid
        delay: 2h
        template: shipping-status
        channel: webhook
        unless: [order_cancelled]

Validation names the file, line, rule and field of every problem. The loader reads YAML 1.2
scalars (``on``, ``no`` and ``10:30`` stay strings), so ``at: 10:30`` means half past ten.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, JsonValue, ValidationError

from shared.contract import Channel, Name, Priority
from workers.durations import format_duration
from workers.rules.delay_policies import POLICIES, ContactFacts, DelayPolicy, Duration, Plan


def _names(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


EventNames = Annotated[tuple[Name, ...], BeforeValidator(_names)]


class Rule(BaseModel):
    """One automation rule, as validated from a rule file and stored in ``rules.definition``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    #: The event(s) that start the rule.
    event: EventNames = Field(min_length=1, max_length=50)
    #: Inactivity: the rule starts counting when none of ``event`` happened for this long
    #: after one of them; any later one cancels that count (and starts its own).
    inactive_for: Duration | None = None
    delay: DelayPolicy
    template: Name
    channel: Channel
    #: Do not send if the contact did one of these after the trigger.
    unless: EventNames = Field(default=(), max_length=50)
    #: At most one message per contact, ever (the first event wins, even under concurrency).
    run_once: bool = False
    category: Name | None = None
    priority: Priority = Priority.AUTOMATION
    #: Not sent (recorded ``expired``) when due later than this after its delivery time.
    expires_after: Duration | None = None
    data: dict[str, JsonValue] = Field(default_factory=dict)
    #: Set by the file only when given: a reload keeps a rule switched off by ``disable``.
    enabled: bool | None = Field(default=None, exclude=True)

    @property
    def exclude_events(self) -> tuple[str, ...]:
        """What the message is excluded by: ``unless``, and for inactivity the trigger
        events themselves."""
        extra = self.event if self.inactive_for is not None else ()
        return tuple(dict.fromkeys((*self.unless, *extra)))

    def start(self, occurred_at: datetime) -> datetime:
        """When the delay starts counting for an event at ``occurred_at``."""
        return occurred_at + (self.inactive_for or timedelta(0))

    def plan(self, occurred_at: datetime, contact: ContactFacts) -> Plan:
        """When the message of an event at ``occurred_at`` falls due, and why."""
        plan = self.delay.plan(self.start(occurred_at), contact)
        if self.inactive_for is None:
            return plan
        return Plan(
            plan.deliver_at, f"inactive for {format_duration(self.inactive_for)}, then {plan.why}"
        )

    def definition(self) -> dict[str, Any]:
        """The JSON stored in ``rules.definition``."""
        return self.model_dump(mode="json", exclude_defaults=True) | {
            "delay": self.delay.model_dump(mode="json")
        }


class _Loader(yaml.SafeLoader):
    """YAML 1.2 core schema scalars: only true/false are booleans, no base-60 numbers."""


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789")
)

Path = tuple[str | int, ...]


def _lines(node: yaml.Node, path: Path, out: dict[Path, int]) -> None:
    """The 1-based line of every mapping key and sequence item under ``node``."""
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, str(key.value))
            out[child] = key.start_mark.line + 1
            _lines(value, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _lines(item, (*path, i), out)


@dataclass(frozen=True)
class RuleFile:
    """A validated rule file, with the line of every field for later errors."""

    source: str
    rules: tuple[Rule, ...]
    lines: Mapping[Path, int]

    def where(self, index: int, *field: str | int) -> str:
        """``FILE line N: rule 'x', field f`` for a field of the ``index``-th rule."""
        return _where(self.source, self.lines, index, self.rules[index].name, field)

    def unknown_templates(self, missing: set[str]) -> list[str]:
        """Problems for the rules whose template does not exist."""
        return [
            f"{self.where(i, 'template')}: no template named {r.template!r}; "
            "add it first (templates are created by name, e.g. `nudge templates add`)"
            for i, r in enumerate(self.rules)
            if r.template in missing
        ]


def _where(
    source: str,
    lines: Mapping[Path, int],
    index: int,
    name: str,
    field: Sequence[str | int],
    *,
    missing: bool = False,
) -> str:
    path: Path = ("rules", index)
    shown: list[str] = []
    for i, part in enumerate(field):  # pydantic adds union tags: keep what the file has
        if (*path, part) in lines:
            path = (*path, part)
            shown.append(str(part))
        elif missing and i == len(field) - 1 and isinstance(part, str):
            shown.append(part)
    what = f"field {'.'.join(shown)}" if shown else "the rule"
    return f"{source} line {lines.get(path, 1)}: rule {name!r}, {what}"


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "union_tag_invalid":
        return f"unknown policy {err['ctx']['tag']!r}: use one of {', '.join(POLICIES)}"
    if kind == "union_tag_not_found":
        return f"a delay is a duration such as 15m, or a mapping with policy: {'|'.join(POLICIES)}"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required"
    msg: str = err["msg"]
    return msg.removeprefix("Value error, ")


def parse(text: str, source: str = "<rules>") -> RuleFile:
    """Parse and validate a rule file; raises :class:`ValueError` with one line per problem,
    each naming the file, line, rule and field."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise ValueError(f"{source} line {line}: bad YAML: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{source} line 1: bad YAML: {exc}") from exc
    if node is None or not isinstance(raw, dict) or not isinstance(raw.get("rules"), list):
        raise ValueError(f"{source} line 1: a rule file is a mapping with a 'rules' list")
    lines: dict[Path, int] = {}
    _lines(node, (), lines)
    if set(raw) != {"rules"}:
        extra = sorted(str(k) for k in raw if k != "rules")
        raise ValueError(
            f"{source} line {lines.get((extra[0],), 1)}: unknown top-level key {extra[0]!r}: "
            "only 'rules'"
        )
    problems: list[str] = []
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw["rules"]):
        name = str(item.get("name", f"#{i + 1}")) if isinstance(item, dict) else f"#{i + 1}"
        if not isinstance(item, dict):
            problems.append(f"{_where(source, lines, i, name, ())}: must be a mapping")
            continue
        if name in seen:
            problems.append(
                f"{_where(source, lines, i, name, ('name',))}: duplicate, first at line "
                f"{lines[('rules', seen[name], 'name')]}"
            )
            continue
        if "name" in item:
            seen[name] = i
        try:
            rule = Rule.model_validate(item)
        except ValidationError as exc:
            for err in exc.errors():
                loc = (*err["loc"], "policy") if err["type"] == "union_tag_invalid" else err["loc"]
                where = _where(source, lines, i, name, loc, missing=err["type"] == "missing")
                problems.append(f"{where}: {_message(err)}")
            continue
        rules.append(rule)
    if problems:
        raise ValueError("\n".join(problems))
    return RuleFile(source, tuple(rules), lines)


def from_definition(definition: Mapping[str, Any]) -> Rule:
    """A stored rule (validated when it was loaded)."""
    return Rule.model_validate(definition)
