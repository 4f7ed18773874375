"""The ``web`` role: the HTTP endpoints recipients reach from an email.

- ``GET  {unsubscribe path}?c=&m=&sig=``: a confirmation page with a button (a GET alone never
  unsubscribes: link scanners follow links);
- ``POST {unsubscribe path}?c=&m=&sig=``: RFC 8058 one-click unsubscribe, answered at once;
- ``GET  {tracking path}/o/{token}``: the open pixel;
- ``GET  {tracking path}/c/{token}``: a click, redirected to the link signed into the token.

Only signed links are honoured; anything else gets a 4xx and records nothing.
:mod:`workers.web.app` is the ASGI application (Starlette), :mod:`workers.web.server` runs
it with uvicorn inside a worker process.
"""
