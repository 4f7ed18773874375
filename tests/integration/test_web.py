"""The web role against a real worker: one-click unsubscribe, the open pixel and click
redirects, checked with an HTTP client and, for the confirmation page, a real browser."""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, text

from producer import Producer
from tests.support import Mail, MailServer, Worker, final_row, free_port, nudge, wait_for
from workers import tracking
from workers.config import Settings
from workers.store import templates

TRACKING_SECRET = secrets.token_urlsafe(32)
UNSUBSCRIBE_SECRET = secrets.token_urlsafe(32)
NEWS_HTML = (
    "<html><body><p>Hi {{ contact.id }}</p>"
    '<a href="https://example.com/offer?x=1&amp;y=2">the offer</a> '
    "<a href='mailto:help@example.com'>write to us</a></body></html>"
)
OFFER = "https://example.com/offer?x=1&y=2"


@dataclass
class Web:
    """A worker with the scheduler, dispatch and web roles, sending email to a test server."""

    worker: Worker
    url: str
    settings: Settings
    mail: MailServer

    def send(self, contact: str, template: str, key: str) -> Mail:
        with Producer(self.settings.amqp_url) as producer:
            producer.schedule(
                {"id": contact, "email": f"{contact}@example.com"},
                template,
                "email",
                idempotency_key=key,
            )
        mails = wait_for(
            lambda: [m for m in self.mail.received if m.recipients == [f"{contact}@example.com"]],
            timeout=20,
            message=f"the email to {contact}",
        )
        return mails[0]


@pytest.fixture
def web(
    settings: Settings,
    mail_server: MailServer,
    engine: Engine,
    start_worker: Callable[..., Worker],
) -> Web:
    with engine.begin() as conn:
        templates.add(conn, "news", "Hi {{ contact.id }}", "News", NEWS_HTML)
        templates.add(conn, "quiet", "Hi", "Quiet", NEWS_HTML, track_opens=True, track_clicks=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    overrides: dict[str, Any] = {
        "smtp_host": "127.0.0.1",
        "smtp_port": mail_server.port,
        "smtp_security": "none",
        "web_port": port,
        "tracking_url": url,
        "tracking_secret": SecretStr(TRACKING_SECRET),
        "unsubscribe_url": f"{url}/unsubscribe",
        "unsubscribe_secret": SecretStr(UNSUBSCRIBE_SECRET),
    }
    worker = start_worker("scheduler", "dispatch", "web", **overrides)
    return Web(worker, url, settings.model_copy(update=overrides), mail_server)


def _html(mail: Mail) -> str:
    body: str = mail.message.get_body(("html",)).get_content()
    return body


def _links(html: str) -> list[str]:
    return [h.replace("&amp;", "&") for h in re.findall(r"""href=["']([^"']*)["']""", html)]


def _pixel(html: str) -> str:
    found = re.search(r'<img src="([^"]*)"', html)
    assert found is not None, html
    return found.group(1).replace("&amp;", "&")


def _count(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one())


def _subscribed(engine: Engine, contact: str) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text("SELECT subscribed FROM contacts WHERE external_id = :c"), {"c": contact}
            ).scalar_one()
        )


def _tampered(token_url: str) -> str:
    """The URL with one character of the token's payload changed."""
    head, _, token = token_url.rpartition("/")
    flipped = ("B" if token[3] == "A" else "A").join((token[:3], token[4:]))
    return f"{head}/{flipped}"


def test_opens_and_clicks_are_recorded_per_recipient_and_a_click_redirects_to_its_link(
    web: Web, engine: Engine
) -> None:
    html = _html(web.send("ann", "news", "news-ann"))
    links = _links(html)
    assert links[1] == "mailto:help@example.com"  # only http(s) links are tracked
    click, pixel = links[0], _pixel(html)
    assert click.startswith(f"{web.url}/c/")
    assert pixel.startswith(f"{web.url}/o/")
    with httpx.Client(timeout=10) as http:
        for _ in range(2):
            opened = http.get(pixel)
            assert opened.status_code == 200
            assert opened.headers["content-type"] == "image/gif"
            assert opened.headers["cache-control"] == "no-store"
        followed = http.get(click)
        assert followed.status_code == 302
        assert followed.headers["location"] == OFFER
    message = nudge(web.settings, "message", "show", "news-ann")
    assert message.returncode == 0, message.stderr
    line = next(li for li in message.stdout.splitlines() if li.strip().startswith("ann:"))
    assert "opened " in line
    assert "(2 times)" in line
    assert f"clicked {OFFER} at " in line
    assert web.worker.metric("nudge_email_opens_total", first="true") == 1
    assert web.worker.metric("nudge_email_opens_total", first="false") == 1
    assert web.worker.metric("nudge_email_clicks_total") == 1


def test_a_bad_or_tampered_token_gets_a_4xx_and_records_nothing(web: Web, engine: Engine) -> None:
    html = _html(web.send("bob", "news", "news-bob"))
    click, pixel = _links(html)[0], _pixel(html)
    item = final_row(engine, "news-bob")
    mid, cid = item["message_id"], item["contact_id"]
    forged = [
        _tampered(click),
        _tampered(pixel),
        # a redirect anywhere else, signed with another secret: no open redirect
        tracking.click_url(web.url, "not-the-secret", mid, cid, "https://evil.example/"),
        tracking.open_url(web.url, "not-the-secret", mid, cid),
        # an open token used as a click, and garbage
        f"{web.url}/c/{pixel.rpartition('/')[2]}",
        f"{web.url}/o/not-a-token",
    ]
    with httpx.Client(timeout=10) as http:
        for url in forged:
            answer = http.get(url)
            assert answer.status_code == 400, url
            assert "location" not in answer.headers
        # well signed, but for a recipient that was never sent anything
        unknown = http.get(tracking.open_url(web.url, TRACKING_SECRET, mid, cid + 1000))
        assert unknown.status_code == 404
    assert _count(engine, "SELECT count(*) FROM message_opens") == 0
    assert _count(engine, "SELECT count(*) FROM message_clicks") == 0
    assert web.worker.metric("nudge_web_rejected_total") == len(forged) + 1


def test_a_template_that_opts_out_of_click_tracking_keeps_its_links(web: Web) -> None:
    html = _html(web.send("cy", "quiet", "quiet-cy"))
    assert _links(html) == [OFFER, "mailto:help@example.com"]
    assert _pixel(html).startswith(f"{web.url}/o/")  # opens are still tracked


def _unsubscribe_link(mail: Mail) -> str:
    assert mail.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link: str = mail.message["List-Unsubscribe"].strip("<>")
    return link


def test_one_click_post_unsubscribes_at_once_and_dispatch_then_suppresses_the_contact(
    web: Web, engine: Engine
) -> None:
    link = _unsubscribe_link(web.send("dee", "news", "news-dee-1"))
    with httpx.Client(timeout=10) as http:
        page = http.get(link)  # what a link scanner does: nothing changes
        assert page.status_code == 200
        assert '<form method="post"' in page.text
        assert _subscribed(engine, "dee")
        forged = http.post(link.replace("c=dee", "c=eve"), data={"List-Unsubscribe": "One-Click"})
        assert forged.status_code == 400
        assert _subscribed(engine, "dee")
        # RFC 8058: the mail provider POSTs List-Unsubscribe=One-Click to the header's URL
        done = http.post(link, data={"List-Unsubscribe": "One-Click"})
        assert done.status_code == 200
    assert not _subscribed(engine, "dee")
    assert _count(engine, "SELECT count(*) FROM contact_events WHERE name = 'unsubscribed'") == 1
    with Producer(web.settings.amqp_url) as producer:
        producer.schedule("dee", "news", "email", idempotency_key="news-dee-2")
    item = final_row(engine, "news-dee-2")
    assert item["status"] == "suppressed"
    assert item["reason"].startswith("unsubscribed")
    assert web.worker.metric("nudge_unsubscribes_total", via="one-click") == 1


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed when missing (CI starts from a clean machine)."""
    path = shutil.which("chromium")
    if path is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"], check=True, capture_output=True
        )
        path = shutil.which("chromium")
    assert path is not None, "chromium is not installed and apt-get could not install it"
    return path


@pytest.fixture
def browser(chromium: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # launch() gives the browser a fresh temporary profile of its own
        b = p.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield b
        b.close()


def test_the_confirmation_page_unsubscribes_only_when_its_button_is_clicked_in_a_browser(
    web: Web, engine: Engine, browser: Any
) -> None:
    link = _unsubscribe_link(web.send("fay", "news", "news-fay"))
    page = browser.new_page()
    page.goto(link)
    assert page.title() == "Unsubscribe"
    assert _subscribed(engine, "fay")  # opening the link changed nothing
    page.click("button#unsubscribe")
    page.wait_for_selector("text=You are unsubscribed")
    assert not _subscribed(engine, "fay")
    assert web.worker.metric("nudge_unsubscribes_total", via="page") == 1


def test_the_web_role_runs_alone_exits_0_on_sigterm_and_names_a_port_in_use(
    settings: Settings, start_worker: Callable[..., Worker]
) -> None:
    port = free_port()
    start_worker("web", web_port=port)

    def answers() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/unsubscribe", timeout=5).status_code == 400
        except httpx.ConnectError:
            return False

    wait_for(answers, timeout=20, message="the web role to answer")
    busy = nudge(settings.model_copy(update={"web_port": port}), "worker", "web", timeout=60)
    assert busy.returncode == 2
    assert f"NUDGE_WEB_HOST/NUDGE_WEB_PORT: cannot listen on 127.0.0.1:{port}" in busy.stderr
    # the start_worker fixture stops the first one with SIGTERM and asserts exit 0
