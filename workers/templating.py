"""Template rendering: Jinja2 in an immutable sandbox, strict about missing variables, bounded in
output size, in the size of every value it builds, and in time.

A template has a text body and optionally a subject and an HTML body, each a Jinja2 source.
They see two variables: ``contact`` (the stored contact: ``id`` is the service's external id,
``email``, ``phone``, ``timezone``, and every attribute, e.g. ``contact.plan``) and ``data``
(the message's data); the keys of ``data`` are also variables of their own. A variable that
does not exist fails the render (``StrictUndefined``) instead of sending a message with a hole
in it.

The sandbox refuses attribute access to internals (``__class__``, ``__globals__``...), calls of
methods that mutate, and ranges above 100,000 items. On top of Jinja's sandbox, every place
where a template can do work passes through a check here: each loop iteration, call, filter,
attribute or item lookup, arithmetic operator, ``~`` concatenation and ``{{ }}`` output. Each
check stops the render once its time limit has passed, and refuses, *before* building it, a
value whose size (characters, items, digits) would exceed the output bound: a padding width,
a format width or precision, a repetition, a join, a replacement, a big power. Python cannot
interrupt a thread, so the time limit holds between checks: between two checks a template can
only run one bounded step (one built-in operation on values no larger than the bound).
"""

from __future__ import annotations

import functools
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg

from shared.errors import InvalidTemplate

#: The largest rendered part, in characters. Bigger means a runaway loop or an abuse, not mail.
#: No value a template builds may be larger either (strings in characters, lists in items
#: plus the characters of their strings).
MAX_OUTPUT_CHARS = 256 * 1024
#: How long one recipient's render may take by default (``NUDGE_RENDER_TIMEOUT_SECONDS``).
RENDER_TIMEOUT_SECONDS = 1.0
#: A template version that ran out of time is given this fraction of the limit for
#: :data:`SUSPECT_SECONDS`: a batch of recipients of one hostile template then costs one time
#: limit and a few short ones, not one full limit per recipient (which could outlast the
#: claim lease), while an ordinary recipient of it still renders in far less.
SUSPECT_FRACTION = 0.05
SUSPECT_SECONDS = 600.0
#: The largest integer a template may compute, in bits (about 1,200 decimal digits).
MAX_INT_BITS = 4096

PARTS = ("subject", "text_body", "html_body")

#: Filters and string methods whose numeric arguments are sizes of what they build.
_SIZED_FILTERS = frozenset({"center", "indent", "batch", "slice", "tojson", "wordwrap"})
_SIZED_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
#: A printf-style conversion: its width and precision (``*`` takes them from the arguments).
_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")

#: The render running in this thread or task: (deadline on the monotonic clock, limit).
_deadline: ContextVar[tuple[float, float]] = ContextVar("nudge_render_deadline")


class RenderTimeout(SecurityError):
    """The render ran past its time limit."""


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


def _in_time() -> None:
    limit = _deadline.get(None)
    if limit is not None and time.monotonic() > limit[0]:
        raise RenderTimeout(f"took longer than {limit[1]:g} s to render")


def _weight(value: Any, bound: int) -> int:
    """The size of ``value`` as text, roughly: characters of strings, digits of numbers, one
    per item of a container and what the items weigh. Stops counting past ``bound``, so it
    costs at most ``bound`` steps whatever ``value`` is (a list repeating one big string, a
    list of lists of lists...)."""
    total = 0
    stack = [value]
    while stack and total <= bound:
        item = stack.pop()
        if isinstance(item, str | bytes):
            total += len(item)
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        elif isinstance(item, dict):
            total += 1
            stack += item.keys()
            stack += item.values()
        elif isinstance(item, list | tuple | set | frozenset):
            total += 1
            stack += item
        else:
            total += 1
    return total


class _Generator(CodeGenerator):
    """Jinja's code generator, with every ``for`` loop and every ``~`` routed through the
    environment's checks (neither calls anything Jinja's sandbox can intercept)."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:  # noqa: N802 (Jinja's name)
        checked = nodes.Call(
            nodes.EnvironmentAttribute("bounded_iter"), [node.iter], [], None, None
        )
        checked.set_lineno(node.iter.lineno)
        loop = nodes.For(node.target, checked, node.body, node.else_, node.test, node.recursive)
        loop.set_lineno(node.lineno)
        super().visit_For(loop, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:  # noqa: N802
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        else:
            join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
        self.write(f"environment.bounded_join({join}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, with a time limit and a size bound checked wherever a template does work.

    ``bounded_iter`` and ``bounded_join`` are called by the code :class:`_Generator` emits."""

    code_generator_class = _Generator
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self, bound: int, **options: Any) -> None:
        super().__init__(finalize=self._output, **options)
        self.bound = bound
        self.globals.pop("lipsum", None)  # lipsum(n=10**9) loops in Python, unchecked
        self.filters = {name: self._checked_filter(name, f) for name, f in self.filters.items()}

    # -- the checks

    def _refuse_big(self, value: Any, what: str) -> Any:
        if _weight(value, self.bound) > self.bound:
            raise SecurityError(f"{what} larger than {self.bound} characters is not allowed")
        return value

    def _refuse_width(self, n: Any, what: str) -> None:
        if isinstance(n, int) and abs(n) > self.bound:
            raise SecurityError(f"{what} larger than {self.bound} is not allowed")

    def _check_printf(self, fmt: str, args: Any) -> None:
        for match in _PRINTF.finditer(fmt):
            for size in match.groups():
                if size == "*":
                    raise SecurityError("'*' widths are not allowed in templates")
                if size is not None:
                    self._refuse_width(int(size), "a format width or precision")
        self._refuse_big(args, "a value to format")

    def _check_format(self, fmt: str) -> None:
        try:
            fields = list(string.Formatter().parse(fmt))
        except ValueError:
            return  # str.format itself will refuse it
        for _, _, spec, _ in fields:
            if spec and "{" in spec:
                raise SecurityError("nested format widths are not allowed in templates")
            for size in re.findall(r"\d+", spec or ""):
                self._refuse_width(int(size), "a format width or precision")

    def _output(self, value: Any) -> Any:
        _in_time()
        return self._refuse_big(value, "an output value")

    def bounded_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """What a template's ``for`` loops over, with the time checked at every item."""
        for item in iterable:
            _in_time()
            yield item

    def bounded_join(self, join: Callable[[Iterable[Any]], str], parts: tuple[Any, ...]) -> str:
        """``a ~ b``: refused before joining when the result would be too large."""
        _in_time()
        self._refuse_big(list(parts), "a concatenation")
        return join(parts)

    def _checked_filter(self, name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        skip = 1 if _PassArg.from_obj(f) is not None else 0

        @functools.wraps(f)
        def checked(*args: Any, **kwargs: Any) -> Any:
            _in_time()
            given = args[skip:]
            self._refuse_big([given, kwargs], f"an argument of |{name}")
            if name in _SIZED_FILTERS:
                for n in (*given[1:], *kwargs.values()):
                    self._refuse_width(n, f"a size given to |{name}")
            if name == "format" and given and isinstance(given[0], str):
                self._check_printf(given[0], given[1:])
            if name == "replace" and len(given) >= 3:
                self._check_replace(*given[:3])
            return self._refuse_big(f(*args, **kwargs), f"the result of |{name}")

        return checked

    def _check_replace(self, value: Any, old: Any, new: Any) -> None:
        text, old, new = str(value), str(old), str(new)
        count = text.count(old) if old else len(text) + 1
        if len(text) + count * (len(new) - len(old)) > self.bound:
            raise SecurityError(f"a replacement larger than {self.bound} characters is not allowed")

    # -- Jinja's sandbox hooks

    def getattr(self, obj: Any, attribute: str) -> Any:
        _in_time()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _in_time()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            self._check_format(value.__self__)
        return wrapped

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _in_time()
        __self._refuse_big([args, kwargs], "a call argument")
        owner = getattr(__obj, "__self__", None)
        method = getattr(__obj, "__name__", "")
        if isinstance(owner, str):
            if method in _SIZED_METHODS:
                for n in (*args, *kwargs.values()):
                    __self._refuse_width(n, f"a size given to {method}()")
            elif method == "replace" and len(args) >= 2:
                __self._check_replace(owner, args[0], args[1])
            elif method == "join" and args:
                __self._refuse_big([list(args[0]), owner], "a join")
        result = super().call(__context, __obj, *args, **kwargs)
        return __self._refuse_big(result, "a call's result")

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _in_time()
        self._check_binop(operator, left, right)
        result = super().call_binop(context, operator, left, right)
        if isinstance(result, int) and result.bit_length() > MAX_INT_BITS:
            raise SecurityError(f"a number larger than {MAX_INT_BITS} bits is not allowed")
        return result

    def _check_binop(self, operator: str, left: Any, right: Any) -> None:
        """Refuse an operation whose result would be too large, before computing it."""
        numbers = isinstance(left, int) and isinstance(right, int)
        if (
            operator == "**"
            and numbers
            and (right > 64 or left.bit_length() * right > MAX_INT_BITS)
        ):
            raise SecurityError(f"a power larger than {MAX_INT_BITS} bits is not allowed")
        if operator == "*" and numbers and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise SecurityError(f"a product larger than {MAX_INT_BITS} bits is not allowed")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(n, int)
                    and _weight(seq, self.bound) * n > self.bound
                ):
                    raise SecurityError(f"repetition larger than {self.bound} items is not allowed")
        if operator == "+":
            self._refuse_big([left, right], "a sum")
        if operator == "%" and isinstance(left, str):
            self._check_printf(left, right)


def _message(exc: Exception) -> str:
    line = getattr(exc, "lineno", None)
    where = f" (line {line})" if line else ""
    return f"{type(exc).__name__}: {exc}{where}"


class Renderer:
    """Compiles and renders templates; compiled versions are cached by (name, version), which
    never change once stored."""

    def __init__(
        self,
        max_output_chars: int = MAX_OUTPUT_CHARS,
        cache_size: int = 512,
        *,
        time_limit: float = RENDER_TIMEOUT_SECONDS,
    ) -> None:
        self._env = _Environment(max_output_chars, undefined=StrictUndefined, autoescape=False)
        self._html_env = _Environment(max_output_chars, undefined=StrictUndefined, autoescape=True)
        self._max = max_output_chars
        self._cache: dict[tuple[str, int, str], Any] = {}
        self._cache_size = cache_size
        self._time_limit = time_limit
        #: Template versions that ran out of time, and until when they get a short limit.
        self._suspects: dict[tuple[str, int], float] = {}

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
        what failed (a missing variable, a sandbox violation, the size bound, the time limit,
        or any other error, by its class). The template's tracking flags go with the result,
        for the email channel.

        CPU-bound for up to the time limit: async callers run it in a thread."""
        variables = {**data, "data": dict(data), "contact": dict(contact)}
        out: dict[str, str | None] = {}
        compiled: dict[str, Any] = {}
        # Compiling runs no template code (and is cached): only rendering is timed.
        for part in PARTS:
            source = parts.get(part)
            if source is not None:
                with self._failing(name, version, part):
                    compiled[part] = self._compiled(name, version, part, source)
        limit = self._limit(name, version)
        token = _deadline.set((time.monotonic() + limit, limit))
        try:
            for part in PARTS:
                if part not in compiled:
                    out[part] = None
                    continue
                with self._failing(name, version, part):
                    out[part] = self._render_part(compiled[part], variables)
        finally:
            _deadline.reset(token)
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

    def _limit(self, name: str, version: int) -> float:
        """The time limit of a render of this template version."""
        until = self._suspects.get((name, version))
        if until is None:
            return self._time_limit
        if until < time.monotonic():
            self._suspects.pop((name, version), None)
            return self._time_limit
        return self._time_limit * SUSPECT_FRACTION

    @contextmanager
    def _failing(self, name: str, version: int, part: str) -> Iterator[None]:
        """Any error of the template becomes this recipient's :class:`InvalidTemplate`."""
        try:
            yield
        except Exception as exc:  # whatever the template did, it fails this recipient only
            if isinstance(exc, RenderTimeout):
                self._suspects[(name, version)] = time.monotonic() + SUSPECT_SECONDS
            raise InvalidTemplate(f"template: {name} v{version} {part}: {_message(exc)}") from exc

    def _compiled(self, name: str, version: int, part: str, source: str) -> Any:
        """The compiled part, or its text when it has no tags (the same for everyone)."""
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
        return compiled

    def _render_part(self, compiled: Any, variables: dict[str, Any]) -> str:
        if isinstance(compiled, str):
            if len(compiled) > self._max:
                raise SecurityError(f"output larger than {self._max} characters")
            return compiled
        chunks: list[str] = []
        size = 0
        # Rendering chunk by chunk stops a runaway loop at the bound instead of at the end.
        for chunk in compiled.generate(variables):
            _in_time()
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
