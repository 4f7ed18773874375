"""Template rendering: Jinja2 in an immutable sandbox, strict about missing variables, bounded in
output size.

A template has a text body and optionally a subject and an HTML body, each a Jinja2 source.
They see two variables: ``contact`` (the stored contact: ``id`` is the service's external id,
``email``, ``phone``, ``timezone``, and every attribute, e.g. ``contact.plan``) and ``data``
(the message's data); the keys of ``data`` are also variables of their own. A variable that
does not exist fails the render (``StrictUndefined``) instead of sending a message with a hole
in it. The sandbox refuses attribute access to internals (``__class__``, ``__globals__``...),
calls of methods that mutate, ranges above 100,000 items, and multiplications that would build
a string or list larger than the output bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from shared.errors import InvalidTemplate

#: The largest rendered part, in characters. Bigger means a runaway loop or an abuse, not mail.
MAX_OUTPUT_CHARS = 256 * 1024

PARTS = ("subject", "text_body", "html_body")


@dataclass(frozen=True)
class Rendered:
    """A template rendered for one recipient."""

    template: str
    version: int
    subject: str | None
    text: str
    html: str | None
    #: The template asks for an open pixel and click redirects in the HTML (when the email
    #: channel has a tracking URL).
    track_opens: bool = True
    track_clicks: bool = True


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, with ``*`` and ``**`` checked so one expression cannot exhaust memory."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise SecurityError("exponent larger than 64 is not allowed in templates")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(n, int)
                    and len(seq) * n > MAX_OUTPUT_CHARS
                ):
                    raise SecurityError(
                        f"repetition larger than {MAX_OUTPUT_CHARS} items is not allowed"
                    )
        return super().call_binop(context, operator, left, right)


def _message(exc: Exception) -> str:
    line = getattr(exc, "lineno", None)
    where = f" (line {line})" if line else ""
    return f"{type(exc).__name__}: {exc}{where}"


class Renderer:
    """Compiles and renders templates; compiled versions are cached by (name, version), which
    never change once stored."""

    def __init__(self, max_output_chars: int = MAX_OUTPUT_CHARS, cache_size: int = 512) -> None:
        self._env = _Environment(undefined=StrictUndefined, autoescape=False)
        self._html_env = _Environment(undefined=StrictUndefined, autoescape=True)
        self._max = max_output_chars
        self._cache: dict[tuple[str, int, str], Any] = {}
        self._cache_size = cache_size

    def validate(self, subject: str | None, text_body: str, html_body: str | None) -> None:
        """Compile every part; raises :class:`InvalidTemplate` naming the part and the line."""
        for part, source in zip(PARTS, (subject, text_body, html_body), strict=True):
            if source is None:
                continue
            try:
                (self._html_env if part == "html_body" else self._env).parse(source)
            except TemplateError as exc:
                raise InvalidTemplate(f"{part}: {_message(exc)}") from exc
        if not text_body.strip():
            raise InvalidTemplate("text_body: must not be empty")

    def render(
        self,
        name: str,
        version: int,
        parts: Mapping[str, str | None],
        contact: Mapping[str, Any],
        data: Mapping[str, Any],
        *,
        track_opens: bool = True,
        track_clicks: bool = True,
    ) -> Rendered:
        """Render ``parts`` (``subject``, ``text_body``, ``html_body``) for one recipient;
        raises :class:`InvalidTemplate` with a reason that names the template, the part and
        what failed (a missing variable, a sandbox violation, the output bound). The
        template's tracking flags go with the result, for the email channel."""
        variables = {**data, "data": dict(data), "contact": dict(contact)}
        out: dict[str, str | None] = {}
        for part in PARTS:
            source = parts.get(part)
            if source is None:
                out[part] = None
                continue
            try:
                out[part] = self._render_part(name, version, part, source, variables)
            except (TemplateError, ArithmeticError, TypeError, ValueError) as exc:
                raise InvalidTemplate(
                    f"template: {name} v{version} {part}: {_message(exc)}"
                ) from exc
        text = out["text_body"]
        assert text is not None
        subject = out["subject"]
        return Rendered(
            name,
            version,
            " ".join(subject.split()) if subject is not None else None,  # one header line
            text,
            out["html_body"],
            track_opens,
            track_clicks,
        )

    def _render_part(
        self, name: str, version: int, part: str, source: str, variables: dict[str, Any]
    ) -> str:
        key = (name, version, part)
        compiled = self._cache.get(key)
        if compiled is None:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            env = self._html_env if part == "html_body" else self._env
            compiled = env.from_string(source)
            if not any(tag in source for tag in ("{{", "{%", "{#")):
                # no variable, statement or comment: the same text for everyone, rendered once
                # (Jinja still normalises newlines and drops a trailing one)
                compiled = "".join(compiled.generate({}))
            self._cache[key] = compiled
        if isinstance(compiled, str):
            if len(compiled) > self._max:
                raise SecurityError(f"output larger than {self._max} characters")
            return compiled
        chunks: list[str] = []
        size = 0
        # Rendering chunk by chunk stops a runaway loop at the bound instead of at the end.
        for chunk in compiled.generate(variables):
            size += len(chunk)
            if size > self._max:
                raise SecurityError(f"output larger than {self._max} characters")
            chunks.append(chunk)
        return "".join(chunks)


def contact_variables(
    external_id: str,
    email: str | None,
    phone: str | None,
    timezone: str | None,
    attributes: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``contact`` variable: the attributes, with the stored fields taking precedence."""
    return {
        **attributes,
        "id": external_id,
        "email": email,
        "phone": phone,
        "timezone": timezone,
        "attributes": dict(attributes),
    }
