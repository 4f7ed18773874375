"""Open and click tracking for email: signed tokens, and the HTML a recipient gets.

Every link of an HTML body (``<a href="http...">``) becomes ``{tracking_url}/c/{token}``,
and a 1x1 image ``{tracking_url}/o/{token}`` is added at the end; the ``web`` role serves
both. A token carries the kind (open or click), the message id, the contact id and, for a
click, the exact URL the rendered message linked to, signed with HMAC-SHA256 under
``NUDGE_TRACKING_SECRET``: the web role redirects only to a URL signed into a token, so it
is no open redirect, and a token that does not verify records nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import json
import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["o", "c"]

#: The pixel's path and the click redirect's, under the tracking URL.
OPEN_PATH, CLICK_PATH = "/o/", "/c/"

#: An ``href`` attribute of an ``<a>`` tag whose value is an absolute http(s) URL (links to
#: ``mailto:``, ``tel:`` or ``#anchors`` stay as they are).
_HREF = re.compile(
    r"""(<a\b[^>]*?\bhref\s*=\s*)(["'])(\s*https?://[^"']*)\2""",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Token:
    """What a verified token says."""

    kind: Kind
    message_id: int
    contact_id: int
    #: The link of a click (None for an open).
    url: str | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, payload: str) -> str:
    return _b64(hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest())


def sign(secret: str, token: Token) -> str:
    """The token as it goes into a URL: ``payload.signature``, both base64url."""
    fields: list[object] = [token.kind, token.message_id, token.contact_id]
    if token.url is not None:
        fields.append(token.url)
    payload = _b64(json.dumps(fields, separators=(",", ":")).encode())
    return f"{payload}.{_mac(secret, payload)}"


def verify(secret: str, text: str, kind: Kind) -> Token | None:
    """The token ``text`` says, when it is of ``kind`` and its signature holds; else None."""
    payload, dot, mac = text.partition(".")
    if not dot or not hmac.compare_digest(_mac(secret, payload), mac):
        return None
    try:
        fields = json.loads(_unb64(payload))
    except (binascii.Error, ValueError):
        return None
    match fields:
        case ["o", int(message_id), int(contact_id)] if kind == "o":
            return Token("o", message_id, contact_id)
        case ["c", int(message_id), int(contact_id), str(url)] if kind == "c":
            return Token("c", message_id, contact_id, url)
    return None


def open_url(base_url: str, secret: str, message_id: int, contact_id: int) -> str:
    """The pixel's URL for one recipient of one message."""
    return f"{base_url.rstrip('/')}{OPEN_PATH}{sign(secret, Token('o', message_id, contact_id))}"


def click_url(base_url: str, secret: str, message_id: int, contact_id: int, url: str) -> str:
    """The redirect to ``url`` for one recipient of one message."""
    token = sign(secret, Token("c", message_id, contact_id, url))
    return f"{base_url.rstrip('/')}{CLICK_PATH}{token}"


def instrument(
    body: str,
    *,
    base_url: str,
    secret: str,
    message_id: int,
    contact_id: int,
    opens: bool,
    clicks: bool,
) -> str:
    """``body`` (rendered HTML) with its links rewritten to signed redirects when ``clicks``,
    and the open pixel added when ``opens``. The signed URL is the link as a browser would
    follow it (HTML entities such as ``&amp;`` decoded)."""
    if clicks:

        def rewrite(match: re.Match[str]) -> str:
            prefix, quote, value = match.groups()
            target = html.unescape(value.strip())
            tracked = click_url(base_url, secret, message_id, contact_id, target)
            return f"{prefix}{quote}{html.escape(tracked)}{quote}"

        body = _HREF.sub(rewrite, body)
    if opens:
        pixel = (
            f'<img src="{html.escape(open_url(base_url, secret, message_id, contact_id))}" '
            'width="1" height="1" alt="" style="display:none">'
        )
        closing = body.lower().rfind("</body>")
        body = body[:closing] + pixel + body[closing:] if closing >= 0 else body + pixel
    return body
