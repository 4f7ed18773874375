"""Templates render what the recipient should read, or fail with a reason that says why;
nothing in a template reaches Python's internals."""

from __future__ import annotations

import pytest

from shared.errors import InvalidTemplate
from workers.templating import MAX_OUTPUT_CHARS, Renderer, contact_variables

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
