"""``nudge template``: add, update, list, show and render message templates.

A template has a text body and optionally a subject and an HTML body, each Jinja2 (see
docs/delivery.md for the variables). Every change stores a new version; messages use the
newest, and each recipient records the version it was rendered with.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from shared.errors import InvalidMessage, InvalidTemplate, NotFound
from workers.cli.base import database, errors, load_settings, print_json

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
#: As the contract's ``Name``: what a message's ``category`` may be.
_CATEGORY = re.compile(r"[A-Za-z0-9_.:\-]{1,200}")


def _part(text: str | None, path: Path | None, option: str) -> str | None:
    if text is not None and path is not None:
        raise InvalidMessage(f"{option}: give --{option} or --{option}-file, not both")
    if path is not None:
        try:
            return path.read_text()
        except OSError as exc:
            raise InvalidMessage(f"{option}-file: {exc}") from exc
    return text


def _json_object(value: str, option: str) -> dict[str, Any]:
    try:
        doc = json.loads(value)
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"{option}: not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise InvalidMessage(f"{option}: must be a JSON object")
    return doc


def _content_options(command: Any) -> Any:
    for decorator in reversed(
        (
            click.option("--subject", help="Subject (Jinja2)."),
            click.option("--text", help="Text body (Jinja2)."),
            click.option("--text-file", type=click.Path(path_type=Path), help="Text body file."),
            click.option("--html", help="HTML body (Jinja2, autoescaped)."),
            click.option("--html-file", type=click.Path(path_type=Path), help="HTML body file."),
            click.option(
                "--track-opens/--no-track-opens",
                default=None,
                help="Add an open pixel to the HTML of emails (default: on; update: keep).",
            ),
            click.option(
                "--track-clicks/--no-track-clicks",
                default=None,
                help="Rewrite the HTML's links to click redirects (default: on; update: keep).",
            ),
            click.option(
                "--category",
                help="The category of messages that give none, for the category dedup "
                "window (update: keep; '' clears it).",
            ),
        )
    ):
        command = decorator(command)
    return command


def _category(value: str | None) -> str | None:
    """``--category`` validated like a message's category ('' means none)."""
    if not value:
        return None
    if not _CATEGORY.fullmatch(value):
        raise InvalidMessage(
            f"category: {value!r} is not a name: 1-200 letters, digits, '_', '.', ':' or '-'"
        )
    return value


def _describe(t: Any) -> dict[str, Any]:
    return {
        "name": t.name,
        "version": t.version,
        "subject": t.subject,
        "text_body": t.text_body,
        "html_body": t.html_body,
        "track_opens": t.track_opens,
        "track_clicks": t.track_clicks,
        "category": t.category,
        "created_at": t.created_at.isoformat(),
    }


@click.group()
def template() -> None:
    """Message templates (Jinja2, sandboxed, versioned)."""


@template.command("add")
@click.argument("name")
@_content_options
@click.pass_context
def template_add(
    ctx: click.Context,
    name: str,
    subject: str | None,
    text: str | None,
    text_file: Path | None,
    html: str | None,
    html_file: Path | None,
    track_opens: bool | None,
    track_clicks: bool | None,
    category: str | None,
) -> None:
    """Add template NAME (version 1); its syntax is checked first."""
    from workers.store import templates
    from workers.templating import Renderer

    settings = load_settings(ctx)
    with errors():
        text_body = _part(text, text_file, "text")
        if text_body is None:
            raise InvalidMessage("text: required (--text or --text-file)")
        html_body = _part(html, html_file, "html")
        if not _NAME.fullmatch(name):
            raise InvalidTemplate("name: 1-100 letters, digits, '_', '.' or '-'")
        Renderer().validate(subject, text_body, html_body)
        with database(settings, write=True) as conn:
            if templates.get(conn, name) is not None:
                raise InvalidTemplate(
                    f"name: template {name!r} already exists; use `nudge template update`"
                )
            version = templates.add(
                conn,
                name,
                text_body,
                subject,
                html_body,
                track_opens=track_opens is not False,
                track_clicks=track_clicks is not False,
                category=_category(category),
            )
    click.echo(f"template {name} version {version} added")


@template.command("update")
@click.argument("name")
@_content_options
@click.pass_context
def template_update(
    ctx: click.Context,
    name: str,
    subject: str | None,
    text: str | None,
    text_file: Path | None,
    html: str | None,
    html_file: Path | None,
    track_opens: bool | None,
    track_clicks: bool | None,
    category: str | None,
) -> None:
    """Store a new version of NAME; parts not given keep their current content."""
    from workers.store import templates
    from workers.templating import Renderer

    settings = load_settings(ctx)
    with errors():
        text_body = _part(text, text_file, "text")
        html_body = _part(html, html_file, "html")
        with database(settings, write=True) as conn:
            current = templates.get(conn, name)
            if current is None:
                raise NotFound(f"no template {name!r}; add it with `nudge template add`")
            new_subject = subject if subject is not None else current.subject
            new_text = text_body if text_body is not None else current.text_body
            new_html = html_body if html_body is not None else current.html_body
            Renderer().validate(new_subject, new_text, new_html)
            version = templates.add(
                conn,
                name,
                new_text,
                new_subject,
                new_html,
                track_opens=current.track_opens if track_opens is None else track_opens,
                track_clicks=current.track_clicks if track_clicks is None else track_clicks,
                category=current.category if category is None else _category(category),
            )
    click.echo(f"template {name} version {version} added")


@template.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def template_list(ctx: click.Context, as_json: bool) -> None:
    """List templates with their newest version."""
    from workers.store import templates

    settings = load_settings(ctx)
    with errors(), database(settings) as conn:
        found = templates.list_latest(conn)
    if as_json:
        print_json([_describe(t) for t in found])
        return
    if not found:
        click.echo("no templates; add one with `nudge template add`")
    for t in found:
        click.echo(
            f"{t.name}  v{t.version}  {t.created_at.isoformat(timespec='seconds')}"
            + (f"  [{t.category}]" if t.category else "")
            + (f"  {t.subject}" if t.subject else "")
        )


@template.command("show")
@click.argument("name")
@click.option("--version", type=click.IntRange(1), help="A given version (default: newest).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def template_show(ctx: click.Context, name: str, version: int | None, as_json: bool) -> None:
    """Show template NAME's content."""
    t = _get(ctx, name, version)
    if as_json:
        print_json(_describe(t))
        return
    click.echo(f"template {t.name} version {t.version} ({t.created_at.isoformat()})")
    click.echo(f"subject: {t.subject or ''}")
    click.echo(f"category: {t.category or 'none'}")
    tracked = [k for k, on in (("opens", t.track_opens), ("clicks", t.track_clicks)) if on]
    click.echo(f"tracking: {', '.join(tracked) or 'off'}")
    click.echo("text:")
    click.echo(t.text_body)
    if t.html_body is not None:
        click.echo("html:")
        click.echo(t.html_body)


def _get(ctx: click.Context, name: str, version: int | None) -> Any:
    from workers.store import templates

    settings = load_settings(ctx)
    with errors():
        with database(settings) as conn:
            found = templates.get(conn, name, version)
        if found is None:
            which = f"version {version} of " if version else ""
            raise NotFound(f"no {which}template {name!r}")
    return found


@template.command("render")
@click.argument("name")
@click.option("--version", type=click.IntRange(1), help="A given version (default: newest).")
@click.option(
    "--contact",
    "contact_json",
    default='{"id": "example"}',
    show_default=True,
    help="JSON: id, email, phone, timezone, attributes.",
)
@click.option("--data", "data_json", default="{}", help="JSON object: the message's data.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def template_render(
    ctx: click.Context,
    name: str,
    version: int | None,
    contact_json: str,
    data_json: str,
    as_json: bool,
) -> None:
    """Render NAME for a sample contact and data, as a recipient would get it."""
    from workers.templating import Renderer, contact_variables

    t = _get(ctx, name, version)
    with errors():
        contact = _json_object(contact_json, "--contact")
        data = _json_object(data_json, "--data")
        attributes = contact.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise InvalidMessage("--contact: attributes must be a JSON object")
        rendered = Renderer().render(
            t.name,
            t.version,
            {"subject": t.subject, "text_body": t.text_body, "html_body": t.html_body},
            contact_variables(
                str(contact.get("id", "example")),
                contact.get("email"),
                contact.get("phone"),
                contact.get("timezone"),
                attributes,
            ),
            data,
        )
    if as_json:
        print_json(
            {
                "template": rendered.template,
                "version": rendered.version,
                "subject": rendered.subject,
                "text": rendered.text,
                "html": rendered.html,
            }
        )
        return
    click.echo(f"subject: {rendered.subject or ''}")
    click.echo(rendered.text)
    if rendered.html is not None:
        click.echo("--- html ---")
        click.echo(rendered.html)
