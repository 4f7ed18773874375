"""Runs worker roles in one process: connect, declare the topology, consume, and shut down
cleanly on SIGTERM/SIGINT (stop consuming, finish in-flight work, exit 0)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any, Literal

import httpx
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import amqp, brokers, delay, topology
from shared.errors import BrokerError, BrokerUnavailable
from workers.channels import Sender
from workers.channels.log import LogSender
from workers.channels.smtp import SmtpConfig, SmtpSender
from workers.channels.webhook import WebhookSender
from workers.config import Settings
from workers.ratelimit import Limits, StoreSlots
from workers.roles.batches import BatchHandler
from workers.roles.dispatch import DispatchHandler
from workers.roles.events import EventsHandler
from workers.roles.planner import PlannerHandler
from workers.roles.receipts import ReceiptsHandler
from workers.roles.scheduler import SchedulerHandler
from workers.runtime import health, metrics
from workers.runtime.consumer import Consumer
from workers.runtime.control import Control
from workers.store import partitions
from workers.store.db import async_engine, check_schema
from workers.templating import Renderer
from workers.web.server import WebServer

log = structlog.get_logger("nudge.worker")

#: How long each step of a shutdown after the consumers' own grace may take (background tasks'
#: clean-up, closing the connection and the pool): a worker exits on SIGTERM within about
#: the consumers' grace plus three times this, whatever a server is doing.
STOP_SECONDS = 5.0

Role = Literal["scheduler", "dispatch", "events", "planner", "receipts", "web"]
ROLES: tuple[Role, ...] = ("scheduler", "dispatch", "events", "planner", "receipts", "web")
#: The role that serves HTTP (workers/web/) instead of consuming a queue.
WEB: Role = "web"


def build_channels(settings: Settings) -> dict[str, Sender]:
    """The delivery channels this worker's configuration enables; raises
    :class:`~shared.errors.ConfigError` when one lacks its secret."""
    settings.require_channel_secrets()
    channels: dict[str, Sender] = {"log": LogSender()}
    if settings.webhook_url:
        assert settings.webhook_secret is not None  # required above
        channels["webhook"] = WebhookSender(
            settings.webhook_url,
            settings.webhook_secret,
            timeout=settings.webhook_timeout_seconds,
            batch_size=settings.webhook_batch_size,
        )
    if settings.smtp_host:
        assert settings.unsubscribe_secret is not None  # required above
        channels["email"] = SmtpSender(
            SmtpConfig(
                host=settings.smtp_host,
                port=settings.smtp_port,
                security=settings.smtp_security,
                username=settings.smtp_username,
                password=settings.smtp_password,
                cert_bundle=settings.smtp_cert_bundle,
                sender=settings.smtp_from,
                timeout=settings.smtp_timeout_seconds,
                connections=settings.smtp_connections,
                unsubscribe_url=settings.unsubscribe_url,
                unsubscribe_secret=settings.unsubscribe_secret,
                tracking_url=settings.tracking_url,
                tracking_secret=settings.tracking_secret,
            )
        )
    return channels


async def _handlers(
    role: Role,
    settings: Settings,
    engine: AsyncEngine,
    publisher: amqp.Publisher,
    backend: delay.BackendName,
    channels: dict[str, Sender],
    connection: Any,
    background: list[asyncio.Task[None]],
) -> list[tuple[Any, bool]]:
    """The handlers of a role, one per queue it consumes, each with whether it takes one
    message at a time (planner and campaign batches: none hoarded, so a pause costs at most
    the chunk in flight per slot and other workers get the rest)."""
    if role == "scheduler":
        scheduler = SchedulerHandler(engine, publisher, backend)
        background.append(
            asyncio.create_task(scheduler.rescue_forever(settings.rescue_after_seconds))
        )
        background.append(
            asyncio.create_task(
                scheduler.partitions_forever(
                    settings.partition_maintenance_seconds,
                    settings.prune_interval_seconds,
                    partitions.Retention.of(settings),
                )
            )
        )
        return [(scheduler, False)]
    if role == "events":
        events = EventsHandler(engine, publisher)
        background.append(asyncio.create_task(events.record_progress_forever(connection)))
        return [(events, False)]
    if role == "receipts":
        return [(ReceiptsHandler(engine), False)]
    if role == "planner":
        planner = PlannerHandler(engine, publisher, backend)
        background.append(asyncio.create_task(planner.sweep_forever()))
        return [(planner, True)]
    # Every dispatch handler shares the channels, and so the rate limits and the template cache;
    # the limits' slots are the fleet's, in Postgres.
    limits = Limits(settings.rate_limits, StoreSlots(engine))
    renderer = Renderer(time_limit=settings.render_timeout_seconds)
    bulk, transactional = (
        DispatchHandler(
            settings,
            engine,
            channels,
            limits=limits,
            renderer=renderer,
            queue=queue,
            destination=destination,
        )
        for queue, destination in (
            (topology.DUE_QUEUE, topology.DUE_DESTINATION),
            (topology.DUE_TRANSACTIONAL_QUEUE, topology.DUE_TRANSACTIONAL_DESTINATION),
        )
    )
    control = Control()
    await control.listen(connection)
    batches = BatchHandler(engine, bulk.handle, publisher, backend, control)
    return [(bulk, False), (transactional, False), (batches, True)]


def _tune_gc() -> None:
    """Keep the garbage collector off the delivery path. Measured on the delays benchmark,
    the default thresholds ran about 20 full collections per worker, each walking every
    object of the imported libraries (up to 200 ms on a busy machine), and cost ~18 % of the
    workers' CPU. What exists once the worker is up (modules, engine, topology) is moved out
    of the collector's sight, and the young generation is collected every 10,000 allocations
    instead of 700; reference counting still frees everything without cycles at once."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 50)


async def run(
    settings: Settings,
    roles: Sequence[Role],
    *,
    concurrency: int,
    burst: bool = False,
    burst_idle: float = 2.0,
) -> None:
    """Run ``roles`` until SIGTERM/SIGINT, or, with ``burst``, until there is no work left
    (``burst`` is for consuming roles: the web role serves until stopped). Only the dispatch
    role delivers, so only it builds the channels and needs their secrets."""
    if "dispatch" in roles:  # before anything connects: a configuration error, not a crash
        settings.require_channel_secrets()
    if "web" in roles:
        settings.require_web_secrets()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    probes = health.Health()
    server = (
        health.serve(probes, settings.metrics_port, settings.metrics_host)
        if settings.metrics_port
        else None
    )
    beating = asyncio.create_task(probes.heartbeat())
    web: WebServer | None = None
    try:
        check_schema(settings.database_url)
        probes.check("not stopping", lambda: not stop.is_set())
        if WEB in roles:
            web = WebServer(settings)
            await web.start()
            probes.check("web", lambda: web is not None and web.serving)
        consuming = [r for r in roles if r != WEB]
        if consuming:
            await _consume(settings, consuming, stop, probes, concurrency, burst, burst_idle)
        else:
            log.info("worker started", roles=list(roles))
            await stop.wait()
            log.info("worker stopping")
    finally:
        if web is not None:
            await web.stop()
        beating.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()
    log.info("worker stopped")


async def _consume(
    settings: Settings,
    roles: Sequence[Role],
    stop: asyncio.Event,
    probes: health.Health,
    concurrency: int,
    burst: bool,
    burst_idle: float,
) -> None:
    """Consume the queues of ``roles`` until ``stop`` is set (or, with ``burst``, until
    there is no work left), then finish in-flight work."""
    connection = await amqp.connect(settings.amqp_url, name=f"nudge-{'+'.join(roles)}")
    probes.check("rabbitmq", lambda: connection.connected.is_set())
    backend = await amqp.resolve_backend(settings.delay_backend, settings.amqp_url)
    topo = topology.build(backend)
    await amqp.declare(connection, topo)
    queues = len(roles) + 2 * ("dispatch" in roles)  # dispatch consumes three queues
    # a connection per slot and queue, one spare, and one per rate limit (a limiter reserves
    # its slots with one statement at a time)
    engine = async_engine(
        settings.database_url, pool_size=concurrency * queues + 1 + len(settings.rate_limits)
    )
    publisher = await amqp.Publisher.open(connection)
    channels = build_channels(settings) if "dispatch" in roles else {}
    consumers: list[Consumer[Any]] = []
    background: list[asyncio.Task[None]] = []
    try:
        for role in roles:
            for handler, single in await _handlers(
                role, settings, engine, publisher, backend, channels, connection, background
            ):
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=concurrency if single else settings.prefetch)
                consumer: Consumer[Any] = Consumer(
                    handler,
                    amqp.QueueInbox(channel),
                    publisher,
                    backend,
                    concurrency=concurrency,
                    batch_size=1 if single else settings.batch_size,
                    batch_wait=0.0 if single else settings.batch_wait_seconds,
                    max_tries=settings.max_crash_tries,
                )
                await consumer.start()
                consumers.append(consumer)
        probes.check("consuming", lambda: bool(consumers))
        _tune_gc()
        depths = asyncio.create_task(
            _watch_depths(connection, [c.handler.queue for c in consumers])
        )
        log.info(
            "worker started",
            roles=list(roles),
            backend=backend,
            concurrency=concurrency,
            burst=burst,
        )
        if burst:
            watcher = asyncio.create_task(
                _until_drained(connection, topo, consumers, burst_idle, settings)
            )
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({watcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (watcher, stopper):
                task.cancel()
        else:
            await stop.wait()
        log.info("worker stopping")
        depths.cancel()
        for consumer in consumers:
            await consumer.stop()
    finally:
        for task in background:
            task.cancel()
        if background:  # cancelled tasks clean up (a watermark row forgotten): briefly
            done, stuck = await asyncio.wait(background, timeout=STOP_SECONDS)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved: each logs its own failures
            if stuck:
                log.warning("background tasks did not stop in time", count=len(stuck))
        # The handlers stay until the loop closes: a second SIGTERM during shutdown (from an
        # impatient supervisor) must not kill the process halfway through it.
        for ch in channels.values():
            await ch.close()
        await publisher.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), STOP_SECONDS)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(engine.dispose(), STOP_SECONDS)


async def _watch_depths(connection: Any, names: Sequence[str], every: float = 5.0) -> None:
    """Publish the depth of the queues this worker consumes as ``nudge_queue_depth``: the
    queue lag in messages, what an autoscaler scales on."""
    while True:
        try:
            for name, depth in (await amqp.queue_depths(connection, names)).items():
                metrics.queue_depth.labels(name).set(depth)
        except BrokerError as exc:  # reconnecting: the next poll will tell
            log.debug("queue depth unavailable", error=str(exc))
        await asyncio.sleep(every)


async def plugin_delayed(settings: Settings) -> int:
    """Messages waiting in the plugin's delay exchange of this vhost (``messages_delayed`` from
    the management API: AMQP cannot see them)."""
    mgmt = urllib.parse.urlsplit(settings.rabbitmq_mgmt_url)
    vhost = brokers.vhost(settings.amqp_url)
    url = (
        f"{mgmt.scheme}://{mgmt.hostname}:{mgmt.port}/api/exchanges/"
        f"{urllib.parse.quote(vhost, safe='')}/{delay.PLUGIN_EXCHANGE}"
    )
    try:
        async with httpx.AsyncClient(
            auth=(mgmt.username or "guest", mgmt.password or "guest"), timeout=10
        ) as client:
            r = await client.get(url)
            r.raise_for_status()
    except httpx.HTTPError as exc:
        raise BrokerUnavailable(f"RabbitMQ management API at {url}: {exc}") from exc
    return int(r.json().get("messages_delayed", 0))


async def _until_drained(
    connection: Any,
    topo: topology.Topology,
    consumers: Sequence[Consumer[Any]],
    idle: float,
    settings: Settings,
) -> None:
    """Return once every consumer is idle, nothing waits in our queues or the delay (ladder
    queues, or the plugin's exchange), and that has held for ``idle`` seconds."""
    watched = [c.handler.queue for c in consumers]
    due = any(c.handler.queue.startswith(topology.DUE_QUEUE) for c in consumers)
    if due:
        # what waits in the delay will come to the due queue
        watched += [q.name for q in topo.queues if q.name.startswith("nudge.delay.")]
    in_plugin = due and topo.backend == "plugin"
    quiet_since: float | None = None
    while True:
        await asyncio.sleep(0.25)
        try:
            empty = not any((await amqp.queue_depths(connection, watched)).values())
            if empty and in_plugin:
                empty = not await plugin_delayed(settings)
        except BrokerError as exc:
            if in_plugin:
                log.warning("burst: cannot tell whether the delay is empty", error=str(exc))
            empty = False
        busy = any(not c.idle or time.monotonic() - c.last_activity < idle for c in consumers)
        if empty and not busy:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= idle:
                return
        else:
            quiet_since = None
