"""The ASGI application of the ``web`` role (Starlette): unsubscribe pages, the open pixel
and click redirects, each checking its signature before it touches the store."""

from __future__ import annotations

import base64
import html
import urllib.parse

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from shared.errors import StoreError
from workers import tracking, unsubscribe
from workers.config import Settings
from workers.runtime import metrics
from workers.store import contacts
from workers.store import tracking as tracking_repo
from workers.store.db import transaction

log = structlog.get_logger("nudge.web")

#: A transparent 1x1 GIF.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")

#: Nothing a recipient reaches is cached or indexed: each load or click is counted, and a
#: signed link is personal.
_PRIVATE = {
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex",
    "Referrer-Policy": "no-referrer",
}

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 4em auto; padding: 0 1em">
<h1>{title}</h1>
{body}
</body></html>
"""


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        _PAGE.format(title=html.escape(title), body=body), status_code=status, headers=_PRIVATE
    )


def _bad_link(endpoint: str) -> HTMLResponse:
    metrics.web_rejected.labels(endpoint).inc()
    return _page(
        "This link is not valid",
        "<p>The link is incomplete or was changed. Open it again from the email.</p>",
        400,
    )


class WebApp:
    """The handlers, bound to the settings and the engine they need."""

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self._settings = settings
        settings.require_web_secrets()
        assert settings.unsubscribe_secret is not None
        assert settings.tracking_secret is not None
        self._unsubscribe_secret = settings.unsubscribe_secret.get_secret_value()
        self._tracking_secret = settings.tracking_secret.get_secret_value()
        self._engine = engine

    def routes(self) -> list[Route]:
        unsubscribe_path = urllib.parse.urlsplit(self._settings.unsubscribe_url).path
        tracking_path = urllib.parse.urlsplit(self._settings.tracking_url or "").path.rstrip("/")
        return [
            Route(unsubscribe_path or "/unsubscribe", self.confirm, methods=["GET"]),
            Route(unsubscribe_path or "/unsubscribe", self.unsubscribe, methods=["POST"]),
            Route(f"{tracking_path}{tracking.OPEN_PATH}{{token}}", self.opened, methods=["GET"]),
            Route(f"{tracking_path}{tracking.CLICK_PATH}{{token}}", self.clicked, methods=["GET"]),
        ]

    def _signed(self, request: Request) -> tuple[str, int] | None:
        """The contact and message of a signed unsubscribe link, or None."""
        return unsubscribe.signed(self._unsubscribe_secret, str(request.url))

    async def confirm(self, request: Request) -> Response:
        """The confirmation page: a button that POSTs the same signed URL."""
        if self._signed(request) is None:
            return _bad_link("unsubscribe")
        action = html.escape(f"{request.url.path}?{request.url.query}")
        return _page(
            "Unsubscribe",
            "<p>Stop receiving these emails?</p>"
            f'<form method="post" action="{action}">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit" id="unsubscribe">Unsubscribe</button>'
            "</form>",
        )

    async def unsubscribe(self, request: Request) -> Response:
        """RFC 8058 one-click: the signed URL alone decides, so a mail provider's POST (with
        ``List-Unsubscribe=One-Click`` in its body) and the confirmation page's button both
        unsubscribe at once."""
        signed = self._signed(request)
        if signed is None:
            return _bad_link("unsubscribe")
        contact, message_id = signed
        via = "page" if "text/html" in request.headers.get("accept", "") else "one-click"
        async with transaction(self._engine) as conn:
            found = await contacts.unsubscribe(conn, contact, message_id)
        if not found:
            metrics.web_rejected.labels("unsubscribe").inc()
            return _page("Not found", "<p>There is no such subscriber any more.</p>", 404)
        metrics.unsubscribes.labels(via).inc()
        log.info("unsubscribed", contact=contact, message_id=message_id, via=via)
        return _page("You are unsubscribed", "<p>You will not receive these emails again.</p>")

    async def opened(self, request: Request) -> Response:
        token = tracking.verify(self._tracking_secret, request.path_params["token"], "o")
        if token is None:
            metrics.web_rejected.labels("open").inc()
            return Response(status_code=400, headers=_PRIVATE)
        async with transaction(self._engine) as conn:
            first = await tracking_repo.record_open(conn, token.message_id, token.contact_id)
        if first is None:
            metrics.web_rejected.labels("open").inc()
            return Response(status_code=404, headers=_PRIVATE)
        metrics.email_opens.labels(str(first).lower()).inc()
        return Response(PIXEL, media_type="image/gif", headers=_PRIVATE)

    async def clicked(self, request: Request) -> Response:
        token = tracking.verify(self._tracking_secret, request.path_params["token"], "c")
        if token is None or token.url is None:
            metrics.web_rejected.labels("click").inc()
            return _page("This link is not valid", "<p>The link was changed or cut.</p>", 400)
        async with transaction(self._engine) as conn:
            found = await tracking_repo.record_click(
                conn, token.message_id, token.contact_id, token.url
            )
        if not found:
            metrics.web_rejected.labels("click").inc()
            return _page("Not found", "<p>This link belongs to no message.</p>", 404)
        metrics.email_clicks.inc()
        return RedirectResponse(token.url, status_code=302, headers=_PRIVATE)


async def _store_failed(request: Request, exc: Exception) -> Response:
    log.warning("store unavailable", path=request.url.path, error=str(exc))
    return Response("the store is unavailable, try again", status_code=503)


def build(settings: Settings, engine: AsyncEngine) -> Starlette:
    """The application for ``settings``, using ``engine`` for the store."""
    return Starlette(
        routes=WebApp(settings, engine).routes(),
        exception_handlers={StoreError: _store_failed},
    )
