"""Templates render what the recipient should read, or fail with a reason that says why;
nothing in a template reaches Python's internals."""

from __future__ import annotations

import tracemalloc

import pytest

from shared.errors import InvalidTemplate
from workers.templating import MAX_OUTPUT_CHARS, SUSPECT_FRACTION, Renderer, contact_variables

CONTACT = contact_variables("u-1", "ann@example.com", None, "Europe/Paris", {"tier": "vip"})


def render(text: str, data: dict[str, object] | None = None, **parts: str) -> str:
    return Renderer().render("t", 1, {"text_body": text, **parts}, CONTACT, data or {}).text


def test_contact_fields_attributes_and_message_data_are_variables() -> None:
    out = render(
        "{{ contact.id }} {{ contact.email }} {{ contact.tier }} "
        "{{ contact.attributes.tier }} {{ plan }} {{ data.plan }}",
        {"plan": "pro"},
    )
    assert out == "u-1 ann@example.com vip vip pro pro"


def test_subject_is_rendered_on_one_line_and_html_is_autoescaped() -> None:
    rendered = Renderer().render(
        "t",
        3,
        {
            "subject": "Hello\n{{ name }}",
            "text_body": "{{ name }}",
            "html_body": "<b>{{ name }}</b>",
        },
        CONTACT,
        {"name": "<Ann>"},
    )
    assert (rendered.subject, rendered.text, rendered.html, rendered.version) == (
        "Hello <Ann>",
        "<Ann>",
        "<b>&lt;Ann&gt;</b>",
        3,
    )


def test_a_syntax_error_is_refused_naming_the_part_and_the_line() -> None:
    with pytest.raises(InvalidTemplate) as info:
        Renderer().validate("Hi", "line one\n{% if x %}never closed", None)
    assert info.value.reason.startswith("text_body: TemplateSyntaxError: ")
    assert info.value.reason.endswith("(line 2)")
    with pytest.raises(InvalidTemplate, match=r"^subject: TemplateSyntaxError"):
        Renderer().validate("{{ oops", "fine", None)
    with pytest.raises(InvalidTemplate, match=r"^text_body: must not be empty"):
        Renderer().validate(None, "  ", None)


def test_a_missing_variable_fails_the_render_instead_of_leaving_a_hole() -> None:
    with pytest.raises(InvalidTemplate) as info:
        render("Your {{ plan }} trial ends")
    assert info.value.reason == "template: t v1 text_body: UndefinedError: 'plan' is undefined"
    with pytest.raises(InvalidTemplate, match="has no attribute 'nickname'"):
        render("{{ contact.nickname }}")


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ contact.__class__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ joiner.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ data.update({'x': 1}) }}",
        "{{ contact.attributes.clear() }}",
        "{{ ''.format.__self__ }}",
        "{{ (1).__class__.__base__.__subclasses__() }}",
        "{{ self._TemplateReference__context }}",
        "{% set x = [].append(1) %}",
    ],
)
def test_sandbox_escape_attempts_fail_the_render(source: str) -> None:
    Renderer().validate(None, source, None)  # valid syntax: only rendering can refuse it
    with pytest.raises(InvalidTemplate) as info:
        render(source)
    assert info.value.reason.startswith("template: t v1 text_body: ")


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'x' * 10000000 }}",
        "{{ [1] * 10000000 }}",
        "{{ 2 ** 100000 }}",
        "{% for i in range(1000000) %}x{% endfor %}",
        "{% for i in range(99999) %}{% for j in range(99999) %}xxxxxxxx{% endfor %}{% endfor %}",
    ],
)
def test_output_and_resources_are_bounded(source: str) -> None:
    with pytest.raises(InvalidTemplate) as info:
        render(source)
    assert "SecurityError" in info.value.reason or "OverflowError" in info.value.reason


def test_output_just_under_the_bound_renders() -> None:
    source = "{% for i in range(256) %}{% for j in range(n) %}x{% endfor %}{% endfor %}"
    out = render(source, {"n": MAX_OUTPUT_CHARS // 256})
    assert len(out) == MAX_OUTPUT_CHARS


@pytest.mark.parametrize(
    "source",
    ["Plain text, no tags.", "ends with a newline\n", "windows\r\nlines\r\n", "braces { } alone"],
)
def test_a_part_without_tags_reads_as_jinja_renders_it(source: str) -> None:
    # rendered once per version and reused: it must be what Jinja itself would produce
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    expected = ImmutableSandboxedEnvironment().from_string(source).render()
    renderer = Renderer()
    first = renderer.render("t", 1, {"text_body": source}, CONTACT, {}).text
    again = renderer.render("t", 1, {"text_body": source}, CONTACT, {}).text
    assert first == again == expected


def test_a_constant_part_over_the_output_bound_still_fails() -> None:
    with pytest.raises(InvalidTemplate, match="output larger than 100 characters"):
        Renderer(max_output_chars=100).render("t", 1, {"text_body": "x" * 101}, CONTACT, {})


LOOPS_TEN_BILLION_TIMES = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
)


def test_a_template_that_loops_without_output_stops_at_the_time_limit() -> None:
    with pytest.raises(InvalidTemplate) as info:
        Renderer(time_limit=0.2).render("t", 1, {"text_body": LOOPS_TEN_BILLION_TIMES}, CONTACT, {})
    assert info.value.reason == (
        "template: t v1 text_body: RenderTimeout: took longer than 0.2 s to render"
    )


@pytest.mark.parametrize(
    "source",
    [
        # every loop is timed, whatever it iterates over
        "{% for a in xs %}{% for b in xs %}{% for c in xs %}{% for d in xs %}"
        "{% endfor %}{% endfor %}{% endfor %}{% endfor %}",
        # so is every call: a macro calling itself twice, 2^60 times
        "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f(60) }}",
    ],
    ids=["nested loops over data", "branching macro"],
)
def test_work_without_output_stops_at_the_time_limit(source: str) -> None:
    with pytest.raises(InvalidTemplate, match=r"RenderTimeout: took longer than 0\.2 s"):
        Renderer(time_limit=0.2).render(
            "t", 1, {"text_body": source}, CONTACT, {"xs": list(range(1000))}
        )


def test_a_template_that_ran_out_of_time_gets_a_short_limit_for_a_while() -> None:
    # so a batch of its recipients costs one limit, not one each (which could outlast a lease)
    source = "{% for i in range(n) %}{% for j in range(n) %}{% endfor %}{% endfor %}{{ n }}"
    renderer = Renderer(time_limit=0.2)
    for _ in range(2):
        with pytest.raises(InvalidTemplate) as info:
            renderer.render("t", 1, {"text_body": source}, CONTACT, {"n": 100000})
    assert info.value.reason.endswith(f"took longer than {0.2 * SUSPECT_FRACTION:g} s to render")
    # an ordinary recipient of that version still renders, and other versions keep the limit
    assert renderer.render("t", 1, {"text_body": source}, CONTACT, {"n": 3}).text == "3"
    with pytest.raises(InvalidTemplate, match=r"took longer than 0\.2 s"):
        renderer.render("t", 2, {"text_body": source}, CONTACT, {"n": 100000})


@pytest.mark.parametrize(
    ("source", "refused"),
    [
        ("{{ '%0999999999d' % 1 }}", "a format width or precision larger than"),
        ("{{ '%.999999999f' % 1.5 }}", "a format width or precision larger than"),
        ("{{ '%*d' % (999999999, 1) }}", "'*' widths are not allowed"),
        ("{{ '%0999999999d'|format(1) }}", "a format width or precision larger than"),
        ("{{ '{:>999999999}'.format(1) }}", "a format width or precision larger than"),
        ("{{ '{:>{}}'.format(1, 999999999) }}", "nested format widths are not allowed"),
        ("{{ 'x'|center(10**9) }}", "a size given to |center larger than"),
        ("{{ 'x'|center(1000000000) }}", "a size given to |center larger than"),
        ("{{ 'x'.ljust(10**9) }}", "a size given to ljust() larger than"),
        ("{{ 'x'.zfill(10**9) }}", "a size given to zfill() larger than"),
        ("{{ 'a\nb'|indent(10**9) }}", "a size given to |indent larger than"),
        ("{{ [1]|batch(10**9, 0)|list }}", "a size given to |batch larger than"),
        ("{{ [1, 2]|tojson(indent=10**9) }}", "a size given to |tojson larger than"),
        ("{{ ('x' * 100000)|replace('x', 'y' * 100000) }}", "a replacement larger than"),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            "a concatenation larger than",
        ),
        (
            "{% set ns = namespace(s=['ab']) %}{% for i in range(64) %}"
            "{% set ns.s = ns.s + ns.s %}{% endfor %}",
            "a sum larger than",
        ),
        (
            "{% set a = 'x' * 200000 %}{% set b = [a, a, a, a] %}{% set c = [b, b, b, b] %}"
            "{{ [c, c, c, c] }}",
            "an output value larger than",
        ),
        ("{% set a = 'x' * 200000 %}{{ [a, a, a]|join }}", "an argument of |join larger than"),
        ("{% set a = 'x' * 200000 %}{{ ''.join([a, a, a]) }}", "a call argument larger than"),
        (
            "{% set ns = namespace(n=10) %}{% for i in range(30) %}"
            "{% set ns.n = ns.n ** 8 %}{% endfor %}",
            "a power larger than",
        ),
        (
            "{% set ns = namespace(n=10**60) %}{% for i in range(30) %}"
            "{% set ns.n = ns.n * ns.n %}{% endfor %}",
            "a product larger than",
        ),
    ],
)
def test_constructs_that_would_build_a_huge_value_are_refused_before_building_it(
    source: str, refused: str
) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(InvalidTemplate) as info:  # refused, not stopped by the clock
            Renderer(time_limit=60).render("t", 1, {"text_body": source}, CONTACT, {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"SecurityError: {refused}" in info.value.reason
    assert peak < 16 * 2**20  # bytes: what was refused was never built


def test_a_self_calling_macro_fails_the_render_with_the_error_class() -> None:
    with pytest.raises(InvalidTemplate, match="text_body: RecursionError: "):
        render("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}")


def test_ordinary_formatting_padding_and_loops_still_render() -> None:
    out = render(
        "{{ '%05d' % 42 }}|{{ 'ab'|center(6) }}|{{ '{:>5}'.format(1) }}|{{ 'x'.ljust(3) }}|"
        "{% for x in xs %}{{ x }}{{ ',' if not loop.last }}{% endfor %}|{{ 'a' ~ 'b' }}|"
        "{{ xs|join('-') }}|{{ 2 ** 10 }}|{{ 'ab' * 2 }}|{{ [1] + [2] }}",
        {"xs": [1, 2, 3]},
    )
    assert out == "00042|  ab  |    1|x  |1,2,3|ab|1-2-3|1024|abab|[1, 2]"
