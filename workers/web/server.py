"""Runs the web application with uvicorn inside a worker process, under the runner's
lifecycle: the runner owns the signals (SIGTERM stops the server with the rest of the
worker), and the listening socket is bound here so that a port in use is a clear error."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import structlog
import uvicorn

from shared.errors import ConfigError
from workers.config import Settings
from workers.store.db import async_engine
from workers.web.app import build

log = structlog.get_logger("nudge.web")


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: it would take SIGTERM from the runner
    and raise it again once stopped, turning a clean exit 0 into death by signal."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebServer:
    """The ``web`` role's HTTP server on ``NUDGE_WEB_HOST``:``NUDGE_WEB_PORT``."""

    def __init__(self, settings: Settings, *, pool_size: int = 4) -> None:
        self._settings = settings
        self._engine = async_engine(settings.database_url, pool_size=pool_size)
        config = uvicorn.Config(
            build(settings, self._engine),
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=10,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool:
        return self._server.started and self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Listen and serve; raises :class:`ConfigError` when the address cannot be bound."""
        host, port = self._settings.web_host, self._settings.web_port
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"NUDGE_WEB_HOST/NUDGE_WEB_PORT: cannot listen on {host}:{port} "
                f"({exc.strerror}); choose a free port"
            ) from exc
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise ConfigError(f"the web server on {host}:{port} stopped while starting")
            await asyncio.sleep(0.01)
        log.info("web serving", host=host, port=port)

    async def stop(self) -> None:
        """Stop accepting, finish the requests in flight, close the store's connections."""
        if self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
        await self._engine.dispose()
