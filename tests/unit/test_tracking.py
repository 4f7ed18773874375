"""Tracking tokens and the HTML a recipient gets: what is signed, what verifies, what is
rewritten."""

from __future__ import annotations

from workers import tracking
from workers.tracking import Token

SECRET = "tracking-secret-123"
BASE = "https://t.example.com"


def _token(url: str) -> str:
    return url.rpartition("/")[2]


def test_a_click_token_verifies_with_its_secret_and_kind_and_carries_the_exact_url() -> None:
    url = tracking.click_url(BASE, SECRET, 7, 42, "https://example.com/a?b=1&c=é")
    assert url.startswith(f"{BASE}/c/")
    assert tracking.verify(SECRET, _token(url), "c") == Token(
        "c", 7, 42, "https://example.com/a?b=1&c=é"
    )
    assert tracking.verify("another-secret", _token(url), "c") is None
    assert tracking.verify(SECRET, _token(url), "o") is None  # a click is not an open


def test_a_token_with_any_character_changed_does_not_verify() -> None:
    token = _token(tracking.open_url(BASE, SECRET, 7, 42))
    assert tracking.verify(SECRET, token, "o") == Token("o", 7, 42)
    for i, ch in enumerate(token):
        if ch == ".":
            continue
        changed = token[:i] + ("A" if ch != "A" else "B") + token[i + 1 :]
        assert tracking.verify(SECRET, changed, "o") is None, i
    for garbage in ("", ".", "abc", "abc.", ".abc", "!!!.???"):
        assert tracking.verify(SECRET, garbage, "o") is None


def test_links_are_rewritten_to_signed_redirects_of_what_a_browser_would_follow() -> None:
    html = (
        '<p><a class="x" href="https://example.com/?a=1&amp;b=2">one</a> '
        "<a href='http://example.com/two'>two</a> "
        '<a href="mailto:hi@example.com">mail</a> <a href="#top">top</a></p></body>'
    )
    out = tracking.instrument(
        html, base_url=BASE, secret=SECRET, message_id=1, contact_id=2, opens=True, clicks=True
    )
    assert 'href="mailto:hi@example.com"' in out
    assert 'href="#top"' in out
    assert out.count(f"{BASE}/c/") == 2
    first = out.split(f'href="{BASE}/c/', 1)[1].split('"', 1)[0]
    assert tracking.verify(SECRET, first, "c") == Token("c", 1, 2, "https://example.com/?a=1&b=2")
    # the pixel goes before </body>
    assert out.endswith('style="display:none"></body>')
    assert f'<img src="{BASE}/o/' in out


def test_a_template_that_opts_out_keeps_its_links_or_gets_no_pixel() -> None:
    html = '<a href="https://example.com/">x</a>'
    kept = tracking.instrument(
        html, base_url=BASE, secret=SECRET, message_id=1, contact_id=2, opens=True, clicks=False
    )
    assert kept.startswith(html)
    assert f"{BASE}/o/" in kept
    no_pixel = tracking.instrument(
        html, base_url=BASE, secret=SECRET, message_id=1, contact_id=2, opens=False, clicks=True
    )
    assert "<img" not in no_pixel
    assert f"{BASE}/c/" in no_pixel
