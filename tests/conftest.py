"""Fixtures: real RabbitMQ and Postgres (started by ``infra/local/servers.sh up`` if they are
not running), a fresh vhost and a database cloned from a migrated template for every test."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import subprocess
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, create_engine

from shared import amqp, delay, topology
from tests.support import MailServer, Management, Worker
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store import templates
from workers.store.db import upgrade
from workers.templating import Renderer

#: The delay backends: the ``delay_backend`` fixture, and the plugin cases' policy.
pytest_plugins = ["tests.backends"]

ROOT = Path(__file__).resolve().parent.parent
BASE = Settings.load()
#: This run's webhook, unsubscribe and tracking keys, generated: no secret is written down anywhere.
SECRET = secrets.token_urlsafe(32)
UNSUBSCRIBE_SECRET = secrets.token_urlsafe(32)
TRACKING_SECRET = secrets.token_urlsafe(32)
#: Per checkout, so that two checkouts may share one server without dropping each other's.
TEMPLATE_DB = f"nudge_test_template_{hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]}"
#: Templates every test database starts with (a message naming an unknown template is parked
#: by the scheduler), each a one-line text naming the contact.
STOCK_TEMPLATES = ("welcome", "reminder", "renewal", "flash_sale", "trial_end", "digest", "tip")

#: The tier markers of each test directory, the one place tiers are assigned: ``make test-fast``
#: deselects ``acceptance``; fault tests talk to the real servers, so they are integration too.
TIERS = {
    "unit": ("unit",),
    "integration": ("integration",),
    "acceptance": ("acceptance",),
    "faults": ("integration", "faults"),
    "cluster": ("integration", "cluster"),
    "failover": ("integration", "failover"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with the tiers of its directory under ``tests/``."""
    for item in items:
        tier = item.path.relative_to(ROOT / "tests").parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(
                f"{item.nodeid}: tests live in one of tests/{{{','.join(TIERS)}}}/"
            )
        for marker in TIERS[tier]:
            item.add_marker(marker)


def _admin_dsn(database: str = "postgres") -> str:
    parts = urllib.parse.urlsplit(BASE.database_url.replace("postgresql+psycopg", "postgresql"))
    return urllib.parse.urlunsplit(parts._replace(path=f"/{database}"))


def _db_url(database: str) -> str:
    parts = urllib.parse.urlsplit(BASE.database_url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def servers() -> None:
    """The local servers; ``up`` is idempotent and fast when they already run."""
    subprocess.run(
        ["bash", str(ROOT / "infra/local/servers.sh"), "up"], check=True, stdout=subprocess.DEVNULL
    )


@pytest.fixture(scope="session")
def template_db(servers: None) -> str:
    """A database migrated to head, cloned for each test (much faster than migrating)."""
    with psycopg.connect(_admin_dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    upgrade(_db_url(TEMPLATE_DB))
    engine = create_engine(_db_url(TEMPLATE_DB))
    try:
        with engine.begin() as conn:
            for name in STOCK_TEMPLATES:
                templates.add(conn, name, f"{name} for {{{{ contact.id }}}}", name, None)
    finally:
        engine.dispose()
    return TEMPLATE_DB


@pytest.fixture
def database_url(template_db: str) -> Iterator[str]:
    name = f"nudge_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield _db_url(name)
    with psycopg.connect(_admin_dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def management(servers: None) -> Iterator[Management]:
    m = Management(BASE.rabbitmq_mgmt_url)
    yield m
    m.close()


@pytest.fixture
def vhost(management: Management) -> Iterator[str]:
    """A fresh, empty RabbitMQ vhost: queues of other tests are invisible here."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    management.create_vhost(name)
    yield name
    management.delete_vhost(name)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink(SECRET).start()
    yield s
    s.stop()


@pytest.fixture
def mail_server() -> Iterator[MailServer]:
    """A real SMTP server for this test; the worker settings point the email channel at it."""
    m = MailServer().start()
    yield m
    m.stop()


def declared_settings(
    base: Settings,
    amqp_url: str,
    database_url: str,
    sink: Sink,
    delay_backend: delay.BackendName,
) -> Settings:
    """``base`` pointed at a test's vhost (``amqp_url``) and database, the sink and generated
    secrets, short leases and retries; the topology of ``delay_backend`` declared."""
    s = base.model_copy(
        update={
            "amqp_url": amqp_url,
            "database_url": database_url,
            "delay_backend": delay_backend,
            "webhook_url": sink.url,
            "webhook_secret": SecretStr(SECRET),
            "unsubscribe_secret": SecretStr(UNSUBSCRIBE_SECRET),
            "tracking_secret": SecretStr(TRACKING_SECRET),
            "claim_lease_seconds": 3.0,
            "retry_base_seconds": 0.5,
            "log_level": "info",
        }
    )

    async def declare() -> None:
        connection = await amqp.connect(amqp_url)
        try:
            await amqp.declare(connection, topology.build(delay_backend))
        finally:
            await connection.close()

    asyncio.run(declare())
    return s


@pytest.fixture
def settings(
    vhost: str, database_url: str, sink: Sink, delay_backend: delay.BackendName
) -> Settings:
    """Settings pointing at this test's vhost and database, with the topology of
    ``delay_backend`` declared."""
    parts = urllib.parse.urlsplit(BASE.amqp_url)
    amqp_url = urllib.parse.urlunsplit(
        parts._replace(path="/" + urllib.parse.quote(vhost, safe=""))
    )
    return declared_settings(BASE, amqp_url, database_url, sink, delay_backend)


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    e = create_engine(settings.database_url)
    yield e
    e.dispose()


@pytest.fixture
def start_worker(settings: Settings) -> Iterator[Callable[..., Worker]]:
    """Start ``nudge worker`` processes; each must exit 0 on SIGTERM at teardown."""
    started: list[Worker] = []

    def start(
        *roles: str,
        concurrency: int = 2,
        wait: bool = True,
        extra: tuple[str, ...] = (),
        **overrides: object,
    ) -> Worker:
        w = Worker(
            settings.model_copy(update=overrides),
            roles or ("scheduler", "dispatch"),
            concurrency,
            extra,
        ).start(wait=wait)
        started.append(w)
        return w

    yield start
    running = [w for w in started if w.process is not None and w.process.poll() is None]
    codes = []
    for w in running:  # stop them all before judging any (killed ones were judged already)
        assert w.process is not None
        w.process.terminate()
    for w in running:
        assert w.process is not None
        try:
            codes.append((w, w.process.wait(timeout=60)))
        except subprocess.TimeoutExpired:
            w.process.kill()
            w.process.wait(timeout=10)  # reaped here, not in a later test's garbage collection
            codes.append((w, -9))
    for w, code in codes:
        assert code == 0, f"worker exited {code} on SIGTERM:\n{w.log()}"


@pytest.fixture
def add_template(engine: Engine) -> Callable[..., int]:
    """Store a template version in this test's database (validated like ``nudge template
    add``); returns its version."""

    def add(
        name: str, text_body: str, subject: str | None = None, html_body: str | None = None
    ) -> int:
        Renderer().validate(subject, text_body, html_body)
        with engine.begin() as conn:
            return templates.add(conn, name, text_body, subject, html_body)

    return add
