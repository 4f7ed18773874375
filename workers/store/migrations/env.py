"""Alembic environment: runs migrations on the URL handed over by :func:`store.db.upgrade`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from workers.store.partitions import in_schema
from workers.store.schema import metadata

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "sqlalchemy.url is set by workers.store.db.alembic_config"

engine = create_engine(url, poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        compare_server_default=True,
        # partitions are created at run time, not declared in the schema
        include_object=in_schema,
    )
    with context.begin_transaction():
        # One migrator at a time, even when several pods start together.
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7342001)")
        context.run_migrations()
engine.dispose()
