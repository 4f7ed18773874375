"""Signed unsubscribe links: the ``List-Unsubscribe`` header of every email.

The link carries the contact's external id, the message id and ``sig``, an HMAC-SHA256 of both
with ``NUDGE_UNSUBSCRIBE_SECRET``; the ``web`` role serves the link and checks it with
:func:`signed`, so nobody can unsubscribe someone else by guessing ids.
"""

from __future__ import annotations

import hashlib
import hmac
import urllib.parse


def signature(secret: str, contact: str, message_id: int) -> str:
    """The ``sig`` parameter for ``contact`` and ``message_id``."""
    mac = hmac.new(secret.encode(), f"{contact}\n{message_id}".encode(), hashlib.sha256)
    return mac.hexdigest()


def link(base_url: str, secret: str, contact: str, message_id: int) -> str:
    """The unsubscribe URL for one recipient of one message."""
    query = urllib.parse.urlencode(
        {"c": contact, "m": message_id, "sig": signature(secret, contact, message_id)}
    )
    return f"{base_url}{'&' if '?' in base_url else '?'}{query}"


def signed(secret: str, url: str) -> tuple[str, int] | None:
    """The contact's external id and the message id when ``url`` carries a valid signature,
    else ``None``."""
    params = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    try:
        contact, message_id, sig = params["c"][0], int(params["m"][0]), params["sig"][0]
    except (KeyError, IndexError, ValueError):
        return None
    if hmac.compare_digest(signature(secret, contact, message_id), sig):
        return contact, message_id
    return None


def verify(secret: str, url: str) -> str | None:
    """The contact's external id when ``url`` carries a valid signature, else ``None``."""
    found = signed(secret, url)
    return found[0] if found is not None else None
